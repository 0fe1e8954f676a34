"""Multi-key associative recall across segments: does the compressive memory bind keys to values?

The task (an MQAR-style probe, Zoology / Arora et al. 2023), built only on the public API:

- every token is a *slot pair* `(key slot, value slot)`, embedded as the sum of a key
  embedding and a value embedding. A *pair* token carries a key `k < keys` and a value
  `v < values`; a *query* token carries a key and the value slot `QUERY`; a *filler*
  token carries one of `fillers` filler ids in the key slot and the value slot `NONE`.
  Presenting key and value in one token makes the binding one attention (or one memory)
  lookup: the probe measures the memory, not whether the model discovered an induction
  head (with key and value in adjacent tokens neither a plain Keras MHA transformer nor
  the InfiniTransformer stack learned 8 pairs reliably, see issue 13).
- cross-segment data (`--data cross`): `P` pairs (distinct keys) at random positions of
  the first segment, `F` segments of random filler, then the last segment asks the `P`
  keys again (random order, random positions, rest filler). Local attention in the last
  segment cannot see the pairs: only the memory can answer.
- one-segment data (the ceiling): the pairs and then the queries inside one segment
  (padded with filler), so softmax attention alone can answer.
- the loss (sparse cross-entropy on the value) is on the query positions only
  (`sample_weight` in `model.fit`); accuracy is the fraction of queries answered right.

Model: `PairEmbedding -> n x InfiniTransformer(causal) -> LayerNorm -> Dense(values)`,
width 64, 4 heads of 16, segments of 32, no positional embedding (the task is content
addressed), Adam with warmup and cosine decay, trained with `model.fit`. Training uses
`--train-fillers` filler segments (2: 4 segments, 128 tokens); evaluation at 1x, 4x and
16x the training length in segments (2, 14 and 62 filler segments).

Configurations (`--configs`, see `CONFIGS`):

- `ceiling`: one-segment data, memory gate pinned shut (softmax attention only). Must
  reach >= 95% on every seed before any memory number counts.
- `floor`: cross-segment data, gate pinned shut: local attention only, chance expected.
- the memory configurations: cross-segment data, `CompressiveMemory` options as named.
  `delta-l2-hard-coupled-gate` (token-level delta rule on L2-normalised keys,
  `write_strength="hard_sigmoid"`, `gate_lr_scale=10`, `memory_decay="coupled"`: Gated
  DeltaNet's decay, taken only as much as a token writes) is the recommended
  configuration; `delta-l2-hard-decay-gate` is the same with the plain decay
  (`memory_decay=True`), `delta-l2-hard-gate` the same without a decay;
  `delta-l2-hard-decay-split` starts half the heads local (gate logit -2) and half on the
  memory (+2), as `examples/passkey.py --gate-init=-2,-2,2,2` does. Every run:
  benchmarks/RECALL_RESULTS.md.

Each (configuration, pairs, seed) runs in its own subprocess on the backend chosen by
`KERAS_BACKEND`; the parent prints a markdown table (mean and per-seed accuracy at every
distance, chance, trained gate values) and saves a PNG (accuracy vs pairs, one line per
configuration, at the longest distance) and optionally JSON.

Usage:

    KERAS_BACKEND=jax taskset -c 1 .venv/bin/python benchmarks/bench_recall.py \\
        --pairs 1 2 4 8 16 --configs ceiling floor linear delta delta-l2-beta --seeds 0 1 2
    KERAS_BACKEND=jax .venv/bin/python benchmarks/bench_recall.py --quick   # smoke test
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

# name -> (data layout, gate pinned shut, memory keyword arguments of InfiniTransformer)
CONFIGS = {
    "ceiling": ("one", True, {}),
    "floor": ("cross", True, {}),
    "linear": ("cross", False, {"update": "linear"}),
    "delta": ("cross", False, {"update": "delta"}),
    "linear-l2": ("cross", False, {"update": "linear", "memory_feature_map": "l2"}),
    "delta-l2": ("cross", False, {"update": "delta", "memory_feature_map": "l2"}),
    "delta-beta": ("cross", False, {"update": "delta", "write_strength": True}),
    "delta-l2-beta": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "l2", "write_strength": True},
    ),
    "delta-l2-beta-gate": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "l2", "write_strength": True,
         "gate_init": 0.0, "gate_lr_scale": 10.0},
    ),
    "delta-l2-hard-gate": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "l2", "write_strength": "hard_sigmoid",
         "gate_lr_scale": 10.0},
    ),
    "delta-l2-hard-decay-gate": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "l2", "write_strength": "hard_sigmoid",
         "gate_lr_scale": 10.0, "memory_decay": True},
    ),
    "delta-l2-hard-decay-split": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "l2", "write_strength": "hard_sigmoid",
         "gate_lr_scale": 10.0, "memory_decay": True, "gate_init": "split"},
    ),
    "delta-l2-hard-coupled-gate": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "l2", "write_strength": "hard_sigmoid",
         "gate_lr_scale": 10.0, "memory_decay": "coupled"},
    ),
    # Grouped-query heads (4 query heads on 2 key/value heads), the recommended memory
    # kept per key/value head (the default) or per query head (`memory_heads="query"`).
    "delta-l2-hard-coupled-gate-kv2": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "l2", "write_strength": "hard_sigmoid",
         "gate_lr_scale": 10.0, "memory_decay": "coupled", "num_key_value_heads": 2},
    ),
    "delta-l2-hard-coupled-gate-kv2-query": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "l2", "write_strength": "hard_sigmoid",
         "gate_lr_scale": 10.0, "memory_decay": "coupled", "num_key_value_heads": 2,
         "memory_heads": "query"},
    ),
    "linear-gate": ("cross", False, {"update": "linear", "gate_lr_scale": 10.0}),
    "linear-beta-gate": ("cross", False, {"update": "linear", "write_strength": True,
                                          "gate_lr_scale": 10.0}),
    "delta-elu1l2-beta-gate": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "elu1_l2", "write_strength": True,
         "gate_lr_scale": 10.0},
    ),
    "delta-gate": ("cross", False, {"update": "delta", "gate_lr_scale": 10.0}),
    # Feature maps that widen the memory key (issue 13's DPFP and Taylor remedies).
    "linear-dpfp": ("cross", False, {"update": "linear", "memory_feature_map": "dpfp"}),
    "delta-dpfp": ("cross", False, {"update": "delta", "memory_feature_map": "dpfp"}),
    "delta-dpfp-hard-coupled-gate": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "dpfp", "write_strength": "hard_sigmoid",
         "gate_lr_scale": 10.0, "memory_decay": "coupled"},
    ),
    "delta-dpfp2-hard-coupled-gate": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "dpfp2", "write_strength": "hard_sigmoid",
         "gate_lr_scale": 10.0, "memory_decay": "coupled"},
    ),
    "linear-taylor": ("cross", False, {"update": "linear", "memory_feature_map": "taylor"}),
    "delta-taylor": ("cross", False, {"update": "delta", "memory_feature_map": "taylor"}),
    "delta-taylor-hard-gate": (
        "cross", False,
        {"update": "delta", "memory_feature_map": "taylor", "write_strength": "hard_sigmoid",
         "gate_lr_scale": 10.0},
    ),
}

# `"gate_init": "split"`: the first half of the heads start local (gate logit -2,
# sigmoid 0.12), the rest on the memory (+2, sigmoid 0.88).
SPLIT_GATE_LOGIT = 2.0


def split_gate_init(heads):
    """Per-head gate logits for `"split"`: `heads // 2` local heads, then memory heads."""
    return [-SPLIT_GATE_LOGIT] * (heads // 2) + [SPLIT_GATE_LOGIT] * (heads - heads // 2)


# Value-slot ids after the `values` real values.
def _value_slots(values):
    return {"QUERY": values, "NONE": values + 1, "size": values + 2}


# --------------------------------------------------------------------------- data
def make_batch(rng, n, pairs, *, keys, values, fillers, segment_len, filler_segments,
               layout, max_pairs=None):
    """Returns `(x (n, L, 2) int32, y (n, L) int32, weight (n, L) float32)`; the weight
    is 1 on the query positions and 0 elsewhere.

    `pairs` pairs per example, or with `max_pairs` a number drawn uniformly in
    `1..max_pairs` per example (mixed difficulty, a curriculum that keeps easy examples).
    """
    import numpy as np

    slots = _value_slots(values)
    seg = segment_len
    segments = 1 if layout == "one" else filler_segments + 2
    length = segments * seg
    x = np.empty((n, length, 2), np.int32)
    x[..., 0] = keys + rng.integers(0, fillers, size=(n, length))  # filler key slots
    x[..., 1] = slots["NONE"]
    y = np.zeros((n, length), np.int32)
    w = np.zeros((n, length), np.float32)
    for i in range(n):
        p = pairs if max_pairs is None else int(rng.integers(1, max_pairs + 1))
        chosen = rng.choice(keys, size=p, replace=False)
        vals = rng.integers(0, values, size=p)
        asked = rng.permutation(p)
        if layout == "one":
            # pairs at sorted random positions of the first half... any order works for
            # causal attention as long as every pair precedes its query.
            pos = np.sort(rng.choice(seg, size=2 * p, replace=False))
            pair_pos, query_pos = pos[:p], pos[p:]
        else:
            pair_pos = rng.choice(seg, size=p, replace=False)
            query_pos = (segments - 1) * seg + rng.choice(seg, size=p, replace=False)
        x[i, pair_pos, 0] = chosen
        x[i, pair_pos, 1] = vals
        x[i, query_pos, 0] = chosen[asked]
        x[i, query_pos, 1] = slots["QUERY"]
        y[i, query_pos] = vals[asked]
        w[i, query_pos] = 1.0
    return x, y, w


# --------------------------------------------------------------------------- child
def build_model(args, memory_kwargs):
    import keras

    from keras_infini import InfiniTransformer

    slots = _value_slots(args.values)

    @keras.saving.register_keras_serializable(package="bench_recall")
    class PairEmbedding(keras.layers.Layer):
        """`(batch, L, 2)` int ids -> key embedding + value embedding."""

        def __init__(self, key_vocab, value_vocab, dim, **kwargs):
            super().__init__(**kwargs)
            self.key_embedding = keras.layers.Embedding(key_vocab, dim)
            self.value_embedding = keras.layers.Embedding(value_vocab, dim)

        def build(self, input_shape):
            self.key_embedding.build(input_shape[:-1])
            self.value_embedding.build(input_shape[:-1])

        def call(self, ids):
            return self.key_embedding(ids[..., 0]) + self.value_embedding(ids[..., 1])

    inputs = keras.Input((None, 2), dtype="int32")
    h = PairEmbedding(args.keys + args.fillers, slots["size"], args.width)(inputs)
    head_dim = args.width // args.heads
    dim_key = args.dim_key or head_dim
    memory_kwargs = dict(memory_kwargs)
    if memory_kwargs.get("gate_init") == "split":
        memory_kwargs["gate_init"] = split_gate_init(args.heads)
    for i in range(args.layers):
        h = InfiniTransformer(
            args.width, 4 * args.width, dim_key, head_dim, args.heads, "gelu",
            segment_len=args.segment_len, causal=True, name=f"block{i}", **memory_kwargs,
        )(h)
    h = keras.layers.LayerNormalization()(h)
    outputs = keras.layers.Dense(args.values)(h)
    return keras.Model(inputs, outputs)


def gate_values(block):
    """The trained memory gates `sigmoid(gate)` of a block's attention, one per head."""
    import numpy as np

    attention = block.attention
    raw = np.asarray(attention.gate.numpy() if hasattr(attention.gate, "numpy")
                     else attention.gate, np.float64)
    scale = float(getattr(attention, "gate_lr_scale", 1.0))
    return (1.0 / (1.0 + np.exp(-scale * raw))).tolist()


