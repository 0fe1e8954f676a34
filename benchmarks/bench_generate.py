"""Generation speed: InfiniCausalLM's cached `generate` against the previous
`streaming.generate` and keras-hub's GPT2CausalLM (KV cache), one configuration per process.

    KERAS_BACKEND=jax python benchmarks/bench_generate.py --model infini --prompt 1024
    KERAS_BACKEND=jax python benchmarks/bench_generate.py --model gpt2 --prompt 1024
    KERAS_BACKEND=jax python benchmarks/bench_generate.py --model legacy --prompt 1024
    git worktree add /tmp/previous aed8d0b^   # the code before the decode cache
    KERAS_BACKEND=jax python benchmarks/bench_generate.py --model previous \
        --previous /tmp/previous --prompt 1024

Models (random weights, nothing downloaded; the example's size by default): `infini`, an
`InfiniCausalLM` (4 blocks, width 128, 4 heads, segment 128, MoD every second block,
greedy sampler); `legacy`, the same blocks as a plain Keras chain decoded as
`streaming.generate` did before the decode cache (each new token re-runs the current
segment, padded to `segment_len`, from the state at its start; greedy argmax on the host);
`previous`, the `streaming.generate` of a checkout from before the decode cache
(`--previous PATH`; the code the issue measured) on the same chain; `gpt2`,
`keras_hub.models.GPT2CausalLM` built from a config of the same width, depth and heads
(intermediate 256) with its KV cache; `llama`, keras-hub's `LlamaCausalLM` of the same
width and depth (grouped-query heads: `--heads` query heads, half as many key/value heads)
with its KV cache, and `llama-infini`, that model converted with
`InfiniCausalLM.from_causal_lm(..., segment_len=--segment-len)` (fixed-size cache).

Timing: each measured call runs once before (compile / warm-up), then `--repeats` times
(the minimum is kept). `compile` is the first call of the `--new` generation minus its
best later call: the compilation of `generate` for that `max_length`, paid once per
`compile(sampler=...)` (and, where a backend retraces, per new `max_length`). `prefill` is the time of
a generation of 1 new token (prompt processing plus one step), `generate` the time of
`--new` new tokens, and new tokens/s = `(new - 1) / (generate - prefill)`. Prints one
markdown table row (`--header` first prints the header).
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

VOCAB = 259


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("infini", "legacy", "previous", "gpt2", "llama",
                                       "llama-infini"),
                   default="infini")
    p.add_argument("--previous", default=None,
                   help="previous: a checkout of keras_infini before the decode cache "
                        "(e.g. `git worktree add /tmp/previous aed8d0b^`)")
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    p.add_argument("--new", type=int, default=256, help="new tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--segment-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each measurement (the minimum is kept)")
    p.add_argument("--prefill", choices=("segments", "steps"), default="segments",
                   help="infini: compile(prefill=...) (steps: prompt through the decode loop)")
    p.add_argument("--header", action="store_true", help="print the table header first")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="append this run's record (one JSON line) to PATH, for "
                        "scripts/docs_tables.py")
    p.add_argument("--step-time", action="store_true",
                   help="infini: also time the compiled one-token cache step alone, over "
                        "segment_len + 1 steps after the prompt (a segment fold included)")
    return p.parse_args(argv)


def blocks_config(args):
    return dict(vocabulary_size=VOCAB, num_layers=args.layers, hidden_dim=args.dim,
                intermediate_dim=2 * args.dim, num_heads=args.heads,
                segment_len=args.segment_len, mod_every=2)


REPEATS = 3
FIRST_CALLS = []  # wall time of the first (compiling) call of each `best_of`


def best_of(fn):
    """Minimum wall time of `REPEATS` calls of `fn` (after one warm-up call, whose time is
    appended to `FIRST_CALLS`)."""
    start = time.perf_counter()
    fn()
    FIRST_CALLS.append(time.perf_counter() - start)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hub_generate(lm, prompt, new):
    """Seconds of `lm.generate` on right-padded token ids (greedy), best of REPEATS."""
    batch, length = prompt.shape
    ids = np.concatenate([prompt, np.zeros((batch, new), "int32")], axis=1)
    mask = np.arange(length + new)[None] < length
    inputs = {"token_ids": ids, "padding_mask": np.repeat(mask, batch, 0)}

    def run():
        out = lm.generate(inputs, stop_token_ids=None)
        keras.ops.convert_to_numpy(out["token_ids"])

    return best_of(run)


def decode_step_seconds(lm, prompt, steps):
    """Seconds per compiled one-token `call_with_cache` step after the whole prompt is in
    the cache (the step alone: no prefill in the difference), best of REPEATS runs of
    `steps` steps."""
    from keras_infini.ops import backend as fast_paths

    length = prompt.shape[1]
    _, _, cache = lm.call_with_cache(prompt, lm.build_cache(prompt.shape[0]), 0)
    step = fast_paths.compile_static_inference(lm.call_with_cache, lm.variables)
    token = prompt[:, -1:]

    def run():
        state = cache
        for t in range(steps):
            logits, _, state = step(token, state, keras.ops.convert_to_tensor(length + t,
                                                                              "int32"))
        keras.ops.convert_to_numpy(logits)

    return best_of(run) / steps


def run_infini(args, prompt):
    from keras_infini.models import InfiniBackbone, InfiniCausalLM

    lm = InfiniCausalLM(InfiniBackbone(**blocks_config(args)))
    lm.compile(sampler="greedy", prefill=args.prefill)
    step = decode_step_seconds(lm, prompt, args.segment_len + 1) if args.step_time else None
    return hub_generate(lm, prompt, 1), hub_generate(lm, prompt, args.new), step


def run_gpt2(args, prompt):
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=args.layers, num_heads=args.heads,
        hidden_dim=args.dim, intermediate_dim=2 * args.dim,
        max_sequence_length=args.prompt + args.new,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    return hub_generate(lm, prompt, 1), hub_generate(lm, prompt, args.new), None


def legacy_chain(args):
    """The example's blocks as a plain Keras chain (tokens -> logits), as the decoding
    before the decode cache took them."""
    from keras_infini import InfiniTransformer, MoDInfiniTransformer

    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, args.dim)(tokens)
    for i in range(args.layers):
        common = dict(dim_input=args.dim, dim_hidden=2 * args.dim,
                      dim_key=args.dim // args.heads, dim_value=args.dim // args.heads,
                      num_heads=args.heads, activation="gelu", segment_len=args.segment_len,
                      causal=True, positional_embedder="rope")
        block = (MoDInfiniTransformer(sampling_factor=2.0, **common) if i % 2 == 1
                 else InfiniTransformer(**common))
        x = block(x)
    x = keras.layers.LayerNormalization()(x)
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(x))


def run_previous(args, prompt):
    """`streaming.generate` of the checkout `--previous` itself (greedy), as the issue
    measured it. Each call compiles its step again on JAX and TensorFlow (a new closure per
    call), so `prefill` includes that compilation and new tokens/s excludes it."""
    import sys

    if not args.previous:
        raise SystemExit("--model previous needs --previous PATH (a checkout before the "
                         "decode cache, e.g. `git worktree add /tmp/previous aed8d0b^`)")
    sys.path.insert(0, os.path.abspath(args.previous))
    import keras_infini
    from keras_infini.streaming import generate

    if not keras_infini.__file__.startswith(os.path.abspath(args.previous)):
        raise SystemExit(f"keras_infini was imported from {keras_infini.__file__}")
    model = legacy_chain(args)
    return (best_of(lambda: generate(model, prompt, 1, temperature=0)),
            best_of(lambda: generate(model, prompt, args.new, temperature=0)))


def run_legacy(args, prompt):
    """The decoding of `streaming.generate` before the decode cache (greedy)."""
    from keras_infini.streaming import Streamer, compile_step

    seg = args.segment_len
    model = legacy_chain(args)
    step = compile_step(Streamer(model))

    def generate(new):
        batch = prompt.shape[0]
        committed = ((prompt.shape[1] - 1) // seg) * seg
        states = None
        for start in range(0, committed, seg):
            _, states = step(prompt[:, start:start + seg], states)
        pending = prompt[:, committed:]
        for _ in range(new):
            length = pending.shape[1]
            chunk = np.zeros((batch, seg), "int32")
            chunk[:, :length] = pending
            logits, new_states = step(chunk, states)
            token = np.asarray(keras.ops.convert_to_numpy(logits[:, length - 1])).argmax(-1)
            token = token.astype("int32")[:, None]
            if length == seg:
                states, pending = new_states, token
            else:
                pending = np.concatenate([pending, token], axis=1)

    return best_of(lambda: generate(1)), best_of(lambda: generate(args.new))


HEADER = ("| backend | model | batch | prompt | prefill (s) | prompt + new (s) | "
          "new tokens/s | ms per new token | ms per cache step | compile (s) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def llama_source(args):
    """keras-hub's LlamaCausalLM of the benchmark's width and depth, grouped-query heads
    (`--heads` query heads on half as many key/value heads), random weights."""
    import keras_hub

    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB, num_layers=args.layers, num_query_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2), hidden_dim=args.dim,
        intermediate_dim=2 * args.dim,
    )
    return keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)


def run_llama(args, prompt):
    """The source model: keras-hub's KV cache grows with prompt + new tokens."""
    lm = llama_source(args)
    lm.compile(sampler="greedy")
    return hub_generate(lm, prompt, 1), hub_generate(lm, prompt, args.new), None


