"""Smoke tests of examples/modinfiniformer.py and examples/classify.py with tiny settings."""

import importlib.util
import math
import os

import keras
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", os.path.join(EXAMPLES, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lm():
    return load_example("modinfiniformer")


@pytest.fixture(scope="module")
def classify():
    return load_example("classify")


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "(x)", ":", "None", "=", "1"]
    for i in range(6):
        lines = [" ".join(rng.choice(words, size=8)) for _ in range(40)]
        (root / f"file{i}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    return root


TINY = ["--steps", "2", "--epochs", "1", "--seq-len", "64", "--segment-len", "16",
        "--dim", "16", "--heads", "2", "--layers", "2", "--batch-size", "2",
        "--val-batches", "1", "--eval-batches", "1", "--generate", "4", "--verbose", "0"]


def test_modinfiniformer_main(lm, text_dir, tmp_path):
    # One end-to-end run (fit, save, reload, evaluate, generate) with the non-default
    # options, so that they are covered too: --no-memory and --yarn.
    args = TINY + ["--data", str(text_dir), "--out", str(tmp_path / "out"), "--no-memory",
                   "--yarn"]
    with pytest.warns(UserWarning, match="Skipping"):
        result = lm.main(args)
    assert math.isfinite(result["bits_per_byte"]) and result["bits_per_byte"] > 0
    assert math.isclose(result["bits_per_byte"], result["val_loss"] / math.log(2))
    assert result["text"].startswith("def ")
    assert set(result["history"]) >= {"loss", "val_loss", "val_accuracy"}
    model = keras.models.load_model(result["model_path"], compile=False)
    blocks = lm.blocks_of(model)
    assert [type(b).__name__ for b in blocks] == ["InfiniTransformer", "MoDInfiniTransformer"]
    for block in blocks:  # pinned, and not moved by training
        np.testing.assert_allclose(keras.ops.convert_to_numpy(block.attention.gate),
                                   lm.NO_MEMORY_GATE)
        assert type(block.attention.positional_embedder).__name__ == "YaRNEmbeddings"


def test_generation_continues_as_the_full_call_predicts(lm):
    # The example's model generates with keras-hub's generate (greedy here): every new
    # token is the argmax of the full call's logits, across segment boundaries.
    args = lm.parse_args(["--dim", "16", "--heads", "2", "--layers", "2",
                          "--segment-len", "3"])
    model = lm.build_model(args)
    for block in lm.blocks_of(model):
        block.attention.gate.assign(np.array([1.5, -1.0], "float32"))
    model.compile(sampler="greedy")
    text = model.generate(["def f", "x"], max_length=14)
    assert text[0].startswith("def f") and text[1].startswith("x")
    model.preprocessor, preprocessor = None, model.preprocessor
    prompt = np.random.default_rng(0).integers(0, 256, size=(2, 12)).astype("int32")
    mask = np.arange(12)[None] < 7  # 2 segments + 1 token; 5 new cross a boundary
    ids = model.generate({"token_ids": prompt, "padding_mask": np.repeat(mask, 2, 0)},
                         stop_token_ids=None)["token_ids"]
    ids = keras.ops.convert_to_numpy(ids)
    logits = keras.ops.convert_to_numpy(
        model({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    )
    np.testing.assert_array_equal(ids[:, :7], prompt[:, :7])
    np.testing.assert_array_equal(ids[:, 7:], logits[:, 6:-1].argmax(-1))
    model.preprocessor = preprocessor


def test_classify_main(classify):
    args = ["--packages", "asyncio,email,json", "--min-files", "3",
            "--max-files-per-class", "5", "--max-bytes", "64", "--segment-len", "16",
            "--steps", "2", "--epochs", "1", "--dim", "16", "--heads", "2", "--layers", "1",
            "--batch-size", "4", "--verbose", "0"]
    result = classify.main(args)
    assert result["classes"] == ["asyncio", "email", "json"]
    assert result["val_files"] == 3 and result["train_files"] == 12
    for key in ("val_accuracy", "majority_accuracy", "first_segment_accuracy"):
        assert 0.0 <= result[key] <= 1.0


def test_classify_split_and_masking(classify):
    args = classify.parse_args(["--packages", "asyncio,email,json", "--min-files", "3",
                                "--max-files-per-class", "5", "--max-bytes", "64"])
    classes, train, val = classify.load_files(args)
    assert not {p for p, _, _ in train} & {p for p, _, _ in val}
    assert {p for p, _, _ in val} == {p for p, _, _ in classify.load_files(args)[2]}
    assert all(p.split("/")[0] == classes[label] for p, _, label in train + val)
    x, y = classify.head_arrays(val, 64)
    assert x.shape == (len(val), 64) and x.dtype == np.int32
    short = classify.encode_window(b"abc", 0, 8)
    assert short.tolist() == [257, 97, 98, 99, 256, 256, 256, 256]
    # Padding is masked: extra PAD tokens do not change the prediction.
    args = classify.parse_args(["--dim", "16", "--heads", "2", "--layers", "1",
                                "--segment-len", "8", "--dropout", "0"])
    model = classify.build_model(args, 3)
    a = keras.ops.convert_to_numpy(model(short[None, :6]))
    b = keras.ops.convert_to_numpy(model(np.concatenate([short, [256] * 12])[None]))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_gate_init_per_head(lm):
    args = lm.parse_args(["--dim", "16", "--heads", "2", "--layers", "2",
                          "--gate-init=-4,2"])
    assert args.gate_init == [-4.0, 2.0]
    model = lm.build_model(args)
    lm.init_gates(model, args.gate_init)
    for block in lm.blocks_of(model):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(block.attention.gate),
                                      [-4.0, 2.0])
    # sigmoid(-4) = 0.018, sigmoid(2) = 0.881, mean 0.449
    assert lm.gate_summary(model) == "0.449 [0.02 0.88] | 0.449 [0.02 0.88]"
    lm.init_gates(model, [-3.0])  # one number: every head
    for block in lm.blocks_of(model):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(block.attention.gate),
                                      [-3.0, -3.0])
    with pytest.raises(ValueError, match="--gate-init=1,2,3: expected one number or 2"):
        lm.init_gates(model, [1.0, 2.0, 3.0])
    with pytest.raises(SystemExit):
        lm.parse_args(["--gate-init", "a,b"])


def test_memory_options_reach_the_blocks(lm):
    args = lm.parse_args(["--dim", "16", "--heads", "2", "--layers", "2", "--write-strength",
                          "--gate-lr-scale", "10", "--memory-feature-map", "elu1"])
    model = lm.build_model(args)
    for block in lm.blocks_of(model):
        assert block.attention.write_strength is True
        assert block.attention.gate_lr_scale == 10.0
        assert block.attention.memory_feature_map == "elu1"
    # --gate-init is the gate logit whatever the scale: raw = logit / scale.
    lm.init_gates(model, [-4.0, 2.0])
    for block in lm.blocks_of(model):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(block.attention.gate),
                                   [-0.4, 0.2], rtol=1e-6)
    assert lm.gate_summary(model) == "0.449 [0.02 0.88] | 0.449 [0.02 0.88]"
    defaults = lm.parse_args([])
    assert (defaults.write_strength, defaults.gate_lr_scale, defaults.memory_feature_map) == (
        False, 1.0, "elu1")
    hard = lm.parse_args(["--write-strength", "hard_sigmoid", "--update", "delta"])
    assert hard.write_strength == "hard_sigmoid" and hard.update == "delta"
    assert not defaults.memory_decay
    decay = lm.parse_args(["--dim", "16", "--heads", "2", "--layers", "2", "--update", "delta",
                           "--memory-feature-map", "l2", "--memory-decay"])
    assert all(block.attention.memory_decay is True
               for block in lm.blocks_of(lm.build_model(decay)))
    coupled = lm.parse_args(["--dim", "16", "--heads", "2", "--layers", "2", "--update",
                             "delta", "--memory-feature-map", "l2", "--write-strength",
                             "hard_sigmoid", "--memory-decay", "coupled"])
    assert all(block.attention.memory_decay == "coupled"
               for block in lm.blocks_of(lm.build_model(coupled)))
    with pytest.raises(SystemExit):
        lm.parse_args(["--memory-decay", "yes"])
