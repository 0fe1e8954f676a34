"""CompressiveMemory: Infini-attention (arXiv 2404.07143) as a Keras 3 layer."""

import math
import numbers

import keras
from keras import ops

from keras_infini.layers._outputs import StatefulOutputsMixin
from keras_infini.layers.rotary import RoPEEmbeddings
from keras_infini.ops import attention as attention_ops
from keras_infini.ops import loops
from keras_infini.ops import memory as memory_ops
from keras_infini.ops import segments as segment_ops

UPDATES = ("linear", "delta")


def check_positive_int(name, value, allow_none=False):
    """Raises a ValueError naming `name` unless `value` is a positive int."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        allowed = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"Invalid {name}={value!r}: expected {allowed}.")


def check_sampling_factor(value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 1:
        raise ValueError(
            f"Invalid sampling_factor={value!r}: expected None or a number greater than 1."
        )


def check_memory_options(num_heads, memory_feature_map, write_strength, gate_init,
                         gate_lr_scale):
    """Validates the memory options; returns `gate_init` as a float or a list of floats."""
    if memory_feature_map not in memory_ops.FEATURE_MAPS:
        raise ValueError(
            f"Invalid memory_feature_map={memory_feature_map!r}: expected one of "
            f"{memory_ops.FEATURE_MAPS}."
        )
    if not isinstance(write_strength, bool):
        raise ValueError(
            f"Invalid write_strength={write_strength!r}: expected a bool (True or False)."
        )

    def real(v):
        return (not isinstance(v, bool) and isinstance(v, numbers.Real)
                and math.isfinite(float(v)))

    if isinstance(gate_init, (list, tuple)):
        if len(gate_init) != num_heads or not all(real(v) for v in gate_init):
            raise ValueError(
                f"Invalid gate_init={gate_init!r}: expected a finite number or a list of "
                f"num_heads={num_heads} finite numbers (gate logits, sigmoid(0) = 0.5)."
            )
        gate_init = [float(v) for v in gate_init]
    elif real(gate_init):
        gate_init = float(gate_init)
    else:
        raise ValueError(
            f"Invalid gate_init={gate_init!r}: expected a finite number or a list of "
            f"num_heads={num_heads} finite numbers (gate logits, sigmoid(0) = 0.5)."
        )
    if not real(gate_lr_scale) or not gate_lr_scale > 0:
        raise ValueError(
            f"Invalid gate_lr_scale={gate_lr_scale!r}: expected a finite number > 0."
        )
    return gate_init


def resolve_positional_embedder(positional_embedder, dim_key, segment_len):
    """Turns the `positional_embedder` argument into an embedder layer or None."""
    if positional_embedder is None:
        return None
    if isinstance(positional_embedder, str):
        if positional_embedder == "rope":
            return RoPEEmbeddings(dim=dim_key, seq_len=segment_len)
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
    if not isinstance(positional_embedder, RoPEEmbeddings):
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
class CompressiveMemory(StatefulOutputsMixin, keras.layers.Layer):
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
        sampling_factor: `None` or a number > 1. Accepted for compatibility with the
            original PyTorch API; it does not change the computation.
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
        memory_feature_map: feature map `phi` of the memory's queries and keys.
            `"elu1"` (default, the paper): `phi = elu + 1`, read as
            `phi(Q) M / (phi(Q) z + eps)`, delta error `V - phi(K) M / (phi(K) z + eps)`.
            `"l2"` (DeltaNet, Yang et al. 2024): `phi(t) = t / ||t||_2` per head, read
            without normaliser, `A_mem = phi(Q) M`, delta error `V - phi(K) M`; unit keys
            make the delta rule replace a stored value instead of piling values up (with
            a positive map every two keys overlap). `"elu1_l2"`: `elu + 1` divided by its
            L2 norm, read like `"l2"` (unit, positive, possibly sparse keys). The
            normaliser `z` is still accumulated (from the write keys) so the state keeps
            its shape.
        write_strength: `False` (default) or `True`: a learned write strength per token
            and head, `beta = sigmoid(x W_beta + b_beta)` (sublayer `beta_dense`, bias
            zeros: 0.5 at initialisation), that scales each token's write:
            delta `M += phi(K)^T diag(beta) (V - read)` (DeltaNet's
            `M += k^T beta (v - k M)` with `"l2"`), linear `M += phi(K)^T diag(beta) V`,
            and `z += sum_t beta_t phi(K_t)`. Lets the model skip tokens (beta -> 0).
        gate_init: initial gate logit, a number or a list of `num_heads` numbers
            (default 0.0: `sigmoid(0) = 0.5` for every head).
        gate_lr_scale: positive number (default 1.0). The gate is stored as
            `raw = gate_init / gate_lr_scale` and used as `sigmoid(gate_lr_scale * raw)`,
            so with Adam the gate logit moves `gate_lr_scale` times faster than the other
            weights (a scaled parametrisation; at 1.0 the layer is the paper's).
            For multi-key recall across segments `update="linear"`,
            `write_strength=True`, `gate_lr_scale=10.0` measured best (README, "Memory
            options"; benchmarks/bench_recall.py).
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(batch, seq_len, dim_input)`.
        mask: optional `(batch, seq_len)` boolean mask; masked tokens are neither attended
            to nor written to memory. Propagated to the output.
        positions: optional `(batch, seq_len)` integer segment-local positions for the
            embedder (default `0..segment_len-1` in every segment).
        initial_state: optional `(memory (batch, heads, dim_key, dim_value),
            norm (batch, heads, dim_key))`, overriding the default initial state.
        training: unused (no dropout), accepted for Keras compatibility.
        return_state: optional per-call override of the constructor's `return_state`.

    Returns:
        `(batch, seq_len, dim_input)`, or `(outputs, memory, norm)` with `return_state`.

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

    # Long inputs run in groups of this many tokens (whole segments), so the working set
    # does not grow with the input length. `None`: all segments in one batch. "auto"
    # picks per backend from measurements (benchmarks/bench_attention.py, 2-core CPU).
    # The *whole layer* (projections, attention, memory, output projection) runs group
    # after group with the state carried (`loops.scan` over axis 1, exact like chunked
    # streaming):
    # - JAX: groups of 4096 tokens. One batched call slowed down per token from 4K to 64K
    #   tokens (train step 1.5x); grouped, the 64K train step took 5.3 s instead of 6.6 s.
    # - torch: groups of 2048 tokens. Batched, the 64K train step took 12.2 s (2.1x per
    #   token of 4K). Eager torch allocates every intermediate through glibc malloc, which
    #   serves blocks of 32 MiB and more with a fresh `mmap` whose pages fault in at every
    #   step; a group's attention logits are `b * tokens * heads * S * 4` bytes (32 MiB for
    #   4096 tokens at batch 2, 4 heads, S = 256), 16 MiB for 2048 stay in the heap. With
    #   the output projection inside the loop and the loop splitting/stacking on axis 1
    #   (no transposed copy of the whole sequence), the 64K delta train step went from
    #   6.6 s (4096-token groups, projection outside) to 4.2 s: 1.22x per token of 4K.
    # - TensorFlow: groups of 4096 tokens (a bounded `tf.while_loop`, which XLA
    #   differentiates). Delta, XLA: the 64K train step went from 5.36 s batched to 3.38 s
    #   (per token 1.56x -> 0.97x of 4K). Linear: batched 64K train 3.75 s with XLA (1.41x
    #   per token of 4K) and 2.82 s without; grouped 3.28 s (1.21x) and 2.61 s (1.00x).
    attention_group_tokens = "auto"

    def __init__(
        self,
        dim_input,
        dim_key,
        dim_value,
        num_heads,
        segment_len,
        sampling_factor=None,
        update="linear",
        causal=False,
        positional_embedder=None,
        init_state_learnable=False,
        return_state=False,
        memory_feature_map="elu1",
        write_strength=False,
        gate_init=0.0,
        gate_lr_scale=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("dim_input", dim_input, allow_none=True)
        check_positive_int("dim_key", dim_key)
        check_positive_int("dim_value", dim_value)
        check_positive_int("num_heads", num_heads)
        self.gate_init = check_memory_options(
            num_heads, memory_feature_map, write_strength, gate_init, gate_lr_scale
        )
        self.memory_feature_map = memory_feature_map
        self.write_strength = write_strength
        self.gate_lr_scale = float(gate_lr_scale)
        check_positive_int("segment_len", segment_len)
        check_sampling_factor(sampling_factor)
        if update not in UPDATES:
            raise ValueError(f"Invalid update={update!r}: expected one of {UPDATES}.")
        self.dim_input = None if dim_input is None else int(dim_input)
        self.dim_key = int(dim_key)
        self.dim_value = int(dim_value)
        self.num_heads = int(num_heads)
        self.segment_len = int(segment_len)
        self.sampling_factor = sampling_factor
        self.update = update
        self.causal = bool(causal)
        self._embedder_arg = positional_embedder
        self.positional_embedder = resolve_positional_embedder(
            positional_embedder, self.dim_key, self.segment_len
        )
        self.init_state_learnable = bool(init_state_learnable)
        self.return_state = bool(return_state)
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

        def projection(name, equation, output_shape):
            layer = keras.layers.EinsumDense(
                equation,
                output_shape=output_shape,
                kernel_initializer="glorot_uniform",
                name=name,
                dtype=self.dtype_policy,
            )
            return layer

        # The projections run on the folded `(batch, n, S, ...)` layout, so the layer
        # never hands its (possibly masked) input tensor itself to a sublayer.
        self.query_dense = projection("query", "bnsd,dhk->bnhsk", (None, h, self.segment_len, dk))
        self.key_dense = projection("key", "bnsd,dhk->bnhsk", (None, h, self.segment_len, dk))
        self.value_dense = projection("value", "bnsd,dhv->bnhsv", (None, h, self.segment_len, dv))
        self.output_dense = projection("output", "bnhsv,hvd->bnsd", (None, self.segment_len, d))
        for dense in (self.query_dense, self.key_dense, self.value_dense):
            dense.build((None, None, self.segment_len, d))
        self.output_dense.build((None, None, h, self.segment_len, dv))
        self.gate = self.add_weight(
            name="gate", shape=(h,), initializer=self._gate_initializer(), trainable=True
        )
        if self.write_strength:
            # Heads last, bias `(h,)`: on TensorFlow, Keras 3.15's `ops.add` takes a
            # `(h, 1)` bias for a `tf.nn.bias_add` and adds it on axis 1 whenever that
            # axis (here the number of segments) happens to equal `h`.
            self.beta_dense = keras.layers.EinsumDense(
                "bnsd,dh->bnsh",
                output_shape=(None, self.segment_len, h),
                bias_axes="h",
                kernel_initializer="glorot_uniform",
                name="write_strength",
                dtype=self.dtype_policy,
            )
            self.beta_dense.build((None, None, self.segment_len, d))
        if self.init_state_learnable:
            # autocast=False: recurrent state stays float32 under mixed precision.
            self.initial_memory = self.add_weight(
                name="initial_memory",
                shape=(h, dk, dv),
                initializer="zeros",
                autocast=False,
                dtype="float32",
            )
            self.initial_norm = self.add_weight(
                name="initial_norm",
                shape=(h, dk),
                initializer="ones",
                constraint=keras.constraints.NonNeg(),
                autocast=False,
                dtype="float32",
            )
        if self.positional_embedder is not None and not self.positional_embedder.built:
            self.positional_embedder.build((None, None, h, dk))
        # Checked on every call once built: wrong rank or width -> ValueError.
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: self.dim_input})
        self.built = True

    def _gate_initializer(self):
        if self.gate_init == 0.0:
            return "zeros"  # the default, as before the option existed
        scale = self.gate_lr_scale

        def initializer(shape, dtype=None):
            raw = ops.convert_to_tensor(self.gate_init, "float32") / scale
            return ops.cast(ops.broadcast_to(raw, shape), dtype or "float32")

        return initializer

    def gate_values(self):
        """The gates `sigmoid(gate_lr_scale * gate)` per head, `(num_heads,)`."""
        raw = ops.cast(self.gate, self.compute_dtype)
        if self.gate_lr_scale != 1.0:
            raw = raw * self.gate_lr_scale
        return ops.sigmoid(raw)

    # ------------------------------------------------------------------ state
    def get_initial_state(self, batch_size):
        """The state before the first segment: `(memory, norm)`, float32."""
        h, dk, dv = self.num_heads, self.dim_key, self.dim_value
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
    def call(
        self,
        inputs,
        mask=None,
        positions=None,
        initial_state=None,
        training=None,
        return_state=None,
    ):
        seg = self.segment_len
        length = segment_ops.static_or_dynamic_dim(inputs, 1)
        batch = segment_ops.static_or_dynamic_dim(inputs, 0)

        # Pad to whole segments; `valid` marks real, unmasked tokens (float32, 0/1), or is
        # None when every token is real (no mask, no padding): no mask tensor to build,
        # apply or constant-fold (see `attention_ops.attention_mask`).
        if mask is None and isinstance(length, int) and length % seg == 0:
            valid = None
        else:
            valid = segment_ops.fold(segment_ops.valid_tokens(inputs, mask, seg), seg)
        x = segment_ops.pad_to_segments(ops.cast(inputs, self.compute_dtype), seg, axis=1)
        x = segment_ops.fold(x, seg)  # (b, n, S, D)
        pos = None
        if self.positional_embedder is not None and positions is not None:
            pos = segment_ops.pad_to_segments(ops.cast(positions, "int32"), seg)
            pos = segment_ops.fold(pos, seg)  # (b, n, S)

        if initial_state is None:
            memory0, norm0 = self.get_initial_state(batch)
        else:
            memory0, norm0 = initial_state
            memory0 = ops.cast(memory0, "float32")
            norm0 = ops.cast(norm0, "float32")

        group_tokens = self.attention_group_tokens
        if group_tokens == "auto":
            group_tokens = {"torch": 2048}.get(keras.backend.backend(), 4096)
        group = None if group_tokens is None else max(1, group_tokens // seg)
        n = x.shape[1]
        if group is not None and n is not None and n > group:
            outputs, memory_final, norm_final = self._grouped_segments(
                x, valid, pos, memory0, norm0, group
            )
        else:
            mixed, memory_final, norm_final = self._segments(
                x, valid, pos, memory0, norm0, group
            )
            outputs = self.output_dense(mixed)  # (b, n, S, D)
        outputs = segment_ops.unfold(outputs)
        outputs = segment_ops.trim(outputs, length)
        return self.pack_outputs(outputs, [], memory_final, norm_final, return_state)

    def _grouped_segments(self, x, valid, pos, memory0, norm0, group):
        """`_segments` and the output projection on groups of `group` segments, one after
        the other, state carried; returns the projected outputs `(b, n, S, D)`.

        Equal to one `_segments` call (chunked streaming is exact), but each group's
        tensors stay small, so elementwise passes and their backward stay in cache (see
        `attention_group_tokens`). The loop is `loops.scan`: `lax.scan` on JAX (compiled
        once, whatever the number of groups), an `unbind` loop on torch (O(n) backward).
        Padding segments are invalid: they write nothing to the memory and their outputs
        are dropped.
        """
        n = x.shape[1]
        groups = -(-n // group)
        pad = groups * group - n

        if valid is None and pad:  # the padding segments must not enter the memory
            valid = ops.ones(ops.shape(x)[:3], dtype="float32")

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
                parts["x"], parts.get("valid"), parts.get("pos"), memory, norm, None
            )
            return (memory, norm), self.output_dense(mixed)  # (b, G, S, D)

        (memory_final, norm_final), outputs = loops.scan(
            step, (memory0, norm0), xs, axis=1
        )  # outputs (b, groups, G, S, D)
        outputs = ops.reshape(
            outputs, [ops.shape(outputs)[0], groups * group] + list(outputs.shape[3:])
        )
        return (outputs[:, :n] if pad else outputs), memory_final, norm_final

    def _segments(self, x, valid, pos, memory0, norm0, group):
        """Attention + memory for folded segments `x` `(b, n, S, D)`: the gated heads
        `(b, n, h, S, dv)` before the output projection, and the final `(memory, norm)`."""
        query = self.query_dense(x)  # (b, n, h, S, dk)
        key = self.key_dense(x)
        value = self.value_dense(x)  # (b, n, h, S, dv)

        # 1. Local attention, all segments at once.
        if self.positional_embedder is not None:
            # None: the embedder's default, 0..S-1 along the segment axis (-2).
            p = None if pos is None else pos[:, :, None, :]  # (b, n, 1, S)
            query_rot = self.positional_embedder(query, positions=p)
            key_rot = self.positional_embedder(key, positions=p)
        else:
            query_rot, key_rot = query, key
        attended = attention_ops.grouped_local_attention(
            query_rot, key_rot, value, valid, self.causal, group
        )

        # 2-3. Memory states before each segment (float32) and retrieval.
        if self.memory_feature_map != "elu1" or self.write_strength:
            retrieved, memory_final, norm_final = self._memory_with_options(
                x, query, key, value, valid, memory0, norm0
            )
            gate = self.gate_values()[:, None, None]  # (h, 1, 1)
            mixed = gate * retrieved + (1.0 - gate) * attended
            return mixed, memory_final, norm_final
        sigma_k = memory_ops.sigma(key)
        if valid is not None:
            sigma_k = sigma_k * valid[:, :, None, :, None]
        value32 = ops.cast(value, "float32")
        norm_before, norm_final = memory_ops.norm_states(sigma_k, norm0)
        if self.update == "linear":
            memory_before, memory_final = memory_ops.linear_memory_states(
                sigma_k, value32, memory0
            )
        else:
            memory_before, memory_final = memory_ops.delta_memory_states(
                sigma_k, value32, norm_before, memory0
            )
        retrieved = memory_ops.retrieve(memory_ops.sigma(query), memory_before, norm_before)
        retrieved = ops.cast(retrieved, self.compute_dtype)

        # 4. Gate per head (the caller concatenates heads and projects).
        gate = self.gate_values()[:, None, None]  # (h, 1, 1)
        mixed = gate * retrieved + (1.0 - gate) * attended
        return mixed, memory_final, norm_final

    def _memory_with_options(self, x, query, key, value, valid, memory0, norm0):
        """Memory read/write with `memory_feature_map` / `write_strength` (see Args):
        returns `(retrieved (b, n, h, S, dv) compute dtype, memory_final, norm_final)`."""
        read_k = memory_ops.feature_map(key, self.memory_feature_map)  # (b, n, h, S, dk)
        write_k = read_k
        if self.write_strength:
            beta = ops.sigmoid(ops.cast(self.beta_dense(x), "float32"))  # (b, n, S, h)
            beta = ops.swapaxes(beta, 2, 3)  # (b, n, h, S)
            write_k = read_k * beta[..., None]
        if valid is not None:  # select, not multiply: a masked NaN must not leak
            keep = ops.cast(valid, "bool")[:, :, None, :, None]
            read_k = ops.where(keep, read_k, 0.0)
            write_k = ops.where(keep, write_k, 0.0)
            value = ops.where(keep, value, ops.zeros_like(value))
        value32 = ops.cast(value, "float32")
        normalised = self.memory_feature_map in memory_ops.NORMALISED_FEATURE_MAPS
        norm_before, norm_final = memory_ops.norm_states(write_k, norm0)
        if self.update == "linear":
            memory_before, memory_final = memory_ops.linear_memory_states(
                write_k, value32, memory0
            )
        else:
            memory_before, memory_final = memory_ops.delta_memory_states_general(
                read_k, write_k, value32, norm_before, memory0, normalised=normalised
            )
        phi_q = memory_ops.feature_map(query, self.memory_feature_map)
        if normalised:
            retrieved = memory_ops.retrieve(phi_q, memory_before, norm_before)
        else:
            retrieved = memory_ops.retrieve_unnormalised(phi_q, memory_before)
        return ops.cast(retrieved, self.compute_dtype), memory_final, norm_final

    # ------------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        embedder = self._embedder_arg
        if embedder is not None and not isinstance(embedder, str):
            embedder = keras.saving.serialize_keras_object(self.positional_embedder)
        config.update(
            {
                "dim_input": self.dim_input,
                "dim_key": self.dim_key,
                "dim_value": self.dim_value,
                "num_heads": self.num_heads,
                "segment_len": self.segment_len,
                "sampling_factor": self.sampling_factor,
                "update": self.update,
                "causal": self.causal,
                "positional_embedder": embedder,
                "init_state_learnable": self.init_state_learnable,
                "return_state": self.return_state,
                "memory_feature_map": self.memory_feature_map,
                "write_strength": self.write_strength,
                "gate_init": self.gate_init,
                "gate_lr_scale": self.gate_lr_scale,
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
