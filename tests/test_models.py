"""keras_infini.models: InfiniBackbone / InfiniCausalLM / preprocessor on keras-hub."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_infini.ops import backend as fast_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_keras_hub_is_optional():
    # Without keras-hub: the package and its layers import and run; the models say which
    # extra to install.
    code = (
        "import sys; sys.modules['keras_hub'] = None\n"
        "import numpy as np, keras_infini\n"
        "layer = keras_infini.InfiniTransformer(8, 16, 4, 4, 2, 'gelu', 4, causal=True)\n"
        "y, cache = layer(np.ones((1, 5, 8), 'float32'), cache=layer.build_cache(1),\n"
        "                 cache_update_index=0)\n"
        "try:\n"
        "    import keras_infini.models\n"
        "except ImportError as error:\n"
        "    print('IMPORT ERROR:', error)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IMPORT ERROR:" in result.stdout and "keras_infini[hub]" in result.stdout


keras_hub = pytest.importorskip("keras_hub")
from keras_infini.models import InfiniBackbone  # noqa: E402
from keras_infini.models import InfiniByteTokenizer  # noqa: E402
from keras_infini.models import InfiniCausalLM  # noqa: E402
from keras_infini.models import InfiniCausalLMPreprocessor  # noqa: E402

S = 4


def backbone(**overrides):
    config = dict(vocabulary_size=259, num_layers=2, hidden_dim=16, intermediate_dim=32,
                  num_heads=2, segment_len=S, mod_every=2, update="delta")
    config.update(overrides)
    return InfiniBackbone(**config)


@pytest.fixture(scope="module")
def lm():
    keras.utils.set_random_seed(0)
    model = InfiniCausalLM(
        backbone(), InfiniCausalLMPreprocessor(InfiniByteTokenizer(), sequence_length=32)
    )
    blocks = model.backbone.transformer_layers
    for block in blocks:  # memory and local attention both matter
        block.attention.gate.assign(np.array([1.0, -0.5], "float32"))
    blocks[1].router.bias.assign(np.array([0.3], "float32"))  # capacity binds sometimes
    return model


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def test_greedy_generation_continues_each_row_as_the_full_call_predicts(lm):
    # Right-padded prompts of 1, S-1, S+1 and 3S+5 tokens in one batch; every generated
    # token is the argmax of the full call's logits on the row's own sequence.
    lengths = np.array([1, S - 1, S + 1, 3 * S + 5])
    total = 3 * S + 5 + 2 * S
    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, 256, size=(4, total)).astype("int32")
    mask = np.arange(total)[None] < lengths[:, None]
    token_ids = np.where(mask, token_ids, 0).astype("int32")
    lm.compile(sampler="greedy")
    preprocessor, lm.preprocessor = lm.preprocessor, None  # token ids in, token ids out
    try:
        out = lm.generate({"token_ids": token_ids, "padding_mask": mask},
                          stop_token_ids=None)
    finally:
        lm.preprocessor = preprocessor
    ids = numpy(out["token_ids"])
    np.testing.assert_array_equal(ids[mask], token_ids[mask])  # prompts kept
    logits = numpy(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(ids[row, n:], logits[row, n - 1:-1].argmax(-1),
                                      err_msg=f"row {row}")


def test_call_with_cache_logits_equal_the_full_call(lm):
    ids = np.random.default_rng(1).integers(0, 256, size=(2, S + 4)).astype("int32")
    full = numpy(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    prompt = S + 1
    logits, _, cache = lm.call_with_cache(ids[:, :prompt], lm.build_cache(2), 0)
    outputs = [numpy(logits)]
    step = fast_paths.compile_inference(lm.call_with_cache, lm.variables)
    for t in range(prompt, ids.shape[1]):
        logits, _, cache = step(ids[:, t:t + 1], cache, ops.convert_to_tensor(t, "int32"))
        outputs.append(numpy(logits))
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), full, atol=1e-4)


def test_generate_strings_with_keras_hub_samplers(lm):
    # Samplers and strings, not compilation (tested above): no compiled step per batch.
    lm.compile(sampler=keras_hub.samplers.TopKSampler(k=5, seed=1), jit_compile=False)
    text = lm.generate("def ", max_length=24)
    assert isinstance(text, str) and text.startswith("def ")
    lm.compile(sampler="top_p", jit_compile=False)
    texts = lm.generate(["a", "import os"], max_length=20)
    assert [t[:len(p)] for t, p in zip(texts, ["a", "import os"])] == ["a", "import os"]


def test_fit_on_strings_and_preset_round_trip(lm, tmp_path):
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), sampler="greedy")
    lm.fit(["def f(x):\n    return x\n", "import os\n"] * 2, batch_size=2, epochs=1,
           verbose=0)
    lm.save_to_preset(str(tmp_path / "preset"))
    loaded = InfiniCausalLM.from_preset(str(tmp_path / "preset"))
    ids = np.random.default_rng(2).integers(0, 256, size=(2, 9)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_allclose(numpy(loaded(x)), numpy(lm(x)), atol=1e-5)
    assert loaded.backbone.get_config() == lm.backbone.get_config()
    assert isinstance(loaded.preprocessor.tokenizer, InfiniByteTokenizer)


def test_lora_through_the_backbone():
    model = InfiniCausalLM(backbone(num_layers=1, mod_every=0))
    ids = np.random.default_rng(3).integers(0, 256, size=(2, 6)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    before = numpy(model(x))
    model.backbone.enable_lora(rank=2)
    names = sorted(v.path for v in model.trainable_variables)
    assert names and all("lora_kernel" in name for name in names), names
    np.testing.assert_allclose(numpy(model(x)), before, atol=1e-6)  # b starts at zero
    model.compile(optimizer="adam", sampler="greedy")
    model.fit(x, ids, epochs=1, verbose=0)


def test_refusals(lm):
    lm.compile(sampler="greedy")
    with pytest.raises(ValueError, match="Invalid prompt of 30 tokens .*max_length=16"):
        lm.generate("x" * 30, max_length=16)
    model = InfiniCausalLM(backbone(num_layers=1, mod_every=0, causal=False))
    model.compile(sampler="greedy")
    ids = np.ones((1, 8), "int32")
    with pytest.raises(ValueError, match="causal=False"):
        model.generate({"token_ids": ids, "padding_mask": ids > 0}, stop_token_ids=None)
    with pytest.raises(ValueError, match="mod_every"):
        backbone(mod_every=-1)


def test_bench_generate_runs_one_tiny_configuration(capsys):
    import importlib.util

    path = os.path.join(ROOT, "benchmarks", "bench_generate.py")
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--model", "infini", "--prompt", "9", "--new", "4", "--layers", "2",
                         "--dim", "16", "--heads", "2", "--segment-len", "4", "--header",
                         "--repeats", "1"])
    assert result["total"] > 0 and result["per_token"] > 0
    assert "| infini | 1 | 9 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--previous PATH"):
        bench.main(["--model", "previous", "--prompt", "9", "--new", "4"])


@pytest.mark.parametrize("tie_weights", [True, False])
def test_backbone_layout_map_covers_every_weight(tie_weights):
    """`InfiniBackbone.get_layout_map` (keras-hub's naming) is the library's layout map:
    every backbone weight has exactly one layout; projections, MLP and embeddings are
    sharded on `model`, each sharded axis divisible by it."""
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"),
                                         [f"cpu:{i}" for i in range(4)])
    layout_map = InfiniBackbone.get_layout_map(mesh)
    model = backbone(vocabulary_size=260, tie_weights=tie_weights)
    sharded = set()
    for variable in model.weights:
        layout = layout_map[variable.path]  # Keras raises if two keys match
        assert layout is not None, f"{variable.path} is not in the layout map"
        for axis, name in enumerate(layout.axes):
            if name == "model":
                assert variable.shape[axis] % 2 == 0, (variable.path, variable.shape)
                sharded.add(variable.path.split("/")[-1])
    assert {"embeddings", "kernel"} <= sharded
    assert ("reverse_embeddings" in sharded) == (not tie_weights)
    with pytest.raises(ValueError, match="model_dim='tensor'"):
        InfiniBackbone.get_layout_map(mesh, model_parallel_dim_name="tensor")


def test_generate_is_compiled_unless_refused(lm):
    """TensorFlow: `generate` runs as an XLA `tf.function` by default (Keras resolves
    `jit_compile="auto"` to no XLA on CPU), and not when `compile(jit_compile=False)`.
    torch: each decode step runs as one compiled graph by default, eagerly when refused.
    Greedy output is the same either way, on every backend."""
    ids = np.random.default_rng(5).integers(0, 256, size=(1, 2 * S + 1)).astype("int32")
    inputs = {"token_ids": np.concatenate([ids, np.zeros((1, S), "int32")], axis=1),
              "padding_mask": np.arange(3 * S + 1)[None] < 2 * S + 1}
    preprocessor, lm.preprocessor = lm.preprocessor, None
    outputs = {}
    try:
        for jit_compile in ("auto", False):
            lm.compile(sampler="greedy", jit_compile=jit_compile)
            function = lm.make_generate_function()
            if keras.backend.backend() == "tensorflow":
                assert function._jit_compile is (jit_compile == "auto")
            compiled_step = lm._decode_step != lm._generation_step
            assert compiled_step is (keras.backend.backend() == "torch"
                                     and jit_compile == "auto")
            outputs[jit_compile] = numpy(lm.generate(inputs, stop_token_ids=None)["token_ids"])
    finally:
        lm.preprocessor = preprocessor
        lm.compile(sampler="greedy")
    np.testing.assert_array_equal(outputs["auto"], outputs[False])


# ----------------------------------------------------------------- issue 33 (round 3)
def test_detokenize_keeps_byte_zero(lm):
    """[3] `[[97, 0, 98]]` detokenized to 'ab' (keras-hub strips id 0 as padding; ours is
    256), so `generate("a\\x00b")` echoed "ab..."."""
    tokenizer = InfiniByteTokenizer()
    assert tokenizer.detokenize([[97, 0, 98]]) == ["a\x00b"]
    assert tokenizer.detokenize([97, 0, 256, 258, 98]) == "a\x00b"
    assert tokenizer.detokenize(np.array([[0, 0], [257, 0]], "int32")) == ["\x00\x00", "\x00"]
    lm.compile(sampler="greedy", jit_compile=False)
    assert lm.generate("a\x00b", max_length=8).startswith("a\x00b")


@pytest.mark.parametrize("max_length", [0, -3, 2.5, True])
def test_generate_refuses_a_non_positive_max_length(lm, max_length):
    """[4] `max_length=0` generated ~45 characters (0 read as "the default")."""
    lm.compile(sampler="greedy", jit_compile=False)
    with pytest.raises(ValueError, match=rf"Invalid max_length={max_length!r}"):
        lm.generate("ab", max_length=max_length)


def test_generate_refuses_out_of_vocabulary_ids_and_non_prefix_masks(lm):
    """[5] Without a preprocessor: id 300 with a 259 vocabulary ran silently on JAX and TF
    (IndexError on torch); a padding_mask `[1, 0, 1, 0]` was accepted."""
    lm.compile(sampler="greedy", jit_compile=False)
    preprocessor, lm.preprocessor = lm.preprocessor, None
    try:
        mask = np.array([[1, 1, 1, 0]], bool)
        for bad in (300, 259, -1):
            ids = np.array([[257, bad, 98, 256]], "int32")
            with pytest.raises(ValueError, match=rf"Invalid token_ids: \[{bad}\].*\[0, 259\)"):
                lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        ids = np.array([[257, 97, 98, 256]], "int32")
        with pytest.raises(ValueError, match=r"Invalid padding_mask: row 0 is \[1, 0, 1, 0\]"):
            lm.generate({"token_ids": ids, "padding_mask": np.array([[1, 0, 1, 0]], bool)},
                        stop_token_ids=None)
        out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        np.testing.assert_array_equal(numpy(out["token_ids"])[:, :3], ids[:, :3])
    finally:
        lm.preprocessor = preprocessor


def test_generate_takes_a_bytes_prompt(lm):
    """[10] `generate(b"\\xffab")` raised `IndexError: tuple index out of range` (keras-hub
    took the bytes for a batch). A bytes prompt is one prompt of raw bytes: the same as
    generating from its token ids [start, 255, 97, 98]."""
    lm.compile(sampler="greedy", jit_compile=False)
    text = lm.generate(b"\xffab", max_length=10)
    assert isinstance(text, str) and text.startswith("\ufffdab")
    assert lm.generate([b"\xffab"], max_length=10) == [text]
    inputs = lm.preprocessor.generate_preprocess([b"\xffab"], sequence_length=10)
    preprocessor, lm.preprocessor = lm.preprocessor, None
    try:
        ids = lm.generate({k: numpy(v) for k, v in inputs.items()}, stop_token_ids=[258])
    finally:
        lm.preprocessor = preprocessor
    assert lm.preprocessor.generate_postprocess(ids) == [text]
