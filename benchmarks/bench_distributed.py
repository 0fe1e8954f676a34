"""Sequence parallelism: per-device memory and collectives of the compiled program (JAX).

For each sequence length (64K and 256K tokens by default), memory update (`linear`,
`delta`) and number of devices `k` (1, 2, 4, 8), one subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (virtual CPU devices) builds one
`CompressiveMemory(dim_input=256, dim_key=32, dim_value=32, heads=8, segment_len=512,
causal=True)` under `keras_infini.distribution.SequenceParallel` on a
`batch x seq = 1 x k` mesh and *compiles* (does not run) a training gradient: fwd +
grad of `sum(outputs**2)` with respect to the weights and the input `(1, L, 256)`. It
reports, from the compiled program:

- `temp MiB/device`: `compiled.memory_analysis().temp_size_in_bytes`, the temporary
  buffers of one device's program (activations kept for the backward pass, the per-segment
  memory states, attention scores...): the part that grows with the sequence;
- `args MiB/device`: the argument buffers of one device (its slice of the input, weights);
- the number of collectives in the HLO (`all-gather`, `all-reduce`, `collective-permute`,
  `all-to-all`, `reduce-scatter`) and the largest all-gather result (elements).

With `--annotations-only` the largest device count also runs with the shard_map fast
path disabled: the same math with only the sharding constraints (XLA's SPMD partitioner on
its own), to show what the explicit per-device summaries buy.

Virtual CPU devices share one host: the numbers are compiled-program sizes and counts,
not speeds (no timing is reported).

Usage:

    .venv/bin/python benchmarks/bench_distributed.py
    .venv/bin/python benchmarks/bench_distributed.py --lengths 65536 --devices 1,8 \\
        --updates delta --annotations-only --json out.json
"""

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit_result  # noqa: E402
from _common import markdown_table  # noqa: E402
from _common import run_child  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all",
               "reduce-scatter")


def child(args):
    import re

    import jax
    import keras
    import numpy as np

    from keras_infini import CompressiveMemory
    from keras_infini.distribution import SequenceParallel
    from keras_infini.ops import backend as fast

    if args.annotations_only:
        def no_fast_path(*_args, **_kwargs):
            raise NotImplementedError

        fast.sequence_shard_map = no_fast_path
    devices = keras.distribution.list_devices()[: args.k]
    mesh = keras.distribution.DeviceMesh((1, args.k), ("batch", "seq"), devices)
    distribution = SequenceParallel(mesh)
    dim = args.dim
    with distribution.scope():
        layer = CompressiveMemory(dim, args.dim_key, args.dim_key, args.heads,
                                  args.segment_len, update=args.update, causal=True)
        layer.build((None, None, dim))
        values = [v.value for v in layer.trainable_variables]

        def loss_fn(values, x):
            outputs, _ = layer.stateless_call(values, [], x)
            return keras.ops.sum(keras.ops.square(outputs))

        layout = distribution.get_data_layout((1, args.length, dim)).backend_layout
        x = jax.ShapeDtypeStruct((1, args.length, dim), "float32", sharding=layout)
        compiled = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(values, x).compile()
    stats = compiled.memory_analysis()
    text = compiled.as_text()
    counts = {op: len(re.findall(rf"= [^=]*? {op}(?:-start)?\(", text)) for op in COLLECTIVES}
    largest = 0
    for match in re.finditer(r"= \(?[a-z0-9]+\[([0-9,]*)\][^=]*? all-gather(?:-start)?\(",
                             text):
        dims = [int(d) for d in match.group(1).split(",") if d]
        largest = max(largest, int(np.prod(dims)) if dims else 1)
    emit_result({
        "length": args.length, "update": args.update, "k": args.k,
        "annotations_only": bool(args.annotations_only),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "collectives": counts, "largest_all_gather": largest,
        "jax": jax.__version__, "keras": keras.__version__,
    })


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="65536,262144")
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--updates", default="linear,delta")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dim-key", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--segment-len", type=int, default=512)
    parser.add_argument("--annotations-only", action="store_true",
                        help="also run the largest k without the shard_map fast path")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--update", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    common = ["--dim", str(args.dim), "--dim-key", str(args.dim_key), "--heads",
              str(args.heads), "--segment-len", str(args.segment_len)]
    results = []
    counts = [int(v) for v in args.devices.split(",")]
    for length in [int(v) for v in args.lengths.split(",")]:
        for update in args.updates.split(","):
            for k in counts:
                extra = args.annotations_only and k == max(counts) and k > 1
                variants = [False] + ([True] if extra else [])
                for annotations in variants:
                    argv = [sys.executable, os.path.abspath(__file__), "--child",
                            "--length", str(length), "--update", update, "--k", str(k)]
                    argv += common + (["--annotations-only"] if annotations else [])
                    status, result, info = run_child(argv, args.timeout, env=env)
                    if status != "ok":
                        print(f"{length} {update} k={k}: {status}\n{info['stderr_tail']}",
                              file=sys.stderr)
                        continue
                    results.append(result)
                    print(json.dumps(result), flush=True)

    base = {(r["length"], r["update"]): r["temp_bytes"] for r in results
            if r["k"] == 1 and not r["annotations_only"]}
    rows = []
    for r in results:
        one = base.get((r["length"], r["update"]))
        c = r["collectives"]
        rows.append([
            f"{r['length'] // 1024}K", r["update"], r["k"],
            "annotations only" if r["annotations_only"] else "summaries (shard_map)",
            f"{r['temp_bytes'] / 2**20:.1f}", f"{r['argument_bytes'] / 2**20:.1f}",
            f"{one / r['temp_bytes']:.2f}x" if one else "",
            c["all-gather"], c["all-reduce"], c["collective-permute"], c["all-to-all"],
            r["largest_all_gather"],
        ])
    headers = ["tokens", "update", "k", "states from", "temp MiB/device",
               "args MiB/device", "1 device / this", "all-gather", "all-reduce",
               "coll.-permute", "all-to-all", "largest all-gather (elements)"]
    print()
    print(f"{datetime.date.today()}, CompressiveMemory(dim={args.dim}, dim_key=dim_value="
          f"{args.dim_key}, heads={args.heads}, segment_len={args.segment_len}), batch 1, "
          "fwd+grad compiled on virtual CPU devices")
    print("\n".join(markdown_table(headers, rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
