"""Where a compiled step spends its time on CPU: per-kernel profile and batched-dot timings.

Two reports for the Keras backend chosen by `KERAS_BACKEND` (JAX or TensorFlow with
`jit_compile=True`), on the `bench_attention.py` model (width 256, 4 heads of 64, batch 2,
segments of 256):

- `--report kernels`: the compiled forward (`predict_on_batch`) or train step
  (`train_on_batch`) run `--steps` times under the backend's profiler with XLA's per-kernel
  trace events on (`--xla_cpu_enable_xprof_traceme`); prints the milliseconds per step of
  the `--top` kernels (fusions, dots, copies). Kernels can overlap in time, so the column
  does not sum to the step time. JAX names a kernel that XLA handed to YNNPACK
  `ynn_fusion*`; Eigen dots are `dot*` (TensorFlow also `Einsum*`, `MatMul*`).
- `--report dots`: the two batched products of the layer's local attention
  (`scores = q k^T`, `probs v`, batch `2 x n x 4` of `256 x 64` matrices) and one
  projection (`8192 x 256` by `256 x 256`), each compiled alone and timed (best of 20),
  with the library XLA picked for it (JAX: `ynn` when the compiled program holds a
  YNNPACK fusion, else `eigen`).

Usage (the tables in docs/benchmarks/attention.md, "JAX against TensorFlow-XLA"):

    KERAS_BACKEND=jax .venv/bin/python benchmarks/profile_ops.py --report dots
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/profile_ops.py --report dots
    KERAS_BACKEND=jax .venv/bin/python benchmarks/profile_ops.py --report kernels \\
        --layer cm-linear --length 16384 --mode forward
    taskset -c 0 ...   (one core: whether a kernel uses more than one thread)

XLA flags (e.g. `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...`) pass through the
environment as usual; `--report kernels` adds the trace flag to them before the backend
starts.
"""

import argparse
import collections
import contextlib
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", choices=("kernels", "dots"), default="kernels")
    p.add_argument("--layer", default="cm-linear", help="a bench_attention.py layer")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--mode", choices=("forward", "train"), default="train")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (kernels)")
    p.add_argument("--top", type=int, default=25)
    return p.parse_args(argv)


def kernel_report(args):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TRACE_FLAG).strip()
    import numpy as np
    import keras

    import bench_attention

    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        raise SystemExit("--report kernels needs KERAS_BACKEND=jax or tensorflow (XLA)")
    keras.utils.set_random_seed(0)
    model = bench_attention.build_model(args.layer, args.length, rope=False)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", jit_compile=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((bench_attention.BATCH, args.length, bench_attention.DIM),
                            dtype=np.float32)
    y = rng.standard_normal(x.shape, dtype=np.float32)
    if args.mode == "forward":
        step = lambda: model.predict_on_batch(x)  # noqa: E731
    else:
        step = lambda: model.train_on_batch(x, y)  # noqa: E731
    step(), step()  # compile, warm up
    times = []
    folder = tempfile.mkdtemp(prefix="profile_ops_")
    if backend == "jax":
        import jax

        profiling = jax.profiler.trace(folder)
    else:
        import tensorflow as tf

        profiling = _tf_trace(tf, folder)
    with profiling:
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    from jax.profiler import ProfileData  # reads the XSpace of either backend

    path = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
    totals = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                totals[event.name] += event.duration_ns
    # Kernels of the compiled program: XLA's fusion / dot / copy names, not host frames.
    host = ("one_step", "Eager", "TFE_", "__inference", "BlockUntilReady", "Executor",
            "KernelAndDevice", "CpuExecutable", "tf.", "SlinkyThreadPool", "Thunk", "H2D",
            "PjitFunction")
    kernel = lambda n: not (n.startswith(host) or n.startswith("$") or " " in n  # noqa: E731
                            or "::" in n)
    step_ms = 1e3 * sorted(times)[len(times) // 2]
    print(f"{backend} {args.layer} {args.length} {args.mode}: step {step_ms:.1f} ms "
          f"(median of {args.steps} profiled), XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    print("| kernel | ms per step |\n| --- | --- |")
    shown = [(n, t) for n, t in totals.most_common() if kernel(n)][: args.top]
    for name, total in shown:
        print(f"| {name} | {total / 1e6 / args.steps:.2f} |")


def dots_report(args):
    import numpy as np
    import keras

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    n = args.length // 256
    q = rng.standard_normal((2, n, 4, 256, 64), dtype=np.float32)
    p = rng.standard_normal((2, n, 4, 256, 256), dtype=np.float32)
    x = rng.standard_normal((2 * args.length, 256), dtype=np.float32)
    w = rng.standard_normal((256, 256), dtype=np.float32)
    cases = [
        ("scores q k^T", "bnhqd,bnhkd->bnhqk", q, q),
        ("probs v", "bnhqk,bnhkd->bnhqd", p, q),
        ("projection", "td,de->te", x, w),
    ]
    print(f"{backend}, {n} segments: best of 20")
    print("| product | shape | library | ms | GFLOP/s |\n| --- | --- | --- | --- | --- |")
    for name, equation, a, b in cases:
        if backend == "jax":
            import jax
            import jax.numpy as jnp

            fn = jax.jit(_einsum_of(jnp.einsum, equation))
            a, b = jnp.asarray(a), jnp.asarray(b)
            text = fn.lower(a, b).compile().as_text()
            library = "ynn" if "__ynn_fusion" in text else "eigen"
            run = lambda: fn(a, b).block_until_ready()  # noqa: E731
        elif backend == "tensorflow":
            import tensorflow as tf

            fn = tf.function(_einsum_of(tf.einsum, equation), jit_compile=True)
            a, b = tf.constant(a), tf.constant(b)
            text = fn.experimental_get_compiler_ir(a, b)(stage="optimized_hlo")
            library = "ynn" if "__ynn_fusion" in text else "eigen"
            run = lambda: fn(a, b).numpy()  # noqa: E731
        else:
            raise SystemExit("--report dots needs KERAS_BACKEND=jax or tensorflow (XLA)")
        run()
        best = min(_timed(run) for _ in range(20))
        if name == "scores q k^T":  # (..., S, d) x (..., S, d) -> (..., S, S)
            flops = 2 * np.prod(a.shape) * b.shape[-2]
        else:  # (..., m, k) x (..., k, n)
            flops = 2 * np.prod(a.shape) * b.shape[-1]
        shape = f"{tuple(a.shape)} x {tuple(b.shape)}"
        print(f"| {name} | {shape} | {library} | {best * 1e3:.2f} | {flops / best / 1e9:.0f} |")


@contextlib.contextmanager
def _tf_trace(tf, folder):
    tf.profiler.experimental.start(folder)
    try:
        yield
    finally:
        tf.profiler.experimental.stop()


def _einsum_of(einsum, equation):
    return lambda u, v: einsum(equation, u, v)


def _timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    if args.report == "kernels":
        kernel_report(args)
    else:
        dots_report(args)


if __name__ == "__main__":
    main()
