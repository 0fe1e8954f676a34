"""`scan` and `map` over the leading axis: `keras.ops` with a PyTorch fast path.

Keras 3.15's torch `ops.scan` (and `ops.map`, built on it) is a Python loop that slices
`xs[i]` at every step. In torch autograd each slice's backward (`SelectBackward`)
materialises a zero tensor of the *whole* `xs` with one slice filled, so the backward of
a scan over `n` steps costs `O(n^2)` memory traffic: a delta-rule CompressiveMemory train
step at 64K tokens (256 segments) took 35 s, 6.6x the per-token cost of 4K.
`torch_unbind_scan` splits `xs` once with `ops.unstack` (`torch.unbind`, whose backward
stacks the gradients: `O(n)`) and loops over the pieces. Eager torch loops in Python either
way; on JAX the `keras.ops` versions compile to one loop.

On TensorFlow, `scan` over a static number of steps uses `_tf_scan.while_scan`: a
`tf.while_loop` with `maximum_iterations` and `TensorArray`s, which XLA can differentiate
(Keras' TF `ops.scan` cannot be differentiated under `jit_compile=True`). A dynamic number
of steps falls back to `ops.scan`.
"""

from keras import backend
from keras import ops
from keras import tree


def _use_unbind():
    return backend.backend() == "torch"


def torch_unbind_scan(f, init, xs, axis=0):
    """`ops.scan(f, init, xs)` semantics (pytrees), over and stacked on `axis`; O(n) backward."""
    leaves = tree.flatten(xs)
    pieces = [ops.unstack(leaf, axis=axis) for leaf in leaves]
    carry = init
    ys = []
    for parts in zip(*pieces):
        carry, y = f(carry, tree.pack_sequence_as(xs, list(parts)))
        ys.append(y)
    if not ys:
        raise ValueError(
            f"Invalid xs: scan needs at least one step (axis {axis} of size 0)."
        )
    stacked = tree.map_structure(lambda *values: ops.stack(values, axis=axis), *ys)
    return carry, stacked


def scan(f, init, xs, axis=0):
    """`ops.scan(f, init, xs)`, scanning `axis` of every leaf of `xs` and stacking the
    outputs on `axis` (default 0, as `ops.scan`). On torch `torch_unbind_scan`, which
    splits and stacks on `axis` directly: no copy of the whole input or output to move the
    axis (each 128 MiB tensor copy at 64K tokens is a fresh `mmap` whose pages fault in).
    On TensorFlow with a static number of steps `_tf_scan.while_scan` (see the module
    docstring)."""
    if _use_unbind():
        return torch_unbind_scan(f, init, xs, axis=axis)
    if axis != 0:
        xs = tree.map_structure(lambda leaf: ops.moveaxis(leaf, axis, 0), xs)
    if backend.backend() == "tensorflow" and tree.flatten(xs)[0].shape[0] is not None:
        from keras_infini.ops import _tf_scan

        carry, ys = _tf_scan.while_scan(f, init, xs)
    else:
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
