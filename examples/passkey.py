"""Passkey retrieval with a small causal Infini-Transformer (arXiv 2404.07143, sec. 4.2).

The synthetic task of Mohtashami & Jaggi (2023) that the Infini-attention paper uses for
its 1M-token result, at laptop scale: a 5-digit key is stated once at a random depth
inside repeated filler text, and after the filler the model is asked for it:

    The grass is green . The sky is blue . The sun is yellow . Here we go . There and
    back again . The grass is ... The pass key is 7 1 4 3 2 . Remember it . 7 1 4 3 2 is
    the pass key . ... (more filler) ... What is the pass key ? The pass key is 7 1 4 3 2

Tokens are words, punctuation and single digits (a 34-token vocabulary). The model is a
causal next-token model (Embedding -> InfiniTransformer blocks with RoPE -> Dense), trained
with `model.fit` on sequences of `--train-segments` segments and evaluated at several
multiples of that length (`--eval-lengths`) and key depths (`--depths`). Once the key and
the question are in different segments only the compressive memory can carry the key, so
lengths beyond the training length test whether the memory generalises to more segments
than it was trained on.

Training recipe (defaults; each can be switched off):

- loss on the five answer digits (sample weights), plus `--aux-weight 0.5` on the key's
  repetition inside the key statement ("Remember it . 7 1 4 3 2"), a local copy that
  teaches the digit-position features the retrieval needs;
- depths uniform in [0, 1], except `--late-fraction 0.25` of the samples with the key
  wholly in the last segment, right before the question: the only case that local
  attention alone must solve, which uniform depths rarely train;
- `--update delta` (generalised to longer inputs better than `linear` in our runs), 3
  blocks of width 64 with 2 heads (32-dim keys), AdamW with warm-up and cosine decay.

Reported accuracies are teacher-forced: digit accuracy is the fraction of answer digits
that are the argmax given the correct earlier digits; key accuracy is the fraction of
samples with all five right, which equals exact-match accuracy of greedy decoding.

Usage:

    KERAS_BACKEND=jax python examples/passkey.py                   # default run
    KERAS_BACKEND=jax python examples/passkey.py --steps 200 --eval-lengths 1,4
    # the recommended memory (README): ~99.8% digit accuracy at 16x and 64x the training
    # length, against 85.9% at 16x with the default paper delta rule
    KERAS_BACKEND=jax python examples/passkey.py --update delta --memory-feature-map l2 \
        --write-strength hard_sigmoid --gate-lr-scale 10 --memory-decay coupled \
        --eval-lengths 1,4,16,64

The accuracy table is printed and a depth x length heat map is written to
`<out>/passkey_heatmap.png` (with the numbers as `<out>/passkey_results.json`).
"""

import argparse
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from keras_infini import InfiniTransformer  # noqa: E402
from keras_infini.ops.memory import FEATURE_MAPS  # noqa: E402

# ----------------------------------------------------------------------------- text
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again."
)
KEY_TEMPLATE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5

_TOKEN_RE = re.compile(r"\d|\w+|[^\w\s]")


def tokenize_words(text):
    """Words, punctuation marks and single digits."""
    return _TOKEN_RE.findall(text)


def _build_vocab():
    words = ["<pad>"] + [str(d) for d in range(10)]
    for text in (FILLER, KEY_TEMPLATE.format(key="0"), QUESTION):
        for word in tokenize_words(text):
            if word not in words:
                words.append(word)
    return words


VOCAB = _build_vocab()
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
DIGIT_IDS = np.array([TOKEN_ID[str(d)] for d in range(10)])


def encode(text):
    return np.array([TOKEN_ID[w] for w in tokenize_words(text)], dtype="int32")


def decode(ids):
    return " ".join(VOCAB[int(i)] for i in ids)


FILLER_IDS = encode(FILLER)
# Filler positions (within one cycle) where a sentence starts: just after a ".".
_SENTENCE_STARTS = np.array(
    [0] + [i + 1 for i, t in enumerate(FILLER_IDS[:-1]) if t == TOKEN_ID["."]]
)
QUESTION_IDS = encode(QUESTION)


