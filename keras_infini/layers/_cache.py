"""Decode-cache plumbing shared by the stateful layers (CompressiveMemory and the blocks).

A cached call, `outputs, cache = layer(x, cache=cache, cache_update_index=i)`, runs `x`
(new tokens at positions `i, i + 1, ...`) against a fixed-shape cache built by
`layer.build_cache(batch_size)`. The cache is a dict of tensors (a pytree for `jax.jit`,
`tf.function` and keras-hub's generation loop):

- `memory (b, h, dk, dv)`, `norm (b, h, dk)`, float32: the state before the current
  segment (what the full call carries between segments);
- `memory_update`, `norm_update` (same shapes, float32): the current segment's update so
  far. Each token's term of the linear or paper delta update depends only on the state
  before its segment (`ops.memory.linear_update` / `delta_update`), so it is added as the
  token arrives; the token-level delta rule of the unit-key maps reads the state plus
  this pending update. The segment is folded (`ops.memory.fold`) when it fills;
- `key (b, S, h, dk)`, `value (b, S, h, dv)` in the compute dtype: the current segment's
  keys (rotated at their positions) and values, for the local softmax attention;
  `valid (b, S)` bool: the slots that hold a token of the current segment;
- `length (b,)` int32: tokens consumed per row (checked against `cache_update_index`).

MoD blocks add `routed (b,)` int32 (tokens of the current segment routed so far) around
the inner block's cache.
"""

from keras import ops
from keras import tree

from keras_infini import distribution
from keras_infini import validation
from keras_infini.ops import backend as fast_paths


class CachedCallMixin:
    """Keeps a decode cache out of Keras' input autocasting, and its calls out of the
    sequence sharding of `keras_infini.distribution.SequenceParallel` (`unsharded`).

    `Layer.__call__` casts every floating tensor argument to the compute dtype, which
    would round the float32 memory to bfloat16 at every step under `mixed_bfloat16`. A
    call with `cache=` skips that conversion (the layer casts its inputs itself).
    """

    def __call__(self, *args, **kwargs):
        if kwargs.get("cache") is None:
            return super().__call__(*args, **kwargs)
        args = tuple(ops.convert_to_tensor(a) if i == 0 else a for i, a in enumerate(args))
        previous = self._convert_input_args
        self._convert_input_args = False
        try:
            # Under `SequenceParallel`, a cached call runs unsharded over the sequence:
            # its one current segment cannot be split across devices.
            with distribution.unsharded():
                return super().__call__(*args, **kwargs)
        finally:
            self._convert_input_args = previous

    def _require_causal(self):
        if not self.causal:
            raise ValueError(
                f"Invalid call of layer {self.name!r} with cache: it has causal=False. A "
                "decode cache needs causal attention (a token must not see later tokens of "
                "its segment, which are not there yet when decoding). Build the layer with "
                "causal=True."
            )

    def _check_cache_call(self, inputs, cache, cache_update_index, positions=None,
                          initial_state=None, return_state=None, mask=None):
        """Validates a cached call's arguments; returns `(index, mask, cache)` checked
        (the cache's entries as tensors: NumPy arrays of the right dtypes are accepted)."""
        self._require_causal()
        for name, value in (("positions", positions), ("initial_state", initial_state),
                            ("return_state", return_state)):
            if value is not None and value is not False:
                raise ValueError(
                    f"Invalid {name}={value!r} with cache: a cached call takes its "
                    "positions and state from the cache and returns (outputs, cache)."
                )
        if len(inputs.shape) != 3 or inputs.shape[1] is None:
            raise ValueError(
                f"Invalid inputs with shape {tuple(inputs.shape)} for a call with cache: "
                "expected (batch, new_tokens, dim_input) with a known number of tokens."
            )
        batch = inputs.shape[0]
        validation.cache(cache, self.cache_shapes(batch), self.name, batch,
                         self.cache_dtypes())
        cache = tree.map_structure(ops.convert_to_tensor, cache)
        index = validation.cache_update_index(cache_update_index, int(inputs.shape[1]))
        mask = validation.sequence_tensor("mask", mask, inputs)
        check_prefix_mask(mask, self.name)
        return index, mask, cache

    def _ensure_built(self):
        if not self.built:
            if self.dim_input is None:
                raise ValueError(
                    f"Layer {self.name!r} is not built and has dim_input=None: call it on "
                    "data (or build it) before build_cache."
                )
            self.build((None, None, self.dim_input))


def check_prefix_mask(mask, owner):
    """`validation.prefix_mask` when `mask` is known now (eager) and has several tokens;
    skipped while tracing (`jax.jit`, `tf.function`), where the tokens after a row's first
    False are not consumed (`consumed_tokens`)."""
    if mask is None or len(mask.shape) != 2 or mask.shape[1] is None or mask.shape[1] < 2:
        return
    if fast_paths.is_traced(mask):
        return
    validation.prefix_mask(ops.convert_to_numpy(mask), owner)


def consumed_tokens(inputs, mask):
    """Bool `(batch, T)`: the tokens a cached call consumes, the prefix of `mask` up to its
    first False (all tokens without a mask). Right-padded prompts keep their tokens."""
    batch, length = inputs.shape[0], inputs.shape[1]
    if mask is None:
        return ops.ones((ops.shape(inputs)[0] if batch is None else batch, length), "bool")
    if length == 1:
        return ops.cast(mask, "bool")
    holes = ops.cumsum(ops.cast(ops.logical_not(ops.cast(mask, "bool")), "int32"), axis=1)
    return holes == 0


def check_cache_position(index, lengths, takes_token):
    """`validation.cache_position` when the values are known now (eager); skipped while
    tracing (`jax.jit`, `tf.function`), where a value cannot be read."""
    if fast_paths.is_traced(lengths) or fast_paths.is_traced(takes_token):
        return
    if not isinstance(index, int):
        if fast_paths.is_traced(index):
            return
        index = int(ops.convert_to_numpy(index))
    validation.cache_position(
        index, ops.convert_to_numpy(lengths), ops.convert_to_numpy(takes_token)
    )


def position_in_segment(index, offset, segment_len):
    """`(index + offset) % segment_len` as a Python int (int index) or int32 tensor."""
    if isinstance(index, int):
        return (index + offset) % segment_len
    return ops.mod(ops.cast(index, "int32") + offset, segment_len)


def pad_tokens(x, length, value=0):
    """Pads `x` `(batch, T, ...)` at the end of axis 1 to `length >= T` entries."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    shape = [ops.shape(x)[0] if x.shape[0] is None else x.shape[0], pad] + list(x.shape[2:])
    return ops.concatenate([x, ops.full(shape, value, dtype=x.dtype)], axis=1)


def segments_for_prefill(length, segment_len):
    """Segments a prefill of `length` tokens runs on: every token plus at least one free
    slot, so a row that consumes all of them has a (possibly empty) current segment."""
    return length // segment_len + 1
