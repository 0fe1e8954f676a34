"""examples/extend_context.py end to end in `--smoke` mode: every stage, resumable, the
conversion exact, the local-only gates closed after fine-tuning, `--train new` keeping the
source weights, the report written."""

import contextlib
import importlib.util
import io
import os

import numpy as np
import pytest

pytest.importorskip("keras_hub")

from conftest import to_numpy  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "keras_infini_example_extend_context", os.path.join(EXAMPLES, "extend_context.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script, out, *extra):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        script.main(["--smoke", "--out", str(out), "--verbose", "0", *extra])
    return buffer.getvalue()


@pytest.fixture(scope="module")
def runs(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("extend_context")
    logs = [run(script, out)]  # every stage: memory variant, --train new
    logs.append(run(script, out, "--stages", "finetune", "evaluate", "--variant", "local",
                    "--train", "all"))
    logs.append(run(script, out, "--stages", "finetune", "evaluate", "report", "--variant",
                    "interp"))
    return out, logs


def test_every_stage_writes_its_output(runs):
    out, _ = runs
    for name in ("source", "converted", "memory-new-s0", "local-all-s0", "interp-all-s0"):
        assert os.path.exists(os.path.join(out, name, "config.json")), name
    for name in ("source", "memory-new-s0", "local-all-s0", "interp-all-s0"):
        assert os.path.exists(os.path.join(out, f"{name}_eval.json")), name
    report = open(os.path.join(out, "report.md")).read()
    for name in ("memory-new-s0", "local-all-s0", "interp-all-s0", "source"):
        assert f"| {name} |" in report
    assert "open before" in report and os.path.exists(os.path.join(out, "results.json"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert os.path.getsize(os.path.join(out, "passkey.png")) > 0


def test_stages_resume(script, runs):
    out, _ = runs
    stamps = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)
              if f.endswith(".json") and f != "results.json"}
    log = run(script, out, "--stages", "pretrain", "convert", "finetune", "evaluate")
    for stage in ("pretrain", "convert", "finetune memory-new-s0", "evaluate source",
                  "evaluate memory-new-s0"):
        assert f"{stage}: " in log and "exists, skipped" in log.split(f"{stage}: ")[1]
    assert stamps == {f: os.path.getmtime(os.path.join(out, f)) for f in stamps}


def test_converted_equals_the_source_on_a_short_input(script, runs):
    out, _ = runs
    source = script.load_preset(os.path.join(out, "source"))
    converted = script.load_preset(os.path.join(out, "converted"))
    x = np.random.default_rng(0).integers(0, 259, (2, 40)).astype("int32")
    data = {"token_ids": x, "padding_mask": np.ones_like(x)}
    want, got = to_numpy(source(data)), to_numpy(converted(data))
    np.testing.assert_array_less(np.abs(got - want).max(), 1e-5 * np.abs(want).max())


def test_local_only_gates_stay_closed_and_train_new_keeps_the_source(script, runs):
    out, _ = runs
    converted = script.load_preset(os.path.join(out, "converted"))
    local = script.load_preset(os.path.join(out, "local-all-s0"))
    memory = script.load_preset(os.path.join(out, "memory-new-s0"))
    for block in local.backbone.transformer_layers:
        np.testing.assert_array_equal(to_numpy(block.attention.gate), 0.0)
    # local/all trained the pretrained weights (so the closed gates are not a no-op run)
    assert any(not np.array_equal(to_numpy(a), to_numpy(b))
               for a, b in zip(converted.backbone.weights, local.backbone.weights))
    new = {v.path for v in converted.backbone.memory_variables()}
    changed = set()
    for before, after in zip(converted.backbone.weights, memory.backbone.weights):
        assert before.path == after.path
        if not np.array_equal(to_numpy(before), to_numpy(after)):
            changed.add(before.path)
    assert changed and changed <= new, sorted(changed - new)


def test_pretraining_with_passkeys(script, tmp_path):
    """`--pretrain-passkey-fraction`: the source trains on windows of its own context that
    hold a passkey (in-context retrieval before any extension); a fraction outside [0, 1]
    is refused by name."""
    run(script, tmp_path, "--stages", "pretrain", "--context", "128",
        "--pretrain-passkey-fraction", "0.5")
    assert os.path.exists(os.path.join(tmp_path, "source", "config.json"))
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            run(script, tmp_path / "bad", "--pretrain-passkey-fraction", "1.5")
    assert "--pretrain-passkey-fraction" in err.getvalue()


def test_pretraining_continues_from_a_saved_source(script, tmp_path):
    """`--pretrain-from DIR` continues from a saved source: the new source starts from its
    weights (not from random ones) and is trained (its weights move)."""
    import keras_hub

    run(script, tmp_path / "a", "--stages", "pretrain")
    first = keras_hub.models.CausalLM.from_preset(str(tmp_path / "a" / "source"))
    run(script, tmp_path / "b", "--stages", "pretrain", "--pretrain-from",
        str(tmp_path / "a" / "source"), "--pretrain-seed", "1", "--pretrain-lr", "1e-9")
    barely = keras_hub.models.CausalLM.from_preset(str(tmp_path / "b" / "source"))
    run(script, tmp_path / "c", "--stages", "pretrain", "--pretrain-from",
        str(tmp_path / "a" / "source"), "--pretrain-seed", "1")
    moved = keras_hub.models.CausalLM.from_preset(str(tmp_path / "c" / "source"))
    for w0, w1, w2 in zip(first.backbone.weights, barely.backbone.weights,
                          moved.backbone.weights):
        np.testing.assert_allclose(to_numpy(w1), to_numpy(w0), atol=1e-6)
    assert max(np.abs(to_numpy(w2) - to_numpy(w0)).max()
               for w0, w2 in zip(first.backbone.weights, moved.backbone.weights)) > 1e-4


def test_gate_init_opens_the_converted_gates(script, tmp_path):
    """`--gate-init G` converts with every gate at `tanh(G)` (the memory's parameters get
    gradients from the first step); refused with `--variant local`, whose gates must stay
    at exactly 0."""
    from keras_infini.models import InfiniCausalLM

    run(script, tmp_path, "--stages", "pretrain", "convert", "--gate-init", "0.3")
    lm = InfiniCausalLM.from_preset(str(tmp_path / "converted"))
    for block in lm.backbone.transformer_layers:
        np.testing.assert_allclose(to_numpy(block.attention.gate_values()), np.tanh(0.3),
                                   rtol=1e-5)
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            run(script, tmp_path / "bad", "--gate-init", "0.3", "--variant", "local")
    assert "--gate-init" in err.getvalue()


def test_length_curriculum(script, tmp_path):
    """`--ft-mult 2 4`: the fine-tune's steps split in order into 2x windows (the given
    batch) then 4x windows (half the batch, the same tokens per step); a non-positive
    multiple is refused by name."""
    run(script, tmp_path, "--stages", "pretrain", "convert", "finetune", "--ft-mult", "2",
        "4", "--ft-steps", "4", "--train", "all")
    import json

    info = json.load(open(tmp_path / "memory-all-s0_finetune.json"))
    assert info["length"] == [128, 256] and info["batch"] == [2, 1] and info["steps"] == 4
    assert info["answer_weight"] == [200.0, 200.0]
    # one `fit` per stage (TensorFlow fixes a PyDataset's shapes at its first batch): the
    # loss curve has one (partial) chunk per stage, the last one the last stage's loss
    assert info["loss_curve"]["every"] == 100 and len(info["loss_curve"]["mean_loss"]) == 2
    np.testing.assert_allclose(info["loss_curve"]["mean_loss"][-1], info["last_loss"],
                               rtol=1e-4)
    run(script, tmp_path / "scaled", "--stages", "pretrain", "convert", "finetune",
        "--ft-mult", "2", "4", "--ft-steps", "2", "--scale-answer-weight")
    info = json.load(open(tmp_path / "scaled" / "memory-new-s0_finetune.json"))
    assert info["answer_weight"] == [200.0, 400.0]
    # --ft-stop-step: part of the schedule, then saved as usual
    run(script, tmp_path / "part", "--stages", "pretrain", "convert", "finetune",
        "--ft-steps", "5", "--ft-stop-step", "2")
    assert json.load(open(tmp_path / "part" / "memory-new-s0_finetune.json"))["steps"] == 2
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            run(script, tmp_path / "bad", "--ft-steps", "5", "--ft-stop-step", "6")
    assert "--ft-stop-step" in err.getvalue()
    stream = np.arange(5000) % 200
    data = script.FinetuneData(stream, 128, 2, 6, 0, 64, 1.0, 20.0, aux_weight=1.0,
                               curriculum=[(128, 2), (256, 1), (512, 1, 80.0)])
    shapes = [(data[i][0]["token_ids"].shape, data[i][1].shape, data[i][2].shape)
              for i in range(6)]
    assert shapes == [((2, 128),) * 3] * 2 + [((1, 256),) * 3] * 2 + [((1, 512),) * 3] * 2
    # the answer (last 5 targets) carries the stage's weight, text 1
    assert np.all(data[0][2][:, -5:] == 20.0) and np.all(data[5][2][:, -5:] == 80.0)
    assert data[5][2][0, 0] == 1.0
    parts = script.stage_slices(data)
    assert [len(part) for part in parts] == [2, 2, 2]
    np.testing.assert_array_equal(parts[2][1][0]["token_ids"], data[5][0]["token_ids"])
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            run(script, tmp_path / "bad", "--ft-mult", "2", "0")
    assert "--ft-mult" in err.getvalue()


def test_loss_curve_means_per_chunk(script):
    """`LossCurve` turns Keras' running epoch mean into the mean of each chunk of steps."""
    losses = np.arange(1.0, 8.0)  # 7 steps
    curve = script.LossCurve(every=3)
    for step, _ in enumerate(losses):
        curve.on_train_batch_end(step, {"loss": losses[:step + 1].mean()})
    curve.flush(len(losses))
    np.testing.assert_allclose(curve.curve, [2.0, 5.0, 7.0])
