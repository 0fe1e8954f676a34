"""Keras-native weight arguments: initializers, regularizers and constraints reach every
projection (each sublayer its own clone), serialise, and torch's jit_compile runs eagerly."""

import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import to_numpy

from keras_infini import CompressiveMemory
from keras_infini import InfiniTransformer
from keras_infini import MoDInfiniTransformer

D, HID, H, DK, DV, S = 8, 12, 2, 4, 3, 4


def make(kind, **kwargs):
    if kind == "cm":
        return CompressiveMemory(D, DK, DV, H, S, **kwargs)
    if kind == "infini":
        return InfiniTransformer(D, HID, DK, DV, H, "gelu", S, **kwargs)
    return MoDInfiniTransformer(D, HID, DK, DV, H, "gelu", S, sampling_factor=2, **kwargs)


def projections(layer):
    attention = layer if isinstance(layer, CompressiveMemory) else layer.attention
    kernels = [attention.query_dense, attention.key_dense, attention.value_dense,
               attention.output_dense]
    if isinstance(layer, CompressiveMemory):
        return kernels, []
    dense = [layer.mlp_in, layer.mlp_out]
    if isinstance(layer, MoDInfiniTransformer):
        dense.append(layer.router)
    return kernels + dense, dense


@pytest.mark.parametrize("kind", ["cm", "infini", "mod"])
def test_initializers_reach_every_projection(kind):
    """Were refused (`kernel_initializer` was an unexpected keyword)."""
    layer = make(kind, kernel_initializer=keras.initializers.Constant(0.25),
                 bias_initializer="ones") if kind != "cm" else make(
        kind, kernel_initializer=keras.initializers.Constant(0.25))
    layer.build((None, None, D))
    kernels, with_bias = projections(layer)
    for sub in kernels:
        np.testing.assert_array_equal(to_numpy(sub.kernel), 0.25)
    for sub in with_bias:
        np.testing.assert_array_equal(to_numpy(sub.bias), 1.0)


@pytest.mark.parametrize("kind", ["cm", "infini", "mod"])
def test_seeded_initializer_gives_each_projection_its_own_clone(kind):
    layer = make(kind, kernel_initializer=keras.initializers.GlorotUniform(seed=3))
    layer.build((None, None, D))
    kernels, _ = projections(layer)
    q, k = to_numpy(kernels[0].kernel), to_numpy(kernels[1].kernel)
    assert q.shape == k.shape
    # Same seed, same shape: clones draw the same values, as Keras' MultiHeadAttention.
    np.testing.assert_array_equal(q, k)


@pytest.mark.parametrize("kind", ["cm", "infini", "mod"])
def test_regularizers_add_losses_and_config_round_trips(kind):
    args = dict(kernel_regularizer=keras.regularizers.L2(0.1),
                kernel_constraint=keras.constraints.MaxNorm(2.0))
    if kind != "cm":
        args["bias_regularizer"] = "l1"
    layer = make(kind, **args)
    layer.build((None, None, D))
    kernels, with_bias = projections(layer)
    assert len(layer.losses) == len(kernels) + len(with_bias)
    for sub in kernels:
        assert isinstance(sub.kernel_constraint, keras.constraints.MaxNorm)
    config = layer.get_config()
    assert config["kernel_regularizer"]["config"]["l2"] == pytest.approx(0.1)
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


def test_bad_initializer_is_named():
    with pytest.raises(ValueError, match="Invalid kernel_initializer='no_such_init'"):
        make("cm", kernel_initializer="no_such_init")


def test_torch_jit_compile_runs_eagerly_with_a_warning():
    """torch's dynamo recompiled these layers until its limit (96 s first step); Keras now
    proceeds with jit_compile=False and says so. Other backends compile."""
    model = keras.Sequential([keras.Input((2 * S, D)), make("infini", causal=True)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(optimizer="adam", loss="mse", jit_compile=True)
    if BACKEND == "torch":
        assert model.jit_compile is False
        assert any("jit_compile" in str(w.message) for w in caught)
    else:
        assert model.jit_compile is True
    x = np.random.default_rng(0).normal(size=(4, 2 * S, D)).astype("float32")
    history = model.fit(x, x, epochs=1, batch_size=2, verbose=0).history["loss"]
    assert np.isfinite(history).all()
