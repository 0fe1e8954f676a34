"""Benchmark CompressiveMemory (Infini-attention) against full causal MultiHeadAttention.

For the Keras backend chosen by `KERAS_BACKEND`, measures per (layer, sequence length):
compile + first train step, forward time, train-step time (forward + backward + SGD update),
tokens/s, model FLOP utilisation (MFU) against the machine's measured float32 matmul
ceiling, and peak resident memory.

Layers (all causal, float32, model width 256, 4 heads of 64, batch 2):

- `cm-linear`, `cm-delta`: `keras_infini.layers.compressive_memory.CompressiveMemory` with
  `segment_len=256` and `update="linear"` / `"delta"` (`--rope` adds
  `positional_embedder="rope"`);
- `mha`: `keras.layers.MultiHeadAttention(num_heads=4, key_dim=64)` called as
  `mha(x, x, use_causal_mask=True)` over the whole sequence (quadratic in the length).

Each layer is wrapped in a `keras.Model` (`Input((L, 256))` -> layer), compiled with
`SGD(1e-3)`, MSE loss and `jit_compile=True` (JAX, TensorFlow; the default, eager, on
torch). Forward is `model.predict_on_batch(x)`, the train step `model.train_on_batch(x, y)`;
the first call of each compiles and is timed on its own, then the median of `--repeats`
calls is reported (fewer when one call takes more than 20 s).

Every (layer, length) runs in its own subprocess (this script re-invoked with `--child`),
so the peak RSS is per configuration and a crash or out-of-memory kill of one configuration
only marks its row. A configuration that fails or times out makes the larger lengths of
the same layer be skipped. Each child also measures the float32 matmul ceiling
(`keras.ops.matmul` of 2048 x 2048 matrices) used for its MFU.

Usage:

    KERAS_BACKEND=jax .venv/bin/python benchmarks/bench_attention.py
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/bench_attention.py \\
        --lengths 1024,4096 --layers cm-linear,cm-delta,mha --repeats 2
    KERAS_BACKEND=torch .venv/bin/python benchmarks/bench_attention.py --rope --json out.json

Options: `--lengths` (default 1024,4096,16384,65536), `--layers` (default
cm-linear,cm-delta,mha), `--repeats` (default 3), `--timeout` per configuration in seconds
(default 600), `--max-mha-len` (default 16384; longer MHA runs are not attempted),
`--rope`, `--json PATH` (raw results), `--keras-default-compile` (`jit_compile="auto"`,
which on TensorFlow without a GPU means no XLA), `--malloc-tuning` (children run with glibc malloc
keeping freed memory, see `GLIBC_MALLOC_TUNING`), `--group-tokens` ("auto", "none" or a
number: `CompressiveMemory(group_tokens=...)`, to tune the group size). FLOP
conventions are documented in `_common.py`.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

BATCH = 2
DIM = 256
HEADS = 4
HEAD_DIM = 64  # dim_key = dim_value = MHA key_dim
SEGMENT = 256
LEARNING_RATE = 1e-3
LONG_STEP_S = 20.0  # stop repeating once one call takes longer than this

LAYERS = ("cm-linear", "cm-delta", "mha")

# `--malloc-tuning`: glibc keeps freed memory instead of returning it to the OS. By default
# every tensor above 32 MiB is a fresh `mmap` whose pages fault in (and are zeroed) on each
# step; a 64K-token eager torch train step spent ~1 s of its 5.5 s in 500K page faults
# (sys time), which made its per-token cost grow with the length. The same effect as
# jemalloc/tcmalloc, which PyTorch's CPU performance guide recommends.
GLIBC_MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(16 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}
QUADRATIC = {"mha"}
DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)

TABLE_HEADERS = [
    "layer",
    "seq",
    "compile+first step (s)",
    "forward (s)",
    "forward tok/s",
    "forward MFU",
    "train step (s)",
    "train tok/s",
    "train MFU",
    "peak RSS (MiB)",
]


# --------------------------------------------------------------------------- layers
def forward_flops(layer_name, length):
    """Forward model FLOPs of one call on a `(BATCH, length, DIM)` input."""
    if layer_name == "mha":
        return _common.mha_flops(BATCH, length, DIM, HEADS, HEAD_DIM)
    update = layer_name.split("-", 1)[1]
    return _common.compressive_memory_flops(
        BATCH, length, DIM, HEADS, HEAD_DIM, HEAD_DIM, SEGMENT, update=update
    )


def build_model(layer_name, length, rope, group_tokens="auto"):
    """`keras.Model`: `Input((length, DIM))` -> the layer under test. `group_tokens` sets
    `CompressiveMemory(group_tokens=...)` ("auto", None or a number of tokens)."""
    import keras

    inputs = keras.Input((length, DIM), name="x")
    if layer_name == "mha":
        layer = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM, name="mha")
        outputs = layer(inputs, inputs, use_causal_mask=True)
    else:
        from keras_infini.layers.compressive_memory import CompressiveMemory

        layer = CompressiveMemory(
            dim_input=DIM,
            dim_key=HEAD_DIM,
            dim_value=HEAD_DIM,
            num_heads=HEADS,
            segment_len=SEGMENT,
            update=layer_name.split("-", 1)[1],
            causal=True,
            positional_embedder="rope" if rope else None,
            group_tokens=group_tokens,
            name=layer_name.replace("-", "_"),
        )
        outputs = layer(inputs)
    return keras.Model(inputs, outputs, name=f"bench_{layer_name.replace('-', '_')}")


# --------------------------------------------------------------------------- child
def run_configuration(
    layer_name, length, repeats, rope, keras_default_compile=False, group_tokens="auto"
):
    """Runs one (layer, length) configuration in this process; returns the result dict."""
    import numpy as np
    import keras

    env = _common.environment_info()
    ceiling, ceiling_samples = _common.measure_matmul_gflops()
    rss_setup = _common.peak_rss_mib()

    keras.utils.set_random_seed(0)
    model = build_model(layer_name, length, rope, group_tokens)
    jit_compile = "auto" if env["backend"] == "torch" or keras_default_compile else True
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse", jit_compile=jit_compile
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, length, DIM), dtype=np.float32)
    y = rng.standard_normal((BATCH, length, DIM), dtype=np.float32)

    # Forward: predict_on_batch returns NumPy, so each call has completed when it returns.
    start = time.perf_counter()
    prediction = model.predict_on_batch(x)
    forward_first = time.perf_counter() - start
    forward_finite = bool(np.all(np.isfinite(prediction)))
    forward_times = _common.time_repeats(
        lambda: model.predict_on_batch(x), repeats, long_step_s=LONG_STEP_S
    )

    # Train step: train_on_batch returns the loss as a Python / NumPy scalar.
    start = time.perf_counter()
    first_loss = model.train_on_batch(x, y)
    train_first = time.perf_counter() - start
    losses = [float(first_loss)]

    def train_step():
        losses.append(float(model.train_on_batch(x, y)))

    train_times = _common.time_repeats(train_step, repeats, long_step_s=LONG_STEP_S)

    flops = forward_flops(layer_name, length)
    tokens = BATCH * length
    forward_s = statistics.median(forward_times)
    train_s = statistics.median(train_times)
    return {
        "layer": layer_name,
        "rope": bool(rope),
        "length": length,
        "batch": BATCH,
        "tokens": tokens,
        "env": env,
        "jit_compile": jit_compile,
        "ceiling_gflops": ceiling,
        "ceiling_samples_gflops": ceiling_samples,
        "forward_first_s": forward_first,
        "forward_times_s": forward_times,
        "forward_s": forward_s,
        "forward_tok_s": tokens / forward_s,
        "forward_flops": flops,
        "forward_mfu": flops / forward_s / (ceiling * 1e9),
        "train_first_s": train_first,
        "train_times_s": train_times,
        "train_s": train_s,
        "train_tok_s": tokens / train_s,
        "train_flops": _common.TRAIN_FLOPS_FACTOR * flops,
        "train_mfu": _common.TRAIN_FLOPS_FACTOR * flops / train_s / (ceiling * 1e9),
        "forward_finite": forward_finite,
        "losses": losses,
        "losses_finite": all(np.isfinite(losses)),
        "rss_after_setup_mib": rss_setup,
        "peak_rss_mib": _common.peak_rss_mib(),
    }


def child_main(args):
    result = run_configuration(
        args.layer,
        args.length,
        args.repeats,
        args.rope,
        args.keras_default_compile,
        args.group_tokens,
    )
    _common.emit_result(result)


# --------------------------------------------------------------------------- parent
def display_name(layer_name, rope):
    return f"{layer_name}+rope" if rope and layer_name != "mha" else layer_name


def run_all(args):
    """Runs every configuration in a subprocess; returns the list of row records."""
    records = []
    child_env = dict(os.environ)
    child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # keep TF's INFO lines out of stderr
    if args.malloc_tuning:
        child_env.update(GLIBC_MALLOC_TUNING)
    for layer_name in args.layers:
        failed_at = None
        for length in args.lengths:
            record = {"layer": layer_name, "length": length, "rope": args.rope}
            if layer_name in QUADRATIC and length > args.max_mha_len:
                record.update(status="skipped", message="skipped: quadratic")
            elif failed_at is not None:
                record.update(status="skipped", message="skipped (smaller length failed)")
            else:
                argv = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    "--layer", layer_name,
                    "--length", str(length),
                    "--repeats", str(args.repeats),
                ]
                if args.rope:
                    argv.append("--rope")
                if args.keras_default_compile:
                    argv.append("--keras-default-compile")
                if args.group_tokens != "auto":
                    argv += ["--group-tokens", str(args.group_tokens).lower()]
                log(f"{display_name(layer_name, args.rope)} L={length}: running ...")
                status, result, info = _common.run_child(argv, args.timeout, env=child_env)
                record.update(status=status, info=info)
                if status == "ok":
                    record["result"] = result
                    log(
                        f"  ok in {info['wall_s']:.1f} s: train step "
                        f"{_common.fmt_seconds(result['train_s'])} s, forward "
                        f"{_common.fmt_seconds(result['forward_s'])} s, peak RSS "
                        f"{result['peak_rss_mib']:.0f} MiB"
                    )
                    if not (result["forward_finite"] and result["losses_finite"]):
                        log("  WARNING: non-finite forward output or loss")
                else:
                    if status == "timeout":
                        record["message"] = f"timeout (>{args.timeout:g} s)"
                    else:
                        record["message"] = f"OOM or crash (rc={info['rc']})"
                    failed_at = length
                    log(f"  {record['message']} after {info['wall_s']:.1f} s; stderr tail:")
                    for line in info["stderr_tail"].strip().splitlines()[-15:]:
                        log("    " + line)
            records.append(record)
    return records


def table_row(record, rope):
    name = display_name(record["layer"], rope)
    seq = _common.fmt_length(record["length"])
    if record["status"] != "ok":
        return [name, seq, record["message"]] + ["-"] * (len(TABLE_HEADERS) - 3)
    r = record["result"]
    return [
        name,
        seq,
        _common.fmt_seconds(r["train_first_s"]),
        _common.fmt_seconds(r["forward_s"]),
        _common.fmt_rate(r["forward_tok_s"]),
        _common.fmt_percent(r["forward_mfu"]),
        _common.fmt_seconds(r["train_s"]),
        _common.fmt_rate(r["train_tok_s"]),
        _common.fmt_percent(r["train_mfu"]),
        f"{r['peak_rss_mib']:.0f}",
    ]


def header_lines(records, args):
    ok = [rec["result"] for rec in records if rec["status"] == "ok"]
    if ok:
        env = ok[0]["env"]
    else:
        usable, total = _common.usable_cores()
        backend = os.environ.get("KERAS_BACKEND", "tensorflow")
        env = {
            "backend": backend,
            "keras_version": _common.installed_version("keras"),
            "backend_version": _common.installed_version(
                *_common.BACKEND_PACKAGES.get(backend, (backend,))
            ),
            "cpu_model": _common.cpu_model(),
            "cores_usable": usable,
            "cores_total": total,
        }
    if ok:
        ceilings = [r["ceiling_gflops"] for r in ok]
        ceiling = (
            f"{statistics.median(ceilings):.1f} GFLOP/s (median over {len(ceilings)} "
            f"children, range {min(ceilings):.1f}-{max(ceilings):.1f}; each row's MFU uses "
            "its own child's measurement)"
        )
    else:
        ceiling = "not measured (no configuration succeeded)"
    return [
        f"backend: {env['backend']} | keras {env['keras_version']} | {env['backend']} "
        f"{env['backend_version']} | CPU: {env['cpu_model']} | cores: "
        f"{env['cores_usable']} usable / {env['cores_total']} total | float32 matmul "
        f"ceiling (2048^3 keras.ops.matmul): {ceiling}",
        f"setup: batch {BATCH}, dim {DIM}, {HEADS} heads x {HEAD_DIM} (dim_key = dim_value), "
        f"CompressiveMemory segment {SEGMENT}, causal, float32"
        + (", RoPE" if args.rope else ", no positional embedder")
        + f"; median of up to {args.repeats} calls after a compile/warm-up call "
        f"(fewer when a call exceeds {LONG_STEP_S:g} s).",
        "compile: "
        + (
            'jit_compile="auto" (Keras default; TensorFlow on CPU: no XLA; torch: eager)'
            if args.keras_default_compile
            else 'jit_compile=True (JAX, TensorFlow), "auto" (torch: eager)'
        ),
        "allocator: "
        + (
            "glibc with " + " ".join(f"{k}={v}" for k, v in GLIBC_MALLOC_TUNING.items())
            if args.malloc_tuning
            else "default (glibc defaults unless the environment sets MALLOC_*)"
        ),
        f"CompressiveMemory group_tokens: {args.group_tokens}"
        + (" (per-backend default)" if args.group_tokens == "auto" else ""),
        "train step = forward + backward + SGD update (train_on_batch); "
        "compile+first step = first train_on_batch call, including compilation.",
        "MFU = model FLOPs per second / ceiling; FLOPs count matmuls only (2*m*n*k), "
        "attention in full (S x S per segment, L x L for MHA; not halved for causal); "
        f"train FLOPs = {_common.TRAIN_FLOPS_FACTOR} x forward (standard approximation).",
    ]


def derived_lines(records, rope):
    ok = {
        (rec["layer"], rec["length"]): rec["result"] for rec in records if rec["status"] == "ok"
    }
    cm_layers = sorted({layer for layer, _ in ok if layer != "mha"}, key=LAYERS.index)
    lines = []
    if any(max(r["forward_mfu"], r["train_mfu"]) > 1.0 for r in ok.values()):
        lines.append(
            "note: an MFU above 100% means the implementation does less work than the model "
            "FLOPs count (e.g. a causal fused attention kernel skipping the masked half), "
            "or that the ceiling measurement was disturbed."
        )
    for layer in cm_layers:
        name = display_name(layer, rope)
        speedups = [
            f"{_common.fmt_length(length)}: {ok[('mha', length)]['train_s'] / r['train_s']:.2f}x"
            for (lay, length), r in sorted(ok.items(), key=lambda kv: kv[0][1])
            if lay == layer and ("mha", length) in ok
        ]
        if speedups:
            lines.append(
                f"train-step speed-up of {name} vs mha (mha time / {name} time): "
                + ", ".join(speedups)
            )
        else:
            lines.append(f"train-step speed-up of {name} vs mha: no length where both ran")
    for layer in cm_layers:
        name = display_name(layer, rope)
        lengths = sorted(length for lay, length in ok if lay == layer)
        reference = 4096 if 4096 in lengths else lengths[0]
        longest = lengths[-1]
        if longest == reference:
            lines.append(
                f"per-token cost ratio of {name}: n/a (longest successful length is "
                f"{_common.fmt_length(longest)}, the reference)"
            )
            continue
        long_r, ref_r = ok[(layer, longest)], ok[(layer, reference)]
        fwd = (long_r["forward_s"] / longest) / (ref_r["forward_s"] / reference)
        trn = (long_r["train_s"] / longest) / (ref_r["train_s"] / reference)
        lines.append(
            f"per-token cost ratio of {name} ({_common.fmt_length(longest)} vs "
            f"{_common.fmt_length(reference)}; 1.00 = linear scaling): forward {fwd:.2f}, "
            f"train {trn:.2f}"
        )
    return lines


def parent_main(args):
    records = run_all(args)
    lines = header_lines(records, args)
    lines.append("")
    lines.extend(
        _common.markdown_table(TABLE_HEADERS, [table_row(rec, args.rope) for rec in records])
    )
    lines.append("")
    lines.extend(derived_lines(records, args.rope))
    print("\n".join(lines), flush=True)
    if args.json:
        payload = {
            "settings": {
                "batch": BATCH,
                "dim": DIM,
                "heads": HEADS,
                "head_dim": HEAD_DIM,
                "segment_len": SEGMENT,
                "rope": args.rope,
                "repeats": args.repeats,
                "timeout_s": args.timeout,
                "max_mha_len": args.max_mha_len,
                "malloc_tuning": args.malloc_tuning,
                "group_tokens": args.group_tokens,
                "keras_default_compile": args.keras_default_compile,
                "train_flops_factor": _common.TRAIN_FLOPS_FACTOR,
            },
            "records": records,
            # for scripts/docs_tables.py: what a docs table names next to its numbers
            "run": _common.run_info("bench_attention.py", args.argv),
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        log(f"raw results written to {args.json}")
    return 0


# --------------------------------------------------------------------------- CLI
def log(message):
    print(f"[bench_attention] {message}", file=sys.stderr, flush=True)


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def layer_list(text):
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name not in LAYERS:
            raise argparse.ArgumentTypeError(f"unknown layer {name!r}; choose from {LAYERS}")
    return names


def group_tokens_arg(text):
    if text == "auto":
        return "auto"
    if text == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f'--group-tokens must be "auto", "none" or a positive integer, got {text!r}'
        )
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lengths", type=int_list, default=list(DEFAULT_LENGTHS),
                        help="comma-separated sequence lengths (default 1024,4096,16384,65536)")
    parser.add_argument("--layers", type=layer_list, default=list(LAYERS),
                        help="comma-separated layers among cm-linear,cm-delta,mha")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per measurement after the warm-up (median)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="wall-clock limit of one configuration (subprocess), seconds")
    parser.add_argument("--max-mha-len", type=int, default=16384,
                        help="longest sequence MultiHeadAttention is attempted at")
    parser.add_argument("--rope", action="store_true",
                        help='CompressiveMemory with positional_embedder="rope"')
    parser.add_argument("--json", metavar="PATH", help="write the raw results to PATH")
    parser.add_argument("--malloc-tuning", action="store_true",
                        help="run the children with glibc malloc set to keep freed memory "
                             "(MALLOC_MMAP_THRESHOLD_/TRIM_THRESHOLD_/TOP_PAD_, see "
                             "GLIBC_MALLOC_TUNING)")
    parser.add_argument("--keras-default-compile", action="store_true",
                        help='compile with jit_compile="auto" (Keras\' default: no XLA for '
                             "TensorFlow on CPU) instead of True")
    parser.add_argument("--group-tokens", type=group_tokens_arg, default="auto",
                        help='CompressiveMemory(group_tokens=...): "auto" (default), '
                             '"none" (one batch) or a number of tokens')
    # Internal: run one configuration and print its result line.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layer", choices=LAYERS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = sorted(set(args.lengths))
    if args.child and (args.layer is None or args.length is None):
        parser.error("--child needs --layer and --length")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.child:
        child_main(args)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
