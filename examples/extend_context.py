"""Extending a pretrained model's context with the compressive memory (issue 34).

The whole workflow, each stage resumable (a stage whose output exists under `--out` is
skipped):

1. `pretrain`: a small keras-hub `LlamaCausalLM` (grouped-query attention, RoPE, the byte
   vocabulary of `byte_datasets.py`: 259 ids) trained on the Python standard library at a
   context of `--context` tokens (256); or `--preset DIR` for any local keras-hub preset of
   a family `InfiniCausalLM.from_causal_lm` converts (its vocabulary must hold the byte
   ids). Saved to `<out>/source`.
2. `convert`: `InfiniCausalLM.from_causal_lm(source, segment_len=--context)`, the memory
   closed (`tanh` gate at 0: the converted model equals the source on one segment).
   Saved to `<out>/converted`.
3. `finetune`: long windows (`--ft-mult` x the context, 16 by default; several values make
   a length curriculum) of held-in text, a
   `--passkey-fraction` of them with a passkey stated at a random depth and asked for at
   the end (loss on every text byte, plus `--answer-weight` on each answer digit).
   `--variant memory` (the converted model), `local` (the converted model with its memory
   closed and kept closed: its gates are not trained), `interp` (the source model, full
   attention, RoPE position interpolation by `--interp-factor`); `--train new` (only the
   conversion's new parameters: gates, write strengths, decays) or `all`. `interp` has no
   new parameters: it always trains all. `local` with `--train new` has nothing that can
   change its outputs (the closed gate disconnects the rest), so its fine-tune is skipped.
   Saved to `<out>/<variant>-<train>-s<seed>`.
4. `evaluate`: at `--eval-mults` (1, 4, 16, 64) x the context on held-out files: passkey
   accuracy per depth bin (bin 0: the key in the first segment, the last bin: the key in
   the last segment, right before the question), bits per byte on long held-out text at
   each length, and short-context bits per byte (windows of `--context`). The models that
   attend to the whole input (`source`, `interp`) are skipped at lengths whose attention
   scores of one layer would exceed `--full-attention-mb` ("does not fit").
5. `report`: `<out>/report.md` (tables), `<out>/passkey.png` (accuracy vs depth, one panel
   per length, one line per model; skipped with a message without matplotlib) and
   `<out>/results.json`.

Passkey scoring: teacher-forced. Digit accuracy is the share of answer digits that are the
argmax given the correct earlier digits; key accuracy is the share of samples with all
five right, which is exact-match accuracy of greedy decoding (greedy decoding emits the
first digit as the argmax, and so on: all five argmaxes right under teacher forcing is the
same event). Chance: 10% per digit, 0.001% per key.

Gates: the converted model mixes `A = A_dot + t A_mem` with `t = tanh(s g)` per head
(`s = gate_lr_scale`), `t = 0` at conversion. A head counts as open when `|t| >= 0.25`:
its memory read enters with at least a quarter of the local output's weight, the ratio a
sigmoid gate has at 0.2 (`0.2 / 0.8`), where a sigmoid gate leaves [0.2, 0.8] on its way
towards the memory.

Usage (the results page `docs/results/extend_context.md` has the commands it ran):

    KERAS_BACKEND=jax python examples/extend_context.py --out runs/ctx            # all stages
    KERAS_BACKEND=jax python examples/extend_context.py --out runs/ctx --stages finetune \
        evaluate report --variant local --train all
    KERAS_BACKEND=jax python examples/extend_context.py --smoke --out /tmp/ctx   # seconds
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import byte_datasets as datasets  # noqa: E402
from modinfiniformer import CausalLMData  # noqa: E402  ((x, y) windows as task inputs)

from keras_infini.models import InfiniCausalLM  # noqa: E402

STAGES = ("pretrain", "convert", "finetune", "evaluate", "report")
VARIANTS = ("memory", "local", "interp")
OPEN_GATE = 0.25  # |tanh(s g)| at or above: the head reads its memory (see the docstring)
STATEMENT = "\n# The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n# What is the pass key? The pass key is {key}"
KEY_DIGITS = 5
SMOKE = dict(
    packages=["json"], context=64, hidden_dim=32, intermediate_dim=64, layers=2, heads=4,
    kv_heads=2, pretrain_steps=6, pretrain_batch=4, pretrain_minutes=5.0, ft_mult=[4],
    ft_steps=3, ft_batch=2, ft_minutes=5.0, eval_mults=[2, 4], eval_samples=2,
    long_windows=1, short_windows=2, depth_bins=3,
)


# ----------------------------------------------------------------------------- data
def encode(text):
    return np.frombuffer(text.encode("ascii"), np.uint8).astype(np.int32)


def passkey_overhead():
    return len(encode(STATEMENT.format(key="00000"))) + len(encode(QUESTION.format(key="00000")))


def depth_position(depth_bin, bins, filler_len, context, statement_len, rng):
    """Where the statement starts: bin 0 inside the first segment, the last bin right
    before the question (inside the last segment), the others uniform in their share."""
    last = filler_len  # the statement directly before the question
    if bins == 1:
        return int(rng.integers(0, last + 1))
    if depth_bin == 0:
        return int(rng.integers(0, max(1, min(last, context - statement_len) + 1)))
    if depth_bin == bins - 1:
        return last
    low, high = depth_bin / (bins - 1) - 0.5 / (bins - 1), depth_bin / (bins - 1) + 0.5 / (bins - 1)
    return int(rng.integers(int(low * last), max(int(low * last) + 1, int(high * last))))


def passkey_row(stream, length, rng, context, depth_bin=None, bins=5):
    """`(x, y, answer_mask)` of one passkey window of `length` tokens: text from `stream`
    with the statement at a depth (`depth_bin`, or uniform when None), the question and
    the 5-digit answer at the end (the last 5 targets)."""
    key = "".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS))
    statement, question = encode(STATEMENT.format(key=key)), encode(QUESTION.format(key=key))
    filler_len = length + 1 - len(statement) - len(question)
    if filler_len < 0:
        raise ValueError(f"length {length} is shorter than the passkey's "
                         f"{passkey_overhead()} tokens")
    start = int(rng.integers(0, stream.size - filler_len))
    filler = stream[start:start + filler_len].astype(np.int32)
    if depth_bin is None:
        position = int(rng.integers(0, filler_len + 1))
    else:
        position = depth_position(depth_bin, bins, filler_len, context, len(statement), rng)
    seq = np.concatenate([filler[:position], statement, filler[position:], question])
    answer = np.zeros(length, bool)
    answer[-KEY_DIGITS:] = True
    # The key's repetition inside the statement ("Remember it. 12345"): a local copy.
    text = STATEMENT.format(key=key)
    repeat = position + text.index("Remember it. ") + len("Remember it. ") - 1
    aux = np.zeros(length, bool)
    aux[repeat:repeat + KEY_DIGITS] = True
    return seq[:-1], seq[1:], answer, aux


def text_row(stream, length, rng):
    start = int(rng.integers(0, stream.size - length - 1))
    window = stream[start:start + length + 1].astype(np.int32)
    return window[:-1], window[1:]


class FinetuneData(keras.utils.PyDataset):
    """Long windows: LM text, a `passkey_fraction` of them with a passkey (uniform depth).
    Sample weights: 1 per text byte, `answer_weight` per answer digit, `aux_weight` per
    digit of the key's repetition inside the statement (a local copy)."""

    def __init__(self, stream, length, batch, steps, seed, context, passkey_fraction,
                 answer_weight, aux_weight=1.0, curriculum=None):
        super().__init__()
        self.stream, self.length, self.batch, self.steps = stream, length, batch, steps
        self.seed, self.context = seed, context
        self.passkey_fraction, self.answer_weight = passkey_fraction, answer_weight
        self.aux_weight = aux_weight
        # [(length, batch[, answer_weight]), ...]: equal shares of the steps, in order (a
        # length curriculum)
        self.curriculum = [tuple(stage) + (answer_weight,) * (3 - len(stage))
                           for stage in (curriculum or [(length, batch)])]

    def __len__(self):
        return self.steps

    def stage(self, index):
        """(length, batch, answer_weight) of step `index`."""
        return self.curriculum[min(len(self.curriculum) - 1,
                                   index * len(self.curriculum) // max(1, self.steps))]

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, 31, index])
        length, batch, answer_weight = self.stage(index)
        xs, ys, ws = [], [], []
        for _ in range(batch):
            if rng.random() < self.passkey_fraction:
                x, y, answer, aux = passkey_row(self.stream, length, rng, self.context)
                w = np.where(answer, answer_weight, np.where(aux, self.aux_weight, 1.0))
            else:
                x, y = text_row(self.stream, length, rng)
                w = np.ones(length)
            xs.append(x), ys.append(y), ws.append(w)
        x = np.stack(xs).astype("int32")
        return ({"token_ids": x, "padding_mask": np.ones_like(x)}, np.stack(ys).astype("int32"),
                np.stack(ws).astype("float32"))


