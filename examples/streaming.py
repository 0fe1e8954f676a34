"""Streams a byte-level Infini-Transformer over 1M tokens on CPU in constant memory.

Infini-attention keeps a fixed-size `(memory, norm)` state per layer, so a model can read
an input of any length chunk by chunk. This example runs a randomly initialised byte-level
model (Embedding -> causal InfiniTransformer blocks, every second one a
MoDInfiniTransformer with `--mod` -> LayerNormalization -> Dense) over `--tokens` random
bytes in chunks of `--chunk` tokens with `keras_infini.streaming.Streamer`, and prints at
checkpoints (64K tokens and doublings up to the end):

- throughput (tokens/s since the previous checkpoint; the first chunk, which includes
  compilation, and a ragged last chunk, which may recompile, are not timed),
- current and peak resident memory (psutil RSS and `resource` ru_maxrss),
- the largest `|memory|` and `|norm|` entries of the carried state, which stay finite
  while the normaliser grows linearly with the number of tokens (it is a running sum of
  `elu(K) + 1`).

It then compares the peak RSS after all tokens with the peak after 64K tokens: the state
does not grow, so neither should memory. `--check` exits with status 1 when the ratio
exceeds 1.10.

Two ways to run a chunk (`--mode`):

- `compiled` (default): `Streamer.run` is applied once to symbolic inputs (a token chunk
  plus every layer's `(memory, norm)`), which gives a functional "step" model
  `(tokens, states) -> (logits, new_states)`; each chunk is one `predict_on_batch` call
  (XLA on JAX, a `tf.function` graph on TensorFlow, eager no-grad PyTorch). `--verify`
  checks the first chunk against the eager `Streamer`.
- `eager`: `streamer.run(chunk, states)` per chunk. On JAX every op is compiled once
  per chunk shape (a slow first chunk); on PyTorch autograd stays on (higher peak RSS).

Usage:

    KERAS_BACKEND=jax python examples/streaming.py                 # 2^20 tokens
    KERAS_BACKEND=jax python examples/streaming.py --tokens 1000000 --check
"""

import argparse
import os
import resource
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from keras_infini import CompressiveMemory  # noqa: E402
from keras_infini import InfiniTransformer  # noqa: E402
from keras_infini import MoDInfiniTransformer  # noqa: E402
from keras_infini.streaming import Streamer  # noqa: E402

VOCAB = 256
REFERENCE_TOKENS = 65536  # default "64K" checkpoint the final peak RSS is compared with


def peak_rss_mib():
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib():
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")


def build_model(args):
    dim, heads = args.dim, args.heads
    blocks = []
    for i in range(args.layers):
        common = dict(
            dim_input=dim,
            dim_hidden=2 * dim,
            dim_key=dim // heads,
            dim_value=dim // heads,
            num_heads=heads,
            activation="swiglu",
            segment_len=args.segment_len,
            update=args.update,
            causal=True,
            positional_embedder="rope",
            name=f"block_{i}",
        )
        if args.mod and i % 2 == 1:
            blocks.append(MoDInfiniTransformer(sampling_factor=2, **common))
        else:
            blocks.append(InfiniTransformer(**common))
    # A list of layers, not a keras.Model: a functional step model built from
    # `Streamer.run` fails Keras' connectivity check when its layers were first called in
    # another graph without `return_state` (keras.src.ops.function.Function checks each
    # node against `op.output`, the outputs of the layer's *first* call).
    return (
        [keras.layers.Embedding(VOCAB, dim, name="embedding")]
        + blocks
        + [keras.layers.LayerNormalization(name="final_norm"),
           keras.layers.Dense(VOCAB, name="logits")]
    )


def stateful_layers(streamer):
    return [layer for layer in streamer.layers
            if isinstance(layer, (CompressiveMemory, InfiniTransformer, MoDInfiniTransformer))]


def state_shapes(streamer, batch):
    """`[(memory_shape, norm_shape), ...]` per stateful layer (no build needed)."""
    return [
        ((batch, layer.num_heads, layer.dim_key, layer.dim_value),
         (batch, layer.num_heads, layer.dim_key))
        for layer in stateful_layers(streamer)
    ]


