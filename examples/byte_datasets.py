"""Byte-level text data for the examples: file readers, a stdlib corpus and a `PyDataset`.

(Moved here from `keras_infini.datasets`: only the examples and their tests use it. The
examples import it as `datasets`; the file name avoids shadowing the Hugging Face package.)

Everything here is NumPy plus `keras.utils.PyDataset`, so it works on every backend.

Byte vocabulary (`VOCAB_SIZE = 259`):

| id | meaning |
| --- | --- |
| 0..255 | the bytes of the (UTF-8) text |
| `PAD = 256` | padding (e.g. short documents in classification; mask it) |
| `BOS = 257` | start of a document |
| `EOS = 258` | end of a document (the separator between concatenated documents) |

A document is encoded as `[BOS] + bytes + [EOS]` (`encode_document`); `decode` drops the
special ids and decodes the bytes as UTF-8 with invalid sequences replaced.

Example:

>>> from byte_datasets import stdlib_corpus, ByteLMDataset  # with examples/ on sys.path
>>> train, val = stdlib_corpus(packages=["json"])           # split by file
>>> data = ByteLMDataset(train, seq_len=256, batch_size=4, steps_per_epoch=10)
>>> x, y = data[0]
>>> x.shape, x.dtype.name, bool((x[:, 1:] == y[:, :-1]).all())
((4, 256), 'int32', True)
"""

import hashlib
import os
import sysconfig
import warnings

import keras
import numpy as np

PAD = 256
BOS = 257
EOS = 258
VOCAB_SIZE = 259

BINARY_SNIFF_BYTES = 8192

# Folders of the standard library that are not library source (or not text worth modelling).
STDLIB_EXCLUDE = (
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "__phello__",
    "encodings",  # mostly generated charmap tables
)


# ----------------------------------------------------------------------------- reading
def _as_path_list(paths_or_dir):
    if isinstance(paths_or_dir, (str, bytes, os.PathLike)):
        return [os.fspath(paths_or_dir)]
    return [os.fspath(p) for p in paths_or_dir]


def _walk_files(root, suffixes, exclude_dirs):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and d not in exclude_dirs
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if suffixes is not None and not name.endswith(tuple(suffixes)):
                continue
            found.append(os.path.join(dirpath, name))
    return found


def read_text_files(paths_or_dir, min_bytes=1, suffixes=None, exclude_dirs=("__pycache__",)):
    """Reads UTF-8 text files; returns a sorted list of `(path, bytes)`.

    Args:
        paths_or_dir: a file or folder path, or a list of them. Folders are searched
            recursively (hidden files and folders and `exclude_dirs` are skipped); files
            named explicitly are always read.
        min_bytes: files shorter than this are skipped (the default skips empty files).
        suffixes: optional name endings (e.g. `(".py", ".txt")`) that files found in
            folders must have; `None` reads every file.
        exclude_dirs: folder names not descended into.

    Files that are empty or shorter than `min_bytes`, binary (a NUL byte in the first
    8 KiB), not valid UTF-8 or unreadable are skipped with a `warnings.warn` naming the
    file; nothing raises for a bad file. A path that does not exist raises
    `FileNotFoundError`.
    """
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"Invalid min_bytes={min_bytes!r}: expected an integer >= 0.")
    files = []
    for path in _as_path_list(paths_or_dir):
        if os.path.isdir(path):
            files.extend(_walk_files(path, suffixes, set(exclude_dirs)))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"No such file or folder: {path!r}")
    docs = []
    for path in sorted(set(files)):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            warnings.warn(f"Skipping {path}: cannot read it ({e}).", stacklevel=2)
            continue
        if len(data) == 0 or len(data) < min_bytes:
            what = "empty" if len(data) == 0 else f"{len(data)} bytes < min_bytes={min_bytes}"
            warnings.warn(f"Skipping {path}: {what}.", stacklevel=2)
            continue
        if b"\x00" in data[:BINARY_SNIFF_BYTES]:
            warnings.warn(f"Skipping {path}: binary (NUL byte in the first 8 KiB).",
                          stacklevel=2)
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            warnings.warn(f"Skipping {path}: not valid UTF-8 ({e.reason} at byte {e.start}).",
                          stacklevel=2)
            continue
        docs.append((path, data))
    return docs