def load_streams(args, docs=False):
    """Token streams (`[BOS] file [EOS] ...`) of the training and the held-out files (or
    the `(path, bytes)` lists with `docs=True`)."""
    train, val = datasets.stdlib_corpus(packages=args.packages)
    if docs:
        return train, val
    return datasets.concatenate_documents(train), datasets.concatenate_documents(val)


# ----------------------------------------------------------------------------- models
def is_infini(lm):
    return hasattr(lm.backbone, "memory_variables")


def gates(lm):
    """`tanh(s g)` per block and head (nested lists), or None for a full-attention model."""
    if not is_infini(lm):
        return None
    return [np.asarray(keras.ops.convert_to_numpy(b.attention.gate_values()), "float64")
            .round(4).tolist() for b in lm.backbone.transformer_layers]


def open_share(gate_lists):
    values = np.abs(np.concatenate([np.asarray(g) for g in gate_lists]))
    return int((values >= OPEN_GATE).sum()), int(values.size)


def full_attention_fits(lm, length, batch, limit_mb):
    """Whether one layer's attention scores (float32) of a full-attention model fit."""
    if is_infini(lm):
        return True
    heads = lm.backbone.num_query_heads
    return batch * heads * length * length * 4 <= limit_mb * 2**20


def predict_logits(lm, x):
    data = {"token_ids": x, "padding_mask": np.ones_like(x)}
    return np.asarray(keras.ops.convert_to_numpy(lm.predict_on_batch(data)), "float32")


