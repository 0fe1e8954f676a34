"""Train-step throughput of MoDInfiniTransformer against InfiniTransformer.

For the Keras backend chosen by `KERAS_BACKEND`: one block (`Input((L, 256))` -> block),
`dim_input=256`, `dim_hidden=1024`, 4 heads of 64, `segment_len=512`, `gelu`, linear
update, causal, batch 2, float32, sequence 16K by default. `MoDInfiniTransformer` runs with
`sampling_factor` 2, 4 and 8 (64 of 512 tokens per segment at 8). Each configuration runs
in its own subprocess; the train step is `model.train_on_batch` (SGD, MSE, router loss
included) compiled with `jit_compile=True` on JAX and TensorFlow.

Target: with `sampling_factor=8` the MoD block trains at least 3x faster than the plain
block.

Usage:

    KERAS_BACKEND=jax .venv/bin/python benchmarks/bench_mod.py
    KERAS_BACKEND=torch .venv/bin/python benchmarks/bench_mod.py --length 4096 --repeats 2
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

CONFIGS = ["infini", "mod-2", "mod-4", "mod-8"]


def child(args):
    import keras
    import numpy as np

    from keras_infini import InfiniTransformer, MoDInfiniTransformer

    common = dict(dim_input=256, dim_hidden=1024, dim_key=64, dim_value=64, num_heads=4,
                  activation="gelu", segment_len=512)
    if args.config == "infini":
        block = InfiniTransformer(**common, update="linear", causal=True)
    else:
        factor = float(args.config.split("-")[1])
        block = MoDInfiniTransformer(**common, sampling_factor=factor, update="linear",
                                     causal=True)
    inp = keras.Input((args.length, 256))
    model = keras.Model(inp, block(inp))
    backend = keras.backend.backend()
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse",
                  jit_compile=backend != "torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, args.length, 256)).astype("float32")
    y = rng.normal(size=(2, args.length, 256)).astype("float32")
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    times = _common.time_repeats(lambda: model.train_on_batch(x, y), args.repeats)
    step = float(np.median(times))
    _common.emit_result({
        "config": args.config, "length": args.length, "first_s": first, "step_s": step,
        "tokens_per_s": 2 * args.length / step, "peak_rss_mib": _common.peak_rss_mib(),
    })


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    import keras

    info = _common.environment_info()
    print(f"backend {info['backend']} {info['backend_version']}, keras {info['keras_version']}, "
          f"{info['cpu_model']}, {info['cores_usable']} cores")
    rows, results = [], {}
    for config in args.configs.split(","):
        argv_child = [sys.executable, os.path.abspath(__file__), "--child", "--config", config,
                      "--length", str(args.length), "--repeats", str(args.repeats)]
        status, result, info_child = _common.run_child(argv_child, args.timeout)
        if status != "ok":
            rows.append([config, f"{status} (rc={info_child['rc']})", "", "", ""])
            continue
        results[config] = result
        rows.append([config, _common.fmt_seconds(result["first_s"]),
                     _common.fmt_seconds(result["step_s"]),
                     _common.fmt_rate(result["tokens_per_s"]), f"{result['peak_rss_mib']:.0f}"])
    print(f"\nTrain step, seq {args.length}, batch 2, dim 256, hidden 1024, 4x64 heads, "
          f"segment 512, gelu, linear update ({keras.backend.backend()})\n")
    headers = ["block", "compile+first step", "train step", "train tok/s", "peak RSS (MiB)"]
    print("\n".join(_common.markdown_table(headers, rows)))
    if "infini" in results:
        base = results["infini"]["step_s"]
        for config, result in results.items():
            if config != "infini":
                print(f"{config}: {base / result['step_s']:.2f}x faster than infini")


if __name__ == "__main__":
    main()