def key_statement(key_digits):
    key = " ".join(str(int(d)) for d in key_digits)
    return encode(KEY_TEMPLATE.format(key=key))


KEY_STATEMENT_LEN = len(key_statement([0] * KEY_DIGITS))
# Offset of the key's second occurrence inside the key statement.
REPEAT_OFFSET = int(np.flatnonzero(np.isin(key_statement([0] * KEY_DIGITS), DIGIT_IDS))[KEY_DIGITS])
OVERHEAD = KEY_STATEMENT_LEN + len(QUESTION_IDS) + KEY_DIGITS


def make_sample(length, depth, key_digits, phase=0):
    """One passkey sequence of exactly `length` + 1 tokens (inputs + the shifted target).

    Args:
        length: model input length; the returned sequence has `length + 1` tokens and ends
            with the question and the `KEY_DIGITS` answer digits.
        depth: in [0, 1]: where the key statement goes in the filler (0: first token,
            1: just before the question); snapped to the nearest sentence start.
        key_digits: `KEY_DIGITS` ints in 0..9.
        phase: offset of the filler into its repeating cycle.

    Returns:
        `(tokens (length + 1,) int32, key_start)`: the key statement starts at
        `tokens[key_start]`.
    """
    n_fill = length + 1 - OVERHEAD
    if n_fill < 0:
        raise ValueError(f"length={length} is too short for a passkey sample ({OVERHEAD}).")
    cycle = len(FILLER_IDS)
    filler = FILLER_IDS[(np.arange(n_fill) + phase) % cycle]
    # Sentence starts inside the filler (positions p with (p + phase) % cycle a start).
    starts = np.flatnonzero(np.isin((np.arange(n_fill + 1) + phase) % cycle, _SENTENCE_STARTS))
    starts = np.union1d(starts, [0, n_fill])
    key_start = int(starts[np.argmin(np.abs(starts - depth * n_fill))])
    tokens = np.concatenate(
        [
            filler[:key_start],
            key_statement(key_digits),
            filler[key_start:],
            QUESTION_IDS,
            DIGIT_IDS[np.asarray(key_digits)],
        ]
    ).astype("int32")
    assert tokens.shape == (length + 1,)
    return tokens, key_start


def make_batch(rng, batch, length, depths=None, aux_weight=0.0, late_fraction=0.0,
               late_tokens=0):
    """Inputs `(batch, length)`, targets, loss weights and the keys.

    `depths`: None (random per sample) or a float for every sample. Random depths are
    uniform in [0, 1], except that a `late_fraction` of the samples put the key in the
    last `late_tokens` filler tokens (near the question, where only local attention can
    see it: a uniform depth rarely trains that case).
    Weights are 1 on the `KEY_DIGITS` positions whose target is an answer digit and
    `aux_weight` on those whose target is a digit of the key's repetition inside the key
    statement ("... Remember it . 7 1 4 3 2 is the pass key ."), a local copy.
    """
    keys = rng.integers(0, 10, size=(batch, KEY_DIGITS))
    if depths is None:
        depth_values = rng.uniform(0.0, 1.0, size=batch)
        if late_fraction:
            n_fill = length + 1 - OVERHEAD
            # 3 tokens of margin: snapping to a sentence start moves the key by <= 2.
            low = max(0.0, 1.0 - max(late_tokens - 3, 0) / n_fill)
            late = rng.uniform(size=batch) < late_fraction
            depth_values[late] = rng.uniform(low, 1.0, size=int(late.sum()))
    else:
        depth_values = np.full(batch, float(depths))
    phases = rng.choice(_SENTENCE_STARTS, size=batch)
    samples = [make_sample(length, d, k, p) for d, k, p in zip(depth_values, keys, phases)]
    seqs = np.stack([tokens for tokens, _ in samples])
    weights = np.zeros((batch, length), dtype="float32")
    if aux_weight:
        for row, (_, key_start) in enumerate(samples):
            first = key_start + REPEAT_OFFSET - 1  # input position predicting the digit
            weights[row, first:first + KEY_DIGITS] = aux_weight
    weights[:, -KEY_DIGITS:] = 1.0
    return seqs[:, :-1], seqs[:, 1:], weights, keys


