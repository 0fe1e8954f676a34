"""Grouped-query heads in CompressiveMemory: where to keep the memory, per key/value head or
per query head. State size, forward and train-step time, one configuration per process.

    KERAS_BACKEND=jax python benchmarks/bench_grouped_query.py            # all, one table
    KERAS_BACKEND=jax python benchmarks/bench_grouped_query.py --config kv2 --length 4096

Configurations (8 query heads of 32, width 256, segments of 256, batch 2, the recommended
memory: delta rule, L2 keys, hard-sigmoid write strength, coupled decay, causal, RoPE):
`mha` (8 key/value heads), `kv2` (2 key/value heads, memory per key/value head, the
default), `kv2-query` (2 key/value heads, memory per query head: keys and values repeated
for the memory, write strength and decay per query head). Recall is measured by
`benchmarks/bench_recall.py --configs delta-l2-hard-coupled-gate-kv2 ...`.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CONFIGS = {
    "mha": {},
    "kv2": {"num_key_value_heads": 2},
    "kv2-query": {"num_key_value_heads": 2, "memory_heads": "query"},
}
DIM, HEADS, HEAD_DIM, SEGMENT, BATCH = 256, 8, 32, 256, 2


def measure(config, length, repeats):
    import keras
    import numpy as np

    from keras_infini import CompressiveMemory

    layer = CompressiveMemory(
        DIM, HEAD_DIM, HEAD_DIM, HEADS, SEGMENT, update="delta", causal=True,
        positional_embedder="rope", memory_feature_map="l2", write_strength="hard_sigmoid",
        gate_lr_scale=10.0, memory_decay="coupled", return_state=True, **CONFIGS[config],
    )
    inputs = keras.Input((length, DIM))
    outputs = layer(inputs)
    model = keras.Model(inputs, outputs[0])
    model.compile(keras.optimizers.Adam(1e-3), "mse", jit_compile=True)
    x = np.random.default_rng(0).normal(size=(BATCH, length, DIM)).astype("float32")
    y = np.zeros_like(x)

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    forward = best(lambda: model.predict_on_batch(x))
    train = best(lambda: model.train_on_batch(x, y))
    _, memory, norm = layer(x[:1, :SEGMENT])
    state = int(np.prod(memory.shape[1:]) + np.prod(norm.shape[1:])) * 4
    return {"config": config, "length": length, "backend": keras.backend.backend(),
            "forward_s": forward, "train_s": train, "state_bytes_per_row": state,
            "params": model.count_params()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS))
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.config:
        print(json.dumps(measure(args.config, args.length, args.repeats)), flush=True)
        return
    print("| backend | config | tokens | state per row (KiB) | params | forward (s) | "
          "train step (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for config in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--config", config, "--length",
                              str(args.length), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {r['backend']} | {config} | {r['length']} | "
              f"{r['state_bytes_per_row'] / 1024:.0f} | {r['params']:,} | "
              f"{r['forward_s']:.3f} | {r['train_s']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
