"""InfiniTransformer: a transformer block around CompressiveMemory."""

import numbers

import keras

from keras_infini.layers._outputs import StatefulOutputsMixin
from keras_infini.layers.activations import get_activation
from keras_infini.layers.compressive_memory import CompressiveMemory
from keras_infini.layers.compressive_memory import check_positive_int
from keras_infini.layers.compressive_memory import resolve_positional_embedder


def check_dropout(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"Invalid dropout={value!r}: expected a number in [0, 1).")


def check_layer_norm_epsilon(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(
            f"Invalid layer_norm_epsilon={value!r}: expected a number greater than 0."
        )


@keras.saving.register_keras_serializable(package="keras_infini")
class InfiniTransformer(StatefulOutputsMixin, keras.layers.Layer):
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

    Sublayers (public attributes): `attention` (the `CompressiveMemory`), `attention_norm`
    (LN1), `mlp_norm` (LN2), `mlp_in`, `mlp_activation`, `mlp_out`.

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
            `"gelu"`, `"abs"`, `"swish"`, `"swiglu"`, `"geglu"`, `"ffnglu"`,
            `"ffngeglu"`, `"ffnswiglu"`).
        segment_len: tokens per memory segment.
        update: `"linear"` or `"delta"` memory update.
        causal: causal attention inside each segment.
        positional_embedder: `None`, `"rope"`, or a `RoPEEmbeddings` / `YaRNEmbeddings`.
        init_state_learnable: learn the initial memory and normaliser.
        dropout: dropout rate after attention and after the MLP, in `[0, 1)`.
        normalize_first: pre-norm (`True`) or post-norm (`False`).
        layer_norm_epsilon: epsilon of both `LayerNormalization`s.
        return_state: also return the attention's final `(memory, norm)`.
        memory_feature_map, write_strength, gate_init, gate_lr_scale: memory options of
            `attention`, see `CompressiveMemory` (defaults: the paper's layer).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, seq_len, dim_input)`.
        mask, positions, initial_state: passed to `attention` (see `CompressiveMemory`).
        training: enables dropout.
        return_state: optional per-call override of the constructor's `return_state`.

    Example:

    >>> import keras
    >>> from keras_infini import InfiniTransformer
    >>> block = InfiniTransformer(32, 64, 8, 8, 4, "swiglu", segment_len=16,
    ...                           causal=True, positional_embedder="rope")
    >>> tuple(block(keras.random.normal((2, 40, 32))).shape)
    (2, 40, 32)
    """

    def __init__(
        self,
        dim_input,
        dim_hidden,
        dim_key,
        dim_value,
        num_heads,
        activation,
        segment_len,
        update="linear",
        causal=False,
        positional_embedder=None,
        init_state_learnable=False,
        dropout=0.0,
        normalize_first=True,
        layer_norm_epsilon=1e-5,
        return_state=False,
        memory_feature_map="elu1",
        write_strength=False,
        gate_init=0.0,
        gate_lr_scale=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("dim_input", dim_input, allow_none=True)
        check_positive_int("dim_hidden", dim_hidden)
        check_positive_int("dim_key", dim_key)
        check_positive_int("segment_len", segment_len)
        check_dropout(dropout)
        check_layer_norm_epsilon(layer_norm_epsilon)
        self.dim_input = None if dim_input is None else int(dim_input)
        self.dim_hidden = int(dim_hidden)
        self.dim_key = dim_key
        self.dim_value = dim_value
        self.num_heads = num_heads
        self.activation = activation
        self.segment_len = int(segment_len)
        self.update = update
        self.causal = causal
        self._embedder_arg = positional_embedder
        self.init_state_learnable = init_state_learnable
        self.dropout = float(dropout)
        self.normalize_first = bool(normalize_first)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.return_state = bool(return_state)
        self.supports_masking = True

        # Sublayers whose constructors validate the remaining arguments now, not at build.
        embedder = resolve_positional_embedder(
            positional_embedder, dim_key, self.embedder_seq_len()
        )
        self.attention = CompressiveMemory(
            dim_input,
            dim_key,
            dim_value,
            num_heads,
            self.attention_segment_len(),
            update=update,
            causal=causal,
            positional_embedder=embedder,
            init_state_learnable=init_state_learnable,
            return_state=True,
            memory_feature_map=memory_feature_map,
            write_strength=write_strength,
            gate_init=gate_init,
            gate_lr_scale=gate_lr_scale,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.mlp_activation = get_activation(activation, self.dim_hidden)
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="attention_norm"
        )
        self.mlp_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="mlp_norm"
        )
        self.mlp_in = keras.layers.Dense(self.dim_hidden, dtype=self.dtype_policy, name="mlp_in")
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.mlp_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def attention_segment_len(self):
        """Segment length of the inner `CompressiveMemory`."""
        return self.segment_len

    def embedder_seq_len(self):
        """Sequence length the positional embedder is built for."""
        return self.segment_len

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                f"{type(self).__name__} expects inputs of rank 3 (batch, seq_len, "
                f"dim_input); received inputs with shape {tuple(input_shape)}."
            )
        if self.dim_input is None:
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
        self.mlp_out = keras.layers.Dense(self.dim_input, dtype=self.dtype_policy, name="mlp_out")
        self.mlp_out.build((None, None, self.dim_hidden))
        # Checked on every call once built: wrong rank or width -> ValueError.
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: self.dim_input})
        self.built = True

    def mlp(self, x):
        return self.mlp_out(self.mlp_activation(self.mlp_in(x)))

    def block(self, x, mask=None, positions=None, initial_state=None, training=None):
        """The block's math; returns `(outputs, memory, norm)`."""

        def attend(t):
            return self.attention(
                t, mask=mask, positions=positions, initial_state=initial_state,
                training=training,
            )

        if self.normalize_first:
            attended, memory, norm = attend(self.attention_norm(x))
            h = x + self.attention_dropout(attended, training=training)
            y = h + self.mlp_dropout(self.mlp(self.mlp_norm(h)), training=training)
        else:
            attended, memory, norm = attend(x)
            h = self.attention_norm(x + self.attention_dropout(attended, training=training))
            y = self.mlp_norm(h + self.mlp_dropout(self.mlp(h), training=training))
        return y, memory, norm

    def call(
        self,
        inputs,
        mask=None,
        positions=None,
        initial_state=None,
        training=None,
        return_state=None,
    ):
        if not keras.backend.is_float_dtype(keras.backend.standardize_dtype(inputs.dtype)):
            inputs = keras.ops.cast(inputs, self.compute_dtype)  # integer inputs
        outputs, memory, norm = self.block(inputs, mask, positions, initial_state, training)
        return self.pack_outputs(outputs, [], memory, norm, return_state)


    def get_config(self):
        config = super().get_config()
        embedder = self._embedder_arg
        if embedder is not None and not isinstance(embedder, str):
            embedder = keras.saving.serialize_keras_object(embedder)
        config.update(
            {
                "dim_input": self.dim_input,
                "dim_hidden": self.dim_hidden,
                "dim_key": self.dim_key,
                "dim_value": self.dim_value,
                "num_heads": self.num_heads,
                "activation": self.activation,
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
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        embedder = config.get("positional_embedder")
        if isinstance(embedder, dict):
            config["positional_embedder"] = keras.saving.deserialize_keras_object(embedder)
        return cls(**config)
