"""InfiniTransformer: a transformer block around CompressiveMemory."""

import keras

from keras_infini import validation
from keras_infini.layers import _cache
from keras_infini.layers._cache import CachedCallMixin
from keras_infini.layers._outputs import StatefulOutputsMixin
from keras_infini.layers._weights import WeightArgsMixin
from keras_infini.layers.activations import get_activation
from keras_infini.layers.compressive_memory import CompressiveMemory
from keras_infini.layers.compressive_memory import resolve_positional_embedder
from keras_infini.layers.rotary import RoPEEmbeddings
from keras_infini.layers._aliases import keras_hub_names


def named_positional_embedder(positional_embedder, dim_key, seq_len):
    """`resolve_positional_embedder`, with the layer built for `"rope"` named
    `positional_embedder` (a deterministic sublayer name, not `ro_pe_embeddings_3`)."""
    if isinstance(positional_embedder, str) and positional_embedder == "rope":
        return RoPEEmbeddings(dim=dim_key, name="positional_embedder")
    return resolve_positional_embedder(positional_embedder, dim_key, seq_len)


@keras.saving.register_keras_serializable(package="keras_infini")
class InfiniTransformer(CachedCallMixin, StatefulOutputsMixin, WeightArgsMixin,
                        keras.layers.Layer):
    """Transformer block: Infini-attention (`CompressiveMemory`) and a gated-activation MLP.

    With `normalize_first=True` (pre-norm, default):

        h = x + Dropout(Attn(LN1(x)))
        y = h + Dropout(MLP(LN2(h)))

    and with `normalize_first=False` (post-norm):

        h = LN1(x + Dropout(Attn(x)))
        y = LN2(h + Dropout(MLP(h)))

    where `MLP(t) = Dense_out(act(Dense_in(t)))`, `Dense_in` maps to `dim_hidden` (with
    bias), `act` is the named activation at width `dim_hidden` (see
    `keras_infini.layers.activations`) and `Dense_out` maps back to `dim_input`.

    Sublayers (public attributes, each named like its attribute): `attention` (the
    `CompressiveMemory`), `attention_norm` (LN1), `mlp_norm` (LN2), `mlp_in`,
    `mlp_activation`, `mlp_out`, `attention_dropout`, `mlp_dropout`.

    Keras masks, `positions`, `initial_state` and `return_state` pass through to
    `attention`, so stacks of blocks can stream over unbounded input by carrying each
    block's `(memory, norm)`.

    Args:
        dim_input: model width, or `None` to take it from the input at build time.
        dim_hidden: MLP hidden width.
        dim_key: per-head key width.
        dim_value: per-head value width.
        num_heads: attention heads.
        activation: MLP activation name: one of `keras_infini.ACTIVATIONS` (`"relu"`,
            `"gelu"`, `"abs"`, `"silu"`, `"swish"`, `"swiglu"`, `"geglu"`, `"ffnglu"`,
            `"ffngeglu"`, `"ffnswiglu"`), or a callable (see `get_activation`; saved with
            `keras.saving.serialize_keras_object`).
        segment_len: tokens per memory segment.
        update: `"linear"` or `"delta"` memory update.
        causal: causal attention inside each segment.
        positional_embedder: `None`, `"rope"`, or a `RoPEEmbeddings` / `YaRNEmbeddings`.
        init_state_learnable: learn the initial memory and normaliser.
        dropout: dropout rate after attention and after the MLP, in `[0, 1)`.
        normalize_first: pre-norm (`True`) or post-norm (`False`).
        layer_norm_epsilon: epsilon of both `LayerNormalization`s.
        return_state: also return the attention's final `(memory, norm)`.
        kernel_initializer: and `bias_initializer`, `kernel_regularizer`, `bias_regularizer`,
            `kernel_constraint`, `bias_constraint`: for every projection (attention
            query/key/value/output kernels, MLP `mlp_in`/`mlp_out` kernels and biases), each
            sublayer getting its own clone, as in Keras' `MultiHeadAttention`.
        memory_feature_map, write_strength, gate_init, gate_lr_scale, memory_decay: memory
            options of `attention`, see `CompressiveMemory` (defaults: the paper's layer).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, seq_len, dim_input)`.
        mask, positions, initial_state: passed to `attention` (see `CompressiveMemory`).
        training: enables dropout.
        return_state: optional per-call override of the constructor's `return_state`.
        cache, cache_update_index: decode with a cache from `build_cache(batch_size)`
            (causal blocks): returns `(outputs, cache)`, equal to one full call on the
            whole sequence; see `CompressiveMemory` (the cache is the attention's).

    Example:

    >>> import keras
    >>> from keras_infini import InfiniTransformer
    >>> block = InfiniTransformer(32, 64, 8, 8, 4, "swiglu", segment_len=16,
    ...                           causal=True, positional_embedder="rope")
    >>> tuple(block(keras.random.normal((2, 40, 32))).shape)
    (2, 40, 32)
    """

    @keras_hub_names
    def __init__(
        self, dim_input, dim_hidden, dim_key, dim_value, num_heads, activation, segment_len,
        update="linear", causal=False, positional_embedder=None, init_state_learnable=False,
        dropout=0.0, normalize_first=True, layer_norm_epsilon=1e-5, return_state=False,
        memory_feature_map="elu1", write_strength=False, gate_init=0.0, gate_lr_scale=1.0,
        memory_decay=False, num_key_value_heads=None, memory_heads="key_value",
        memory_gate="sigmoid", **kwargs,
    ):
        kwargs = self.set_weight_args(kwargs, with_bias=True)
        super().__init__(**kwargs)
        self.dim_input = validation.positive_int("dim_input", dim_input, allow_none=True)
        self.dim_hidden = validation.positive_int("dim_hidden", dim_hidden)
        self.dim_key = validation.positive_int("dim_key", dim_key)
        self.dim_value = validation.positive_int("dim_value", dim_value)
        self.num_heads = validation.positive_int("num_heads", num_heads)
        if isinstance(activation, dict):  # a serialised callable, from get_config()
            activation = keras.saving.deserialize_keras_object(activation)
        self.activation = activation
        self.segment_len = validation.positive_int("segment_len", segment_len)
        self.update = update
        self.causal = validation.boolean("causal", causal)
        self._embedder_arg = positional_embedder
        self.init_state_learnable = validation.boolean(
            "init_state_learnable", init_state_learnable
        )
        self.dropout = float(validation.rate("dropout", dropout))
        self.normalize_first = validation.boolean("normalize_first", normalize_first)
        self.layer_norm_epsilon = float(
            validation.positive_real("layer_norm_epsilon", layer_norm_epsilon)
        )
        self.return_state = validation.boolean("return_state", return_state)
        self.supports_masking = True

        # Sublayers whose constructors validate the remaining arguments now, not at build.
        embedder = named_positional_embedder(positional_embedder, dim_key, self.segment_len)
        self.attention = CompressiveMemory(
            dim_input,
            dim_key,
            dim_value,
            num_heads,
            self.segment_len,
            update=update,
            causal=causal,
            positional_embedder=embedder,
            init_state_learnable=init_state_learnable,
            return_state=True,
            memory_feature_map=memory_feature_map,
            write_strength=write_strength,
            gate_init=gate_init,
            gate_lr_scale=gate_lr_scale,
            memory_decay=memory_decay,
            num_key_value_heads=num_key_value_heads,
            memory_heads=memory_heads,
            memory_gate=memory_gate,
            dtype=self.dtype_policy,
            name="attention",
            **self.weight_kwargs(bias=False),
        )
        self.mlp_activation = get_activation(activation, self.dim_hidden, name="mlp_activation")
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="attention_norm"
        )
        self.mlp_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="mlp_norm"
        )
        self.mlp_in = keras.layers.Dense(
            self.dim_hidden, dtype=self.dtype_policy, name="mlp_in", **self.weight_kwargs()
        )
        self.attention_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="attention_dropout"
        )
        self.mlp_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="mlp_dropout"
        )

    @property
    def memory_dim(self):
        """The memory's key width (`dim_key`, or the "dpfp*" / "taylor" feature width)."""
        return self.attention.memory_dim

    @property
    def num_memory_heads(self):
        """Heads of the memory state (`num_key_value_heads` or `num_heads`)."""
        return self.attention.num_memory_heads

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                f"{type(self).__name__} expects inputs of rank 3 (batch, seq_len, "
                f"dim_input); received inputs with shape {tuple(input_shape)}."
            )
        if self.dim_input is None:
            if input_shape[-1] is None:
                raise ValueError(
                    f"{type(self).__name__}(dim_input=None) takes its width from the last "
                    f"axis of the inputs, which is unknown in input shape "
                    f"{tuple(input_shape)}; pass dim_input or give the inputs a known last "
                    "axis."
                )
            self.dim_input = int(input_shape[-1])
        elif input_shape[-1] is not None and int(input_shape[-1]) != self.dim_input:
            raise ValueError(
                f"Invalid inputs: last axis {input_shape[-1]} does not match "
                f"dim_input={self.dim_input}."
            )
        shape = (None, None, self.dim_input)
        self.attention.build(shape)
        self.attention_norm.build(shape)
        self.mlp_norm.build(shape)
        self.mlp_in.build(shape)
        self.mlp_activation.build((None, None, self.dim_hidden))
        self.mlp_out = keras.layers.Dense(
            self.dim_input, dtype=self.dtype_policy, name="mlp_out", **self.weight_kwargs()
        )
        self.mlp_out.build((None, None, self.dim_hidden))
        # Checked on every call once built: wrong rank or width -> ValueError.
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: self.dim_input})
        self.built = True

    def mlp(self, x):
        return self.mlp_out(self.mlp_activation(self.mlp_in(x)))

    def block(self, x, mask=None, positions=None, initial_state=None, training=None):
        """The block's math; returns `(outputs, memory, norm)`."""

        def attend(t):
            attended, memory, norm = self.attention(
                t, mask=mask, positions=positions, initial_state=initial_state,
                training=training,
            )
            return attended, (memory, norm)

        y, (memory, norm) = self._residual(x, attend, training)
        return y, memory, norm

    def _residual(self, x, attend, training=None):
        """Norms, residuals and MLP around `attend(t) -> (attended, extra)`; returns
        `(outputs, extra)`. One definition for the full call and the cached calls."""
        if self.normalize_first:
            attended, extra = attend(self.attention_norm(x))
            h = x + self.attention_dropout(attended, training=training)
            y = h + self.mlp_dropout(self.mlp(self.mlp_norm(h)), training=training)
        else:
            attended, extra = attend(x)
            h = self.attention_norm(x + self.attention_dropout(attended, training=training))
            y = self.mlp_norm(h + self.mlp_dropout(self.mlp(h), training=training))
        return y, extra

    # ------------------------------------------------------------------ decode cache
    def cache_shapes(self, batch_size):
        """`{name: shape}` of the cache `build_cache(batch_size)` returns."""
        return self.attention.cache_shapes(batch_size)

    def cache_dtypes(self):
        """`{name: dtype}` of the cache `build_cache` returns."""
        return self.attention.cache_dtypes()

    def build_cache(self, batch_size):
        """An empty decode cache for `batch_size` rows: the attention's (see
        `CompressiveMemory.build_cache`)."""
        batch_size = validation.positive_int("batch_size", batch_size)
        self._require_causal()
        self._ensure_built()
        return self.attention.build_cache(batch_size)

    def _cached_call(self, inputs, mask, cache, cache_update_index, positions=None,
                     initial_state=None, return_state=None):
        index, mask, cache = self._check_cache_call(
            inputs, cache, cache_update_index, positions, initial_state, return_state, mask
        )
        x = keras.ops.cast(inputs, self.compute_dtype)
        if int(inputs.shape[1]) == 0:
            return x, cache
        consumed = _cache.consumed_tokens(inputs, mask)
        _cache.check_cache_position(index, cache["length"], consumed[:, 0])
        return self._cached(x, consumed, cache, index)

    def _cached(self, x, consumed, cache, index):
        x = keras.ops.where(consumed[..., None], x, keras.ops.zeros_like(x))
        return self._residual(
            x, lambda t: self.attention._cached(t, consumed, cache, index), training=False
        )

    def _decode_step(self, x, cache, take, write, slot, position, fold_now):
        """`CompressiveMemory._decode_step` inside the block (one token)."""
        keep = keras.ops.logical_and(keras.ops.cast(take, "bool"),
                                     keras.ops.cast(write, "bool"))[:, None, None]
        x = keras.ops.where(keep, x, keras.ops.zeros_like(x))
        return self._residual(
            x,
            lambda t: self.attention._decode_step(t, cache, take, write, slot, position,
                                                  fold_now),
            training=False,
        )

    def _prefill(self, x, valid, positions, stop, count, cache):
        """`CompressiveMemory._prefill` inside the block (whole segments)."""
        x = keras.ops.where(valid[..., None], x, keras.ops.zeros_like(x))
        return self._residual(
            x,
            lambda t: self.attention._prefill(t, valid, positions, stop, count, cache),
            training=False,
        )

    def _prefill_segment(self, x, valid, cache, positions=None, count=None, fold=None):
        """`CompressiveMemory._prefill_segment` inside the block (one segment)."""
        x = keras.ops.cast(x, self.compute_dtype)
        x = keras.ops.where(valid[..., None], x, keras.ops.zeros_like(x))
        return self._residual(
            x,
            lambda t: self.attention._prefill_segment(t, valid, cache, positions, count,
                                                      fold),
            training=False,
        )

    def call(self, inputs, mask=None, positions=None, initial_state=None, training=None,
             return_state=None, cache=None, cache_update_index=None):
        if cache is not None:  # decoding: the attention's cache, see CompressiveMemory
            return self._cached_call(
                inputs, mask, cache, cache_update_index, positions=positions,
                initial_state=initial_state, return_state=return_state,
            )
        mask = validation.sequence_tensor("mask", mask, inputs)
        if not keras.backend.is_float_dtype(keras.backend.standardize_dtype(inputs.dtype)):
            inputs = keras.ops.cast(inputs, self.compute_dtype)  # integer inputs
        if mask is not None:
            # Masked tokens enter nothing, whatever their value (NaN, inf), weight gradients
            # included: a masked token's output is the block's output for a zero input.
            keep = keras.ops.cast(mask, "bool")[..., None]
            inputs = keras.ops.where(keep, inputs, keras.ops.zeros_like(inputs))
        outputs, memory, norm = self.block(inputs, mask, positions, initial_state, training)
        return self.pack_outputs(outputs, [], memory, norm, return_state)


    def get_config(self):
        config = super().get_config()
        config.update(self.weight_config())
        embedder = self.embedder_config()
        config.update(
            {
                "dim_input": self.dim_input,
                "dim_hidden": self.dim_hidden,
                "dim_key": self.dim_key,
                "dim_value": self.dim_value,
                "num_heads": self.num_heads,
                "activation": (
                    self.activation
                    if isinstance(self.activation, str)
                    else keras.saving.serialize_keras_object(self.activation)
                ),
                "segment_len": self.segment_len,
                "update": self.update,
                "causal": self.causal,
                "positional_embedder": embedder,
                "init_state_learnable": self.init_state_learnable,
                "dropout": self.dropout,
                "normalize_first": self.normalize_first,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "return_state": self.return_state,
                "memory_feature_map": self.attention.memory_feature_map,
                "write_strength": self.attention.write_strength,
                "gate_init": self.attention.gate_init,
                "gate_lr_scale": self.attention.gate_lr_scale,
                "memory_decay": self.attention.memory_decay,
                "num_key_value_heads": self.attention.num_key_value_heads,
                "memory_heads": self.attention.memory_heads,
                "memory_gate": self.attention.memory_gate,
            }
        )
        return config
