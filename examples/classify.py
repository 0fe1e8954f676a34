"""Long-document classification: which stdlib package is a source file from?

A non-causal `InfiniTransformer` encoder reads the first `--max-bytes` bytes of a Python
source file (default 2048 = 16 segments of 128) and a masked mean over all positions
feeds a softmax over packages (asyncio, email, importlib, multiprocessing, xml, ...: every
package of `--packages` with at least `--min-files` files in the running interpreter's
standard library):

    Embedding(259, dim) -> InfiniTransformer x layers (non-causal, RoPE)
    -> LayerNormalization -> GlobalAveragePooling1D (masked) -> Dense(classes)

Short files are padded with PAD (id 256) and masked: padded bytes are neither attended
to, nor written to memory, nor averaged. The split into training and validation files is
by file, stratified by package and deterministic (hash of the relative path). Training
batches mix each file's first `--max-bytes` bytes with random windows of the same size
from the training files (`--head-prob`); validation uses the first bytes only.

Printed: validation accuracy against the majority-class baseline, and against the same
trained model given only the first segment (the rest masked). `--truncate-to-segment`
trains and evaluates a model on the first segment only, for the fair one-segment
comparison.

Usage:

    KERAS_BACKEND=jax python examples/classify.py
    KERAS_BACKEND=jax python examples/classify.py --truncate-to-segment
"""

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/modinfiniformer.py

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import byte_datasets as datasets  # noqa: E402  (examples/byte_datasets.py)

from keras_infini import InfiniTransformer  # noqa: E402

DEFAULT_PACKAGES = (
    "asyncio", "concurrent", "ctypes", "distutils", "email", "http", "importlib", "json",
    "logging", "multiprocessing", "unittest", "urllib", "xml", "xmlrpc", "wsgiref",
)


# ----------------------------------------------------------------------------- data
def package_of(rel_path):
    return rel_path.split("/")[0]


def load_files(args):
    """`(classes, train [(path, bytes, label)], validation [...])`, split by file."""
    docs = datasets.stdlib_files(packages=args.packages)
    by_class = {}
    for path, data in docs:
        by_class.setdefault(package_of(path), []).append((path, data))
    classes = sorted(c for c, files in by_class.items() if len(files) >= args.min_files)
    if len(classes) < 2:
        raise SystemExit(
            f"Fewer than 2 packages of {args.packages} have >= {args.min_files} files."
        )
    train, val = [], []
    for label, name in enumerate(classes):
        files = by_class[name]
        if args.max_files_per_class:
            files = sorted(files, key=lambda d: datasets.file_fraction(d[0], "subset:"))
            files = files[:args.max_files_per_class]
        # Stratified, deterministic split by file: the files with the smallest hashes.
        ranked = sorted(files, key=lambda d: datasets.file_fraction(d[0], "classify:"))
        n_val = min(len(ranked) - 1, max(1, round(args.val_fraction * len(ranked))))
        val += [(p, d, label) for p, d in ranked[:n_val]]
        train += [(p, d, label) for p, d in ranked[n_val:]]
    return classes, train, val


def encode_window(data, start, length):
    """`[BOS] + data[start : start + length - 1]`, padded with PAD to `length` (int32)."""
    body = np.frombuffer(data[start:start + length - 1], dtype=np.uint8)
    tokens = np.full((length,), datasets.PAD, dtype=np.int32)
    tokens[0] = datasets.BOS
    tokens[1:1 + body.size] = body
    return tokens


def head_arrays(files, length):
    """Inputs `(n, length)` (each file's first bytes) and labels `(n,)`."""
    x = np.stack([encode_window(data, 0, length) for _, data, _ in files])
    y = np.array([label for _, _, label in files], dtype=np.int32)
    return x, y


def truncate(x, length):
    """Keeps the first `length` tokens of every row; the rest becomes PAD (masked)."""
    x = x.copy()
    x[:, length:] = datasets.PAD
    return x


class WindowDataset(keras.utils.PyDataset):
    """Training batches: a random training file each, its head or a random window."""

    def __init__(self, files, length, batch_size, steps_per_epoch, head_prob, seed, **kw):
        super().__init__(**kw)
        self.files, self.length, self.batch_size = files, length, batch_size
        self.steps_per_epoch, self.head_prob, self.seed = steps_per_epoch, head_prob, seed
        self.epoch = 0

    def __len__(self):
        return self.steps_per_epoch

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        picks = rng.integers(0, len(self.files), size=self.batch_size)
        x = np.empty((self.batch_size, self.length), dtype=np.int32)
        y = np.empty((self.batch_size,), dtype=np.int32)
        for row, i in enumerate(picks):
            _, data, label = self.files[i]
            start = 0
            if rng.random() >= self.head_prob and len(data) > self.length:
                start = int(rng.integers(0, len(data) - self.length + 2))
            x[row] = encode_window(data, start, self.length)
            y[row] = label
        return x, y

    def on_epoch_end(self):
        self.epoch += 1


