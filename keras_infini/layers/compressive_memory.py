"""CompressiveMemory: Infini-attention (arXiv 2404.07143) as a Keras 3 layer."""

import keras
import numpy as np
from keras import ops

from keras_infini.layers._cache import CachedCallMixin
from keras_infini.layers import _cache
from keras_infini.layers._outputs import StatefulOutputsMixin
from keras_infini.layers._weights import WeightArgsMixin
from keras_infini.ops import backend as fast_paths
from keras_infini.layers.rotary import RoPEEmbeddings
from keras_infini.ops import attention as attention_ops
from keras_infini.ops import loops
from keras_infini.ops import memory as memory_ops
from keras_infini.ops import segments as segment_ops
from keras_infini import distribution
from keras_infini import validation
from keras_infini.layers._aliases import keras_hub_names

UPDATES = ("linear", "delta")
MEMORY_HEADS = ("key_value", "query")
MEMORY_GATES = ("sigmoid", "tanh")


def _decay_bias_initializer(shape, dtype=None):
    """`b_h` with `softplus(b_h)` log-spaced over [0.001, 0.1] across the heads
    (`memory_decay`; Mamba-2's / Gated DeltaNet's range of time steps)."""
    heads = int(shape[0])
    steps = np.exp(np.linspace(np.log(1e-3), np.log(1e-1), heads))
    return ops.convert_to_tensor(np.log(np.expm1(steps)), dtype or "float32")


def _serialize_layer(layer):
    return None if layer is None else keras.saving.serialize_keras_object(layer)


def _heads(dense, x):
    """A q/k/v projection of folded tokens `(b, n, S, D)` as `(b, n, h, S, d)`."""
    return ops.swapaxes(dense(x), 2, 3)


def _fold_now(position, segment_len):
    """Whether the token at in-segment `position` (int or tensor) ends its segment."""
    if isinstance(position, int):
        return position == segment_len - 1
    return position == segment_len - 1


def _rows_taking(count, new_cache, cache):
    """`new_cache` for the rows that take tokens (`count > 0`); a row that takes none keeps
    its `cache` (it may hold a partial segment)."""
    takes = ops.cast(count, "int32") > 0
    return {
        name: ops.where(ops.reshape(takes, (-1,) + (1,) * (len(t.shape) - 1)), t,
                        cache[name])
        for name, t in new_cache.items()
    }


def resolve_positional_embedder(positional_embedder, dim_key, segment_len):
    """Turns the `positional_embedder` argument into an embedder layer or None."""
    if positional_embedder is None:
        return None
    if isinstance(positional_embedder, str):
        if positional_embedder == "rope":
            return RoPEEmbeddings(dim=dim_key, name="positional_embedder")
        if positional_embedder == "yarn":
            raise ValueError(
                "Invalid positional_embedder='yarn': YaRN needs its context lengths. Pass "
                "positional_embedder=YaRNEmbeddings(dim=dim_key, seq_len=segment_len, "
                "context_len=..., context_len_ext=...) instead."
            )
        raise ValueError(
            f"Invalid positional_embedder={positional_embedder!r}: expected None, 'rope', "
            "or a RoPEEmbeddings / YaRNEmbeddings instance."
        )
    if isinstance(positional_embedder, dict):
        positional_embedder = keras.saving.deserialize_keras_object(positional_embedder)
    # RoPE / YaRN, or any layer that declares the same call (`x (..., S, dim)`,
    # `positions=` broadcastable to `x.shape[:-1]`) and a `dim` (e.g. the adapter of a
    # keras-hub rotary embedding in `keras_infini.models`).
    if not (isinstance(positional_embedder, RoPEEmbeddings)
            or getattr(positional_embedder, "keras_infini_positional_embedder", False)):
        raise ValueError(
            f"Invalid positional_embedder={positional_embedder!r}: expected None, 'rope', "
            "or a RoPEEmbeddings / YaRNEmbeddings instance."
        )
    if positional_embedder.dim != dim_key:
        raise ValueError(
            f"Invalid positional_embedder: its dim={positional_embedder.dim} must equal "
            f"dim_key={dim_key}."
        )
    return positional_embedder