class PasskeyData(keras.utils.PyDataset):
    """Random training batches for `model.fit`; `lengths` cycles per step (curriculum)."""

    def __init__(self, steps, batch, lengths, seed, aux_weight=0.0, late_fraction=0.0,
                 late_tokens=0):
        super().__init__()
        self.steps, self.batch, self.lengths, self.seed = steps, batch, lengths, seed
        self.aux_weight, self.late_fraction = aux_weight, late_fraction
        self.late_tokens = late_tokens

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        length = self.lengths[index % len(self.lengths)]
        x, y, w, _ = make_batch(rng, self.batch, length, aux_weight=self.aux_weight,
                                late_fraction=self.late_fraction,
                                late_tokens=self.late_tokens)
        return x, y, w


# ----------------------------------------------------------------------------- model
def build_model(args):
    dim, heads = args.dim, args.heads
    blocks = [
        InfiniTransformer(
            dim,
            2 * dim,
            dim // heads,
            dim // heads,
            heads,
            "gelu",
            args.segment_len,
            update=args.update,
            causal=True,
            positional_embedder="rope",
            init_state_learnable=args.init_state_learnable,
            memory_feature_map=args.memory_feature_map,
            write_strength=args.write_strength,
            gate_init=args.gate_init,
            gate_lr_scale=args.gate_lr_scale,
            memory_decay=args.memory_decay,
            name=f"block_{i}",
        )
        for i in range(args.layers)
    ]
    # Keras' default table range divided by the scale, the output multiplied by it: the
    # same initial model, whose embedding output Adam moves `scale` times faster.
    scale = args.embedding_scale
    embedding = [keras.layers.Embedding(
        len(VOCAB), dim, name="embedding",
        embeddings_initializer=keras.initializers.RandomUniform(-0.05 / scale, 0.05 / scale))]
    if scale != 1:
        embedding.append(keras.layers.Rescaling(scale, name="embedding_scale"))
    model = keras.Sequential(
        [keras.Input((None,), dtype="int32")]
        + embedding
        + blocks
        + [keras.layers.LayerNormalization(epsilon=1e-5), keras.layers.Dense(len(VOCAB))],
        name="passkey_infini",
    )
    return model


# ----------------------------------------------------------------------------- eval
def evaluate_cell(model, rng, length, depth, samples, batch):
    """Teacher-forced (digit accuracy, key accuracy) at one length and depth."""
    digit_hits, key_hits = [], []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        x, y, _, keys = make_batch(rng, n, length, depths=depth)
        logits = model.predict_on_batch(x)
        logits = np.asarray(keras.ops.convert_to_numpy(logits))[:, -KEY_DIGITS:]
        predicted = logits.argmax(-1)
        hits = predicted == y[:, -KEY_DIGITS:]
        digit_hits.append(hits.mean(1))
        key_hits.append(hits.all(1))
    return float(np.concatenate(digit_hits).mean()), float(np.concatenate(key_hits).mean())