def initial_states(streamer, batch):
    """Each stateful layer's state before the first token, as NumPy arrays (built layers)."""
    states = []
    for layer in stateful_layers(streamer):
        attention = layer if isinstance(layer, CompressiveMemory) else layer.attention
        memory, norm = attention.get_initial_state(batch)
        states.append((to_numpy(memory), to_numpy(norm)))
    return states


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def build_step_model(streamer, batch):
    """`(tokens, *flat_states) -> (logits, *flat_new_states)` from `Streamer.run`."""
    tokens = keras.Input((None,), batch_size=batch, dtype="int32", name="tokens")
    state_inputs = []
    for i, (memory_shape, norm_shape) in enumerate(state_shapes(streamer, batch)):
        state_inputs.append(
            (
                keras.Input(memory_shape[1:], batch_size=batch, name=f"memory_{i}"),
                keras.Input(norm_shape[1:], batch_size=batch, name=f"norm_{i}"),
            )
        )
    logits, new_states = streamer.run(tokens, state_inputs)
    flat_inputs = [tokens] + [t for pair in state_inputs for t in pair]
    flat_outputs = [logits] + [t for pair in new_states for t in pair]
    return keras.Model(flat_inputs, flat_outputs, name="stream_step")


def next_byte_nll(logits, chunk, next_token):
    """Sum of -log p(next byte) over a chunk (the last target is the next chunk's first)."""
    targets = np.concatenate([chunk[:, 1:], next_token[:, None]], axis=1)
    logits = logits.astype("float64")
    logits -= logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits).sum(-1))
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float((log_z - picked).sum())


def checkpoints_for(total, chunk, reference):
    """Token counts at which to report: `reference` times powers of two, and the end."""
    points = set()
    count = reference
    while count < total:
        points.add(count)
        count *= 2
    points.add(total)
    return sorted(p for p in points if p >= chunk)


