"""`scan` over segments or groups: one entry point, with backend fast paths behind it.

`scan(f, init, xs, axis)` has `keras.ops.scan` semantics over `axis` of every leaf of `xs`
(outputs stacked on `axis`). It tries `keras_infini.ops.backend.scan` (a bounded
`tf.while_loop` on TensorFlow that XLA can differentiate for static and dynamic step
counts; an `unbind` loop on torch with an `O(n)` backward) and falls back to `ops.scan`
(JAX's `lax.scan`). Also here: the group size of the whole-layer group loop.
"""

from keras import backend
from keras import ops
from keras import tree

from keras_infini.ops import backend as fast


def scan(f, init, xs, axis=0):
    """`ops.scan(f, init, xs)`, scanning `axis` of every leaf of `xs` and stacking the
    outputs on `axis` (default 0, as `ops.scan`)."""
    try:
        return fast.scan(f, init, xs, axis=axis)
    except NotImplementedError:
        pass
    if axis != 0:
        xs = tree.map_structure(lambda leaf: ops.moveaxis(leaf, axis, 0), xs)
    carry, ys = ops.scan(f, init, xs)
    if axis != 0:
        ys = tree.map_structure(lambda leaf: ops.moveaxis(leaf, 0, axis), ys)
    return carry, ys


# Tokens per group of the whole-layer group loop (`CompressiveMemory(group_tokens="auto")`),
# per backend, from benchmarks/bench_attention.py on a 2-core CPU (README "Performance"):
# PyTorch's smaller groups keep each group's attention scores under glibc's 32 MiB `mmap`
# threshold at batch 2, 4 heads, segments of 256.
_AUTO_GROUP_TOKENS = {"torch": 2048}
_DEFAULT_GROUP_TOKENS = 4096


def check_group_tokens(value):
    """Validates a `group_tokens` argument: `"auto"`, `None` (no grouping) or a positive int."""
    if value is None or value == "auto":
        return value
    from keras_infini import validation

    try:
        return validation.positive_int("group_tokens", value)
    except ValueError:
        raise ValueError(
            f"Invalid group_tokens={value!r}: expected 'auto', None or a positive integer."
        ) from None


def group_segments(group_tokens, segment_len):
    """Segments per group for `group_tokens` (`"auto"` resolved per backend), or None."""
    if group_tokens == "auto":
        group_tokens = _AUTO_GROUP_TOKENS.get(backend.backend(), _DEFAULT_GROUP_TOKENS)
    if group_tokens is None:
        return None
    return max(1, group_tokens // segment_len)
