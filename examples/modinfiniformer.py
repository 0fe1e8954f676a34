"""Byte-level language model with Mixture-of-Depths Infini-Transformer blocks.

A causal next-byte model trained with `model.fit` on Python's own standard library (read
at run time from the running interpreter; no download), or on any text files with
`--data`:

    InfiniCausalLM (keras-hub CausalLM) on an InfiniBackbone:
    Embedding(259, dim)
    -> InfiniTransformer, MoDInfiniTransformer, InfiniTransformer, ... (alternating)
    -> LayerNormalization -> Dense(259) (the untied reverse embedding)

Bytes are tokens 0..255, plus PAD/BOS/EOS (see `examples/byte_datasets.py`). Every block
attends exactly inside segments of `--segment-len` bytes and reads earlier segments of the
`--seq-len` window only through its compressive memory; each MoD block runs only
`ceil(segment_len / sampling_factor)` tokens per segment through attention and MLP.
Positions are RoPE (`--yarn` for YaRN).

The model is trained with AdamW and a warmup + cosine learning-rate schedule, validated
on held-out files every epoch, saved as `.keras`, reloaded, and evaluated: the printed
bits-per-byte is the validation cross-entropy (nats, from `model.evaluate`, which runs MoD's
causal inference routing and adds no router loss) divided by ln 2. Finally it samples text
after `--prompt` with keras-hub's `generate` (top-k sampler), which decodes with the blocks'
fixed-shape cache: finished segments live only in the memory state, each new byte costs one
token of work per block. Needs keras-hub (`pip install 'keras_infini[hub]'`).

`--no-memory` pins every block's memory gate to sigmoid(-30) ~ 0 (not trainable): local
attention inside segments only, the baseline for what the memory adds.

Usage (same script on every backend):

    KERAS_BACKEND=jax python examples/modinfiniformer.py
    KERAS_BACKEND=jax python examples/modinfiniformer.py --steps 1000 --no-memory
    KERAS_BACKEND=torch python examples/modinfiniformer.py --data ~/notes --generate 400
"""

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# PyTorch's OpenMP threads spin while waiting; on a CPU shared with other processes that
# made a training step ~9x slower (6 s instead of 0.7 s on 2 cores). Read at import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import byte_datasets as datasets  # noqa: E402  (examples/byte_datasets.py)

import keras_hub  # noqa: E402

from keras_infini import InfiniTransformer  # noqa: E402
from keras_infini.ops.memory import FEATURE_MAPS  # noqa: E402
from keras_infini import MoDInfiniTransformer  # noqa: E402
from keras_infini.models import InfiniBackbone  # noqa: E402
from keras_infini.models import InfiniByteTokenizer  # noqa: E402
from keras_infini.models import InfiniCausalLM  # noqa: E402
from keras_infini.models import InfiniCausalLMPreprocessor  # noqa: E402

NO_MEMORY_GATE = -30.0
# Validation bits per byte that a healthy run with the default settings (Python 3.11's
# standard library as data) ends in: measured 2.881 on TensorFlow, 3.028 on PyTorch and
# 2.993-3.108 on JAX (docs/examples/modinfiniformer.md). Outside it, something is wrong
# (versions, install, data).
EXPECTED_BITS_PER_BYTE = (2.8, 3.3)
# Arguments that do not change what the model learns or how it is evaluated.
_OUTPUT_ONLY_ARGS = {"out", "verbose", "generate", "prompt", "temperature", "top_k"}


# ----------------------------------------------------------------------------- data
def load_corpus(args):
    """`(train_docs, validation_docs)`: the stdlib (default) or `--data`, split by file."""
    if args.data is None:
        return datasets.stdlib_corpus(
            validation_fraction=args.val_fraction, max_files=args.max_files
        )
    docs = datasets.read_text_files(args.data)
    if args.max_files is not None:
        docs = docs[:args.max_files]
    if not docs:
        raise SystemExit(f"No readable UTF-8 text files in {args.data!r}.")
    root = args.data if os.path.isdir(args.data) else None
    return datasets.split_by_file(docs, args.val_fraction, root=root)


# ----------------------------------------------------------------------------- model
class CausalLMData(keras.utils.PyDataset):
    """A `ByteLMDataset` as `InfiniCausalLM` inputs: `({"token_ids", "padding_mask"}, y)`."""

    def __init__(self, windows):
        super().__init__()
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, index):
        x, y = self.windows[index]
        return {"token_ids": x, "padding_mask": np.ones_like(x)}, y

    def on_epoch_end(self):
        self.windows.on_epoch_end()


