"""Converting pretrained keras-hub decoders (Llama, Llama 3, Mistral, Qwen, Qwen3, Gemma) to
Infini-attention: exact at conversion, exact per segment with the memory closed, exact
cached decoding, presets (also across backends), the closed gate trains, refusals."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

from conftest import BACKEND, gradients, to_numpy  # noqa: E402
from keras_infini.models import InfiniBackbone  # noqa: E402
from keras_infini.models import InfiniCausalLM  # noqa: E402
from keras_infini.models import InfiniDecoderBackbone  # noqa: E402
from keras_infini.models import InfiniDecoderCausalLM  # noqa: E402

VOCAB, HIDDEN, HEADS = 37, 16, 4
FAMILIES = ("llama", "llama3", "mistral", "qwen", "qwen3", "gemma")
TIEABLE = ("llama", "llama3", "qwen", "qwen3")  # gemma is always tied, mistral never


def source_lm(family, kv_heads=2, tie=False, num_layers=2, seed=0, **extra):
    """A tiny random keras-hub CausalLM of `family`, norm scales and biases randomised
    (so a missed or misplaced weight shows)."""
    keras.utils.set_random_seed(seed)
    common = dict(vocabulary_size=VOCAB, num_layers=num_layers, hidden_dim=HIDDEN,
                  num_query_heads=HEADS, num_key_value_heads=kv_heads)
    if family in ("llama", "llama3"):
        cls, task = keras_hub.models.LlamaBackbone, keras_hub.models.LlamaCausalLM
        args = dict(intermediate_dim=24, tie_word_embeddings=tie)
        if family == "llama3":
            cls, task = keras_hub.models.Llama3Backbone, keras_hub.models.Llama3CausalLM
            args.update(rope_max_wavelength=500000, rope_frequency_adjustment_factor=8.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_pretraining_sequence_length=16)
    elif family == "mistral":
        cls, task = keras_hub.models.MistralBackbone, keras_hub.models.MistralCausalLM
        args = dict(intermediate_dim=24, sliding_window=64, rope_max_wavelength=1000)
    elif family == "qwen":
        cls, task = keras_hub.models.QwenBackbone, keras_hub.models.QwenCausalLM
        args = dict(intermediate_dim=24, tie_word_embeddings=tie)
    elif family == "qwen3":
        cls, task = keras_hub.models.Qwen3Backbone, keras_hub.models.Qwen3CausalLM
        args = dict(intermediate_dim=24, head_dim=8, tie_word_embeddings=tie)
    else:
        cls, task = keras_hub.models.GemmaBackbone, keras_hub.models.GemmaCausalLM
        args = dict(intermediate_dim=48, head_dim=8)
    args.update(extra)
    backbone = cls(**common, **args)
    rng = np.random.default_rng(seed + 1)
    for variable in backbone.weights:
        if variable.path.endswith("scale") or variable.path.endswith("bias"):
            base = 1.0 if variable.path.endswith("scale") and family != "gemma" else 0.0
            variable.assign(base + rng.normal(0, 0.3, variable.shape).astype("float32"))
    return task(backbone=backbone, preprocessor=None)


def batch(length, rows=2, seed=0, pad=0):
    ids = np.random.default_rng(seed).integers(1, VOCAB, (rows, length)).astype("int32")
    mask = np.ones_like(ids)
    if pad:
        mask[-1, length - pad:] = 0
    return {"token_ids": ids, "padding_mask": mask}


def assert_close(got, want, rtol=1e-5):
    got, want = to_numpy(got), to_numpy(want)
    scale = np.abs(want).max()
    np.testing.assert_array_less(np.abs(got - want).max(), rtol * scale + 1e-12)


CASES = [(f, kv, False) for f in FAMILIES for kv in (4, 2, 1)] + \
    [(f, 2, True) for f in TIEABLE]


@pytest.mark.parametrize("family,kv_heads,tie", CASES)
def test_converted_logits_equal_the_source(family, kv_heads, tie):
    source = source_lm(family, kv_heads, tie)
    converted = InfiniCausalLM.from_causal_lm(source, segment_len=16)
    assert isinstance(converted, InfiniDecoderCausalLM)
    assert converted.backbone.num_key_value_heads == kv_heads
    data = batch(12, pad=3)
    want, got = source(data), converted(data)
    valid = data["padding_mask"].astype(bool)
    assert_close(to_numpy(got)[valid], to_numpy(want)[valid])
    # Every gate starts exactly closed.
    for block in converted.backbone.transformer_layers:
        np.testing.assert_array_equal(to_numpy(block.attention.gate_values()), 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_memory_with_short_segments_equals_the_source_on_each_segment(family):
    source = source_lm(family, kv_heads=2)
    converted = InfiniCausalLM.from_causal_lm(source, segment_len=4)
    data = batch(12)
    got = to_numpy(converted(data))
    for start in range(0, 12, 4):
        part = {k: v[:, start:start + 4] for k, v in data.items()}
        assert_close(got[:, start:start + 4], source(part))


def open_memory(lm, seed=3):
    """Random gates and write strengths, so that the memory changes the outputs."""
    rng = np.random.default_rng(seed)
    for block in lm.backbone.transformer_layers:
        attention = block.attention
        attention.gate.assign(rng.uniform(0.02, 0.08, attention.gate.shape).astype("float32"))
        kernel = attention.beta_dense.kernel
        kernel.assign(rng.normal(0, 2.0, kernel.shape).astype("float32"))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_one_full_call(family):
    source = source_lm(family, kv_heads=2)
    converted = InfiniCausalLM.from_causal_lm(source, segment_len=4)
    open_memory(converted)
    data = batch(11)
    full = to_numpy(converted(data))
    closed = to_numpy(InfiniCausalLM.from_causal_lm(source, segment_len=4)(data))
    assert np.abs(full - closed).max() > 1e-3  # the memory matters here
    cache = converted.build_cache(2)
    ids = data["token_ids"]
    logits, _, cache = converted.call_with_cache(ids[:, :5], cache, 0)
    steps = [to_numpy(logits)]
    for index in range(5, 11):
        logits, _, cache = converted.call_with_cache(ids[:, index:index + 1], cache, index)
        steps.append(to_numpy(logits))
    assert_close(np.concatenate(steps, axis=1), full)


@pytest.mark.parametrize("family", ("llama3", "gemma"))
def test_greedy_generate_gives_the_source_tokens(family):
    source = source_lm(family, kv_heads=2, num_layers=1)
    converted = InfiniCausalLM.from_causal_lm(source, segment_len=16)
    source.compile(sampler="greedy")
    converted.compile(sampler="greedy")
    prompt = batch(10, pad=4)
    prompt["padding_mask"][0, 6:] = 0  # rows of 6 and 6 tokens, right-padded
    prompt["padding_mask"][1, 6:] = 0
    want = source.generate(prompt, max_length=10, stop_token_ids=None)
    got = converted.generate(prompt, max_length=10, stop_token_ids=None)
    np.testing.assert_array_equal(to_numpy(got["token_ids"]), to_numpy(want["token_ids"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_preset_round_trip_is_exact(family, tmp_path):
    converted = InfiniCausalLM.from_causal_lm(source_lm(family, kv_heads=2), segment_len=4)
    open_memory(converted)
    data = batch(9)
    want = to_numpy(converted(data))
    converted.save_to_preset(str(tmp_path))
    loaded = InfiniCausalLM.from_preset(str(tmp_path))
    assert isinstance(loaded, InfiniDecoderCausalLM)
    assert type(InfiniBackbone.from_preset(str(tmp_path))) is InfiniDecoderBackbone
    np.testing.assert_array_equal(to_numpy(loaded(data)), want)


_LOAD_ELSEWHERE = """
import json, sys, numpy as np, keras
from keras_infini.models import InfiniCausalLM
lm = InfiniCausalLM.from_preset(sys.argv[1])
data = {k: np.asarray(v, dtype="int32") for k, v in json.loads(sys.argv[2]).items()}
np.save(sys.argv[3], keras.ops.convert_to_numpy(lm(data)))
"""


@pytest.mark.parametrize("family", ("llama3", "qwen3", "gemma"))
def test_preset_loads_on_another_backend(family, tmp_path):
    converted = InfiniCausalLM.from_causal_lm(source_lm(family, kv_heads=2), segment_len=4)
    open_memory(converted)
    data = batch(9)
    want = to_numpy(converted(data))
    converted.save_to_preset(str(tmp_path / "preset"))
    other = {"jax": "torch", "torch": "tensorflow", "tensorflow": "jax"}[BACKEND]
    env = dict(os.environ, KERAS_BACKEND=other)
    out = str(tmp_path / "logits.npy")
    arguments = json.dumps({k: v.tolist() for k, v in data.items()})
    subprocess.run([sys.executable, "-c", _LOAD_ELSEWHERE, str(tmp_path / "preset"),
                    arguments, out], check=True, env=env, capture_output=True, timeout=300)
    assert_close(np.load(out), want)


def test_closed_gate_is_trainable_and_freezing_keeps_the_source_weights():
    source = source_lm("llama3", kv_heads=2, num_layers=1)
    converted = InfiniCausalLM.from_causal_lm(source, segment_len=4)
    trainable = converted.freeze_pretrained()
    attention = converted.backbone.transformer_layers[0].attention
    ids = {k: v for k, v in batch(12).items()}
    assert any(v is attention.gate for v in trainable)
    assert not any(v is attention.query_dense.kernel for v in trainable)

    def loss():
        logits = converted(ids)
        return keras.ops.mean(keras.ops.square(keras.ops.cast(logits, "float32")))

    (grad,) = gradients(loss, [attention.gate])
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0  # not sigmoid(-100)
    before = {v.path: to_numpy(v) for v in converted.weights}
    converted.compile(optimizer=converted.memory_optimizer(1e-2, weight_decay=0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = batch(12, rows=4)
    y = np.roll(x["token_ids"], -1, axis=1)
    converted.fit(x, y, epochs=2, batch_size=4, verbose=0)
    changed = {v.path for v in converted.weights
               if not np.array_equal(before[v.path], to_numpy(v))}
    new = {v.path for v in converted.backbone.memory_variables()}
    assert attention.gate.path in changed
    assert changed <= new, sorted(changed - new)


def test_refusals():
    gpt2 = keras_hub.models.GPT2Backbone(vocabulary_size=VOCAB, num_layers=1, num_heads=2,
                                         hidden_dim=8, intermediate_dim=16, max_sequence_length=32)
    with pytest.raises(ValueError, match="GPT2Backbone"):
        InfiniBackbone.from_backbone(gpt2, segment_len=8)
    mistral = source_lm("mistral", sliding_window=8).backbone
    with pytest.raises(ValueError, match="segment_len=16.*sliding attention window of 8"):
        InfiniBackbone.from_backbone(mistral, segment_len=16)
    InfiniBackbone.from_backbone(mistral, segment_len=8)  # within the window
    capped = source_lm("gemma", attention_logit_soft_cap=50.0).backbone
    with pytest.raises(ValueError, match="attention_logit_soft_cap"):
        InfiniBackbone.from_backbone(capped, segment_len=8)
    llama = source_lm("llama").backbone
    with pytest.raises(ValueError, match="memory_gates"):
        InfiniBackbone.from_backbone(llama, segment_len=8, memory_gates="tanh")
    with pytest.raises(ValueError, match="segment_len"):
        InfiniBackbone.from_backbone(llama, segment_len=0)
    with pytest.raises(ValueError, match="num_key_value_heads=3.*num_heads=4"):
        InfiniDecoderBackbone("llama", VOCAB, 1, HIDDEN, 24, 4, 3, 4, segment_len=8)
    with pytest.raises(ValueError, match="causal_lm"):
        InfiniCausalLM.from_causal_lm(llama, segment_len=8)


def test_freezing_keeps_lora_factors_and_memory_parameters():
    converted = InfiniCausalLM.from_causal_lm(source_lm("qwen", num_layers=1), segment_len=4)
    converted.backbone.enable_lora(rank=2)  # keras-hub's: freezes every other layer
    trainable = {v.path for v in converted.freeze_pretrained(trainable_layers=("final_norm",))}
    memory = {v.path for v in converted.backbone.memory_variables()}
    lora = {v.path for v in converted.weights if v.name.startswith("lora_kernel")}
    assert lora and memory <= trainable and lora <= trainable
    assert trainable == memory | lora | {converted.backbone.layer_norm.scale.path}
    assert {v.path for v in converted.trainable_weights} == trainable


def test_the_source_preprocessor_and_tokenizer_travel_with_the_model(tmp_path):
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "\u0120": 3, "\u0120a": 4, "\u0120b": 5,
             "ab": 6, "<|im_end|>": 7, "c": 8}
    tokenizer = keras_hub.models.QwenTokenizer(vocabulary=vocab,
                                               merges=["\u0120 a", "\u0120 b", "a b"])
    preprocessor = keras_hub.models.QwenCausalLMPreprocessor(tokenizer, sequence_length=8)
    source = source_lm("qwen", num_layers=1)
    source = keras_hub.models.QwenCausalLM(source.backbone, preprocessor)
    converted = InfiniCausalLM.from_causal_lm(source, segment_len=8)
    assert converted.preprocessor is preprocessor
    x, _, _ = preprocessor(["a b ab", "b"])  # eager (tf.data would need tensorflow-text)
    want = to_numpy(converted(x))
    converted.save_to_preset(str(tmp_path))
    loaded = InfiniCausalLM.from_preset(str(tmp_path))
    assert type(loaded.preprocessor) is keras_hub.models.QwenCausalLMPreprocessor
    np.testing.assert_array_equal(to_numpy(loaded.preprocessor.tokenizer("a b ab")),
                                  to_numpy(tokenizer("a b ab")))
    x_loaded, _, _ = loaded.preprocessor(["a b ab", "b"])
    np.testing.assert_array_equal(to_numpy(loaded(x_loaded)), want)


def test_layout_map_covers_every_converted_weight():
    converted = InfiniCausalLM.from_causal_lm(source_lm("qwen", num_layers=1), segment_len=4)
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"),
                                         [f"cpu:{i}" for i in range(4)])
    layout_map = InfiniDecoderBackbone.get_layout_map(mesh)
    for variable in converted.backbone.weights:  # Keras raises if two keys match
        layout = layout_map[variable.path]
        assert layout is not None, f"{variable.path} is not in the layout map"
        for axis, name in enumerate(layout.axes):  # 4 heads, 2 key/value heads: divide
            assert name != "model" or variable.shape[axis] % 2 == 0, variable.path
    assert tuple(layout_map["block_0/attention/key/kernel"].axes) == (None, "model", None)
    assert tuple(layout_map["block_0/mlp_down/kernel"].axes) == ("model", None)