def evaluate(model, train_len, multiples, depths, samples, batch, seed):
    results = {}
    for mult in multiples:
        length = train_len * mult
        eval_batch = max(1, min(batch, (batch * train_len * 4) // length))
        for depth in depths:
            rng = np.random.default_rng([seed, 7919, mult, int(round(depth * 1000))])
            results[(mult, depth)] = evaluate_cell(
                model, rng, length, depth, samples, eval_batch
            )
    return results


def format_table(results, multiples, depths, train_len):
    lines = []
    head = f"{'depth':>6} | " + " | ".join(
        f"{f'{m}x ({m * train_len} tok)':>19}" for m in multiples
    )
    lines.append("digit accuracy / whole-key accuracy (teacher-forced)")
    lines.append(head)
    lines.append("-" * len(head))
    for depth in depths:
        cells = []
        for m in multiples:
            digit, key = results[(m, depth)]
            cells.append(f"{digit * 100:8.1f}% / {key * 100:6.1f}%")
        lines.append(f"{depth * 100:5.0f}% | " + " | ".join(f"{c:>19}" for c in cells))
    means = []
    for m in multiples:
        digit = np.mean([results[(m, d)][0] for d in depths])
        key = np.mean([results[(m, d)][1] for d in depths])
        means.append(f"{digit * 100:8.1f}% / {key * 100:6.1f}%")
    lines.append("-" * len(head))
    lines.append(f"{'mean':>6} | " + " | ".join(f"{c:>19}" for c in means))
    return "\n".join(lines)


def save_heatmap(results, multiples, depths, train_len, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[results[(m, d)][0] * 100 for m in multiples] for d in depths])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(multiples), 1.2 + 0.55 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(multiples)))
    ax.set_xticklabels([f"{m}x\n{m * train_len}" for m in multiples])
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f"{d * 100:.0f}%" for d in depths])
    ax.set_xlabel("length (x training length / tokens)")
    ax.set_ylabel("key depth")
    for i in range(len(depths)):
        for j in range(len(multiples)):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="digit accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def _int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def _float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def _gate_init(text):
    """One gate logit (a float) or one per head (a list of floats)."""
    try:
        values = _float_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --gate-init={text!r}: expected numbers separated by commas") from None
    if not values:
        raise argparse.ArgumentTypeError(f"invalid --gate-init={text!r}: no number")
    return values[0] if len(values) == 1 else values


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="training steps")
    p.add_argument("--batch", type=int, default=16, help="training batch size")
    p.add_argument("--train-segments", type=int, default=4, help="training length in segments")
    p.add_argument("--segment-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--update", choices=("linear", "delta"), default="delta")
    p.add_argument("--init-state-learnable", action="store_true")
    p.add_argument("--memory-feature-map", choices=FEATURE_MAPS, default="elu1",
                   help="feature map of the memory's queries and keys (README 'Memory options')")
    p.add_argument("--write-strength", nargs="?", const=True, default=False,
                   choices=("sigmoid", "hard_sigmoid"),
                   help="learned per-token, per-head memory write strength beta "
                        "(alone: sigmoid)")
    p.add_argument("--gate-init", type=_gate_init, default=0.0,
                   help="initial memory gate logit: one number for every head, or one per "
                        "head separated by commas (e.g. '-2,2': a local and a memory head)")
    p.add_argument("--gate-lr-scale", type=float, default=1.0,
                   help="gate learning-rate scale (sigmoid(scale * raw))")
    p.add_argument("--memory-decay", nargs="?", const=True, default=False,
                   choices=("coupled",),
                   help="learned per-token memory decay (Gated DeltaNet; needs --update "
                        "delta and a unit-key map: l2, elu1_l2, dpfp*); 'coupled': decay "
                        "only as much as the token writes (needs --write-strength)")
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate")
    p.add_argument("--embedding-scale", type=float, default=1.0,
                   help="multiply the token embeddings by this factor and divide their "
                        "initial values by it: the same initial model whose embedding "
                        "table learns this many times faster under Adam")
    p.add_argument("--curriculum", type=_int_list, default=None,
                   help="comma-separated training lengths in segments cycled per step "
                        "(default: only --train-segments)")
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="loss weight on the key's repetition inside the key statement")
    p.add_argument("--late-fraction", type=float, default=0.25,
                   help="fraction of training samples with the key in the last segment, "
                        "right before the question (local attention only)")
    p.add_argument("--eval-lengths", type=_int_list, default=[1, 4, 16],
                   help="comma-separated multiples of the training length")
    p.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="comma-separated key depths in [0, 1]")
    p.add_argument("--eval-samples", type=int, default=64, help="samples per table cell")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: a new temp dir)")
    p.add_argument("--verbose", type=int, default=2, help="model.fit verbosity")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error("--dim must be a multiple of --heads")
    if isinstance(args.gate_init, list) and len(args.gate_init) != args.heads:
        p.error(f"--gate-init={','.join(f'{v:g}' for v in args.gate_init)}: expected one "
                f"number or {args.heads} (one per head)")
    if not args.embedding_scale > 0:
        p.error(f"--embedding-scale must be positive, got {args.embedding_scale}")
    if any(not 0 <= d <= 1 for d in args.depths):
        p.error("--depths must lie in [0, 1]")
    if args.train_segments * args.segment_len < OVERHEAD:
        p.error(f"the training length must be at least {OVERHEAD} tokens")
    return args