# ----------------------------------------------------------------------------- splitting
def file_fraction(key, salt=""):
    """A deterministic number in `[0, 1)` from a string (SHA-1, stable across runs)."""
    digest = hashlib.sha1(f"{salt}{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _split_key(path, root):
    if root is not None:
        path = os.path.relpath(path, root)
    return path.replace(os.sep, "/")


def split_by_file(docs, validation_fraction=0.1, root=None, salt=""):
    """Deterministic train / validation split of `(path, bytes)` documents, by file.

    A file goes to validation when `file_fraction(relative path) < validation_fraction`,
    so the split of a file never depends on the other files, the machine or the order.
    `root` makes paths relative first (pass the folder the files were read from).

    With two or more files, both parts are non-empty (the file with the smallest hash
    moves to validation, or the largest back to training, if needed). A single file is
    split inside: its last `validation_fraction` of bytes (cut at a newline when
    possible) becomes the validation document, with a warning.

    Returns:
        `(train_docs, validation_docs)`, each a list of `(path, bytes)` in input order.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(
            f"Invalid validation_fraction={validation_fraction!r}: expected a number in (0, 1)."
        )
    docs = list(docs)
    if not docs:
        raise ValueError("No documents to split.")
    if len(docs) == 1:
        path, data = docs[0]
        cut = int(len(data) * (1 - validation_fraction))
        newline = data.rfind(b"\n", 0, cut)
        if newline > len(data) // 2:
            cut = newline + 1
        cut = min(max(cut, 1), len(data) - 1) if len(data) > 1 else len(data)
        warnings.warn(
            f"Only one document ({path}): using its last {len(data) - cut} bytes for validation.",
            stacklevel=2,
        )
        return [(path, data[:cut])], [(path, data[cut:])]
    fractions = [file_fraction(_split_key(path, root), salt) for path, _ in docs]
    is_val = [f < validation_fraction for f in fractions]
    if not any(is_val):
        is_val[int(np.argmin(fractions))] = True
    if all(is_val):
        is_val[int(np.argmax(fractions))] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


# ----------------------------------------------------------------------------- stdlib
def _top_level(rel_path):
    """`"asyncio"` for `"asyncio/events.py"`, `"json"` for a top-level `"json.py"`."""
    head, _, rest = rel_path.partition("/")
    return head if rest else head[:-3]


def stdlib_dir():
    """The running interpreter's standard-library folder (`sysconfig` `"stdlib"`)."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(packages=None, max_files=None, exclude=STDLIB_EXCLUDE):
    """The `.py` source files of Python's standard library, as `(relative path, bytes)`.

    Read at run time from `stdlib_dir()`; folders named in `exclude` (site-packages,
    test suites, idlelib, lib2to3, ... see `STDLIB_EXCLUDE`) and `config-*` are skipped.

    Args:
        packages: optional list of top-level names to keep, e.g. `["asyncio", "json"]`;
            a name matches the package folder or the top-level module `name.py`.
            `"."` keeps the top-level modules.
        max_files: optional cap: keeps the `max_files` files with the smallest path hash
            (a deterministic, spread-out subset).
        exclude: folder names to skip.

    Paths are relative, with `/` separators (e.g. `"asyncio/events.py"`), so they are the
    same on every machine.
    """
    root = stdlib_dir()
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Standard library folder not found: {root!r}")
    exclude = set(exclude)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in exclude and not d.startswith((".", "config-"))
        )
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            # Empty files (e.g. many `__init__.py`) are left out silently.
            if name.endswith(".py") and os.path.getsize(path) > 0:
                paths.append(path)
    rel = {p: _split_key(p, root) for p in paths}
    if packages is not None:
        wanted = set(packages)
        paths = [
            p for p in paths
            if _top_level(rel[p]) in wanted or ("." in wanted and "/" not in rel[p])
        ]
    if max_files is not None:
        paths = sorted(paths, key=lambda p: file_fraction(rel[p], "subset:"))[:max_files]
        paths.sort()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = read_text_files(paths)
    for w in caught:  # re-emit with the caller's stack level
        warnings.warn(str(w.message), w.category, stacklevel=2)
    return [(rel[path], data) for path, data in docs]


