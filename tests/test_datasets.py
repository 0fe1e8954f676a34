"""examples/byte_datasets.py: file reading, the split by file, the stdlib corpus, ByteLMDataset."""

import os
import random
import sys
import warnings

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
import byte_datasets as datasets  # noqa: E402


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "corpus"
    _write(str(root / "a.txt"), b"hello world\n" * 20)
    _write(str(root / "b.py"), "def f():\n    return 'caf\u00e9'\n".encode("utf-8") * 10)
    _write(str(root / "sub" / "c.txt"), b"nested text file\n" * 5)
    _write(str(root / "empty.txt"), b"")
    _write(str(root / "binary.bin"), b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 4)
    _write(str(root / "latin1.txt"), "caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    _write(str(root / "__pycache__" / "x.txt"), b"cache")
    _write(str(root / ".hidden" / "y.txt"), b"hidden")
    return root


def test_read_text_files_skips_bad_files_with_warnings(text_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = datasets.read_text_files(str(text_dir))
    names = sorted(os.path.relpath(p, text_dir) for p, _ in docs)
    assert names == ["a.txt", "b.py", os.path.join("sub", "c.txt")]
    messages = [str(w.message) for w in caught]
    for bad, why in (("empty.txt", "empty"), ("binary.bin", "binary"),
                     ("latin1.txt", "UTF-8")):
        assert any(bad in m and why in m for m in messages), (bad, messages)
    assert len(messages) == 3
    assert all(isinstance(data, bytes) and data for _, data in docs)
    with open(str(text_dir / "a.txt"), "rb") as f:
        assert dict(docs)[str(text_dir / "a.txt")] == f.read()


def test_read_text_files_suffixes_files_and_min_bytes(text_dir):
    docs = datasets.read_text_files(str(text_dir), suffixes=(".py",))
    assert [os.path.basename(p) for p, _ in docs] == ["b.py"]
    # Explicit files are read whatever their suffix; min_bytes skips short ones.
    with pytest.warns(UserWarning, match="min_bytes"):
        docs = datasets.read_text_files(
            [str(text_dir / "a.txt"), str(text_dir / "sub" / "c.txt")], min_bytes=100
        )
    assert [os.path.basename(p) for p, _ in docs] == ["a.txt"]
    with pytest.raises(FileNotFoundError):
        datasets.read_text_files(str(text_dir / "missing"))


def _docs(n):
    return [(f"/data/dir{i % 3}/file{i}.txt", b"x" * (i + 1)) for i in range(n)]


def test_split_by_file_is_deterministic_disjoint_and_per_file():
    docs = _docs(60)
    train, val = datasets.split_by_file(docs, 0.25, root="/data")
    assert train and val
    train_paths, val_paths = {p for p, _ in train}, {p for p, _ in val}
    assert not train_paths & val_paths
    assert train_paths | val_paths == {p for p, _ in docs}
    assert 5 <= len(val) <= 25
    # Same answer for a shuffled input and for a subset: a file's side depends only on it.
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = datasets.split_by_file(shuffled, 0.25, root="/data")
    assert {p for p, _ in val2} == val_paths
    _, val3 = datasets.split_by_file(docs[:40], 0.25, root="/data")
    assert {p for p, _ in val3} == val_paths & {p for p, _ in docs[:40]}
    # Relative to the root: the same tree elsewhere splits the same way.
    moved = [(p.replace("/data", "/elsewhere/data"), d) for p, d in docs]
    _, val4 = datasets.split_by_file(moved, 0.25, root="/elsewhere/data")
    assert {p.replace("/elsewhere", "") for p, _ in val4} == val_paths


def test_split_by_file_small_inputs():
    train, val = datasets.split_by_file(_docs(2), 0.01)
    assert len(train) == 1 and len(val) == 1
    with pytest.warns(UserWarning, match="one document"):
        train, val = datasets.split_by_file([("f.txt", b"line\n" * 100)], 0.1)
    assert train[0][1] + val[0][1] == b"line\n" * 100
    assert val[0][1].startswith(b"line")
    with pytest.raises(ValueError):
        datasets.split_by_file([], 0.1)
    with pytest.raises(ValueError):
        datasets.split_by_file(_docs(3), 1.5)


def test_stdlib_files_and_corpus():
    docs = datasets.stdlib_files(packages=["json", "."], max_files=40)
    assert 0 < len(docs) <= 40
    for path, data in docs:
        assert path.endswith(".py") and "\\" not in path
        assert path.startswith("json/") or "/" not in path
        data.decode("utf-8")
    excluded = set(datasets.STDLIB_EXCLUDE)
    all_docs = datasets.stdlib_files(max_files=200)
    assert all(not set(p.split("/")[:-1]) & excluded for p, _ in all_docs)
    train, val = datasets.stdlib_corpus(max_files=50)
    assert train and val
    assert not {p for p, _ in train} & {p for p, _ in val}
    again = datasets.stdlib_corpus(max_files=50)
    assert [p for p, _ in again[1]] == [p for p, _ in val]


def test_encode_decode():
    tokens = datasets.encode_document("h\u00e9")
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [datasets.BOS, 104, 0xC3, 0xA9, datasets.EOS]
    assert datasets.decode(tokens) == "h\u00e9"
    assert datasets.decode([104, 0xC3, datasets.PAD]) == "h\ufffd"
    assert datasets.VOCAB_SIZE == 259 and datasets.PAD < datasets.VOCAB_SIZE


def test_byte_lm_dataset_shapes_targets_and_determinism():
    docs = [(f"f{i}", bytes(range(32, 127)) * (i + 2)) for i in range(4)]
    data = datasets.ByteLMDataset(docs, seq_len=32, batch_size=3, steps_per_epoch=5, seed=7)
    assert len(data) == 5
    stream = datasets.concatenate_documents(docs)
    assert data.num_tokens == stream.size == sum(len(d) + 2 for _, d in docs)
    x, y = data[2]
    assert x.shape == y.shape == (3, 32)
    assert x.dtype == np.int32 and y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row, start in zip(range(3), data.starts(2)):
        np.testing.assert_array_equal(x[row], stream[start:start + 32])
        np.testing.assert_array_equal(y[row], stream[start + 1:start + 33])
    assert x.min() >= 0 and x.max() < datasets.VOCAB_SIZE
    same = datasets.ByteLMDataset(docs, seq_len=32, batch_size=3, steps_per_epoch=5, seed=7)
    np.testing.assert_array_equal(same[2][0], x)
    data.on_epoch_end()
    assert not np.array_equal(data[2][0], x)
    with pytest.raises(IndexError):
        data[5]


def test_byte_lm_dataset_validation_mode_and_short_stream():
    docs = [("a", b"abcdefgh" * 50)]
    val = datasets.ByteLMDataset(docs, seq_len=16, batch_size=2, steps_per_epoch=3,
                                 shuffle=False)
    first = [val[i][0] for i in range(3)]
    val.on_epoch_end()
    for i in range(3):
        np.testing.assert_array_equal(val[i][0], first[i])
    starts = np.concatenate([val.starts(i) for i in range(3)])
    assert starts[0] == 0 and starts[-1] == val.num_tokens - 17
    assert np.all(np.diff(starts) > 0)
    with pytest.warns(UserWarning, match="repeating"):
        short = datasets.ByteLMDataset([("s", b"abc")], seq_len=16, batch_size=2,
                                       steps_per_epoch=1)
    x, y = short[0]
    assert x.shape == (2, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError):
        datasets.ByteLMDataset(docs, seq_len=0, batch_size=2, steps_per_epoch=1)
