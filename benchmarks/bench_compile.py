"""Compile time of one training step against the number of segments (JAX and TensorFlow/XLA).

Nothing in keras_infini loops over segments in Python, so the compiled program should not
grow with the sequence length: compiling a model for 64 segments should cost about as much
as for 4. This script measures it.

For each backend (JAX; TensorFlow with `jit_compile=True`), each memory update rule
(`linear`, `delta`) and each number of segments (4, 16, 64 by default), one subprocess
builds `Input((n * 64, 32)) -> block -> output` (default block: `InfiniTransformer(32, 64,
dim_key=16, dim_value=16, heads=2, "gelu", segment_len=64, causal=True)`), compiles it with
SGD, MSE and `jit_compile=True`, and times `train_on_batch` (the same compiled train
function `model.fit` uses): the first call (trace + compile + one step) and then
`--repeats` steady-state calls. Compile time = first call - median steady step. Each
configuration runs `--trials` times (fresh subprocesses, interleaved) and the minimum is
reported: on a shared machine other jobs only ever add time.

Prints a markdown table and, per (backend, update), the ratio compile(64) / compile(4)
(target <= 1.5x).

Usage:

    .venv/bin/python benchmarks/bench_compile.py
    .venv/bin/python benchmarks/bench_compile.py --backends jax --segments 4,64 \\
        --block mod --json out.json

Options: `--backends` (default jax,tensorflow), `--updates` (default linear,delta),
`--segments` (default 4,16,64), `--block` (`infini`, `mod` or `cm`), `--repeats`
(default 5), `--trials` (default 3), `--timeout` per configuration in seconds (default
900), `--json PATH`.
Timings on a machine shared with other jobs are noisy; the header prints the load average.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

SEGMENT = 64
DIM, HIDDEN, HEADS, HEAD_DIM, BATCH = 32, 64, 2, 16, 2
TARGET_RATIO = 1.5


def build_model(block, update, length):
    import keras
    from keras_infini import CompressiveMemory
    from keras_infini import InfiniTransformer
    from keras_infini import MoDInfiniTransformer

    inputs = keras.Input((length, DIM))
    if block == "cm":
        layer = CompressiveMemory(DIM, HEAD_DIM, HEAD_DIM, HEADS, SEGMENT, update=update,
                                  causal=True)
    elif block == "mod":
        layer = MoDInfiniTransformer(DIM, HIDDEN, HEAD_DIM, HEAD_DIM, HEADS, "gelu", SEGMENT,
                                     sampling_factor=2, update=update, causal=True)
    else:
        layer = InfiniTransformer(DIM, HIDDEN, HEAD_DIM, HEAD_DIM, HEADS, "gelu", SEGMENT,
                                  update=update, causal=True)
    return keras.Model(inputs, layer(inputs))


def run_configuration(block, update, segments, repeats):
    import keras
    import numpy as np

    env = _common.environment_info()
    keras.utils.set_random_seed(0)
    length = segments * SEGMENT
    model = build_model(block, update, length)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", jit_compile=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, length, DIM), dtype=np.float32)
    y = rng.standard_normal((BATCH, length, DIM), dtype=np.float32)

    start = time.perf_counter()
    loss = float(model.train_on_batch(x, y))  # returns a host scalar: the step completed
    first = time.perf_counter() - start
    steps = _common.time_repeats(lambda: float(model.train_on_batch(x, y)), repeats)
    steady = statistics.median(steps)
    return {
        "backend": env["backend"],
        "block": block,
        "update": update,
        "segments": segments,
        "length": length,
        "first_step_s": first,
        "steady_steps_s": steps,
        "steady_step_s": steady,
        "compile_s": max(first - steady, 0.0),
        "loss_finite": bool(np.isfinite(loss)),
        "env": env,
    }


def child_main(args):
    result = run_configuration(args.block, args.updates, int(args.segments), args.repeats)
    _common.emit_result(result)


def parent_main(args):
    backends = [b for b in args.backends.split(",") if b]
    updates = [u for u in args.updates.split(",") if u]
    segment_counts = [int(s) for s in args.segments.split(",") if s]
    load = os.getloadavg()
    usable, total = _common.usable_cores()
    print(f"# Compile time vs segments (block={args.block}, segment_len={SEGMENT}, "
          f"dim={DIM}, heads={HEADS}x{HEAD_DIM}, batch={BATCH}, min of {args.trials} trials)")
    print(f"CPU: {_common.cpu_model()}, {usable}/{total} cores usable, load average at start "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    print()
    configs = [(b, u, n) for b in backends for u in updates for n in segment_counts]
    trials = {config: [] for config in configs}
    failures = {}
    for trial in range(args.trials):
        for backend, update, segments in configs:  # interleaved: load drifts hit all alike
            env = dict(os.environ)
            env["KERAS_BACKEND"] = backend
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            argv = [sys.executable, os.path.abspath(__file__), "--child",
                    "--block", args.block, "--updates", update,
                    "--segments", str(segments), "--repeats", str(args.repeats)]
            status, result, info = _common.run_child(argv, args.timeout, env=env)
            if status != "ok":
                print(f"[{backend} {update} {segments}] {status}: "
                      f"{info['stderr_tail'][-800:]}", file=sys.stderr)
                failures[(backend, update, segments)] = status
                continue
            print(f"[trial {trial + 1}: {backend} {update} {segments:>2} segments] compile "
                  f"{result['compile_s']:.2f} s, step {result['steady_step_s']:.3f} s",
                  file=sys.stderr)
            trials[(backend, update, segments)].append(result)
    records = []
    for backend, update, segments in configs:
        results = trials[(backend, update, segments)]
        if not results:
            records.append({"backend": backend, "update": update, "segments": segments,
                            "length": segments * SEGMENT,
                            "status": failures.get((backend, update, segments), "crash")})
            continue
        best = dict(min(results, key=lambda r: r["compile_s"]))
        best["status"] = "ok"
        best["compile_trials_s"] = [r["compile_s"] for r in results]
        records.append(best)

    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["backend"], r["update"], r["segments"], r["length"], r["status"],
                         "-", "-", "-"])
            continue
        rows.append([r["backend"], r["update"], r["segments"], r["length"],
                     _common.fmt_seconds(r["first_step_s"]),
                     _common.fmt_seconds(r["steady_step_s"]),
                     _common.fmt_seconds(r["compile_s"]),
                     " ".join(_common.fmt_seconds(t) for t in r["compile_trials_s"])])
    headers = ["backend", "update", "segments", "tokens", "first step (s)",
               "steady step (s)", "compile (s), min", "all trials (s)"]
    print("\n".join(_common.markdown_table(headers, rows)))
    print()
    lo, hi = min(segment_counts), max(segment_counts)
    ratio_rows = []
    for backend in backends:
        for update in updates:
            def find(n):
                for r in records:
                    if (r["backend"], r["update"], r["segments"], r["status"]) == (
                            backend, update, n, "ok"):
                        return r
                return None
            a, b = find(lo), find(hi)
            if a is None or b is None or a["compile_s"] <= 0:
                ratio_rows.append([backend, update, "-", "-"])
                continue
            ratio = b["compile_s"] / a["compile_s"]
            ratio_rows.append([backend, update, f"{ratio:.2f}x",
                               "yes" if ratio <= TARGET_RATIO else "NO"])
    print("\n".join(_common.markdown_table(
        ["backend", "update", f"compile {hi} / {lo} segments",
         f"<= {TARGET_RATIO}x"], ratio_rows)))
    load = os.getloadavg()
    print()
    print(f"Load average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="jax,tensorflow")
    parser.add_argument("--updates", default="linear,delta")
    parser.add_argument("--segments", default="4,16,64")
    parser.add_argument("--block", default="infini", choices=["infini", "mod", "cm"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
