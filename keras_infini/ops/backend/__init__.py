"""Backend fast paths: the only place in keras_infini that imports TensorFlow, JAX or torch.

Each function here tries the fast path of the active Keras backend and raises
`NotImplementedError` where there is none, so its caller falls back to plain `keras.ops`
(the pattern of Keras' own `layers/rnn/lstm.py`, which tries `backend.lstm(...)` first):

- `scan(f, init, xs)`: `ops.scan` semantics over axis 0 of every leaf of `xs`.
  TensorFlow: a bounded `tf.while_loop` over `TensorArray`s, differentiable under XLA
  (Keras' TF `ops.scan` is not), for static and dynamic step counts. torch: `unbind` once
  and loop (Keras' torch `ops.scan` slices `xs[i]`, whose backward is `O(n^2)`); it also
  splits and stacks on any `axis` without a transposed copy. JAX: `lax.scan` through
  `ops.scan` (no fast path needed).
- `prefers_fused_attention()`: whether `ops.attention.local_attention` uses Keras'
  `ops.dot_product_attention` (True on torch, where it runs PyTorch's SDPA kernels) or its
  einsum + softmax (JAX, TensorFlow, where that measured as fast or faster on CPU).
- `compiled_when_eager(fn)`: `fn` jitted once for eager JAX calls (a `lax.scan` called
  eagerly retraces its body every time); `fn` elsewhere.
- `no_grad()`: a context without autograd recording (torch), else a null context.
- `sequence_shard_map(fn, sharded, replicated, sequence)`: `fn` run once per sequence
  shard of a `keras_infini.distribution.SequenceSharding` (JAX: `shard_map` over the
  mesh's `seq_dim`, manual on that axis only, with `all_gather` for the summaries); the
  math and the one-shard fallback are in `keras_infini.ops.memory`.

- `branch_is_free(x)`: whether branching on a value of `x` needs no device-to-host
  synchronisation (traced, so the branch compiles, or held in host memory).
- `is_traced(x)`: whether `x` is a placeholder of a trace (`jax.jit`, `tf.function`),
  whose value cannot be read now (checks of values then have to be skipped).
- `compile_inference(fn, variables)`: `fn` compiled once per input shape for inference:
  `jax.jit` over the variables' current values (stateless), `tf.function`, or `fn` under
  `no_grad()` on torch.
- `compile_static_inference(fn, variables, optimize=True)`: the same for an `fn` with
  static control flow (no Python branch on a tensor value, no value read on the host),
  compiled on torch too: `make_fx` traces the Keras code once per input shape into a
  graph of aten ops, compiled with `torch.compile` (Inductor). The decode step of
  `InfiniCausalLM.generate`, whose loop keras-hub runs eagerly on torch.
"""

import contextlib
import importlib

from keras import backend as keras_backend


def _module():
    name = keras_backend.backend()
    if name not in ("tensorflow", "torch", "jax"):
        return None
    return importlib.import_module(f"keras_infini.ops.backend.{name}")


def scan(f, init, xs, axis=0):
    """`(carry, ys)` from the backend's fast scan; `NotImplementedError` if it has none."""
    module = _module()
    if module is None or not hasattr(module, "scan"):
        raise NotImplementedError
    return module.scan(f, init, xs, axis=axis)


def compiled_when_eager(fn, static_argnames=()):
    """`fn` (a pure function of tensors), compiled once per shape when called eagerly.

    JAX: called outside any trace, `lax.scan` traces its body again at every call (a new
    closure each time); the returned function runs a module-level `jax.jit` of `fn`
    instead (cached per shape and static argument), and calls `fn` directly inside a
    trace. Other backends: `fn` itself.
    """
    module = _module()
    if module is None or not hasattr(module, "compiled_when_eager"):
        return fn
    return module.compiled_when_eager(fn, static_argnames)


def prefers_fused_attention():
    """Whether `local_attention` should use `ops.dot_product_attention` on this backend.

    torch: SDPA's fused kernels took half the time of the einsum + softmax for a causal
    forward + backward (`benchmarks/bench_attention.py`). JAX and TensorFlow on CPU lower
    `dot_product_attention` to the same einsum + softmax, or slower (JAX's `jax.nn`
    implementation); keep the einsum path there.
    """
    return keras_backend.backend() == "torch"


def sequence_shard_map(fn, sharded, replicated, sequence):
    """`fn(index, shards, gather, sharded, replicated)` once per shard of the sequence
    axis (axis 1 of every `sharded` tensor; `replicated` are whole on every shard);
    returns `(sharded_outputs, replicated_outputs)`. `NotImplementedError` if the backend
    has no fast path."""
    module = _module()
    if module is None or not hasattr(module, "sequence_shard_map"):
        raise NotImplementedError
    return module.sequence_shard_map(fn, sharded, replicated, sequence)


def no_grad():
    module = _module()
    if module is None or not hasattr(module, "no_grad"):
        return contextlib.nullcontext()
    return module.no_grad()


def branch_is_free(x):
    """True when `ops.cond` on a value of `x` costs no device synchronisation: `x` is
    traced (the branch compiles) or lives in host memory; False on an accelerator in
    eager mode, where reading the predicate would stall the device queue."""
    module = _module()
    if module is None or not hasattr(module, "branch_is_free"):
        return True
    return module.branch_is_free(x)


def is_traced(x):
    """True when `x` is a tensor being traced (no value to read now), else False."""
    module = _module()
    if module is None or not hasattr(module, "is_traced"):
        return False
    return module.is_traced(x)


def compile_inference(fn, variables=()):
    """`fn(*args)` compiled once per input structure and shape for inference.

    `variables`: the Keras variables `fn` reads; they are read at every call (not frozen
    at trace time), so a model trained after compiling is seen as it is now.
    """
    module = _module()
    if module is None or not hasattr(module, "compile_inference"):
        def eager(*args):
            with no_grad():
                return fn(*args)

        return eager
    return module.compile_inference(fn, list(variables))


def compile_static_inference(fn, variables=(), optimize=True):
    """`fn(*args)` compiled once per input structure and shape for inference, for an `fn`
    whose control flow does not depend on tensor values (checks of values are skipped
    while tracing: `is_traced`). As `compile_inference` on JAX and TensorFlow; on torch
    a `make_fx` trace to aten ops, compiled with `torch.compile` when `optimize` (the
    traced graph alone when not: no C++ compilation, for tests).

    `variables`: the Keras variables `fn` reads, read at every call.
    """
    module = _module()
    if module is not None and hasattr(module, "compile_static_inference"):
        return module.compile_static_inference(fn, list(variables), optimize=optimize)
    return compile_inference(fn, variables)


def supports_jit():
    """Whether Keras should XLA/dynamo-compile models holding keras_infini layers.

    False on torch: dynamo recompiles on Keras' `_setattr_hook` and on rank changes until
    its limit (96 s for a first train step, 6-8 s later, against 0.05 s eagerly), so the
    layers set `supports_jit = False` there and Keras runs `jit_compile=True` eagerly with
    a warning ("Model doesn't support `jit_compile=True`").
    """
    return keras_backend.backend() != "torch"