def run_config(args):
    """Trains and evaluates one (configuration, pairs, seed); returns the result dict."""
    import keras
    import numpy as np

    layout, pinned, memory_kwargs = CONFIGS[args.config]
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(1000 + args.seed)
    model = build_model(args, memory_kwargs)
    blocks = [layer for layer in model.layers if layer.name.startswith("block")]
    if pinned:
        for block in blocks:
            gate = block.attention.gate
            gate.assign(np.full(gate.shape, -30.0, np.float32))
            gate.trainable = False
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, args.steps, alpha=0.05, warmup_target=args.lr,
        warmup_steps=max(1, args.steps // 10),
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    common = dict(keys=args.keys, values=args.values, fillers=args.fillers,
                  segment_len=args.segment_len, layout=layout)
    x, y, w = make_batch(
        rng, args.steps * args.batch, args.pairs, filler_segments=args.train_fillers,
        max_pairs=args.pairs if args.curriculum == "mix" else None, **common,
    )
    # Weights summing to the length per example: Keras divides the weighted sum by all
    # positions, so the reported loss is the mean cross-entropy per answer (nats).
    w = w * (w.shape[1] / w.sum(axis=1, keepdims=True))
    start = time.perf_counter()
    history = model.fit(x, y, sample_weight=w, batch_size=args.batch, epochs=1,
                        shuffle=False, verbose=0)
    train_s = time.perf_counter() - start
    losses = [float(v) for v in history.history["loss"]]

    accuracy = {}
    distances = [1] if layout == "one" else args.scales
    for scale in distances:
        # `scale` x the training length in segments.
        fillers = (args.train_fillers + 2) * scale - 2
        xe, ye, we = make_batch(rng, args.eval_examples, args.pairs,
                                filler_segments=fillers, **common)
        batch = max(1, min(args.eval_examples, (args.batch * 4) // scale))
        logits = model.predict(xe, batch_size=batch, verbose=0)
        pred = np.argmax(np.asarray(logits), axis=-1)
        accuracy[str(scale)] = float(((pred == ye) * we).sum() / we.sum())
    return {
        "config": args.config, "pairs": args.pairs, "seed": args.seed,
        "accuracy": accuracy, "final_loss": losses[-1], "train_s": train_s,
        "gates": [gate_values(b) for b in blocks],
        "backend": keras.backend.backend(),
    }


# --------------------------------------------------------------------------- parent
def child_argv(args, config, pairs, seed):
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--config", config,
            "--pair-count", str(pairs), "--seed", str(seed)]
    for name in ("keys", "values", "fillers", "width", "heads", "dim_key", "layers",
                 "segment_len",
                 "steps", "batch", "lr", "train_fillers", "eval_examples", "curriculum"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    argv += ["--scales"] + [str(s) for s in args.scales]
    return argv


def summarise(records, args):
    """Markdown table lines: one row per (configuration, pairs)."""
    import numpy as np

    scales = args.scales
    headers = (["config", "pairs"] + [f"{s}x mean" for s in scales]
               + [f"{scales[-1]}x per seed", "gates <0.2 or >0.8", "train s", "ok"])
    rows = []
    for config in args.configs:
        for pairs in args.pairs:
            recs = [r for r in records if r["config"] == config and r["pairs"] == pairs]
            done = [r["result"] for r in recs if r["result"] is not None]
            row = [config, pairs]
            for s in scales:
                vals = [d["accuracy"].get(str(s)) for d in done]
                vals = [v for v in vals if v is not None]
                row.append(f"{100 * np.mean(vals):.1f}" if vals else "-")
            last = str(scales[-1]) if CONFIGS[config][0] == "cross" else "1"
            row.append(" ".join(f"{100 * d['accuracy'][last]:.0f}" for d in done) or "-")
            gates = [g for d in done for block in d["gates"] for g in block]
            if gates and not CONFIGS[config][1]:
                extreme = sum(g < 0.2 or g > 0.8 for g in gates) / len(gates)
                row.append(f"{100 * extreme:.0f}% (min {min(gates):.2f} max {max(gates):.2f})")
            else:
                row.append("-")
            row.append(f"{np.mean([d['train_s'] for d in done]):.0f}" if done else "-")
            row.append(f"{len(done)}/{len(recs)}")
            rows.append(row)
    return _common.markdown_table(headers, rows)


def save_png(records, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for config in args.configs:
        scale = "1" if CONFIGS[config][0] == "one" else str(args.scales[-1])
        xs, ys = [], []
        for pairs in args.pairs:
            vals = [r["result"]["accuracy"][scale] for r in records
                    if r["config"] == config and r["pairs"] == pairs and r["result"]]
            if vals:
                xs.append(pairs)
                ys.append(100 * np.mean(vals))
        if xs:
            label = config if scale == "1" else f"{config} ({scale}x)"
            ax.plot(xs, ys, marker="o", label=label)
    ax.plot(args.pairs, [100 / args.values] * len(args.pairs), "k:", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pairs per segment")
    ax.set_ylabel("recall accuracy (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"recall across segments ({args.steps} steps, {len(args.seeds)} seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["ceiling", "floor", "linear", "delta",
                                                    "linear-beta-gate"],
                   choices=sorted(CONFIGS))
    p.add_argument("--pairs", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--keys", type=int, default=64, help="key vocabulary")
    p.add_argument("--values", type=int, default=64, help="value vocabulary")
    p.add_argument("--fillers", type=int, default=16, help="filler vocabulary")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim-key", type=int, default=0,
                   help="per-head key width (0: width / heads, like the values)")
    p.add_argument("--segment-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-fillers", type=int, default=2,
                   help="filler segments between pairs and queries in training")
    p.add_argument("--scales", nargs="+", type=int, default=[1, 4, 16],
                   help="evaluation lengths in multiples of the training length")
    p.add_argument("--eval-examples", type=int, default=256)
    p.add_argument("--curriculum", choices=["mix", "none"], default="mix",
                   help="mix: each training example has 1..pairs pairs")
    p.add_argument("--timeout", type=float, default=1800.0, help="per child, seconds")
    p.add_argument("--png", default="recall.png")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke configuration (seconds): 2 pairs, 10 steps, 1 seed")
    p.add_argument("--in-process", action="store_true",
                   help="run the configurations in this process (smoke tests)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--pair-count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.seeds, args.steps, args.batch = [2], [0], 10, 4
        args.layers, args.train_fillers, args.scales, args.eval_examples = 1, 1, [1, 2], 8
        args.configs = ["ceiling", "linear-beta-gate"]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        args.pairs = args.pair_count
        _common.emit_result(run_config(args))
        return 0
    records = []
    for config in args.configs:
        for pairs in args.pairs:
            for seed in args.seeds:
                if args.in_process:
                    one = argparse.Namespace(**vars(args))
                    one.config, one.pairs, one.seed = config, pairs, seed
                    status, result, info = "ok", run_config(one), {}
                else:
                    status, result, info = _common.run_child(
                        child_argv(args, config, pairs, seed), args.timeout
                    )
                records.append({"config": config, "pairs": pairs, "seed": seed,
                                "status": status, "result": result, "info": info})
                if result:
                    gates = [round(g, 2) for block in result["gates"] for g in block]
                    detail = (f"{result['accuracy']} loss {result['final_loss']:.3f} train "
                              f"{result['train_s']:.0f} s gates {gates}")
                else:
                    detail = info["stderr_tail"][-600:]
                print(f"# {config} pairs={pairs} seed={seed}: {status} {detail}", flush=True)
    print(f"\nbackend {os.environ.get('KERAS_BACKEND', 'tensorflow')}, keys {args.keys}, "
          f"values {args.values}, width {args.width}, heads {args.heads}, dim_key "
          f"{args.dim_key or args.width // args.heads}, layers "
          f"{args.layers}, segment {args.segment_len}, steps {args.steps}, batch "
          f"{args.batch}, lr {args.lr}, train fillers {args.train_fillers}, curriculum "
          f"{args.curriculum}; chance {100 / args.values:.1f}%")
    for line in summarise(records, args):
        print(line)
    if args.png:
        save_png(records, args, args.png)
        print(f"saved {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