def state_extrema(states):
    mem = max(float(np.abs(m).max()) for m, _ in states)
    norm = max(float(np.abs(n).max()) for _, n in states)
    finite = all(np.isfinite(m).all() and np.isfinite(n).all() for m, n in states)
    return mem, norm, finite


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2**20, help="tokens to stream (2^20)")
    p.add_argument("--chunk", type=int, default=8192, help="tokens per chunk")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--segment-len", type=int, default=256)
    p.add_argument("--update", choices=("linear", "delta"), default="linear")
    p.add_argument("--mod", action="store_true",
                   help="make every second block a MoDInfiniTransformer (sampling factor 2)")
    p.add_argument("--mode", choices=("compiled", "eager"), default="compiled")
    p.add_argument("--verify", action="store_true",
                   help="compare the compiled step with the eager Streamer on the first chunk")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-tokens", type=int, default=REFERENCE_TOKENS,
                   help="checkpoint whose peak RSS the final peak is compared with (64K)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if peak RSS at the end exceeds 1.10 x peak RSS at 64K tokens")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error("--dim must be a multiple of --heads")
    if args.chunk % args.segment_len:
        p.error("--chunk must be a multiple of --segment-len (stream equals one call)")
    if args.tokens < 2:
        p.error("--tokens must be at least 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    backend = keras.backend.backend()
    layers = build_model(args)
    streamer = Streamer(layers)
    print(f"backend={backend} mode={args.mode} tokens={args.tokens} chunk={args.chunk} "
          f"dim={args.dim} layers={args.layers} (mod={args.mod}) heads={args.heads} "
          f"segment_len={args.segment_len} update={args.update}")
    rng = np.random.default_rng(args.seed)
    if args.mode == "compiled":
        step_model = build_step_model(streamer, args.batch)  # also builds the layers
        states = initial_states(streamer, args.batch)

        def step(chunk, states):
            flat = [chunk] + [t for pair in states for t in pair]
            outputs = step_model.predict_on_batch(flat)
            logits = np.asarray(outputs[0])
            rest = [np.asarray(t) for t in outputs[1:]]
            return logits, list(zip(rest[0::2], rest[1::2]))
    else:
        states = None

        def step(chunk, states):
            logits, new_states = streamer.run(chunk, states)
            return to_numpy(logits), [(to_numpy(m), to_numpy(n)) for m, n in new_states]

    print(f"RSS before the first chunk: {current_rss_mib():.1f} MiB "
          f"(peak {peak_rss_mib():.1f} MiB)")
    checkpoints = checkpoints_for(args.tokens, args.chunk, args.reference_tokens)
    header = (f"{'tokens':>9} {'tok/s*':>9} {'RSS MiB':>8} {'peak MiB':>9} "
              f"{'max|mem|':>10} {'max|norm|':>10} {'bits/byte':>9}")
    print(header)
    print("(* tokens/s since the previous row; RSS: psutil now, peak: ru_maxrss)")
    chunk = rng.integers(0, VOCAB, size=(args.batch, min(args.chunk, args.tokens)),
                         dtype="int32")
    done, nll, timed_tokens, timed_seconds = 0, 0.0, 0, 0.0
    peak_at_reference, reference_done, report = None, None, {}
    first_seconds, last_timed = None, (0, 0.0)
    while done < args.tokens:
        start = time.perf_counter()
        logits, states = step(chunk, states)
        seconds = time.perf_counter() - start
        if done == 0:
            first_seconds = seconds
            params = sum(layer.count_params() for layer in layers)
            print(f"first chunk: {seconds:.2f} s (with compilation); params={params}")
            if args.verify and args.mode == "compiled":
                # The compiled step equals the eager Streamer (on JAX the eager call
                # compiles every op once for this shape: seconds, and extra peak RSS).
                reference = to_numpy(streamer.run(chunk)[0])
                err = float(np.abs(reference - logits).max())
                print(f"max |compiled step - eager Streamer| on the first chunk = {err:.2e}")
                if not err < 1e-3:
                    raise SystemExit(f"compiled step differs from Streamer.run ({err})")
        elif chunk.shape[1] == args.chunk:  # a ragged last chunk may recompile: not timed
            timed_tokens += chunk.size
            timed_seconds += seconds
        done += chunk.shape[1]
        size = min(args.chunk, args.tokens - done)
        following = rng.integers(0, VOCAB, size=(args.batch, max(size, 1)), dtype="int32")
        nll += next_byte_nll(logits, chunk, following[:, 0])
        chunk = following
        crossed = [c for c in checkpoints if c <= done and c not in report]
        if crossed:
            mem, norm, finite = state_extrema(states)
            # tokens/s since the previous checkpoint (full chunks after the first only)
            span_tokens = timed_tokens - last_timed[0]
            span_seconds = timed_seconds - last_timed[1]
            rate = span_tokens / span_seconds if span_seconds else float("nan")
            last_timed = (timed_tokens, timed_seconds)
            bpb = nll / (done * args.batch) / np.log(2)
            row = dict(tokens=done, rate=rate, rss=current_rss_mib(), peak=peak_rss_mib(),
                       mem=mem, norm=norm, finite=finite, bpb=bpb)
            for c in crossed:
                report[c] = row
            if peak_at_reference is None and done >= args.reference_tokens:
                peak_at_reference, reference_done = row["peak"], done
            print(f"{done:>9} {rate:>9.0f} {row['rss']:>8.1f} {row['peak']:>9.1f} "
                  f"{mem:>10.4g} {norm:>10.4g} {bpb:>9.3f}", flush=True)

    final = report[max(report)]
    rate = timed_tokens / timed_seconds if timed_seconds else float("nan")
    print(f"throughput: {rate:.0f} tokens/s over the full chunks after the first "
          f"({backend}, {args.mode}; first chunk {first_seconds:.2f} s)")
    print("final state per stateful layer (memory, norm), float32:")
    for layer, (memory, norm) in zip(stateful_layers(streamer), states):
        finite = bool(np.isfinite(memory).all() and np.isfinite(norm).all())
        print(f"  {layer.name:<10} memory {tuple(memory.shape)} max|.|={np.abs(memory).max():.4g}"
              f"  norm {tuple(norm.shape)} max|.|={np.abs(norm).max():.4g}"
              f" mean={norm.mean():.4g}  finite={finite}")
    print(f"max|norm| / tokens = {final['norm'] / done:.4g} "
          "(the normaliser is a running sum of elu(K) + 1, so it grows linearly)")
    ratio = None
    if peak_at_reference is not None:
        ratio = final["peak"] / peak_at_reference
        print(f"peak RSS at {reference_done} tokens: {peak_at_reference:.1f} MiB; "
              f"at {done} tokens: {final['peak']:.1f} MiB; ratio {ratio:.3f}")
    else:
        print(f"peak RSS at {done} tokens: {final['peak']:.1f} MiB "
              f"(fewer than {args.reference_tokens} tokens: no ratio)")
    result = dict(tokens=done, tokens_per_second=rate, first_chunk_seconds=first_seconds,
                  peak_rss_reference_mib=peak_at_reference, peak_rss_final_mib=final["peak"],
                  ratio=ratio, finite=final["finite"], max_norm=final["norm"],
                  max_memory=final["mem"], checkpoints=report)
    if not final["finite"]:
        print("FAIL: the state is not finite")
        if args.check:
            raise SystemExit(1)
    if args.check and ratio is not None and ratio > 1.10:
        print(f"FAIL: peak RSS grew by more than 10% ({ratio:.3f})")
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
