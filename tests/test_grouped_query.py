"""Grouped-query heads in CompressiveMemory, and the gate's parametrisation.

A layer with `num_key_value_heads = h / g` computes exactly what the multi-head layer
computes when each key/value head (and, with a memory per key/value head, its write
strength and decay) is repeated for its `g` query heads: that layer is checked against
float64 references elsewhere, so this pins the grouped layer to the same equations.
"""

import keras
import numpy as np
import pytest

from conftest import to_numpy
from keras_infini import CompressiveMemory
from keras_infini import InfiniTransformer
from keras_infini import MoDInfiniTransformer

D, DK, H, S = 12, 4, 4, 4

CONFIGS = [
    dict(update="linear"),
    dict(update="delta", positional_embedder="rope"),
    dict(update="delta", memory_feature_map="l2", write_strength="hard_sigmoid",
         memory_decay="coupled", gate_lr_scale=10.0),
    dict(update="delta", memory_feature_map="taylor", write_strength=True),
    dict(update="delta", memory_feature_map="l2", write_strength=True, memory_decay=True,
         memory_heads="query", memory_gate="tanh", gate_init=0.7, qkv_bias=True),
]


def expanded_weights(grouped, full, groups):
    """The grouped layer's weights with every key/value-head axis repeated `groups`
    times, in `full`'s variable order."""
    source = {v.path.split("/", 1)[1]: to_numpy(v) for v in grouped.weights}
    values = []
    for variable in full.weights:
        value = source[variable.path.split("/", 1)[1]]
        if tuple(value.shape) != tuple(variable.shape):
            axis = [i for i, (a, b) in enumerate(zip(value.shape, variable.shape)) if a != b][0]
            value = np.repeat(value, groups, axis=axis)
        values.append(value)
    return values


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_grouped_layer_equals_the_multi_head_layer_with_repeated_key_value_heads(
        config, kv_heads):
    causal = dict(causal=True, **config)
    grouped = CompressiveMemory(D, DK, DK, H, S, num_key_value_heads=kv_heads, name="g",
                                return_state=True, **causal)
    full = CompressiveMemory(D, DK, DK, H, S, name="f", return_state=True, **causal)
    x = np.random.default_rng(0).normal(size=(2, 3 * S + 1, D)).astype("float32")
    mask = np.ones((2, 3 * S + 1), bool)
    mask[1, -3:] = False
    y, memory, norm = grouped(x, mask=mask)
    full(x)
    full.set_weights(expanded_weights(grouped, full, H // kv_heads))
    for layer in (grouped, full):  # a gate that lets the memory in
        layer.gate.assign(np.array([0.3, -0.2, 0.5, 0.1], "float32"))
    y, memory, norm = grouped(x, mask=mask)
    want, want_memory, want_norm = full(x, mask=mask)
    np.testing.assert_allclose(to_numpy(y), to_numpy(want), atol=2e-5, rtol=1e-4)
    per_kv = config.get("memory_heads", "key_value") == "key_value"
    heads = kv_heads if per_kv else H
    assert tuple(memory.shape)[:2] == (2, heads)
    pick = slice(None, None, H // kv_heads) if per_kv else slice(None)
    np.testing.assert_allclose(to_numpy(memory), to_numpy(want_memory)[:, pick], atol=2e-5,
                               rtol=1e-4)
    np.testing.assert_allclose(to_numpy(norm), to_numpy(want_norm)[:, pick], atol=2e-5,
                               rtol=1e-4)


def test_grouped_heads_are_refused_unless_they_divide():
    with pytest.raises(ValueError, match="num_key_value_heads=3.*num_heads=4"):
        CompressiveMemory(D, DK, DK, H, S, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        CompressiveMemory(D, DK, DK, H, S, num_key_value_heads=0)
    with pytest.raises(ValueError, match="memory_heads"):
        CompressiveMemory(D, DK, DK, H, S, memory_heads="value")
    with pytest.raises(ValueError, match="memory_gate"):
        CompressiveMemory(D, DK, DK, H, S, memory_gate="relu")


def test_tanh_gate_at_zero_closes_the_memory_exactly():
    layer = CompressiveMemory(D, DK, DK, H, S, update="delta", causal=True,
                              memory_gate="tanh", positional_embedder="rope")
    x = np.random.default_rng(0).normal(size=(1, 3 * S, D)).astype("float32")
    y = to_numpy(layer(x))
    for start in range(0, 3 * S, S):  # every segment as if alone
        np.testing.assert_array_equal(y[:, start:start + S], to_numpy(layer(x[:, start:start + S])))
    layer.gate.assign(np.full((H,), 0.5, "float32"))
    np.testing.assert_allclose(to_numpy(layer.gate_values()), np.tanh(0.5), rtol=1e-6)
    assert np.abs(to_numpy(layer(x))[:, S:] - y[:, S:]).max() > 1e-3


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_gate_is_stored_in_float32_and_cannot_overflow(policy):
    keras.config.set_dtype_policy(policy)
    layer = CompressiveMemory(16, 8, 8, 2, 4, gate_init=[2.0, -1.0], gate_lr_scale=1e-4)
    layer(np.zeros((1, 4, 16), "float32"))
    assert keras.backend.standardize_dtype(layer.gate.dtype) == "float32"
    np.testing.assert_allclose(to_numpy(layer.gate_values()).astype("float32"),
                               [0.8808, 0.2689], atol=2e-3)
    for scale in (1e-39, 1e-5, 1e5, float("inf")):
        with pytest.raises(ValueError, match="gate_lr_scale"):
            CompressiveMemory(16, 8, 8, 2, 4, gate_init=[2.0, -1.0], gate_lr_scale=scale)
    with pytest.raises(ValueError, match="gate_init"):
        CompressiveMemory(16, 8, 8, 2, 4, gate_init=1e34, gate_lr_scale=1e-4)


def _model(kind, gate_init):
    options = dict(causal=True, gate_init=gate_init, update="delta")
    if kind == "cm":
        layer = CompressiveMemory(8, 4, 4, 2, 4, **options)
    elif kind == "block":
        layer = InfiniTransformer(8, 16, 4, 4, 2, "gelu", 4, **options)
    else:
        layer = MoDInfiniTransformer(8, 16, 4, 4, 2, "gelu", 4, 2.0, **options)
    inputs = keras.Input((8, 8))
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    return model, layer


@pytest.mark.parametrize("gate_init", [-3.0, [1.5, -0.5]], ids=["scalar", "per-head"])
@pytest.mark.parametrize("kind", ["cm", "block", "mod"])
def test_gate_initializer_gives_a_fresh_tensor_that_trains_assigns_and_reloads(
        kind, gate_init, tmp_path):
    model, layer = _model(kind, gate_init)
    attention = layer.attention if kind != "cm" else layer
    want = np.broadcast_to(np.asarray(gate_init, "float32"), (2,))
    np.testing.assert_allclose(to_numpy(attention.gate), want)
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(4, 8, 8)).astype("float32")
    model.fit(x, np.zeros((4, 8, 1), "float32"), epochs=1, verbose=0)
    assert not np.allclose(to_numpy(attention.gate), want)  # the gate trained
    model.set_weights(model.get_weights())
    attention.gate.assign(np.array([0.25, -0.25], "float32"))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded.predict(x, verbose=0)),
                               to_numpy(model.predict(x, verbose=0)), atol=1e-6)