def build_model(args):
    """InfiniCausalLM: Embedding -> alternating InfiniTransformer / MoDInfiniTransformer
    (every second block MoD) -> LayerNormalization -> Dense(vocab); byte preprocessor."""
    backbone = InfiniBackbone(
        vocabulary_size=datasets.VOCAB_SIZE,
        num_layers=args.layers,
        hidden_dim=args.dim,
        intermediate_dim=2 * args.dim,
        num_heads=args.heads,
        segment_len=args.segment_len,
        activation=args.activation,
        update=args.update,
        # Positions are segment-local (0..segment_len-1); YaRN interpolates the low RoPE
        # frequencies as for a context `--yarn-scale` times longer and rescales attention.
        positional_embedder="yarn" if args.yarn else "rope",
        yarn_scale=args.yarn_scale,
        mod_every=2,
        sampling_factor=args.sampling_factor,
        router_loss_weight=args.router_loss_weight,
        name="modinfiniformer_backbone",
        memory_feature_map=args.memory_feature_map,
        write_strength=args.write_strength,
        gate_lr_scale=args.gate_lr_scale,
        memory_decay=args.memory_decay,
    )
    preprocessor = InfiniCausalLMPreprocessor(
        InfiniByteTokenizer(), sequence_length=args.seq_len
    )
    return InfiniCausalLM(backbone, preprocessor, name="modinfiniformer")


def keras_fit(model, *args, **kwargs):
    """`keras.Model.fit` on the InfiniCausalLM. keras-hub 0.32's `Task.fit` turns its
    input into a `tf.data` / grain dataset and does not take a `keras.utils.PyDataset`;
    the data here is already tokenized (no preprocessor attached), so Keras' own `fit`
    trains the same model on the same batches."""
    return keras.Model.fit(model, *args, **kwargs)


def keras_evaluate(model, *args, **kwargs):
    """`keras.Model.evaluate` (see `keras_fit`)."""
    return keras.Model.evaluate(model, *args, **kwargs)


def blocks_of(model):
    if hasattr(model, "backbone"):
        return list(model.backbone.transformer_layers)
    blocks = (InfiniTransformer, MoDInfiniTransformer)
    return [layer for layer in model.layers if isinstance(layer, blocks)]


def disable_memory(model):
    """Local attention only: every block's per-head gate fixed at -30 (sigmoid ~ 1e-13)."""
    for block in blocks_of(model):
        gate = block.attention.gate
        gate.assign(np.full(gate.shape, NO_MEMORY_GATE, dtype="float32"))
        gate.trainable = False


def init_gates(model, values):
    """Sets every block's per-head memory gate to `values` (one number, or one per head)."""
    for block in blocks_of(model):
        gate = block.attention.gate
        heads = gate.shape[0]
        if len(values) not in (1, heads):
            raise ValueError(
                f"Invalid --gate-init={','.join(f'{v:g}' for v in values)}: expected one "
                f"number or {heads} (one per head)."
            )
        # The variable holds gate / gate_lr_scale (used as sigmoid(scale * raw)).
        scale = float(getattr(block.attention, "gate_lr_scale", 1.0))
        gate.assign(np.broadcast_to(np.asarray(values, "float32") / scale, gate.shape))


def gate_summary(model):
    """sigmoid(gate) per block, mean over heads and per head in brackets: the share of
    memory retrieval in the attention."""
    parts = []
    for block in blocks_of(model):
        share = np.asarray(keras.ops.convert_to_numpy(block.attention.gate_values()),
                           "float64")
        parts.append(f"{share.mean():.3f} [{' '.join(f'{v:.2f}' for v in share)}]")
    return " | ".join(parts)


def compile_model(model, args, schedule=None):
    jit = keras.backend.backend() in ("jax", "tensorflow")
    if schedule is None:
        optimizer = "adamw"  # evaluation only
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay,
                                           clipnorm=1.0)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        weighted_metrics=[],
        jit_compile=jit,
        sampler=keras_hub.samplers.TopKSampler(
            k=args.top_k, temperature=args.temperature, seed=args.seed
        ),
    )