def main(argv=None):
    t0 = time.perf_counter()
    args = parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="passkey_")
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    train_len = args.train_segments * args.segment_len
    lengths = [s * args.segment_len for s in (args.curriculum or [args.train_segments])]
    if any(n < OVERHEAD for n in lengths):
        raise SystemExit(f"every curriculum length must be at least {OVERHEAD} tokens")

    print(f"backend={keras.backend.backend()} vocab={len(VOCAB)} train_len={train_len} "
          f"({args.train_segments} x {args.segment_len}) dim={args.dim} layers={args.layers} "
          f"heads={args.heads} update={args.update} steps={args.steps} batch={args.batch}")
    example, _ = make_sample(train_len, 0.5, [7, 1, 4, 3, 2])
    print("sample (end):", "...", decode(example[-40:]))

    model = build_model(args)
    warmup = max(1, args.steps // 20)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, args.steps - warmup), alpha=0.05,
        warmup_target=args.lr, warmup_steps=warmup,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    epochs = 10 if args.steps >= 10 else 1
    per_epoch = args.steps // epochs
    # "Late" keys lie wholly in the last segment, before the question: local attention only.
    late_tokens = args.segment_len - OVERHEAD if args.segment_len > OVERHEAD else args.segment_len
    data = PasskeyData(per_epoch * epochs, args.batch, lengths, args.seed, args.aux_weight,
                       args.late_fraction, late_tokens)
    start = time.perf_counter()
    history = model.fit(data, epochs=epochs, steps_per_epoch=per_epoch, verbose=args.verbose)
    train_s = time.perf_counter() - start
    digit_acc = history.history.get("accuracy", [float("nan")])[-1]
    print(f"trained {per_epoch * epochs} steps in {train_s:.1f} s; "
          f"last-epoch weighted train accuracy {digit_acc * 100:.1f}%")
    gates = [np.round(np.asarray(keras.ops.convert_to_numpy(
        block.attention.gate_values()), "float64"), 3).tolist()
        for block in model.layers if isinstance(block, InfiniTransformer)]
    print("trained memory gates sigmoid per block (heads):",
          "; ".join(" ".join(f"{g:.2f}" for g in block) for block in gates))

    start = time.perf_counter()
    results = evaluate(model, train_len, args.eval_lengths, args.depths,
                       args.eval_samples, args.eval_batch, args.seed)
    eval_s = time.perf_counter() - start
    table = format_table(results, args.eval_lengths, args.depths, train_len)
    print(table)
    print(f"evaluated {args.eval_samples} samples per cell in {eval_s:.1f} s")

    title = (f"passkey, {keras.backend.backend()}: {args.layers}x{args.dim} {args.update}, "
             f"segment {args.segment_len}, trained on {train_len} tokens ({args.steps} steps)")
    png = os.path.join(out, "passkey_heatmap.png")
    save_heatmap(results, args.eval_lengths, args.depths, train_len, png, title)
    with open(os.path.join(out, "passkey_results.json"), "w") as f:
        json.dump(
            {
                "args": vars(args),
                "backend": keras.backend.backend(),
                "train_seconds": train_s,
                "eval_seconds": eval_s,
                "gates": gates,
                "results": [
                    {"multiple": m, "length": m * train_len, "depth": d,
                     "digit_accuracy": results[(m, d)][0], "key_accuracy": results[(m, d)][1]}
                    for m in args.eval_lengths for d in args.depths
                ],
            },
            f,
            indent=1,
        )
    print(f"heat map: {png}")
    print(f"total time {time.perf_counter() - t0:.1f} s (training {train_s:.1f} s, "
          f"evaluation {eval_s:.1f} s)")
    return {"results": results, "table": table, "png": png, "out": out,
            "train_seconds": train_s, "eval_seconds": eval_s, "gates": gates}


if __name__ == "__main__":
    main()
    sys.exit(0)
