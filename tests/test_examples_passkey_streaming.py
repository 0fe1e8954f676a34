"""Smoke tests of examples/passkey.py and examples/streaming.py, and the passkey generator."""

import importlib.util
import math
import os

import keras
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(
        f"keras_infini_example_{name}", os.path.join(EXAMPLES, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def passkey():
    return load_example("passkey")


@pytest.fixture(scope="module")
def streaming():
    return load_example("streaming")


def find_all(seq, sub):
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if np.array_equal(seq[i:i + n], sub)]


@pytest.mark.parametrize("length", [64, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_sample_has_one_key_at_depth(passkey, length, depth):
    key = [7, 1, 4, 3, 2]
    for phase in passkey._SENTENCE_STARTS:
        tokens, key_start = passkey.make_sample(length, depth, key, phase=phase)
        assert tokens.shape == (length + 1,)
        statement = passkey.key_statement(key)
        assert find_all(tokens, statement) == [key_start]  # stated exactly once
        # The digit string occurs in the statement (twice) and as the answer, nowhere else.
        digits = passkey.DIGIT_IDS[key]
        assert find_all(tokens, digits) == [
            key_start + 4, key_start + passkey.REPEAT_OFFSET, length + 1 - 5
        ]
        # At the requested depth of the filler, up to one filler sentence (<= 6 tokens).
        n_fill = length + 1 - passkey.OVERHEAD
        assert abs(key_start - depth * n_fill) <= 6
        if depth == 0.0:
            assert key_start == 0
        if depth == 1.0:
            assert key_start == n_fill
        # Question, then the answer digits at the very end.
        q = passkey.QUESTION_IDS
        assert np.array_equal(tokens[-5 - len(q):-5], q)
        assert np.array_equal(tokens[-5:], digits)
        # Everything else is filler.
        rest = np.concatenate([tokens[:key_start], tokens[key_start + len(statement):-5 - len(q)]])
        assert np.isin(rest, passkey.FILLER_IDS).all()
        assert not np.isin(rest, passkey.DIGIT_IDS).any()


def test_passkey_batch_targets_are_the_answer_digits(passkey):
    rng = np.random.default_rng(0)
    x, y, w, keys = passkey.make_batch(rng, 8, 256)
    assert x.shape == y.shape == w.shape == (8, 256)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # next-token targets
    np.testing.assert_array_equal(y[:, -5:], passkey.DIGIT_IDS[keys])
    np.testing.assert_array_equal(np.flatnonzero(w.sum(0)), np.arange(251, 256))
    # The input ends with "... The pass key is" followed by the first four digits.
    np.testing.assert_array_equal(x[:, -4:], passkey.DIGIT_IDS[keys[:, :4]])
    assert passkey.decode(x[0, -8:-4]) == "The pass key is"
    # With aux_weight, the key's repetition inside the statement is weighted too.
    _, y2, w2, keys2 = passkey.make_batch(np.random.default_rng(1), 4, 256, aux_weight=0.5)
    for row in range(4):
        aux = np.flatnonzero(w2[row] == 0.5)
        assert len(aux) == 5
        np.testing.assert_array_equal(y2[row, aux], passkey.DIGIT_IDS[keys2[row]])


def test_passkey_late_keys_lie_in_the_last_segment(passkey):
    seg, length = 64, 256
    late_tokens = seg - passkey.OVERHEAD
    x, _, _, keys = passkey.make_batch(
        np.random.default_rng(2), 32, length, late_fraction=1.0, late_tokens=late_tokens
    )
    statement_len = passkey.KEY_STATEMENT_LEN
    for row in range(32):
        starts = find_all(x[row], passkey.key_statement(keys[row]))
        assert len(starts) == 1
        assert length - seg <= starts[0] and starts[0] + statement_len <= length - 14


def test_passkey_main_smoke(passkey, tmp_path, capsys):
    result = passkey.main(
        ["--steps", "3", "--batch", "4", "--train-segments", "2", "--segment-len", "24",
         "--dim", "16", "--heads", "2", "--layers", "1", "--eval-lengths", "1,2",
         "--depths", "0,1", "--eval-samples", "3", "--eval-batch", "3",
         "--out", str(tmp_path), "--verbose", "0"]
    )
    out = capsys.readouterr().out
    assert "digit accuracy / whole-key accuracy" in out
    assert "1x (48 tok)" in out and "2x (96 tok)" in out
    assert "100% |" in out
    png = tmp_path / "passkey_heatmap.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "passkey_results.json").exists()
    assert set(result["results"]) == {(m, d) for m in (1, 2) for d in (0.0, 1.0)}
    for digit, key in result["results"].values():
        assert 0.0 <= key <= digit <= 1.0


def test_passkey_memory_options_reach_the_blocks(passkey):
    defaults = passkey.parse_args([])
    assert (defaults.update, defaults.write_strength, defaults.gate_lr_scale,
            defaults.gate_init, defaults.memory_feature_map) == ("delta", False, 1.0, 0.0, "elu1")
    args = passkey.parse_args(["--dim", "16", "--heads", "2", "--layers", "2", "--update",
                               "linear", "--write-strength", "--gate-lr-scale", "10",
                               "--gate-init", "-1", "--memory-feature-map", "elu1"])
    model = passkey.build_model(args)
    blocks = [layer for layer in model.layers if isinstance(layer, passkey.InfiniTransformer)]
    assert len(blocks) == 2
    for block in blocks:
        memory = block.attention
        assert (memory.update, memory.write_strength, memory.gate_lr_scale,
                memory.memory_feature_map) == ("linear", True, 10.0, "elu1")
        np.testing.assert_allclose(keras_ops_numpy(memory.gate_values()), 1 / (1 + np.exp(1)),
                                   rtol=1e-5)
    args = passkey.parse_args(["--dim", "16", "--heads", "2", "--layers", "1",
                               "--memory-feature-map", "l2", "--write-strength", "hard_sigmoid"])
    (block,) = [layer for layer in passkey.build_model(args).layers
                if isinstance(layer, passkey.InfiniTransformer)]
    assert (block.attention.write_strength, block.attention.memory_feature_map) == (
        "hard_sigmoid", "l2")
    assert not block.attention.memory_decay and not defaults.memory_decay
    args = passkey.parse_args(["--dim", "16", "--heads", "2", "--layers", "1",
                               "--memory-feature-map", "l2", "--memory-decay"])
    (block,) = [layer for layer in passkey.build_model(args).layers
                if isinstance(layer, passkey.InfiniTransformer)]
    assert block.attention.memory_decay is True
    args = passkey.parse_args(["--dim", "16", "--heads", "2", "--layers", "1",
                               "--memory-feature-map", "l2", "--write-strength",
                               "hard_sigmoid", "--memory-decay", "coupled"])
    (block,) = [layer for layer in passkey.build_model(args).layers
                if isinstance(layer, passkey.InfiniTransformer)]
    assert block.attention.memory_decay == "coupled"
    for bad in (["--write-strength", "hard"], ["--memory-decay", "yes"]):
        with pytest.raises(SystemExit):
            passkey.parse_args(bad)


def test_passkey_embedding_scale(passkey, capsys):
    """`--embedding-scale 2`: the same initial model (the table drawn at half the range,
    multiplied by 2), whose embedding output moves twice as far in one Adam step."""
    base = ["--dim", "16", "--heads", "2", "--layers", "1", "--lr", "1e-3"]
    assert passkey.parse_args(base).embedding_scale == 1.0
    x = np.random.default_rng(0).integers(0, len(passkey.VOCAB), (2, 24)).astype("int32")
    moved, logits = [], []
    for scale in ("1", "2"):
        keras.utils.set_random_seed(0)
        model = passkey.build_model(passkey.parse_args(base + ["--embedding-scale", scale]))
        embed = keras.Sequential(model.layers[:2] if scale == "2" else model.layers[:1])
        before = keras_ops_numpy(embed(x))
        logits.append(keras_ops_numpy(model(x)))
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.train_on_batch(x, x)
        moved.append(np.abs(keras_ops_numpy(embed(x)) - before).mean())
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(moved[1] / moved[0], 2.0, rtol=0.05)
    with pytest.raises(SystemExit):
        passkey.parse_args(["--embedding-scale", "0"])
    assert "--embedding-scale must be positive" in capsys.readouterr().err


def test_passkey_gate_init_per_head(passkey, capsys):
    args = passkey.parse_args(["--dim", "16", "--heads", "2", "--layers", "2",
                               "--gate-lr-scale", "10", "--gate-init=-2,1.5"])
    assert args.gate_init == [-2.0, 1.5]
    for layer in passkey.build_model(args).layers:
        if isinstance(layer, passkey.InfiniTransformer):
            np.testing.assert_allclose(keras_ops_numpy(layer.attention.gate_values()),
                                       1 / (1 + np.exp([2.0, -1.5])), rtol=1e-5)
    assert passkey.parse_args(["--gate-init", "0.5"]).gate_init == 0.5
    for bad in (["--gate-init=1,2,3"], ["--gate-init", "a,b"]):
        with pytest.raises(SystemExit):
            passkey.parse_args(bad)
    assert "--gate-init=1,2,3: expected one number or 2" in capsys.readouterr().err


def keras_ops_numpy(x):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


def check_streaming_result(result, out, tokens, reference):
    assert "tokens/s" in out and f"peak RSS at {reference} tokens" in out and "ratio" in out
    assert result["tokens"] == tokens
    assert result["finite"]
    assert result["peak_rss_final_mib"] >= result["peak_rss_reference_mib"] > 0
    assert result["ratio"] <= 1.10
    assert math.isfinite(result["tokens_per_second"]) and result["tokens_per_second"] > 0
    # The normaliser is a running sum of elu(K) + 1 > 0, so it grows with the tokens.
    norms = [row["norm"] for _, row in sorted(result["checkpoints"].items())]
    assert norms == sorted(norms) and norms[-1] > norms[0]


def test_streaming_main_compiled_smoke(streaming, capsys):
    # MoD and delta blocks, and a ragged last chunk (3000 = 5 * 512 + 440).
    result = streaming.main(
        ["--tokens", "3000", "--chunk", "512", "--reference-tokens", "1024",
         "--dim", "16", "--heads", "2", "--layers", "2", "--segment-len", "64",
         "--mod", "--update", "delta", "--check"]
    )
    check_streaming_result(result, capsys.readouterr().out, 3000, 1024)


def test_streaming_compiled_step_matches_eager_streamer(streaming, capsys):
    result = streaming.main(
        ["--tokens", "1024", "--chunk", "512", "--reference-tokens", "512",
         "--dim", "16", "--heads", "2", "--layers", "1", "--segment-len", "64",
         "--update", "delta", "--verify"]
    )
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "max |compiled step - eager Streamer|" in x)
    assert float(line.rsplit("=", 1)[1]) < 1e-4
    assert result["finite"]


def test_streaming_main_eager_smoke(streaming, capsys):
    result = streaming.main(
        ["--tokens", "2048", "--chunk", "512", "--reference-tokens", "1024",
         "--dim", "16", "--heads", "2", "--layers", "1", "--segment-len", "64",
         "--mode", "eager", "--check"]
    )
    check_streaming_result(result, capsys.readouterr().out, 2048, 1024)