def run_llama_infini(args, prompt):
    """The same LlamaCausalLM converted to Infini-attention (`segment_len`): its cache
    holds one segment and a fixed-size memory, whatever the prompt."""
    from keras_infini.models import InfiniCausalLM

    lm = InfiniCausalLM.from_causal_lm(llama_source(args), segment_len=args.segment_len)
    lm.compile(sampler="greedy")
    step = decode_step_seconds(lm, prompt, args.segment_len + 1) if args.step_time else None
    return hub_generate(lm, prompt, 1), hub_generate(lm, prompt, args.new), step


def main(argv=None):
    global REPEATS
    args = parse_args(argv)
    REPEATS = max(1, args.repeats)
    keras.utils.set_random_seed(0)
    prompt = np.random.default_rng(0).integers(0, 256, size=(args.batch, args.prompt))
    prompt = prompt.astype("int32")
    runner = {"infini": run_infini, "gpt2": run_gpt2, "legacy": run_legacy,
              "previous": run_previous, "llama": run_llama,
              "llama-infini": run_llama_infini}[args.model]
    del FIRST_CALLS[:]
    prefill, total, *rest = runner(args, prompt)
    # The measurement of `total` is the last `best_of` of every runner but `--step-time`'s.
    compile_time = max(FIRST_CALLS[-1] - total, 0.0)
    step = rest[0] if rest else None
    per_token = max(total - prefill, 1e-9) / max(args.new - 1, 1)
    if args.header:
        print(HEADER)
    print(f"| {keras.backend.backend()} | {args.model} | {args.batch} | {args.prompt} | "
          f"{prefill:.3f} | {total:.3f} | {args.batch / per_token:,.0f} | "
          f"{1000 * per_token:.2f} | {'-' if step is None else f'{1000 * step:.2f}'} | "
          f"{compile_time:.2f} |", flush=True)
    record = {"prefill": prefill, "total": total, "per_token": per_token, "step": step,
              "compile": compile_time,
              "machine": platform.processor() or platform.machine()}
    if args.json:
        import json

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _common

        line = dict(record, model=args.model, batch=args.batch, prompt=args.prompt,
                    new=args.new, run=_common.run_info("bench_generate.py",
                                               sys.argv[1:] if argv is None else argv))
        with open(args.json, "a") as f:
            f.write(json.dumps(line) + "\n")
    return record


if __name__ == "__main__":
    main()
