"""PyTorch fast paths (see `keras_infini.ops.backend`)."""

import warnings

import keras
import numpy as np
import torch
import torch.utils._pytree as pytree
from keras import ops
from keras import tree

# Depth of `compile_static_inference` traces in progress: `make_fx` runs the Keras code
# on fake tensors, whose values cannot be read (see `is_traced`, `branch_is_free`).
_TRACING = [0]


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


def compile_static_inference(fn, variables, optimize=True):
    """`fn` traced once per input structure and shape to one graph of aten ops, run
    without Keras' Python dispatch (see the package docstring).

    The trace is `make_fx` on fake tensors: Keras code runs as Python once, and what
    reaches the dispatcher is recorded (as `jax.jit` traces), so Keras' per-call objects
    and attribute writes, which make `torch.compile` recompile at every call, are not in
    the graph. The variables' current values are graph inputs (read at every call).
    `optimize=True` compiles the graph with `torch.compile` (Inductor); if that fails
    (no C++ compiler, say), the traced graph runs as it is, with a warning.
    """
    compiled = {}

    def run(*args):
        leaves, spec = pytree.tree_flatten(args)
        leaves = [ops.convert_to_tensor(leaf) if isinstance(leaf, np.ndarray) else leaf
                  for leaf in leaves]
        key = (spec, tuple(
            (tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor)
            else ("constant", leaf) for leaf in leaves
        ))
        values = _current_values(variables)
        entry = compiled.get(key)
        if entry is None:
            entry = compiled[key] = _trace_static(fn, variables, values, leaves, spec,
                                                  optimize)
        inputs = values + [leaves[i] for i in entry["inputs"]]
        with torch.no_grad():
            try:
                outputs = entry["graph"](*inputs)
            except Exception as error:  # noqa: BLE001 - a failed compile falls back
                if entry["graph"] is entry["traced"]:
                    raise
                warnings.warn(
                    "torch.compile of the traced inference graph failed; running the "
                    f"traced graph without it (slower). Reason: {error!r}",
                    stacklevel=2,
                )
                entry["graph"] = entry["traced"]
                outputs = entry["graph"](*inputs)
        return pytree.tree_unflatten(list(outputs), entry["outputs"])

    return run


def _current_values(variables):
    """The variables' values as `Variable.value` reads them. Outside a `StatelessScope`
    and an autocast scope that is the stored tensor, read directly (`.value` costs
    ~2 us of scope checks per variable, a tenth of a decode step for 60 variables)."""
    from keras.src.backend.common import global_state

    if (global_state.get_global_attribute("stateless_scope") is not None
            or global_state.get_global_attribute("autocast_scope") is not None):
        return [variable.value for variable in variables]
    values = [variable._value for variable in variables]
    if any(value is None for value in values):  # not initialised yet
        return [variable.value for variable in variables]
    return values


def _trace_static(fn, variables, values, leaves, spec, optimize):
    inputs = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    entry = {"inputs": inputs}
    count = len(values)

    def flat(*flat_inputs):  # flat arguments: ~15% less call overhead than lists
        full = list(leaves)
        for i, tensor in zip(inputs, flat_inputs[count:]):
            full[i] = tensor
        mapping = list(zip(variables, flat_inputs[:count]))
        with keras.StatelessScope(state_mapping=mapping):
            outputs = fn(*pytree.tree_unflatten(full, spec))
        flat_outputs, entry["outputs"] = pytree.tree_flatten(outputs)
        return flat_outputs

    from torch.fx.experimental.proxy_tensor import make_fx

    _TRACING[0] += 1
    try:
        with torch.no_grad():
            traced = make_fx(flat, tracing_mode="fake")(*values,
                                                        *[leaves[i] for i in inputs])
    finally:
        _TRACING[0] -= 1
    entry["traced"] = traced
    # Inductor's input size asserts repeat dynamo's guards (hundreds per call).
    entry["graph"] = (torch.compile(traced, dynamic=False, fullgraph=True,
                                    options={"size_asserts": False})
                      if optimize else traced)
    return entry


def is_traced(x):
    del x
    return _TRACING[0] > 0 or bool(torch.compiler.is_compiling())


def branch_is_free(x):
    # Keras' torch `ops.cond` is a Python `if`: no branch on a traced value.
    return _TRACING[0] == 0 and x.device.type == "cpu"