# ----------------------------------------------------------------------------- main
def gate_values(text):
    """`--gate-init` values: floats separated by commas."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid gate values {text!r}: expected numbers separated by commas"
        ) from None
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=None,
                   help="text file or folder to train on instead of the Python stdlib")
    p.add_argument("--max-files", type=int, default=None,
                   help="use at most this many files (a deterministic subset)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of files held out for validation")
    p.add_argument("--steps", type=int, default=200, help="training steps in all")
    p.add_argument("--epochs", type=int, default=2, help="epochs (validation after each)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024, help="bytes per training window")
    p.add_argument("--segment-len", type=int, default=128, help="bytes per memory segment")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--activation", default="gelu", help="MLP activation (see ACTIVATIONS)")
    p.add_argument("--sampling-factor", type=float, default=2.0,
                   help="MoD blocks keep ceil(segment_len / sampling_factor) tokens")
    p.add_argument("--router-loss-weight", type=float, default=0.1)
    p.add_argument("--update", choices=("linear", "delta"), default="linear")
    p.add_argument("--yarn", action="store_true", help="YaRN instead of RoPE")
    p.add_argument("--yarn-scale", type=float, default=4.0,
                   help="with --yarn: context_len_ext / context_len")
    p.add_argument("--gate-init", type=gate_values, default=None,
                   help="initial memory gate (sigmoid(g) = share of memory retrieval): one "
                        "number for every head, or one per head separated by commas (e.g. "
                        "'-4,-4,-4,2': three local heads, one memory head); default: the "
                        "layer's 0, an even mix")
    p.add_argument("--memory-feature-map", choices=FEATURE_MAPS, default="elu1",
                   help="feature map of the memory's queries and keys (README 'Memory options')")
    p.add_argument("--write-strength", nargs="?", const=True, default=False,
                   choices=("sigmoid", "hard_sigmoid"),
                   help="learned per-token, per-head memory write strength beta "
                        "(alone: sigmoid)")
    p.add_argument("--gate-lr-scale", type=float, default=1.0,
                   help="memory gate learning-rate scale (sigmoid(scale * raw))")
    p.add_argument("--memory-decay", nargs="?", const=True, default=False,
                   choices=("coupled",),
                   help="learned per-token memory decay (Gated DeltaNet; needs --update "
                        "delta and a unit-key map: l2, elu1_l2, dpfp*); 'coupled': decay "
                        "only as much as the token writes (needs --write-strength)")
    p.add_argument("--no-memory", action="store_true",
                   help="pin every memory gate to -30: local attention only")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the steps")
    p.add_argument("--val-batches", type=int, default=4,
                   help="validation batches after each epoch")
    p.add_argument("--eval-batches", type=int, default=16,
                   help="validation batches for the final bits-per-byte")
    p.add_argument("--prompt", default="def ", help="generation prompt (after BOS)")
    p.add_argument("--generate", type=int, default=128, help="bytes to generate (0: none)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder; None: a new temp dir")
    p.add_argument("--verbose", type=int, default=1,
                   help="model.fit verbosity (1: progress bar)")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error("--dim must be a multiple of --heads")
    if not 1 < args.sampling_factor < args.segment_len:
        p.error("--sampling-factor must lie in (1, segment_len)")
    if args.steps < 1 or args.epochs < 1:
        p.error("--steps and --epochs must be positive")
    if args.epochs > args.steps:
        args.epochs = args.steps
    if args.seq_len % args.segment_len:
        print(f"note: --seq-len {args.seq_len} is not a multiple of --segment-len "
              f"{args.segment_len}; the last segment of each window is partial")
    return args


def expected_note(args, bpb):
    """The expected range next to the result, or why there is none (settings changed)."""
    defaults = vars(parse_args([]))
    changed = sorted(k for k, v in vars(args).items()
                     if k not in _OUTPUT_ONLY_ARGS and defaults.get(k) != v)
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        return f"(no expected range: settings differ from the defaults: {flags})"
    low, high = EXPECTED_BITS_PER_BYTE
    verdict = "as expected" if low <= bpb <= high else \
        "OUTSIDE the expected range: check the installed versions"
    return f"(expected {low}-{high} for the default settings: {verdict})"


def main(argv=None):
    args = parse_args(argv)
    backend = keras.backend.backend()
    out = args.out or tempfile.mkdtemp(prefix="modinfiniformer_")
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    start_all = time.perf_counter()

    train_docs, val_docs = load_corpus(args)
    steps_per_epoch = args.steps // args.epochs
    train = CausalLMData(datasets.ByteLMDataset(train_docs, args.seq_len, args.batch_size,
                                                steps_per_epoch, seed=args.seed))
    val = CausalLMData(datasets.ByteLMDataset(val_docs, args.seq_len, args.batch_size,
                                              args.val_batches, shuffle=False))
    final_val = CausalLMData(datasets.ByteLMDataset(val_docs, args.seq_len,
                                                    args.batch_size, args.eval_batches,
                                                    shuffle=False))
    print(f"backend={backend} data={args.data or 'python stdlib ' + datasets.stdlib_dir()}")
    print(f"files: {len(train_docs)} train ({train.windows.num_tokens:,} tokens), "
          f"{len(val_docs)} validation ({val.windows.num_tokens:,} tokens); "
          f"windows of {args.seq_len} = {math.ceil(args.seq_len / args.segment_len)} "
          f"segments of {args.segment_len}")

    model = build_model(args)
    # fit / evaluate read token windows (CausalLMData), not strings: no preprocessor then
    # (keras-hub would map the data through it); generate uses it.
    preprocessor, model.preprocessor = model.preprocessor, None
    if args.gate_init is not None:
        init_gates(model, args.gate_init)
    if args.no_memory:
        disable_memory(model)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup * total))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, total - warmup), alpha=0.1, warmup_target=args.lr, warmup_steps=warmup
    )
    compile_model(model, args, schedule)
    print(f"model: {args.layers} blocks (odd ones MoD, sampling factor "
          f"{args.sampling_factor:g}), dim {args.dim}, {args.heads} heads, "
          f"{'YaRN' if args.yarn else 'RoPE'}, update={args.update}, "
          f"feature map {args.memory_feature_map}, write_strength={args.write_strength}, "
          f"gate_lr_scale={args.gate_lr_scale:g}, memory_decay={args.memory_decay}, "
          f"memory {'OFF (gates pinned at -30)' if args.no_memory else 'on'}; "
          f"{model.count_params():,} parameters")

    start = time.perf_counter()
    history = keras_fit(model, train, epochs=args.epochs, validation_data=val,
                        verbose=args.verbose)
    train_s = time.perf_counter() - start
    print(f"trained {total} steps ({total * args.batch_size * args.seq_len:,} tokens) "
          f"in {train_s:.1f} s; memory gate sigmoid per block: {gate_summary(model)}")

    path = os.path.join(out, "modinfiniformer.keras")
    model.save(path)
    # compile=False + compile: the saved compile config names the training backend's
    # optimizer class, and evaluation only needs the loss.
    reloaded = keras.models.load_model(path, compile=False)
    reloaded.preprocessor = None
    compile_model(reloaded, args)
    probe = {name: t[:1] for name, t in val[0][0].items()}
    diff = float(np.max(np.abs(
        keras.ops.convert_to_numpy(model(probe)) - keras.ops.convert_to_numpy(reloaded(probe))
    )))
    print(f"saved {path} ({os.path.getsize(path) / 1e6:.1f} MB); reloaded, max |logit "
          f"difference| {diff:.2e}")

    start = time.perf_counter()
    results = keras_evaluate(reloaded, final_val, verbose=0, return_dict=True)
    eval_s = time.perf_counter() - start
    val_loss = float(results["loss"])
    bpb = val_loss / math.log(2)
    print(f"validation ({args.eval_batches * args.batch_size} windows, "
          f"{args.eval_batches * args.batch_size * args.seq_len:,} tokens, {eval_s:.1f} s): "
          f"loss {val_loss:.4f} nats/byte, accuracy {float(results['accuracy']):.3f}, "
          f"bits-per-byte {bpb:.3f} {expected_note(args, bpb)}")

    text = None
    if args.generate > 0:
        prompt_len = len(args.prompt.encode("utf-8")) + 1  # with the start token
        start = time.perf_counter()
        # keras-hub's generate: the byte preprocessor, the compiled sampler loop, the
        # blocks' decode cache; stops at the end token.
        reloaded.preprocessor = preprocessor
        text = reloaded.generate(args.prompt, max_length=prompt_len + args.generate)
        gen_s = time.perf_counter() - start
        print(f"--- generated up to {args.generate} bytes in {gen_s:.1f} s "
              f"(temperature {args.temperature:g}, top-k {args.top_k}) ---")
        print(text)
        print("---")
    total_s = time.perf_counter() - start_all
    print(f"RESULT backend={backend} bits_per_byte={bpb:.4f} val_loss={val_loss:.4f} "
          f"train_s={train_s:.1f} total_s={total_s:.1f}")
    return {
        "backend": backend,
        "bits_per_byte": bpb,
        "val_loss": val_loss,
        "history": history.history,
        "train_seconds": train_s,
        "total_seconds": total_s,
        "model_path": path,
        "text": text,
    }


if __name__ == "__main__":
    main()
