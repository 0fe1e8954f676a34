"""PyTorch fast paths (see `keras_infini.ops.backend`)."""

import torch
from keras import ops
from keras import tree


def scan(f, init, xs, axis=0):
    """`ops.scan(f, init, xs)` semantics (pytrees), over and stacked on `axis`.

    Keras 3.15's torch `ops.scan` slices `xs[i]` at every step; in autograd each slice's
    backward (`SelectBackward`) materialises a zero tensor of the whole `xs`, so a scan
    over `n` steps costs `O(n^2)` in its backward (a delta-rule train step at 64K tokens
    took 35 s, 6.6x the per-token cost of 4K). `unbind` once (backward: one stack, `O(n)`)
    and loop; splitting and stacking on `axis` directly avoids a transposed copy of the
    whole input and output (each a fresh `mmap` that faults in at 64K tokens).
    """
    leaves = tree.flatten(xs)
    pieces = [ops.unstack(leaf, axis=axis) for leaf in leaves]
    carry = init
    ys = []
    for parts in zip(*pieces):
        carry, y = f(carry, tree.pack_sequence_as(xs, list(parts)))
        ys.append(y)
    if not ys:
        raise ValueError(f"Invalid xs: scan needs at least one step (axis {axis} of size 0).")
    stacked = tree.map_structure(lambda *values: ops.stack(values, axis=axis), *ys)
    return carry, stacked


def no_grad():
    return torch.no_grad()


def compile_inference(fn, variables):
    """Eager `fn` without autograd recording (dynamo recompiles on Keras layers)."""
    del variables

    def run(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return run


def is_traced(x):
    del x
    return bool(torch.compiler.is_compiling())


def branch_is_free(x):
    return x.device.type == "cpu"