def log_softmax_at(logits, targets):
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse


def save_preset(lm, path):
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_to_preset(tmp)
    os.replace(tmp, path)


def load_preset(path):
    if os.path.exists(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            if "keras_infini" in f.read():
                return InfiniCausalLM.from_preset(path)
    return keras_hub.models.CausalLM.from_preset(path)


def done(path):
    return os.path.exists(os.path.join(path, "config.json")) or os.path.exists(path + ".json")


def write_json(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


class TimeLimit(keras.callbacks.Callback):
    """Stops `fit` after `minutes` of wall time, or after `stop_step` steps (the schedule
    stays the one of all the steps)."""

    def __init__(self, minutes, stop_step=None):
        super().__init__()
        self.limit, self.stop_step, self.start = minutes * 60.0, stop_step, None
        self.steps, self.stopped = 0, False  # over every `fit` call it is given to

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if time.perf_counter() - self.start > self.limit or (
                self.stop_step is not None and self.steps >= self.stop_step):
            self.model.stop_training = self.stopped = True


class LossCurve(keras.callbacks.Callback):
    """The mean training loss of every `every` steps (from Keras' running epoch mean)."""

    def __init__(self, every=100):
        super().__init__()
        self.every, self.curve = every, []
        self.on_train_begin()

    def on_train_begin(self, logs=None):  # each `fit` call (curriculum stage) starts anew
        self.total, self.mark, self.seen = 0.0, (0, 0.0), 0

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            self.total = float(logs["loss"]) * (batch + 1)  # running mean -> running sum
            self.seen = batch + 1
            if (batch + 1) % self.every == 0:
                self.flush(batch + 1)

    def on_train_end(self, logs=None):
        self.flush(self.seen)

    def flush(self, steps):
        if steps > self.mark[0]:
            self.curve.append(round((self.total - self.mark[1]) / (steps - self.mark[0]), 4))
            self.mark = (steps, self.total)


class StageData(keras.utils.PyDataset):
    """Steps `[first, first + count)` of a `FinetuneData`: one curriculum stage, fed to its
    own `fit` call (TensorFlow's PyDataset adapter fixes the window shape at the first
    batch, so the lengths cannot change inside one call)."""

    def __init__(self, data, first, count):
        super().__init__()
        self.data, self.first, self.count = data, first, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.data[self.first + index]


def stage_slices(data):
    """`FinetuneData` -> one `StageData` per curriculum stage (equal shares, in order)."""
    if len(data.curriculum) == 1:
        return [data]
    firsts = [i for i in range(data.steps) if i == 0 or data.stage(i) != data.stage(i - 1)]
    ends = firsts[1:] + [data.steps]
    return [StageData(data, a, b - a) for a, b in zip(firsts, ends)]


def fit(lm, parts, optimizer, minutes, verbose, stop_step=None):
    """Trains on each dataset of `parts` in turn (one `fit` call each: the curriculum's
    stages), under one time limit and step limit; returns steps, time, loss curve."""
    lm.compile(optimizer=optimizer,
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               weighted_metrics=[], sampler="greedy")
    limit, curve = TimeLimit(minutes, stop_step), LossCurve()
    start = time.perf_counter()
    for part in parts:
        # Keras' own fit: keras-hub's (PipelineModel) turns its inputs into a tf.data
        # pipeline, which refuses a PyDataset of dicts; there is no preprocessor to apply.
        history = keras.Model.fit(lm, part, epochs=1, verbose=verbose,
                                  callbacks=[limit, curve])
        if limit.stopped:
            break
    steps = int(keras.ops.convert_to_numpy(optimizer.iterations))
    return dict(steps=steps, seconds=round(time.perf_counter() - start, 1),
                last_loss=float(history.history["loss"][-1]),
                loss_curve=dict(every=curve.every, mean_loss=curve.curve))


def schedule(lr, steps):
    warmup = max(1, steps // 20)
    return keras.optimizers.schedules.CosineDecay(0.0, max(1, steps - warmup), alpha=0.05,
                                                  warmup_target=lr, warmup_steps=warmup)


# ----------------------------------------------------------------------------- stages
def stage_pretrain(args, out):
    path = os.path.join(out, "source")
    if done(path):
        print(f"pretrain: {path} exists, skipped")
        return
    if args.preset:
        lm = keras_hub.models.CausalLM.from_preset(args.preset)
        save_preset(lm, path)
        print(f"pretrain: copied --preset {args.preset} to {path}")
        return
    keras.utils.set_random_seed(args.pretrain_seed)
    if args.pretrain_from:  # continue pretraining a saved source
        lm = keras_hub.models.CausalLM.from_preset(args.pretrain_from)
        backbone = lm.backbone
    else:
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=datasets.VOCAB_SIZE, num_layers=args.layers,
            num_query_heads=args.heads, num_key_value_heads=args.kv_heads,
            hidden_dim=args.hidden_dim, intermediate_dim=args.intermediate_dim,
            rope_max_wavelength=args.rope_max_wavelength)
        lm = keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)
    if args.pretrain_passkey_fraction > 0:  # in-context retrieval learned at the source
        stream, _ = load_streams(args)
        data = FinetuneData(stream, args.context, args.pretrain_batch, args.pretrain_steps,
                            args.pretrain_seed, args.context, args.pretrain_passkey_fraction,
                            args.answer_weight, args.aux_weight)
    else:
        docs, _ = load_streams(args, docs=True)
        data = CausalLMData(datasets.ByteLMDataset(docs, args.context, args.pretrain_batch,
                                                   args.pretrain_steps,
                                                   seed=args.pretrain_seed))
    optimizer = keras.optimizers.AdamW(schedule(args.pretrain_lr, args.pretrain_steps),
                                       weight_decay=0.01, clipnorm=1.0)
    stats = fit(lm, [data], optimizer, args.pretrain_minutes, args.verbose)
    save_preset(lm, path)
    write_json(os.path.join(out, "source_pretrain.json"),
               dict(stats, params=int(backbone.count_params()), backend=keras.backend.backend()))
    print(f"pretrain: {stats['steps']} steps in {stats['seconds']} s, last loss "
          f"{stats['last_loss']:.3f} ({backbone.count_params()} parameters) -> {path}")


def stage_convert(args, out):
    path = os.path.join(out, "converted")
    if done(path):
        print(f"convert: {path} exists, skipped")
        return
    source = load_preset(os.path.join(out, "source"))
    options = {"gate_init": args.gate_init} if args.gate_init else {}
    converted = InfiniCausalLM.from_causal_lm(source, segment_len=args.context, **options)
    save_preset(converted, path)
    print(f"convert: segment_len={args.context}"
          + (f", gates opened to tanh({args.gate_init})" if options else "") + f" -> {path}")


def run_name(args):
    train = "all" if args.variant == "interp" else args.train
    return f"{args.variant}-{train}-s{args.seed}"


def curriculum(args):
    """[(window length, batch, answer weight), ...] of the fine-tune: one stage per
    `--ft-mult`, equal shares of the steps, the batch scaled to keep the first stage's
    tokens per step, the answer weight by the window's length (`--scale-answer-weight`)."""
    first = args.ft_mult[0]
    return [(args.context * mult, max(1, round(args.ft_batch * first / mult)),
             args.answer_weight * (mult / first if args.scale_answer_weight else 1.0))
            for mult in args.ft_mult]


def interpolated(source, factor):
    """The source with RoPE position interpolation by `factor` (same weights)."""
    config = dict(source.backbone.get_config(), rope_position_scaling_factor=float(factor))
    backbone = type(source.backbone).from_config(config)
    backbone.set_weights(source.backbone.get_weights())
    return type(source)(backbone, preprocessor=None)


def stage_finetune(args, out):
    name = run_name(args)
    path = os.path.join(out, name)
    if done(path):
        print(f"finetune {name}: {path} exists, skipped")
        return
    keras.utils.set_random_seed(args.seed)
    train = "all" if args.variant == "interp" else args.train
    if args.variant == "interp":
        lm = interpolated(load_preset(os.path.join(out, "source")), args.interp_factor)
        note = f"position interpolation x{args.interp_factor} (YaRN is not offered for Llama)"
    else:
        lm = load_preset(os.path.join(out, "converted"))
        note = "memory closed and kept closed" if args.variant == "local" else "memory"
    gates_before = gates(lm)
    if is_infini(lm):
        memory = {id(v) for v in lm.backbone.memory_variables()}
        for variable in lm.backbone.weights:
            if args.variant == "local":  # the gate stays at 0: the memory is disconnected
                variable.trainable = train == "all" and id(variable) not in memory
            else:
                variable.trainable = train == "all" or id(variable) in memory
    trainable = sum(int(np.prod(v.shape)) for v in lm.trainable_weights)
    stages = curriculum(args)
    info = dict(variant=args.variant, train=train, seed=args.seed, note=note,
                length=[stage[0] for stage in stages], batch=[stage[1] for stage in stages],
                answer_weight=[stage[2] for stage in stages],
                trainable_params=trainable, gates_before=gates_before,
                backend=keras.backend.backend(),
                args={k: v for k, v in vars(args).items() if k.startswith(("ft_", "pass",
                                                                           "answer", "aux",
                                                                           "interp"))})
    if args.variant == "local" and train == "new":
        info.update(steps=0, seconds=0.0, skipped="nothing trainable reaches the outputs")
        print(f"finetune {name}: the closed gate disconnects every new parameter; "
              "no fine-tune (the converted model as it is)")
    else:
        for length, batch, _ in stages:
            if not full_attention_fits(lm, length, batch * 3, args.full_attention_mb):
                raise SystemExit(f"finetune {name}: {length} tokens of full attention do "
                                 f"not fit --full-attention-mb={args.full_attention_mb}")
        stream, _ = load_streams(args)
        data = FinetuneData(stream, stages[0][0], stages[0][1], args.ft_steps, args.seed,
                            args.context, args.passkey_fraction, args.answer_weight,
                            args.aux_weight, curriculum=stages)
        length = " -> ".join(f"{b} x {n}" for n, b, _ in stages)
        lr = args.ft_lr if train == "new" else args.ft_lr_all
        if is_infini(lm):
            optimizer = lm.memory_optimizer(schedule(lr, args.ft_steps), weight_decay=0.0,
                                            clipnorm=1.0)
        else:
            optimizer = keras.optimizers.AdamW(schedule(lr, args.ft_steps), weight_decay=0.0,
                                               clipnorm=1.0)
        stats = fit(lm, stage_slices(data), optimizer, args.ft_minutes, args.verbose,
                    args.ft_stop_step)
        info.update(stats, lr=lr)
        print(f"finetune {name}: {stats['steps']} steps of {length} tokens "
              f"in {stats['seconds']} s, last loss {stats['last_loss']:.3f}")
    info["gates_after"] = gates(lm)
    if info["gates_after"] is not None:
        print(f"finetune {name}: open heads (|tanh(s g)| >= {OPEN_GATE}) "
              "%d of %d" % open_share(info["gates_after"]))
    save_preset(lm, path)
    write_json(path + "_finetune.json", info)


def evaluate_model(lm, args, val):
    """Passkey accuracy per length and depth bin, long-text and short-context bpb."""
    result = dict(passkey={}, long_bpb={}, short_bpb=None, skipped=[])
    bins = args.depth_bins
    for mult in args.eval_mults:
        length = args.context * mult
        if not full_attention_fits(lm, length, 1, args.full_attention_mb):
            result["skipped"].append(mult)
            print(f"  {mult}x ({length} tokens): does not fit (full attention over "
                  f"--full-attention-mb={args.full_attention_mb})")
            continue
        batch = max(1, args.eval_tokens // length)
        cells = {}
        for depth_bin in range(bins):
            rng = np.random.default_rng([args.eval_seed, mult, depth_bin])
            digit_hits, key_hits = [], []
            for start in range(0, args.eval_samples, batch):
                rows = [passkey_row(val, length, rng, args.context, depth_bin, bins)
                        for _ in range(min(batch, args.eval_samples - start))]
                x = np.stack([r[0] for r in rows])
                y = np.stack([r[1] for r in rows])[:, -KEY_DIGITS:]  # the answer
                logits = predict_logits(lm, x)[:, -KEY_DIGITS:]
                hits = logits.argmax(-1) == y
                digit_hits.append(hits.mean(1)), key_hits.append(hits.all(1))
            cells[depth_bin] = [float(np.concatenate(digit_hits).mean()),
                                float(np.concatenate(key_hits).mean())]
        result["passkey"][mult] = cells
        rng = np.random.default_rng([args.eval_seed, mult, 999])
        nats, count = 0.0, 0
        for start in range(0, args.long_windows, batch):
            rows = [text_row(val, length, rng)
                    for _ in range(min(batch, args.long_windows - start))]
            x, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
            nats -= log_softmax_at(predict_logits(lm, x), y).sum()
            count += y.size
        result["long_bpb"][mult] = float(nats / count / math.log(2))
        key = np.mean([c[1] for c in cells.values()])
        print(f"  {mult}x ({length} tokens): passkey key accuracy {key * 100:.1f}% "
              f"(bins {' '.join(f'{c[1] * 100:.0f}' for c in cells.values())}), "
              f"long-text bpb {result['long_bpb'][mult]:.4f}")
    rng = np.random.default_rng([args.eval_seed, 12345])
    nats, count = 0.0, 0
    batch = max(1, args.eval_tokens // args.context)
    for start in range(0, args.short_windows, batch):
        rows = [text_row(val, args.context, rng)
                for _ in range(min(batch, args.short_windows - start))]
        x, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
        nats -= log_softmax_at(predict_logits(lm, x), y).sum()
        count += y.size
    result["short_bpb"] = float(nats / count / math.log(2))
    print(f"  short-context bpb ({args.context} tokens) {result['short_bpb']:.4f}")
    return result


def stage_evaluate(args, out):
    _, val = load_streams(args)
    names = ["source", run_name(args)] + list(args.also_evaluate)
    for name in dict.fromkeys(names):
        path = os.path.join(out, name)
        target = os.path.join(out, f"{name}_eval.json")
        if os.path.exists(target):
            print(f"evaluate {name}: {target} exists, skipped")
            continue
        if not done(path):
            print(f"evaluate {name}: no model at {path}, skipped")
            continue
        print(f"evaluate {name}:")
        lm = load_preset(path)
        start = time.perf_counter()
        result = evaluate_model(lm, args, val)
        result.update(name=name, seconds=round(time.perf_counter() - start, 1),
                      context=args.context, samples=args.eval_samples,
                      depth_bins=args.depth_bins, backend=keras.backend.backend(),
                      gates=gates(lm))
        write_json(target, result)


# ----------------------------------------------------------------------------- report
def _read(path):
    with open(path) as f:
        return json.load(f)


def collect(out):
    """`{name: {"eval": ..., "finetune": ...}}` of every evaluated model under `out`."""
    found = {}
    for file in sorted(os.listdir(out)):
        if file.endswith("_eval.json"):
            name = file[:-len("_eval.json")]
            entry = dict(eval=_read(os.path.join(out, file)))
            ft = os.path.join(out, f"{name}_finetune.json")
            if os.path.exists(ft):
                entry["finetune"] = _read(ft)
            found[name] = entry
    return found


def _pct(value):
    return "-" if value is None else f"{value * 100:.1f}"


def report_tables(found, mults, bins):
    lines = ["Passkey whole-key accuracy (%, teacher-forced = greedy exact match), mean "
             "over depth bins, and per bin (bin 0: key in the first segment; last bin: key "
             "in the last segment):", "",
             "| model | " + " | ".join(f"{m}x" for m in mults) + " |",
             "| --- |" + " --- |" * len(mults)]
    per_bin = []
    for name, entry in found.items():
        ev, cells = entry["eval"], []
        for m in mults:
            got = ev["passkey"].get(str(m))
            if got is None:
                cells.append("does not fit" if m in ev["skipped"] else "-")
                continue
            keys = [got[str(b)][1] for b in range(len(got))]
            cells.append(f"{np.mean(keys) * 100:.1f}")
            per_bin.append(f"| {name} | {m}x | " + " | ".join(_pct(k) for k in keys) +
                           f" | {np.mean([got[str(b)][0] for b in range(len(got))]) * 100:.1f} |")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per depth bin (key accuracy %), and mean digit accuracy:", "",
              "| model | length | " + " | ".join(f"bin {b}" for b in range(bins)) +
              " | digits |", "| --- | --- |" + " --- |" * (bins + 1)] + per_bin
    lines += ["", "Bits per byte on held-out text (long windows at each length; short: "
              "windows of the source context):", "",
              "| model | short | " + " | ".join(f"{m}x" for m in mults) + " |",
              "| --- | --- |" + " --- |" * len(mults)]
    for name, entry in found.items():
        ev = entry["eval"]
        cells = [f"{ev['long_bpb'][str(m)]:.4f}" if str(m) in ev["long_bpb"]
                 else ("does not fit" if m in ev["skipped"] else "-") for m in mults]
        lines.append(f"| {name} | {ev['short_bpb']:.4f} | " + " | ".join(cells) + " |")
    lines += ["", f"Gates (`|tanh(s g)|`, open: >= {OPEN_GATE}) and fine-tuning:", "",
              "| model | trained | steps | fine-tune s | open before | open after | "
              "gates after (per block: heads) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in found.items():
        ft = entry.get("finetune")
        if ft is None:
            continue
        after = ft.get("gates_after")
        before = ft.get("gates_before")
        share = (lambda g: "-" if g is None else "%d / %d" % open_share(g))
        values = "-" if after is None else "; ".join(
            " ".join(f"{v:.2f}" for v in block) for block in after)
        lines.append(f"| {name} | {ft['train']} ({ft['trainable_params']} params) | "
                     f"{ft.get('steps', 0)} | {ft.get('seconds', 0)} | {share(before)} | "
                     f"{share(after)} | {values} |")
    return "\n".join(lines)


def save_plot(found, mults, bins, path):
    try:
        import matplotlib
    except ImportError:
        print("report: matplotlib is not installed, no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mults), figsize=(3.2 * len(mults), 3.0), squeeze=False)
    for ax, m in zip(axes[0], mults):
        for name, entry in found.items():
            got = entry["eval"]["passkey"].get(str(m))
            if got is not None:
                ax.plot(range(bins), [got[str(b)][1] * 100 for b in range(bins)], "o-",
                        label=name)
        ax.set_title(f"{m}x the context")
        ax.set_xlabel("depth bin (0: first segment)")
        ax.set_ylim(-5, 105)
    axes[0][0].set_ylabel("passkey key accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def stage_report(args, out):
    found = collect(out)
    if not found:
        print("report: nothing evaluated yet")
        return
    bins = max(e["eval"]["depth_bins"] for e in found.values())
    table = report_tables(found, args.eval_mults, bins)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# Context extension results ({out})\n\n{table}\n")
    write_json(os.path.join(out, "results.json"), found)
    plotted = save_plot(found, args.eval_mults, bins, os.path.join(out, "passkey.png"))
    print(table)
    print(f"report: {os.path.join(out, 'report.md')}"
          + (f", {os.path.join(out, 'passkey.png')}" if plotted else ""))


# ----------------------------------------------------------------------------- main
def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (stages resume from it)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, a few steps: the whole pipeline in seconds")
    p.add_argument("--preset", default=None, help="local keras-hub preset as the source")
    p.add_argument("--packages", nargs="*", default=None,
                   help="stdlib packages of the corpus (default: all)")
    p.add_argument("--context", type=int, default=256, help="source context = segment_len")
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--intermediate-dim", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--rope-max-wavelength", type=float, default=10000.0)
    p.add_argument("--pretrain-steps", type=int, default=4000)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--pretrain-minutes", type=float, default=10.0,
                   help="wall-time cap of pretraining (stops early)")
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--pretrain-from", default=None,
                   help="continue pretraining this local keras-hub preset (e.g. an earlier "
                        "run's <out>/source) instead of starting from random weights")
    p.add_argument("--pretrain-passkey-fraction", type=float, default=0.0,
                   help="share of pretraining windows (of --context tokens) holding a "
                        "passkey (weighted as in fine-tuning): the source learns to "
                        "retrieve inside its own context")
    p.add_argument("--gate-init", type=float, default=0.0,
                   help="convert with every gate at tanh(GATE_INIT) instead of exactly 0 "
                        "(the memory's keys then get gradients from the first step; the "
                        "converted model no longer equals the source; not with "
                        "--variant local)")
    p.add_argument("--variant", choices=VARIANTS, default="memory")
    p.add_argument("--train", choices=("new", "all"), default="new",
                   help="fine-tune only the new memory parameters, or every weight")
    p.add_argument("--ft-mult", type=int, nargs="+", default=[16],
                   help="fine-tuning window in multiples of the context; several (e.g. "
                        "2 4 8) make a curriculum: equal shares of --ft-steps in order, "
                        "the batch scaled to keep the first stage's tokens per step")
    p.add_argument("--scale-answer-weight", action="store_true",
                   help="in a curriculum, multiply --answer-weight by each stage's window "
                        "length over the first stage's (the answer keeps its share of a "
                        "window's loss)")
    p.add_argument("--ft-steps", type=int, default=400)
    p.add_argument("--ft-stop-step", type=int, default=None,
                   help="stop after this many steps of the --ft-steps schedule (a look at "
                        "a model part way, e.g. at a curriculum's stage boundary)")
    p.add_argument("--ft-batch", type=int, default=2)
    p.add_argument("--ft-minutes", type=float, default=10.0,
                   help="wall-time cap of one fine-tune (stops early)")
    p.add_argument("--ft-lr", type=float, default=3e-3, help="peak lr, --train new")
    p.add_argument("--ft-lr-all", type=float, default=3e-4, help="peak lr, --train all")
    p.add_argument("--passkey-fraction", type=float, default=0.5,
                   help="share of fine-tuning windows holding a passkey")
    p.add_argument("--answer-weight", type=float, default=200.0,
                   help="loss weight of each answer digit (text bytes: 1)")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="loss weight of each digit of the key's repetition inside the "
                        "statement (a local copy; text bytes: 1)")
    p.add_argument("--interp-factor", type=float, default=16.0,
                   help="RoPE position interpolation factor of --variant interp")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    p.add_argument("--eval-mults", type=_ints, default=[1, 4, 16, 64])
    p.add_argument("--eval-samples", type=int, default=16, help="passkey samples per cell")
    p.add_argument("--depth-bins", type=int, default=5)
    p.add_argument("--long-windows", type=int, default=4,
                   help="held-out text windows per length for long-text bpb")
    p.add_argument("--short-windows", type=int, default=64,
                   help="held-out windows of --context for short-context bpb")
    p.add_argument("--eval-tokens", type=int, default=16384, help="tokens per eval batch")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--also-evaluate", nargs="*", default=[],
                   help="more run names under --out to evaluate (e.g. local-new-s0)")
    p.add_argument("--full-attention-mb", type=float, default=2048.0,
                   help="largest attention-score tensor of one layer (MiB) a full-attention "
                        "model may need; longer inputs 'do not fit'")
    p.add_argument("--verbose", type=int, default=2)
    args = p.parse_args(argv)
    if args.smoke:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in SMOKE.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    if args.ft_stop_step is not None and not 1 <= args.ft_stop_step <= args.ft_steps:
        p.error(f"--ft-stop-step must lie in [1, --ft-steps={args.ft_steps}], got "
                f"{args.ft_stop_step}")
    if min(args.ft_mult) < 1:
        p.error(f"--ft-mult must be positive multiples of the context, got {args.ft_mult}")
    if args.context * min(args.eval_mults + args.ft_mult) < passkey_overhead() + 8:
        p.error(f"--context too short for the passkey ({passkey_overhead()} tokens)")
    if args.gate_init and args.variant == "local":
        p.error(f"--gate-init {args.gate_init} with --variant local: local-only keeps "
                "every gate at exactly 0")
    if not 0.0 <= args.pretrain_passkey_fraction <= 1.0:
        p.error(f"--pretrain-passkey-fraction must lie in [0, 1], got "
                f"{args.pretrain_passkey_fraction}")
    if args.pretrain_passkey_fraction > 0 and args.context < passkey_overhead() + 8:
        p.error(f"--context {args.context} too short for a passkey in pretraining "
                f"({passkey_overhead()} tokens + 8)")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = args.out
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    for stage in STAGES:
        if stage in args.stages:
            t0 = time.perf_counter()
            globals()[f"stage_{stage}"](args, out)
            print(f"[{stage}: {time.perf_counter() - t0:.1f} s]")
    print(f"total {time.perf_counter() - start:.1f} s (backend {keras.backend.backend()})")
    return out


if __name__ == "__main__":
    main()