# ----------------------------------------------------------------------------- model
def build_model(args, num_classes):
    dim, heads = args.dim, args.heads
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    mask = keras.ops.not_equal(tokens, datasets.PAD)
    x = keras.layers.Embedding(datasets.VOCAB_SIZE, dim, name="embedding")(tokens)
    for i in range(args.layers):
        x = InfiniTransformer(
            dim, 2 * dim, dim // heads, dim // heads, heads, "gelu", args.segment_len,
            update=args.update, causal=False, positional_embedder="rope",
            dropout=args.dropout, name=f"block_{i}",
        )(x, mask=mask)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="masked_mean")(x, mask=mask)
    x = keras.layers.Dropout(args.dropout)(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(tokens, logits, name="infini_classifier")


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--packages", type=lambda s: [v for v in s.split(",") if v],
                   default=list(DEFAULT_PACKAGES), help="comma-separated candidate packages")
    p.add_argument("--min-files", type=int, default=8,
                   help="keep packages with at least this many files")
    p.add_argument("--max-files-per-class", type=int, default=None,
                   help="cap per package (a deterministic subset; for quick tests)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of each package's files held out")
    p.add_argument("--max-bytes", type=int, default=2048, help="bytes read from each file")
    p.add_argument("--segment-len", type=int, default=128)
    p.add_argument("--truncate-to-segment", action="store_true",
                   help="train and evaluate on the first segment only")
    p.add_argument("--head-prob", type=float, default=0.5,
                   help="probability that a training example is a file's first bytes "
                        "(else a random window of the same file)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--update", choices=("linear", "delta"), default="linear")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1)
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error("--dim must be a multiple of --heads")
    if args.steps < 1 or args.epochs < 1:
        p.error("--steps and --epochs must be positive")
    args.epochs = min(args.epochs, args.steps)
    return args


def accuracy(model, x, y, batch_size):
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y)), np.argmax(logits, -1)


def main(argv=None):
    args = parse_args(argv)
    backend = keras.backend.backend()
    keras.utils.set_random_seed(args.seed)
    start_all = time.perf_counter()
    classes, train_files, val_files = load_files(args)
    length = args.segment_len if args.truncate_to_segment else args.max_bytes
    counts_train = np.bincount([f[2] for f in train_files], minlength=len(classes))
    counts_val = np.bincount([f[2] for f in val_files], minlength=len(classes))
    print(f"backend={backend} classes ({len(classes)}), train/validation files:")
    print("  " + ", ".join(f"{c} {a}/{b}" for c, a, b in zip(classes, counts_train, counts_val)))
    print(f"input: first {length} bytes = {-(-length // args.segment_len)} segment(s) of "
          f"{args.segment_len}")

    x_val, y_val = head_arrays(val_files, length)
    steps_per_epoch = args.steps // args.epochs
    train = WindowDataset(train_files, length, args.batch_size, steps_per_epoch,
                          args.head_prob, args.seed)
    model = build_model(args, len(classes))
    total = steps_per_epoch * args.epochs
    warmup = max(1, total // 20)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, total - warmup), alpha=0.1, warmup_target=args.lr, warmup_steps=warmup
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=backend in ("jax", "tensorflow"),
    )
    start = time.perf_counter()
    model.fit(train, epochs=args.epochs, validation_data=(x_val, y_val),
              validation_batch_size=args.batch_size, verbose=args.verbose)
    train_s = time.perf_counter() - start

    majority = int(np.argmax(counts_train))
    majority_acc = float(np.mean(y_val == majority))
    val_acc, predicted = accuracy(model, x_val, y_val, args.batch_size)
    results = {"backend": backend, "classes": classes, "train_files": len(train_files),
               "val_files": len(val_files), "input_bytes": length,
               "val_accuracy": val_acc, "majority_accuracy": majority_acc,
               "train_seconds": train_s}
    print(f"trained {total} steps in {train_s:.1f} s")
    print(f"validation accuracy ({len(val_files)} files, first {length} bytes): "
          f"{val_acc:.3f}")
    print(f"majority-class baseline ({classes[majority]}): {majority_acc:.3f}")
    if length > args.segment_len:
        seg_acc, _ = accuracy(model, truncate(x_val, args.segment_len), y_val, args.batch_size)
        results["first_segment_accuracy"] = seg_acc
        print(f"same model, first segment only ({args.segment_len} bytes, rest masked): "
              f"{seg_acc:.3f}")
    per_class = "  ".join(
        f"{c} {np.mean(predicted[y_val == i] == i):.2f}" for i, c in enumerate(classes)
        if np.any(y_val == i)
    )
    print(f"per-class validation accuracy: {per_class}")
    total_s = time.perf_counter() - start_all
    print(f"RESULT backend={backend} input_bytes={length} val_accuracy={val_acc:.4f} "
          f"majority={majority_acc:.4f} "
          + (f"first_segment={results['first_segment_accuracy']:.4f} "
             if "first_segment_accuracy" in results else "")
          + f"total_s={total_s:.1f}")
    results["total_seconds"] = total_s
    return results


if __name__ == "__main__":
    main()