def stdlib_corpus(packages=None, validation_fraction=0.1, max_files=None):
    """Python's standard library source, split into `(train, validation)` by file.

    See `stdlib_files` for `packages` and `max_files` and `split_by_file` for the split
    (on the relative path, so every machine with the same Python gets the same split).
    """
    docs = stdlib_files(packages=packages, max_files=max_files)
    if not docs:
        raise ValueError(f"No standard-library files found for packages={packages!r}.")
    return split_by_file(docs, validation_fraction)


# ----------------------------------------------------------------------------- encoding
def encode_document(data, bos=True, eos=True):
    """`[BOS] + bytes + [EOS]` as an int32 array (`data`: bytes or str)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    body = np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int32)
    parts = ([np.array([BOS], np.int32)] if bos else []) + [body]
    if eos:
        parts.append(np.array([EOS], np.int32))
    return np.concatenate(parts)


def decode(tokens):
    """Bytes of `tokens` (special ids dropped) decoded as UTF-8, invalid bytes replaced."""
    tokens = np.asarray(tokens).reshape(-1)
    data = bytes(int(t) for t in tokens if 0 <= int(t) < 256)
    return data.decode("utf-8", errors="replace")


def concatenate_documents(docs):
    """One uint16 token stream `[BOS] doc [EOS] [BOS] doc [EOS] ...` from `(path, bytes)`."""
    parts = [encode_document(data).astype(np.uint16) for _, data in docs]
    if not parts:
        return np.zeros((0,), np.uint16)
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- dataset
class ByteLMDataset(keras.utils.PyDataset):
    """Next-token windows over concatenated documents, for `model.fit` / `evaluate`.

    The documents are encoded with `encode_document` and concatenated. Each batch holds
    `batch_size` windows of `seq_len + 1` tokens: `x = window[:-1]`, `y = window[1:]`
    (both int32 `(batch_size, seq_len)`).

    Args:
        docs: list of `(path, bytes)` (as from `read_text_files` / `stdlib_corpus`).
        seq_len: tokens per input window.
        batch_size: windows per batch.
        steps_per_epoch: batches per epoch (`len(dataset)`).
        seed: int seed; the batches are a pure function of `(seed, epoch, index)`.
        shuffle: `True` (training): uniformly random window starts, new ones every
            epoch. `False` (validation): `steps_per_epoch * batch_size` evenly spaced
            starts covering the stream, the same every epoch.
        **kwargs: `keras.utils.PyDataset` arguments (`workers`, `use_multiprocessing`,
            `max_queue_size`).

    A stream shorter than `seq_len + 1` tokens is repeated (with a warning).
    """

    def __init__(self, docs, seq_len, batch_size, steps_per_epoch, seed=0, shuffle=True,
                 **kwargs):
        super().__init__(**kwargs)
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                            ("steps_per_epoch", steps_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}: expected a positive integer.")
        stream = concatenate_documents(docs)
        if stream.size == 0:
            raise ValueError("Invalid docs: no documents.")
        if stream.size < seq_len + 1:
            reps = -(-(seq_len + 1) // stream.size)
            warnings.warn(
                f"The documents hold {stream.size} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}: repeating them {reps} times.",
                stacklevel=2,
            )
            stream = np.tile(stream, reps)
        self.stream = stream
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.num_tokens = int(stream.size)

    def __len__(self):
        return self.steps_per_epoch

    def starts(self, index):
        """The window start offsets of batch `index` in the current epoch."""
        last = self.stream.size - self.seq_len - 1  # largest valid start
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            return rng.integers(0, last + 1, size=self.batch_size)
        total = self.steps_per_epoch * self.batch_size
        offsets = np.linspace(0, last, num=total).round().astype(np.int64)
        return offsets[index * self.batch_size:(index + 1) * self.batch_size]

    def __getitem__(self, index):
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"Batch index {index} out of range [0, {self.steps_per_epoch}).")
        rows = self.starts(index)[:, None] + np.arange(self.seq_len + 1)[None, :]
        windows = self.stream[rows].astype(np.int32)
        return windows[:, :-1], windows[:, 1:]

    def on_epoch_end(self):
        if self.shuffle:
            self.epoch += 1