@keras.saving.register_keras_serializable(package="keras_infini")
class CompressiveMemory(CachedCallMixin, StatefulOutputsMixin, WeightArgsMixin,
                        keras.layers.Layer):
    """Infini-attention: local softmax attention plus a compressive memory across segments.

    The input is split into segments of `segment_len` tokens. Inside a segment every
    head does exact (optionally causal) softmax attention; across segments it reads from
    and writes to a fixed-size memory `M` `(dim_key, dim_value)` with normaliser `z`
    (Munkhdalai et al. 2024, eqs. 3-10), so memory use does not grow with the length:

        A_dot = softmax(Q' K'^T / sqrt(dim_key) + mask) V          (Q', K' rotated)
        A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1} + eps)         sigma = elu + 1
        linear: M_s = M_{s-1} + sigma(K)^T V
        delta:  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1} + eps))
        z_s = z_{s-1} + sum_t sigma(K_t)
        A = sigmoid(gate) * A_mem + (1 - sigmoid(gate)) * A_dot

    Heads are concatenated and projected back to `dim_input`. Nothing loops over segments
    in Python: local attention runs on all segments at once, the `linear` memory state
    before each segment is an exclusive cumulative sum, and the `delta` recurrence is an
    `ops.scan` (JAX, torch) or a bounded `tf.while_loop` (TensorFlow, differentiable
    under XLA); a parallel associative scan is available in `ops.memory`.
    Memory, normaliser and retrieval are float32 under any dtype policy.

    Sequences of any length work: the layer pads to a multiple of `segment_len`, masks
    the padding and trims the output. To stream unbounded input, call the layer on
    chunks whose length is a multiple of `segment_len` with `return_state=True` and pass
    `initial_state=(memory, norm)` along: the outputs equal one call on the whole
    sequence. A chunk that is not a multiple ends in a partial segment, and the next
    chunk starts a new segment (positions restart at 0).

    Args:
        dim_input: model width `D`, or `None` to take it from the input at build time.
        dim_key: per-head key/query width.
        dim_value: per-head value width.
        num_heads: number of heads.
        segment_len: tokens per segment.
        sampling_factor: deprecated and ignored (the original PyTorch API took it; it never
            changed the computation). Accepted so old code and configs load; not saved.
        update: `"linear"` or `"delta"` memory update.
        causal: causal masking inside each segment (the memory only ever holds earlier
            segments, so the layer is causal as a whole).
        positional_embedder: `None`, `"rope"` (a `RoPEEmbeddings(dim_key, segment_len)`),
            or a `RoPEEmbeddings` / `YaRNEmbeddings` instance with `dim == dim_key`. It
            rotates queries and keys of the local attention only, at segment-local
            positions; the memory uses unrotated `Q`, `K`.
        init_state_learnable: learn the initial memory (`initial_memory`, zeros) and
            normaliser (`initial_norm`, ones, kept non-negative). Otherwise the initial
            state is zeros.
        return_state: also return the final `(memory, norm)` (float32).
        group_tokens: long inputs run the whole layer in groups of this many tokens
            (whole segments), state carried, so the working set does not grow with the
            length: `"auto"` (4096 tokens; 2048 on PyTorch, measured in
            benchmarks/bench_attention.py), `None` (all segments in one batch) or a
            positive int. Results do not depend on it. Not used under
            `keras_infini.distribution.SequenceParallel`, where each device runs its
            own segments in one batch.
        kernel_initializer, kernel_regularizer, kernel_constraint: for the query, key,
            value and output projections (each gets its own clone), as in Keras'
            `MultiHeadAttention`. Default `"glorot_uniform"`, no regularizer/constraint.
        memory_feature_map: feature map `phi` of the memory's queries and keys.
            `"elu1"` (default, the paper): `phi = elu + 1`, read as
            `phi(Q) M / (phi(Q) z + eps)`, delta error `V - phi(K) M / (phi(K) z + eps)`.
            `"l2"` (DeltaNet, Yang et al. 2024): `phi(t) = t / ||t||_2` per head, read
            without normaliser, `A_mem = phi(Q) M`, delta error `V - phi(K) M`; unit keys
            make the delta rule replace a stored value instead of piling values up (with
            a positive map every two keys overlap). `"elu1_l2"`: `elu + 1` divided by its
            L2 norm, read like `"l2"` (unit, positive, possibly sparse keys). With these
            two maps the delta rule runs token by token inside a segment, as DeltaNet
            does (each token reads the memory its segment's earlier tokens left; one
            triangular solve per segment, `ops.memory.token_level_delta_inputs`): the
            paper's segment-level form sums the segment's `beta k^T k` into one step,
            which grows without bound over segments for similar unit keys. The
            normaliser `z` is still accumulated (from the write keys) so the state keeps
            its shape. Two maps widen the memory key beyond `dim_key` (the state is
            `(memory_dim, dim_value)`, attribute `memory_dim`): `"dpfp"`, `"dpfp2"`,
            `"dpfp3"`, DPFP-nu (Schlag et al. 2021, nu = 1, 2, 3: with
            `r = [relu(t), relu(-t)]`, `phi(t) = [r * roll(r, 1), ..., r * roll(r, nu)]`,
            `2 dim_key nu` sparse non-negative features) divided by its L2 norm and read
            like `"l2"` (unit keys; the paper sum-normalises); and `"taylor"`, the
            second-order Taylor map of "Based" (Arora et al. 2024),
            `phi(t) = [1, t / dk^(1/4), vec(t t^T) / (sqrt(2) sqrt(dk))]`
            (`1 + dk + dk^2` features, `phi(q) . phi(k) = 1 + s + s^2 / 2` with
            `s = q . k / sqrt(dk)`), positive, so read with the normaliser like `"elu1"`.
        write_strength: `False` (default), `True` (or `"sigmoid"`) or
            `"hard_sigmoid"`: a learned write strength per token and head,
            `beta = f(x W_beta + b_beta)` (sublayer `beta_dense`, bias zeros: 0.5 at
            initialisation), that scales each token's write:
            delta `M += phi(K)^T diag(beta) (V - read)` (DeltaNet's
            `M += k^T beta (v - k M)` with `"l2"`), linear `M += phi(K)^T diag(beta) V`,
            and `z += sum_t beta_t phi(K_t)`. Lets the model skip tokens. `f = sigmoid`
            never reaches 0, and small writes of many skipped tokens add up over long
            inputs; `"hard_sigmoid"` (`clip(t / 6 + 1/2, 0, 1)`, Keras' `hard_sigmoid`)
            is exactly 0 below -3, so skipped tokens write nothing whatever the input
            length (with `memory_decay=True` the memory still decays through them,
            with `"coupled"` it does not).
        memory_decay: `False` (default), `True` or `"coupled"`: a learned decay per
            token and head for the token-level delta rule (Gated DeltaNet, Yang et al. 2025),
            `M_t = alpha_t (I - beta_t k_t^T k_t) M_{t-1} + beta_t k_t^T v_t` with
            `alpha_t = exp(-exp(a_h) softplus(x_t W_alpha + b_h))` in (0, 1] (sublayer
            `decay_dense`, weights `decay_log_rate` `a` (zeros) and `decay_bias` `b`,
            initialised so that `softplus(b_h)` runs log-spaced over [0.001, 0.1] across
            heads: from a memory kept over thousands of tokens to one of ~10 tokens). A
            head can then keep recent tokens (a summary of the previous segment's last
            tokens) or, with `alpha` near 1, keep facts. Requires `update="delta"` and
            `memory_feature_map` `"l2"` or `"elu1_l2"`. Still one triangular solve per
            segment and a scan over segments (`ops.memory.gated_token_level_delta_inputs`).
            `"coupled"` (needs a `write_strength`) decays by `alpha_t ** beta_t`
            instead: a token that writes nothing (`beta_t = 0`, e.g. skipped by
            `"hard_sigmoid"`) also erases nothing, so a fact outlives any number of
            skipped tokens.
        gate_init: initial gate logit, a number or a list of `num_heads` numbers
            (default 0.0: `sigmoid(0) = 0.5` for every head).
        gate_lr_scale: positive number (default 1.0). The gate is stored as
            `raw = gate_init / gate_lr_scale` and used as `sigmoid(gate_lr_scale * raw)`,
            so with Adam the gate logit moves `gate_lr_scale` times faster than the other
            weights (a scaled parametrisation; at 1.0 the layer is the paper's).
            For multi-key recall and passkey retrieval across segments
            `update="delta"`, `memory_feature_map="l2"`, `write_strength="hard_sigmoid"`,
            `gate_lr_scale=10.0`, `memory_decay="coupled"` measured best (README, "Memory
            options"; benchmarks/bench_recall.py, examples/passkey.py,
            examples/modinfiniformer.py).
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(batch, seq_len, dim_input)`.
        mask: optional `(batch, seq_len)` boolean mask; masked tokens are neither attended
            to nor written to memory. Propagated to the output.
        positions: optional `(batch, seq_len)` integer segment-local positions for the
            embedder (default `0..segment_len-1` in every segment).
        initial_state: optional `(memory (batch, heads, memory_dim, dim_value),
            norm (batch, heads, memory_dim))`, overriding the default initial state
            (`memory_dim` is `dim_key`, or the feature width of "dpfp*" / "taylor").
        training: unused (no dropout), accepted for Keras compatibility.
        return_state: optional per-call override of the constructor's `return_state`.
        cache: optional decode cache from `build_cache(batch_size)` (causal layers only):
            the call processes `inputs` as new tokens after those already in the cache and
            returns `(outputs, new_cache)`, equal to one full call on the whole sequence.
            Whole segments of a long input run segment-parallel (the normal path) and the
            unfinished last segment goes into the cache; a one-token call costs
            `O(segment_len)`, whatever the number of tokens before it. Fixed shapes:
            `jax.jit` / `tf.function` compile one step for every position. `mask` then
            marks the tokens each row takes, a prefix per row (a right-padded prompt, or
            rows that skip a one-token step); the other rows keep their cache. A mask
            that is not a prefix (`[1, 0, 1, 1]`: a cache cannot skip a token) is refused
            by name when its value can be read (eager); inside `jax.jit` /
            `tf.function` / a traced torch step it cannot be, and the tokens after a
            row's first False are not consumed. The cache's structure, shapes and dtypes
            (`cache_shapes`, `cache_dtypes`) are checked by name (static, no value read).
            Not combined with `positions`, `initial_state`, `return_state`.
        cache_update_index: with `cache`: the position of the first token of `inputs`,
            i.e. the number of tokens already in the cache (an int, or a scalar integer
            tensor for one token; a cache continues where it stopped, and a wrong index
            is refused when it can be read, i.e. outside `jax.jit` / `tf.function`).

    Returns:
        `(batch, seq_len, dim_input)`, or `(outputs, memory, norm)` with `return_state`,
        or `(outputs, cache)` with `cache`.

    Example:

    >>> import keras
    >>> from keras_infini import CompressiveMemory, RoPEEmbeddings
    >>> layer = CompressiveMemory(dim_input=32, dim_key=8, dim_value=8, num_heads=2,
    ...                           segment_len=16, update="delta", causal=True,
    ...                           positional_embedder=RoPEEmbeddings(dim=8, seq_len=16))
    >>> y = layer(keras.random.normal((2, 100, 32)))
    >>> tuple(y.shape)
    (2, 100, 32)
    """

    @keras_hub_names
    def __init__(
        self, dim_input, dim_key, dim_value, num_heads, segment_len, sampling_factor=None,
        update="linear", causal=False, positional_embedder=None, init_state_learnable=False,
        return_state=False, group_tokens="auto", memory_feature_map="elu1",
        write_strength=False, gate_init=0.0, gate_lr_scale=1.0, memory_decay=False,
        num_key_value_heads=None, memory_heads="key_value", memory_gate="sigmoid",
        qkv_bias=False, query_norm=None, key_norm=None,
        **kwargs,
    ):
        kwargs = self.set_weight_args(kwargs, with_bias=False)
        super().__init__(**kwargs)
        # torch: dynamo recompiles these layers until its limit; Keras then runs
        # `jit_compile=True` eagerly with a warning (see `ops.backend.supports_jit`).
        self.supports_jit = fast_paths.supports_jit()
        self.dim_input = validation.positive_int("dim_input", dim_input, allow_none=True)
        self.dim_key = validation.positive_int("dim_key", dim_key)
        self.dim_value = validation.positive_int("dim_value", dim_value)
        self.num_heads = validation.positive_int("num_heads", num_heads)
        self.segment_len = validation.positive_int("segment_len", segment_len)
        self.sampling_factor = validation.sampling_factor(sampling_factor, allow_none=True)
        self.update = validation.choice("update", update, UPDATES)
        self.causal = validation.boolean("causal", causal)
        self.init_state_learnable = validation.boolean(
            "init_state_learnable", init_state_learnable
        )
        self.return_state = validation.boolean("return_state", return_state)
        self.group_tokens = loops.check_group_tokens(group_tokens)
        self.num_key_value_heads = validation.key_value_heads(num_key_value_heads,
                                                              self.num_heads)
        self.memory_heads = validation.choice("memory_heads", memory_heads, MEMORY_HEADS)
        # Heads of the memory state: one per key/value head (default) or per query head.
        self.num_memory_heads = (self.num_key_value_heads if self.memory_heads == "key_value"
                                 else self.num_heads)
        self.memory_gate = validation.choice("memory_gate", memory_gate, MEMORY_GATES)
        self.qkv_bias = validation.boolean("qkv_bias", qkv_bias)
        self.query_norm = validation.optional_layer("query_norm", query_norm)
        self.key_norm = validation.optional_layer("key_norm", key_norm)
        self.gate_init = validation.gate_init(gate_init, self.num_heads)
        self.memory_feature_map = validation.choice(
            "memory_feature_map", memory_feature_map, memory_ops.FEATURE_MAPS
        )
        # Width of the memory's keys: `dim_key`, wider for "dpfp*" and "taylor".
        self.memory_dim = memory_ops.feature_dim(self.memory_feature_map, self.dim_key)
        self.write_strength = validation.write_strength(write_strength)
        self.gate_lr_scale = validation.gate_lr_scale(gate_lr_scale, self.gate_init)
        self.memory_decay = validation.memory_decay(memory_decay)
        if self.memory_decay and (self.update != "delta" or self.memory_feature_map
                                  in memory_ops.NORMALISED_FEATURE_MAPS):
            raise ValueError(
                f"Invalid memory_decay={self.memory_decay!r} with update={self.update!r} and "
                f"memory_feature_map={self.memory_feature_map!r}: the decay applies to the "
                "token-level delta rule, update='delta' with a unit-key memory_feature_map, "
                f"one of {memory_ops.UNIT_KEY_FEATURE_MAPS}."
            )
        if self.memory_decay == "coupled" and not self.write_strength:
            raise ValueError(
                "Invalid memory_decay='coupled' with write_strength=False: the coupled "
                "decay is scaled by the write strength; use write_strength=True, "
                "'sigmoid' or 'hard_sigmoid'."
            )
        self._embedder_arg = positional_embedder
        self.positional_embedder = resolve_positional_embedder(
            positional_embedder, self.dim_key, self.segment_len
        )
        # A static bound of explicit positions when an owning layer builds them (the MoD
        # block passes its tokens' in-segment positions, below its own segment length);
        # None: explicit positions come from the user and may be anything.
        self._explicit_positions_below = None
        self.supports_masking = True

    # ------------------------------------------------------------------ build
    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                f"CompressiveMemory expects inputs of rank 3 (batch, seq_len, dim_input); "
                f"received inputs with shape {tuple(input_shape)}."
            )
        last = input_shape[-1]
        if last is None:
            raise ValueError("The last axis of the inputs (dim_input) must be known.")
        if self.dim_input is None:
            self.dim_input = int(last)
        elif int(last) != self.dim_input:
            raise ValueError(
                f"Invalid inputs: last axis {last} does not match dim_input={self.dim_input}."
            )
        h, dk, dv, d = self.num_heads, self.dim_key, self.dim_value, self.dim_input
        hkv, hm = self.num_key_value_heads, self.num_memory_heads

        def projection(name, equation, output_shape, bias_axes=None):
            extra = {"bias_axes": bias_axes, "bias_initializer": "zeros"} if bias_axes \
                else {}
            layer = keras.layers.EinsumDense(
                equation,
                output_shape=output_shape,
                name=name,
                dtype=self.dtype_policy,
                **self.weight_kwargs(bias=False),
                **extra,
            )
            return layer

        # The projections run on the folded `(batch, n, S, ...)` layout, so the layer
        # never hands its (possibly masked) input tensor itself to a sublayer.
        # Heads after tokens: each projection writes one contiguous `(b, n, S, h, d)` block,
        # which `_heads` views as `(b, n, h, S, d)` (a plain matmul output, no permuted copy).
        # Grouped-query attention: keys and values have `num_key_value_heads` heads, each
        # shared by `num_heads // num_key_value_heads` consecutive query heads.
        bias = self.qkv_bias
        self.query_dense = projection("query", "bnsd,dhk->bnshk",
                                      (None, self.segment_len, h, dk), "hk" if bias else None)
        self.key_dense = projection("key", "bnsd,dhk->bnshk",
                                    (None, self.segment_len, hkv, dk), "hk" if bias else None)
        self.value_dense = projection("value", "bnsd,dhv->bnshv",
                                      (None, self.segment_len, hkv, dv), "hv" if bias else None)
        self.output_dense = projection("output", "bnhsv,hvd->bnsd", (None, self.segment_len, d))
        for dense in (self.query_dense, self.key_dense, self.value_dense):
            dense.build((None, None, self.segment_len, d))
        self.output_dense.build((None, None, h, self.segment_len, dv))
        for norm in (self.query_norm, self.key_norm):
            if norm is not None and not norm.built:
                norm.build((None, None, h, self.segment_len, dk))
        # float32 under any policy: the stored gate is `gate_init / gate_lr_scale`.
        self.gate = self.add_weight(
            name="gate", shape=(h,), initializer=self._gate_initializer(), trainable=True,
            dtype="float32", autocast=False,
        )
        if self.write_strength:
            # Heads last, bias `(h,)`: on TensorFlow, Keras 3.15's `ops.add` takes a
            # `(h, 1)` bias for a `tf.nn.bias_add` and adds it on axis 1 whenever that
            # axis (here the number of segments) happens to equal `h`.
            self.beta_dense = keras.layers.EinsumDense(
                "bnsd,dh->bnsh",
                output_shape=(None, self.segment_len, hm),
                bias_axes="h",
                kernel_initializer="glorot_uniform",
                name="write_strength",
                dtype=self.dtype_policy,
            )
            self.beta_dense.build((None, None, self.segment_len, d))
        if self.memory_decay:
            self.decay_dense = keras.layers.EinsumDense(
                "bnsd,dh->bnsh",
                output_shape=(None, self.segment_len, hm),
                kernel_initializer="glorot_uniform",
                name="decay",
                dtype=self.dtype_policy,
            )
            self.decay_dense.build((None, None, self.segment_len, d))
            self.decay_log_rate = self.add_weight(
                name="decay_log_rate", shape=(hm,), initializer="zeros", autocast=False,
                dtype="float32",
            )
            self.decay_bias = self.add_weight(
                name="decay_bias", shape=(hm,), initializer=_decay_bias_initializer,
                autocast=False, dtype="float32",
            )
        if self.init_state_learnable:
            # autocast=False: recurrent state stays float32 under mixed precision.
            self.initial_memory = self.add_weight(
                name="initial_memory",
                shape=(hm, self.memory_dim, dv),
                initializer="zeros",
                autocast=False,
                dtype="float32",
            )
            self.initial_norm = self.add_weight(
                name="initial_norm",
                shape=(hm, self.memory_dim),
                initializer="ones",
                constraint=keras.constraints.NonNeg(),
                autocast=False,
                dtype="float32",
            )
        if self.positional_embedder is not None and not self.positional_embedder.built:
            self.positional_embedder.build((None, None, h, self.segment_len, dk))
        # Checked on every call once built: wrong rank or width -> ValueError.
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: self.dim_input})
        self.built = True

    def _gate_initializer(self):
        if self.gate_init == 0.0:
            return "zeros"  # the default, as before the option existed
        raw = np.asarray(self.gate_init, "float64") / self.gate_lr_scale

        def initializer(shape, dtype=None):
            # A fresh array (not a broadcast view: torch refuses to assign into one).
            values = np.array(np.broadcast_to(raw, tuple(shape)), dtype=dtype or "float32")
            return ops.convert_to_tensor(values, dtype or "float32")

        return initializer

    def gate_values(self):
        """The gates per head, `(num_heads,)`, in the compute dtype (computed in float32):
        `sigmoid(gate_lr_scale * gate)` (`memory_gate="sigmoid"`) or
        `tanh(gate_lr_scale * gate)` (`memory_gate="tanh"`)."""
        raw = ops.cast(self.gate, "float32")
        if self.gate_lr_scale != 1.0:
            raw = raw * self.gate_lr_scale
        gate = ops.sigmoid(raw) if self.memory_gate == "sigmoid" else ops.tanh(raw)
        return ops.cast(gate, self.compute_dtype)

    def _mix(self, retrieved, attended, gate):
        """The heads' output from the memory read and the local attention: the paper's
        `g A_mem + (1 - g) A_dot` (`"sigmoid"`), or `A_dot + g A_mem` (`"tanh"`)."""
        if self.memory_gate == "sigmoid":
            return gate * retrieved + (1.0 - gate) * attended
        return attended + gate * retrieved

    def _repeat_heads(self, t, axis=2):
        """Key/value heads `(..., hkv, ...)` repeated for their query heads on `axis`."""
        groups = self.num_heads // self.num_key_value_heads
        return t if groups == 1 else ops.repeat(t, groups, axis=axis)

    def _project(self, x, query=True):
        """Queries `(b, n, h, S, dk)` (or None), keys `(b, n, hkv, S, dk)` and values
        `(b, n, hkv, S, dv)` of folded tokens `x` `(b, n, S, D)`, with the q/k norms."""
        q = _heads(self.query_dense, x) if query else None
        k = _heads(self.key_dense, x)
        v = _heads(self.value_dense, x)
        if q is not None and self.query_norm is not None:
            q = self.query_norm(q)
        if self.key_norm is not None:
            k = self.key_norm(k)
        return q, k, v

    def _read_memory(self, phi_q, memory, norm):
        """The memory read of queries `phi_q` `(b, n, h, S, f)` from the state before each
        segment (`(b, n, hm, f, dv)`, `(b, n, hm, f)`): `(b, n, h, S, dv)` float32. With a
        memory per key/value head, each query head reads its group's memory."""
        groups = self.num_heads // self.num_memory_heads
        if groups > 1:
            shape = ops.shape(phi_q)
            s, f = phi_q.shape[3], phi_q.shape[4]
            phi_q = ops.reshape(phi_q, (shape[0], shape[1], self.num_memory_heads,
                                        groups * s, f))
        if self.memory_feature_map in memory_ops.NORMALISED_FEATURE_MAPS:
            read = memory_ops.retrieve(phi_q, memory, norm)
        else:
            read = memory_ops.retrieve_unnormalised(phi_q, memory)
        if groups > 1:
            read = ops.reshape(read, (shape[0], shape[1], self.num_heads, s, read.shape[-1]))
        return read

    # ------------------------------------------------------------------ state
    def get_initial_state(self, batch_size):
        """The state before the first segment: `(memory (batch, heads, memory_dim,
        dim_value), norm (batch, heads, memory_dim))`, float32."""
        h, dk, dv = self.num_memory_heads, self.memory_dim, self.dim_value
        if self.init_state_learnable:
            memory = ops.broadcast_to(
                ops.cast(self.initial_memory, "float32")[None], (batch_size, h, dk, dv)
            )
            norm = ops.broadcast_to(
                ops.cast(self.initial_norm, "float32")[None], (batch_size, h, dk)
            )
            return memory, norm
        return (
            ops.zeros((batch_size, h, dk, dv), dtype="float32"),
            ops.zeros((batch_size, h, dk), dtype="float32"),
        )

    # ------------------------------------------------------------------ call
    def call(self, inputs, mask=None, positions=None, initial_state=None, training=None,
             return_state=None, cache=None, cache_update_index=None):
        if cache is not None:
            return self._cached_call(inputs, mask, cache, cache_update_index, positions,
                                     initial_state, return_state)
        mask = validation.sequence_tensor("mask", mask, inputs)
        positions = validation.sequence_tensor("positions", positions, inputs)
        initial_state = validation.state(
            initial_state, inputs, self.num_memory_heads, self.memory_dim, self.dim_value
        )
        length = segment_ops.static_or_dynamic_dim(inputs, 1)
        batch = segment_ops.static_or_dynamic_dim(inputs, 0)
        if initial_state is None:
            memory0, norm0 = self.get_initial_state(batch)
        else:
            memory0 = ops.cast(initial_state[0], "float32")
            norm0 = ops.cast(initial_state[1], "float32")
        if isinstance(length, int) and length == 0:
            outputs = ops.zeros((batch, 0, self.dim_input), dtype=self.compute_dtype)
            return self.pack_outputs(outputs, [], memory0, norm0, return_state)

        # An input shorter than one segment is one (short) segment: the same result as
        # padding it to `segment_len`, with work bounded by its real length.
        seg = self.segment_len
        if isinstance(length, int):
            seg = min(seg, length)
        # Under SequenceParallel the segments are split over devices: pad to a multiple
        # of `seg * shards` tokens (whole padding segments are invalid) and constrain the
        # folded tensors' segment axis to the sequence mesh axis.
        sequence = distribution.sequence_sharding()
        unit = seg * distribution.sequence_multiple(sequence)
        # Pad to whole segments; `valid` marks real, unmasked tokens (bool), or is None
        # when every token is real (no mask, no padding): no mask tensor to build, apply or
        # constant-fold (see `attention_ops.attention_mask`).
        if mask is None and isinstance(length, int) and length % unit == 0:
            valid = None
        else:
            valid = segment_ops.fold(segment_ops.valid_tokens(inputs, mask, unit), seg) > 0
            valid = distribution.constrain_segments(valid, sequence)
        x = segment_ops.pad_to_segments(ops.cast(inputs, self.compute_dtype), unit, axis=1)
        x = distribution.constrain_segments(segment_ops.fold(x, seg), sequence)  # (b, n, S, D)
        pos = None
        if self.positional_embedder is not None and positions is not None:
            # Integer positions stay integers; float positions keep their fraction.
            pos_dtype = "int32" if "int" in str(positions.dtype) else "float32"
            pos = segment_ops.pad_to_segments(ops.cast(positions, pos_dtype), unit)
            pos = distribution.constrain_segments(segment_ops.fold(pos, seg), sequence)

        group = loops.group_segments(self.group_tokens, seg)
        n = x.shape[1]
        if group is not None and n is not None and n > group and sequence is None:
            outputs, memory_final, norm_final = self._grouped_segments(
                x, valid, pos, memory0, norm0, group
            )
        else:
            mixed, memory_final, norm_final = self._segments(x, valid, pos, memory0, norm0)
            outputs = self.output_dense(mixed)  # (b, n, S, D)
        outputs = segment_ops.unfold(distribution.constrain_segments(outputs, sequence))
        outputs = segment_ops.trim(outputs, length)
        return self.pack_outputs(outputs, [], memory_final, norm_final, return_state)

    def _grouped_segments(self, x, valid, pos, memory0, norm0, group):
        """`_segments` and the output projection on groups of `group` segments, one after
        the other, state carried; returns the projected outputs `(b, n, S, D)`.

        Equal to one `_segments` call (chunked streaming is exact), but each group's
        tensors stay small, so elementwise passes and their backward stay in cache (see
        `group_tokens`). The loop is `loops.scan`: `lax.scan` on JAX (compiled once,
        whatever the number of groups), an `unbind` loop on torch (O(n) backward).
        Padding segments are invalid: they write nothing to the memory and their outputs
        are dropped.
        """
        n = x.shape[1]
        groups = -(-n // group)
        pad = groups * group - n

        if valid is None and pad:  # the padding segments must not enter the memory
            valid = ops.ones(ops.shape(x)[:3], dtype="bool")

        def to_groups(t):  # (b, groups, G, ...): scanned on axis 1, no transpose
            if pad:
                t = ops.concatenate([t, ops.zeros_like(t[:, :pad])], axis=1)  # pad < n
            return ops.reshape(t, [ops.shape(t)[0], groups, group] + list(t.shape[2:]))

        xs = {"x": to_groups(x)}
        if valid is not None:
            xs["valid"] = to_groups(valid)
        if pos is not None:
            xs["pos"] = to_groups(pos)

        def step(carry, parts):
            memory, norm = carry
            mixed, memory, norm = self._segments(
                parts["x"], parts.get("valid"), parts.get("pos"), memory, norm
            )
            return (memory, norm), self.output_dense(mixed)  # (b, G, S, D)

        (memory_final, norm_final), outputs = loops.scan(
            step, (memory0, norm0), xs, axis=1
        )  # outputs (b, groups, G, S, D)
        outputs = ops.reshape(
            outputs, [ops.shape(outputs)[0], groups * group] + list(outputs.shape[3:])
        )
        return (outputs[:, :n] if pad else outputs), memory_final, norm_final

    def _segments(self, x, valid, pos, memory0, norm0):
        """Attention + memory for folded segments `x` `(b, n, S, D)`: the gated heads
        `(b, n, h, S, dv)` before the output projection, and the final `(memory, norm)`.
        `valid` is a bool `(b, n, S)` or None (every token real)."""
        if valid is not None:
            # Masked tokens enter nothing, whatever their value (NaN, inf): selected away
            # before the projections, so no output and no weight gradient can see them. A
            # masked token's own output is the layer's output for a zero input.
            x = ops.where(valid[..., None], x, ops.zeros_like(x))
        query, key, value = self._project(x)  # (b, n, h | hkv, S, d)

        # 1. Local attention, all segments at once.
        attended, _ = self._attend_locally(query, key, value, valid, pos)

        # 2-3. Memory states before each segment (float32) and retrieval.
        retrieved, memory_final, norm_final = self._memory(
            x, query, key, value, valid, memory0, norm0
        )

        # 4. Gate per head (the caller concatenates heads and projects).
        mixed = self._mix(retrieved, attended, self.gate_values()[:, None, None])
        return mixed, memory_final, norm_final

    def _rotate(self, t, positions, in_segment):
        """`t` rotated by the positional embedder at explicit `positions`. `in_segment`:
        the layer built the positions itself, in `[0, segment_len)`; a `RoPEEmbeddings`
        then looks up only the digits such positions have (`max_position`), which keeps
        the decode step's compiled program small. Explicit positions get the full lookup
        unless an owning layer set `_explicit_positions_below`."""
        bound = self.segment_len if in_segment else self._explicit_positions_below
        if bound is not None and isinstance(self.positional_embedder, RoPEEmbeddings):
            return self.positional_embedder(t, positions=positions, max_position=bound)
        return self.positional_embedder(t, positions=positions)

    def _attend_locally(self, query, key, value, valid, pos):
        """Local attention of folded segments (`(b, n, h | hkv, S, d)` projections,
        `valid` bool `(b, n, S)` or None, `pos` `(b, n, S)` or None: `0..S-1` along the
        segment axis (-2), passed explicitly, any `sequence_axis`): `(attended, key_rot)`."""
        if self.positional_embedder is not None:
            p = ops.arange(query.shape[-2], dtype="int32") if pos is None else \
                pos[:, :, None, :]
            query_rot = self._rotate(query, p, in_segment=pos is None)
            key_rot = self._rotate(key, p, in_segment=pos is None)
        else:
            query_rot, key_rot = query, key
        attended = attention_ops.local_attention(
            query_rot, self._repeat_heads(key_rot), self._repeat_heads(value), valid,
            self.causal,
        )
        return attended, key_rot

    def decay_values(self, x):
        """`log alpha` `(b, n, h, S)` float32 (`<= 0`) of the folded input `x`
        `(b, n, S, D)` (`memory_decay=True`)."""
        rate = ops.swapaxes(ops.cast(self.decay_dense(x), "float32"), 2, 3)
        return -ops.exp(self.decay_log_rate)[:, None] * ops.softplus(
            rate + self.decay_bias[:, None]
        )

    def _memory(self, x, query, key, value, valid, memory0, norm0):
        """Memory read/write (the paper's, or with `memory_feature_map` / `write_strength`,
        see Args): returns `(retrieved (b, n, h, S, dv) compute dtype, memory_final,
        norm_final)`. Invalid tokens are selected out of both factors of every sum (a zero
        key times a NaN value is still NaN)."""
        read_k, write_k, value32, decay = self._memory_keys(x, key, value, valid)
        log_decay, memory_write_k = (None, write_k) if decay is None else decay
        normalised = self.memory_feature_map in memory_ops.NORMALISED_FEATURE_MAPS
        sequence = distribution.sequence_sharding()  # segments split over devices
        norm_before, norm_final = memory_ops.norm_states(write_k, norm0, sequence=sequence)
        if self.update == "linear":
            memory_before, memory_final = memory_ops.linear_memory_states(
                write_k, value32, memory0, sequence=sequence
            )
        elif normalised and not self.write_strength:  # the paper's delta rule
            memory_before, memory_final = memory_ops.delta_memory_states(
                read_k, value32, norm_before, memory0, sequence=sequence
            )
        else:
            memory_before, memory_final = memory_ops.delta_memory_states_general(
                read_k, memory_write_k, value32, norm_before, memory0, normalised=normalised,
                sequence=sequence, log_decay=log_decay,
            )
        phi_q = memory_ops.feature_map(query, self.memory_feature_map)
        retrieved = self._read_memory(phi_q, memory_before, norm_before)
        return ops.cast(retrieved, self.compute_dtype), memory_final, norm_final

    def _memory_keys(self, x, key, value, valid):
        """The memory's read keys `phi(K)`, write keys (times the write strength) and
        float32 values `(b, n, h, S, d)`, invalid tokens selected to 0 (a masked NaN
        must not leak), and with `memory_decay` `(log decay of each segment (b, n, h),
        the write keys of the memory's segment step)` (else None; the normaliser `z`
        accumulates the undecayed write keys). For the token-level delta rule of the
        unit-key maps, read keys and values are its segment-level inputs
        (`token_level_delta_inputs`, or `gated_token_level_delta_inputs` with the
        decay)."""
        if self.num_memory_heads != self.num_key_value_heads:  # a memory per query head
            key, value = self._repeat_heads(key), self._repeat_heads(value)
        read_k = memory_ops.feature_map(key, self.memory_feature_map)  # (b, n, hm, S, f)
        write_k = read_k
        if self.write_strength:
            beta = ops.cast(self.beta_dense(x), "float32")  # (b, n, S, h)
            if self.write_strength == "hard_sigmoid":
                beta = ops.hard_sigmoid(beta)  # exactly 0 below -3
            else:
                beta = ops.sigmoid(beta)
            beta = ops.swapaxes(beta, 2, 3)  # (b, n, h, S)
            write_k = read_k * beta[..., None]
        log_decay = self.decay_values(x) if self.memory_decay else None  # (b, n, h, S)
        if self.memory_decay == "coupled":  # alpha_t ** beta_t: no write, no decay
            log_decay = log_decay * beta
        if valid is not None:  # select, not multiply: a masked NaN must not leak
            keep = ops.cast(valid, "bool")[:, :, None, :, None]
            read_k = ops.where(keep, read_k, 0.0)
            write_k = ops.where(keep, write_k, 0.0)
            value = ops.where(keep, value, ops.zeros_like(value))
            if log_decay is not None:  # a masked token keeps the memory as it is
                log_decay = ops.where(keep[..., 0], log_decay, 0.0)
        value = ops.cast(value, "float32")
        if log_decay is not None:  # Gated DeltaNet: token level, with a decay
            read_k, memory_write_k, value, segment_decay = \
                memory_ops.gated_token_level_delta_inputs(read_k, write_k, value, log_decay)
            return read_k, write_k, value, (segment_decay, memory_write_k)
        if self.update == "delta" and \
                self.memory_feature_map not in memory_ops.NORMALISED_FEATURE_MAPS:
            # DeltaNet: token by token inside the segment, as segment-level inputs.
            read_k, value = memory_ops.token_level_delta_inputs(read_k, write_k, value)
        return read_k, write_k, value, None

    def _memory_update(self, read_k, write_k, value32, memory, norm, pending=None,
                       memory_write_k=None):
        """The update of `(memory, norm)` from these tokens of the current segment
        (`(b, n, h, S, d)` keys and values; state `(b, h, ...)` before the segment).
        `pending`: the memory update of the segment's earlier tokens (decode cache), which
        the token-level delta rule of the unit-key maps reads; None: none.
        `memory_write_k`: the write keys of the memory update when they differ from the
        normaliser's `write_k` (`memory_decay`)."""
        normalised = self.memory_feature_map in memory_ops.NORMALISED_FEATURE_MAPS
        if self.update == "linear":
            memory_update = memory_ops.linear_update(write_k, value32)
        else:
            if not normalised and pending is not None:  # token level: read the state
                memory = memory + pending  # after the segment's earlier tokens
            memory_update = memory_ops.delta_update(
                memory[:, None], read_k, write_k if memory_write_k is None else memory_write_k,
                value32, norm[:, None], normalised,
            )
        return ops.sum(memory_update, axis=1), ops.sum(write_k, axis=(1, 3))

    # ------------------------------------------------------------------ decode cache
    def cache_shapes(self, batch_size):
        """`{name: shape}` of the cache `build_cache(batch_size)` returns."""
        b, h, dk, dv, s = batch_size, self.num_memory_heads, self.dim_key, \
            self.dim_value, self.segment_len
        f, hkv = self.memory_dim, self.num_key_value_heads
        shapes = {
            "memory": (b, h, f, dv), "norm": (b, h, f),
            "memory_update": (b, h, f, dv), "norm_update": (b, h, f),
            "key": (b, s, hkv, dk), "value": (b, s, hkv, dv), "valid": (b, s),
            "length": (b,),
        }
        if self.memory_decay:  # log of the decay of `memory` over the segment so far
            shapes["memory_decay"] = (b, h)
        return shapes

    def cache_dtypes(self):
        """`{name: dtype}` of the cache `build_cache` returns: float32 state, keys and
        values in the compute dtype, `valid` bool, `length` int32."""
        dtypes = {name: "float32" for name in ("memory", "norm", "memory_update",
                                                "norm_update")}
        dtypes.update(key=self.compute_dtype, value=self.compute_dtype, valid="bool",
                      length="int32")
        if self.memory_decay:
            dtypes["memory_decay"] = "float32"
        return dtypes

    def build_cache(self, batch_size):
        """An empty decode cache for `batch_size` rows (see `call(cache=...)`): the
        initial state (learned, with `init_state_learnable`), an empty current segment.

        Fixed shapes, whatever the length decoded: `memory`/`memory_update`
        `(b, h, f, dv)` and `norm`/`norm_update` `(b, h, f)` float32 (`f` is
        `memory_dim`: `dim_key`, or the width of the "dpfp*" / "taylor" feature map),
        the current segment's `key` `(b, S, h, dk)` and `value` `(b, S, h, dv)` in the
        compute dtype, `valid` `(b, S)` bool, `length` `(b,)` int32; with `memory_decay`, also
        `memory_decay` `(b, h)` float32, the log decay of `memory` since the segment
        began (the state after the segment's tokens so far is
        `exp(memory_decay) memory + memory_update`).
        """
        batch_size = validation.positive_int("batch_size", batch_size)
        self._require_causal()
        self._ensure_built()
        memory, norm = self.get_initial_state(batch_size)
        shapes = self.cache_shapes(batch_size)
        cache = {"memory": memory, "norm": norm}
        for name in ("memory_update", "norm_update", "memory_decay"):
            if name in shapes:
                cache[name] = ops.zeros(shapes[name], "float32")
        for name in ("key", "value"):
            cache[name] = ops.zeros(shapes[name], self.compute_dtype)
        cache["valid"] = ops.zeros(shapes["valid"], "bool")
        cache["length"] = ops.zeros(shapes["length"], "int32")
        return cache

    def _cached_call(self, inputs, mask, cache, cache_update_index, positions=None,
                     initial_state=None, return_state=None):
        index, mask, cache = self._check_cache_call(
            inputs, cache, cache_update_index, positions, initial_state, return_state, mask
        )
        if int(inputs.shape[1]) == 0:
            return ops.zeros_like(ops.cast(inputs, self.compute_dtype)), cache
        consumed = _cache.consumed_tokens(inputs, mask)
        _cache.check_cache_position(index, cache["length"], consumed[:, 0])
        return self._cached(ops.cast(inputs, self.compute_dtype), consumed, cache, index)

    def _cached(self, x, consumed, cache, index):
        """Cached call on checked arguments: `x` `(b, T, D)` compute dtype, `consumed`
        bool `(b, T)` (a prefix per row), `index` an int or a scalar tensor (T == 1).

        Tokens before the next segment boundary run one at a time (`_decode_step`), the
        rest segment-parallel (`_prefill`)."""
        seg, length = self.segment_len, int(x.shape[1])
        head = length if not isinstance(index, int) else min(length, (-index) % seg)
        outputs = []
        for t in range(head):
            position = _cache.position_in_segment(index, t, seg)
            take = consumed[:, t]
            y, cache = self._decode_step(
                x[:, t:t + 1], cache, take, take, position, position,
                _fold_now(position, seg),
            )
            outputs.append(y)
        if head < length:
            rest = length - head
            segments = _cache.segments_for_prefill(rest, seg)
            taken = consumed[:, head:]
            count = ops.sum(ops.cast(taken, "int32"), axis=1)
            y, cache = self._prefill(
                _cache.pad_tokens(x[:, head:], segments * seg),
                _cache.pad_tokens(taken, segments * seg, False),
                None, count // seg, count, cache,
            )
            outputs.append(y[:, :rest])
        outputs = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=1)
        return outputs, cache

    def _decode_step(self, x, cache, take, write, slot, position, fold_now):
        """One new token `x` `(b, 1, D)` (compute dtype) against the cache.

        `take` (bool `(b,)`): rows that consume the token (the others keep their cache;
        their output is not meaningful); `write`: rows whose token enters the attention
        and the memory (`take` for a plain layer; the routed tokens in a MoD block);
        `slot`: the cache slot it takes (int or `(b,)`); `position`: its position for the
        embedder; `fold_now` (bool, scalar or `(b,)`): the token ends its segment, which
        is then folded into `(memory, norm)` and the slots freed.
        """
        b = x.shape[0] if x.shape[0] is not None else ops.shape(x)[0]
        seg = self.segment_len
        write = ops.logical_and(ops.cast(write, "bool"), ops.cast(take, "bool"))
        xs = ops.where(write[:, None, None], x, ops.zeros_like(x))[:, :, None, :]
        query, key, value = self._project(xs)  # (b, 1, h | hkv, 1, d)
        if self.positional_embedder is not None:
            p = ops.reshape(ops.cast(position, "int32"), (-1, 1, 1, 1))
            query_rot = self._rotate(query, p, in_segment=True)
            key_rot = self._rotate(key, p, in_segment=True)
        else:
            query_rot, key_rot = query, key

        # Write the token into its slot, then attend over the segment so far.
        slots = ops.arange(seg, dtype="int32")[None, :]
        slot = ops.reshape(ops.cast(slot, "int32"), (-1, 1))
        hit = ops.logical_and(slots == slot, write[:, None])  # (b, S)
        keys = ops.where(hit[:, :, None, None], ops.swapaxes(key_rot[:, 0], 1, 2),
                         cache["key"])
        values = ops.where(hit[:, :, None, None], ops.swapaxes(value[:, 0], 1, 2),
                           cache["value"])
        valid = ops.logical_or(cache["valid"], hit)
        attended = attention_ops.cached_attention(
            query_rot[:, 0], self._repeat_heads(keys), self._repeat_heads(values), valid,
            freed_slots_finite=True,
        )

        # Read the memory (the state before this segment) and add the token's update.
        memory, norm = cache["memory"], cache["norm"]
        phi_q = memory_ops.feature_map(query, self.memory_feature_map)
        retrieved = self._read_memory(phi_q, memory[:, None], norm[:, None])
        read_k, write_k, value32, decay = self._memory_keys(
            xs, key, value, write[:, None, None]
        )
        log_decay = None
        if decay is None:
            memory_step, norm_step = self._memory_update(
                read_k, write_k, value32, memory, norm, pending=cache["memory_update"]
            )
            memory_update = cache["memory_update"] + memory_step
        else:  # the state so far, e^G M + P; the token: e^g_t (e^G M + P) + w^T e
            decay_before = cache["memory_decay"]
            state = ops.exp(decay_before)[..., None, None] * memory + cache["memory_update"]
            memory_step, norm_step = self._memory_update(read_k, write_k, value32, state,
                                                         norm, memory_write_k=decay[1])
            log_decay = decay[0][:, 0]  # (b, h)
            memory_update = ops.exp(log_decay)[..., None, None] * cache["memory_update"] \
                + memory_step
            memory_decay = decay_before + log_decay
        norm_update = cache["norm_update"] + norm_step

        mixed = self._mix(ops.cast(retrieved[:, 0], self.compute_dtype), attended,
                          self.gate_values()[:, None, None])
        outputs = self.output_dense(mixed[:, None])  # (b, 1, 1, D)
        outputs = ops.reshape(outputs, (b, 1, self.dim_input))

        # A finished segment is folded into the state and its slots are freed.
        fold_now = ops.logical_and(
            ops.broadcast_to(ops.cast(fold_now, "bool"), ops.shape(write)),
            ops.cast(take, "bool"),
        )
        new_cache = self._folded_cache(
            memory, norm, memory_update, norm_update, keys, values, valid,
            cache["length"] + ops.cast(take, "int32"), fold_now,
            None if log_decay is None else memory_decay,
        )
        return outputs, new_cache

    def _folded_cache(self, memory, norm, memory_update, norm_update, keys, values, valid,
                      length, fold, memory_decay=None):
        """The cache after a token or segment: rows with `fold` (bool `(b,)`) fold their
        current segment's update into `(memory, norm)` (decayed by `memory_decay`
        `(b, h)`, the segment's log decay so far, when given) and free its slots; the
        others keep the update pending."""
        decayed = memory if memory_decay is None else \
            ops.exp(memory_decay)[..., None, None] * memory
        folded_memory, folded_norm = memory_ops.fold(decayed, norm, memory_update,
                                                     norm_update)
        f4, f3 = fold[:, None, None, None], fold[:, None, None]
        new_cache = {
            "memory": ops.where(f4, folded_memory, memory),
            "norm": ops.where(f3, folded_norm, norm),
            "memory_update": ops.where(f4, ops.zeros_like(memory_update), memory_update),
            "norm_update": ops.where(f3, ops.zeros_like(norm_update), norm_update),
            "key": keys,
            # Freed slots hold zeros: a stale non-finite value cannot reach a later query
            # through a zero probability (`cached_attention(freed_slots_finite=True)`).
            "value": ops.where(f4, ops.zeros_like(values), values),
            "valid": ops.logical_and(valid, ops.logical_not(fold[:, None])),
            "length": length,
        }
        if memory_decay is not None:
            new_cache["memory_decay"] = ops.where(
                fold[:, None], ops.zeros_like(memory_decay), memory_decay
            )
        return new_cache

    def _prefill(self, x, valid, positions, stop, count, cache):
        """Several new tokens at a segment boundary, segment-parallel.

        `x` `(b, n * S, D)` (whole segments), `valid` bool `(b, n * S)`: tokens that enter
        the layer; `positions` `(b, n * S)` or None (segment-local); `stop` `(b,)`: the
        segment each row's consumption ends in (`< n`): earlier segments are folded into
        the state through the normal call, segment `stop` becomes the cache's current
        segment; `count` `(b,)`: tokens consumed per row. Returns `(outputs, cache)`.
        """
        seg = self.segment_len
        n = int(x.shape[1]) // seg
        stop = ops.cast(stop, "int32")
        segment_id = ops.arange(n * seg, dtype="int32")[None, :] // seg  # (1, n S)
        # 1. Whole segments (those before `stop`) through the normal call, state carried.
        before_stop = ops.logical_and(valid, segment_id < stop[:, None])
        outputs, memory, norm = self.call(
            x, mask=before_stop, positions=positions,
            initial_state=(cache["memory"], cache["norm"]), return_state=True,
        )
        # 2. The current segment `stop` of every row: outputs from the state after the
        # whole segments, keys and values into the cache.
        def current(t):  # (b, n * S, ...) -> (b, 1, S, ...): segment `stop` of each row
            t = segment_ops.fold(t, seg)
            index = ops.reshape(stop, (-1,) + (1,) * (len(t.shape) - 1))
            return ops.take_along_axis(t, index, axis=1)

        x_cur, valid_cur = current(x), current(valid)
        pos_cur = None if positions is None else current(positions)
        mixed, _, _ = self._segments(x_cur, valid_cur, pos_cur, memory, norm)
        current_outputs = self.output_dense(mixed)  # (b, 1, S, D)
        x_in = ops.where(valid_cur[..., None], x_cur, ops.zeros_like(x_cur))
        _, key, value = self._project(x_in, query=False)  # (b, 1, hkv, S, d)
        key_rot = key
        if self.positional_embedder is not None:
            p = ops.arange(seg, dtype="int32") if pos_cur is None else pos_cur[:, :, None, :]
            key_rot = self._rotate(key, p, in_segment=pos_cur is None)
        read_k, write_k, value32, decay = self._memory_keys(x_in, key, value, valid_cur)
        memory_update, norm_update = self._memory_update(
            read_k, write_k, value32, memory, norm,
            memory_write_k=None if decay is None else decay[1],
        )
        outputs = segment_ops.fold(outputs, seg)
        is_current = (ops.arange(n, dtype="int32")[None, :] == stop[:, None])[..., None, None]
        outputs = ops.where(is_current, current_outputs, outputs)
        new_cache = {
            "memory": memory,
            "norm": norm,
            "memory_update": memory_update,
            "norm_update": norm_update,
            "key": ops.swapaxes(key_rot[:, 0], 1, 2),
            "value": ops.swapaxes(value[:, 0], 1, 2),
            "valid": valid_cur[:, 0],
            "length": cache["length"] + ops.cast(count, "int32"),
        }
        if decay is not None:
            new_cache["memory_decay"] = decay[0][:, 0]
        return segment_ops.unfold(outputs), _rows_taking(count, new_cache, cache)

    def _prefill_segment(self, x, valid, cache, positions=None, count=None, fold=None):
        """One segment from a segment boundary (the cache's current segment is empty):
        the step of the chunked prefill (`InfiniCausalLM` loops it over the prompt).

        `x` `(b, S, D)` (compute dtype), `valid` bool `(b, S)`: the tokens that enter (a
        prefix per row for a plain layer, the routed slots in a MoD block); `positions`
        `(b, S)` or None (`0..S-1`); `count` `(b,)`: tokens each row consumes (a row with
        0 keeps its cache; default: the valid tokens); `fold` bool `(b,)`: the row
        consumed the whole segment, which is folded into `(memory, norm)` (the slots
        freed), as `_decode_step` does at a segment's last token; otherwise it becomes the
        cache's current segment (default: `count == segment_len`). Equal to
        `_prefill` on this segment, with one segment's program (no scan over segments).
        Returns `(outputs (b, S, D), cache)`.
        """
        if count is None:
            count = ops.sum(ops.cast(valid, "int32"), axis=1)
        if fold is None:
            fold = count == self.segment_len
        xf = ops.where(valid[:, None, :, None], x[:, None], ops.zeros_like(x[:, None]))
        vf = valid[:, None]  # (b, 1, S)
        query, key, value = self._project(xf)  # (b, 1, h | hkv, S, d)
        pos = None if positions is None else ops.cast(positions, "int32")[:, None]
        attended, key_rot = self._attend_locally(query, key, value, vf, pos)
        memory, norm = cache["memory"], cache["norm"]
        phi_q = memory_ops.feature_map(query, self.memory_feature_map)
        retrieved = self._read_memory(phi_q, memory[:, None], norm[:, None])
        mixed = self._mix(ops.cast(retrieved, self.compute_dtype), attended,
                          self.gate_values()[:, None, None])
        outputs = self.output_dense(mixed)[:, 0]  # (b, S, D)

        read_k, write_k, value32, decay = self._memory_keys(xf, key, value, vf)
        memory_update, norm_update = self._memory_update(
            read_k, write_k, value32, memory, norm,
            memory_write_k=None if decay is None else decay[1],
        )
        value_cur = ops.swapaxes(value[:, 0], 1, 2)  # (b, S, hkv, dv)
        new_cache = self._folded_cache(
            memory, norm, memory_update, norm_update, ops.swapaxes(key_rot[:, 0], 1, 2),
            value_cur, valid, cache["length"] + ops.cast(count, "int32"),
            ops.cast(fold, "bool"), None if decay is None else decay[0][:, 0],
        )
        return outputs, _rows_taking(count, new_cache, cache)

    # ------------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        embedder = self.embedder_config()
        config.update(
            {
                "dim_input": self.dim_input,
                "dim_key": self.dim_key,
                "dim_value": self.dim_value,
                "num_heads": self.num_heads,
                "segment_len": self.segment_len,
                "update": self.update,
                "causal": self.causal,
                "positional_embedder": embedder,
                "init_state_learnable": self.init_state_learnable,
                "return_state": self.return_state,
                "group_tokens": self.group_tokens,
                **self.weight_config(),
                "memory_feature_map": self.memory_feature_map,
                "write_strength": self.write_strength,
                "gate_init": self.gate_init,
                "gate_lr_scale": self.gate_lr_scale,
                "memory_decay": self.memory_decay,
                "num_key_value_heads": self.num_key_value_heads,
                "memory_heads": self.memory_heads,
                "memory_gate": self.memory_gate,
                "qkv_bias": self.qkv_bias,
                "query_norm": _serialize_layer(self.query_norm),
                "key_norm": _serialize_layer(self.key_norm),
            }
        )
        return config
