"""Tests of the FFN activation layers against float64 NumPy references."""

import math

import keras
import numpy as np
import pytest
from conftest import gradients
from conftest import to_numpy

from keras_infini import ACTIVATIONS
from keras_infini import get_activation
from keras_infini.layers import activations as act_module

NAMES = ("relu", "gelu", "abs", "silu", "swish", "swiglu", "geglu", "ffnglu", "ffngeglu",
         "ffnswiglu")
WEIGHTLESS = ("relu", "gelu", "abs", "silu")
WEIGHTED = tuple(n for n in NAMES if n not in WEIGHTLESS)
DIMS = (6, 7)  # inner widths 4 and 5; 7 is odd, so ceil(2 d / 3) != 2 d // 3


# ---------------------------------------------------------------- NumPy float64 reference
_erf = np.vectorize(math.erf, otypes=[np.float64])


def np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_swish(x, beta=1.0):
    return x * np_sigmoid(beta * x)


def _glu(gate):
    return lambda x, w: gate(x @ w["kernel_gate"] + w["bias_gate"], w) * (
        x @ w["kernel_value"] + w["bias_value"]
    )


def _ffn(gate):
    return lambda x, w: (gate(x @ w["kernel_gate"]) * (x @ w["kernel_value"])) @ w["kernel_out"]


NP_ACTIVATIONS = {
    "relu": lambda x, w: np.maximum(x, 0.0),
    "gelu": lambda x, w: np_gelu(x),
    "abs": lambda x, w: np.abs(x),
    "silu": lambda x, w: np_swish(x),
    "swish": lambda x, w: np_swish(x, w["beta"]),
    "swiglu": _glu(lambda t, w: np_swish(t, w["beta"])),
    "geglu": _glu(lambda t, w: np_gelu(t)),
    "ffnglu": _ffn(np_sigmoid),
    "ffngeglu": _ffn(np_gelu),
    "ffnswiglu": _ffn(np_swish),
}


def weight_shapes(name, d):
    """Pinned attribute name -> shape of every weight of activation `name` at width `d`."""
    inner = math.ceil(2 * d / 3)
    if name in ("swiglu", "geglu"):
        shapes = {"kernel_gate": (d, d), "bias_gate": (d,), "kernel_value": (d, d),
                  "bias_value": (d,)}
        return {**shapes, "beta": ()} if name == "swiglu" else shapes
    if name.startswith("ffn"):
        return {"kernel_gate": (d, inner), "kernel_value": (d, inner), "kernel_out": (inner, d)}
    return {"beta": ()} if name == "swish" else {}


def layer_weights(layer, name):
    """The layer's weights as float64 NumPy, read through the pinned attribute names."""
    return {attr: to_numpy(getattr(layer, attr)).astype(np.float64)
            for attr in weight_shapes(name, layer.dim)}


def randomize(layer, name, seed=0):
    """Non-trivial weights: beta 0.7, random kernels and biases."""
    rng = np.random.default_rng(seed)
    for attr, shape in weight_shapes(name, layer.dim).items():
        value = 0.7 if attr == "beta" else 0.5 * rng.standard_normal(shape)
        getattr(layer, attr).assign(np.asarray(value, "float32"))


def randn(*shape, seed=1, scale=1.5):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype("float32")


def built(name, d, shape=None):
    layer = get_activation(name, d)
    layer.build(shape or (None, d))
    randomize(layer, name)
    return layer


def check_values(layer, name, x, atol=2e-5, rtol=2e-5):
    want = NP_ACTIVATIONS[name](x.astype(np.float64), layer_weights(layer, name))
    got = to_numpy(layer(x))
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- values
def test_names_and_classes():
    assert ACTIVATIONS == NAMES
    assert tuple(act_module.ACTIVATION_CLASSES) == NAMES
    for name, cls in act_module.ACTIVATION_CLASSES.items():
        assert type(get_activation(name, 4)) is cls
        assert keras.saving.get_registered_name(cls) == f"keras_infini>{cls.__name__}"


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("name", NAMES)
def test_values_match_reference(name, d):
    check_values(built(name, d), name, randn(2, 3, d))


@pytest.mark.parametrize("name", NAMES)
def test_ranks_2_3_4(name):
    d = 5
    layer = built(name, d)
    for shape in ((4, d), (2, 3, d), (2, 2, 3, d)):
        check_values(layer, name, randn(*shape, seed=len(shape)))


def test_ffn_inner_width_is_ceil_two_thirds():
    cases = [(1, 1), (2, 2), (3, 2), (4, 3), (5, 4), (6, 4), (7, 5), (8, 6), (12, 8), (100, 67)]
    for name in ("ffnglu", "ffngeglu", "ffnswiglu"):
        for d, inner in cases:
            assert get_activation(name, d).inner_dim == inner == math.ceil(2 * d / 3)
        layer = get_activation(name, 5)
        layer.build((None, 5))  # built shapes at an odd width (6 and 7: shape test below)
        assert tuple(layer.kernel_gate.shape) == (5, 4) and tuple(layer.kernel_out.shape) == (4, 5)


def test_gelu_is_exact_not_tanh():
    x = np.linspace(-4, 4, 801, dtype="float32").reshape(1, -1)
    got = to_numpy(get_activation("gelu", x.shape[-1])(x)).astype(np.float64)
    exact, approx = np_gelu(x.astype(np.float64)), np_gelu_tanh(x.astype(np.float64))
    assert np.max(np.abs(exact - approx)) > 1e-4  # the two really differ on this grid
    np.testing.assert_allclose(got, exact, atol=1e-6)
    assert np.max(np.abs(got - approx)) > 1e-4
    assert got[0, 500] == pytest.approx(0.8413447460685429, abs=1e-6)  # gelu(1) = Phi(1)


@pytest.mark.parametrize("name", ("geglu", "ffngeglu"))
def test_gated_gelu_is_exact(name):
    """With identity-like kernels the gate sees x itself: compare to erf and tanh GELU."""
    d = 6
    layer = get_activation(name, d)
    layer.build((None, d))
    inner = layer.kernel_gate.shape[1]
    eye = np.eye(d, inner, dtype="float32")
    layer.kernel_gate.assign(eye)
    layer.kernel_value.assign(eye)
    if name == "ffngeglu":
        layer.kernel_out.assign(np.eye(inner, d, dtype="float32"))
    x = np.tile(np.linspace(-3, 3, 61, dtype="float32")[:, None], (1, d))
    got = to_numpy(layer(x)).astype(np.float64)[:, 0]
    x0 = x[:, 0].astype(np.float64)
    np.testing.assert_allclose(got, np_gelu(x0) * x0, atol=1e-5)
    assert np.max(np.abs(got - np_gelu_tanh(x0) * x0)) > 2e-4


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("name", NAMES)
def test_weight_shapes_and_initial_values(name, d):
    layer = get_activation(name, d)
    layer.build((None, d))
    shapes = weight_shapes(name, d)
    assert {v.path.split("/")[-1] for v in layer.weights} == set(shapes)
    assert len(layer.trainable_weights) == len(layer.weights) == len(shapes)
    for attr, shape in shapes.items():
        var = getattr(layer, attr)
        value = to_numpy(var)
        assert tuple(var.shape) == shape and value.dtype == np.float32, attr
        if attr == "beta":
            assert float(value) == 1.0
        elif attr.startswith("bias"):
            assert not value.any(), attr
        else:  # Glorot uniform: within the limit and not constant
            limit = math.sqrt(6.0 / (shape[0] + shape[1]))
            assert np.all(np.abs(value) <= limit + 1e-7) and np.std(value) > 0.1 * limit, attr


@pytest.mark.parametrize("name", WEIGHTED)
def test_gradients_match_finite_differences(name):
    """Autodiff gradients of every weight equal central differences of the float64 reference."""
    d = 5
    layer = built(name, d)
    x = randn(3, d)
    r = np.random.default_rng(2).standard_normal((3, d))
    variables = list(layer.trainable_weights)
    got = gradients(lambda: keras.ops.sum(layer(x) * keras.ops.convert_to_tensor(r, "float32")),
                    variables)
    w0 = layer_weights(layer, name)
    attrs = {id(getattr(layer, attr)): attr for attr in w0}

    def loss(w):
        return float(np.sum(NP_ACTIVATIONS[name](x.astype(np.float64), w) * r))

    eps = 1e-6
    for var, g in zip(variables, got):
        attr = attrs[id(var)]
        assert g is not None and g.shape == tuple(var.shape), attr
        want = np.zeros(var.shape)
        for idx in np.ndindex(*var.shape):
            plus, minus = dict(w0), dict(w0)
            plus[attr], minus[attr] = w0[attr].copy(), w0[attr].copy()
            plus[attr][idx] += eps
            minus[attr][idx] -= eps
            want[idx] = (loss(plus) - loss(minus)) / (2 * eps)
        assert np.abs(want).max() > 1e-3, attr
        np.testing.assert_allclose(g, want, atol=2e-4, rtol=1e-3, err_msg=attr)


@pytest.mark.parametrize("name", WEIGHTED)
def test_fit_one_step_updates_every_weight(name):
    d = 6
    model = keras.Sequential([keras.Input((3, d)), get_activation(name, d)])
    randomize(model.layers[0], name)
    before = [to_numpy(v).copy() for v in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(randn(4, 3, d), randn(4, 3, d, seed=3), epochs=1, batch_size=4, verbose=0)
    for v, b in zip(model.trainable_weights, before):
        assert np.abs(to_numpy(v) - b).max() > 1e-6, v.path


# ---------------------------------------------------------------- serialization
@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    d = 7
    layer = built(name, d)
    config = layer.get_config()
    assert config["dim"] == d
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    clone.build((None, d))
    clone.set_weights(layer.get_weights())
    x = randn(2, d)
    np.testing.assert_array_equal(to_numpy(clone(x)), to_numpy(layer(x)))
    again = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(again) is type(layer) and again.get_config() == config


@pytest.mark.parametrize("name", NAMES)
def test_keras_save_load(name, tmp_path):
    d = 6
    model = keras.Sequential([keras.Input((3, d)), get_activation(name, d)])
    randomize(model.layers[0], name)
    x = randn(2, 3, d)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[0]
    assert type(layer) is type(model.layers[0]) and layer.dim == d
    for attr in weight_shapes(name, d):
        np.testing.assert_array_equal(to_numpy(getattr(layer, attr)),
                                      to_numpy(getattr(model.layers[0], attr)))
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


# ---------------------------------------------------------------- factory and arguments
@pytest.mark.parametrize("name", NAMES)
def test_get_activation_returns_fresh_instances(name):
    a, b = get_activation(name, 4), get_activation(name, 4)
    assert a is not b and not a.built and not b.built
    a.build((None, 4))
    assert not b.built
    b.build((None, 4))
    assert all(va is not vb for va, vb in zip(a.weights, b.weights))


@pytest.mark.parametrize("bad", ["ReLU", "GELU", "Swish", "tanh", "swiglu ", "", "glu", None, 3,
                                 ["relu"], ACTIVATIONS[0].encode()])
def test_get_activation_bad_name(bad):
    with pytest.raises(ValueError, match="activation") as info:
        get_activation(bad, 4)
    message = str(info.value)
    assert repr(bad) in message
    assert all(name in message for name in NAMES)


@pytest.mark.parametrize("bad", [0, -3, 2.5, 4.0, "4", None, True, [4]])
@pytest.mark.parametrize("name", ("relu", "swish", "geglu", "ffnglu"))
def test_get_activation_bad_dim(name, bad):
    with pytest.raises(ValueError, match="dim") as info:
        get_activation(name, bad)
    assert repr(bad) in str(info.value)


def test_numpy_integer_dim_accepted():
    layer = get_activation("swiglu", np.int64(4))
    assert type(layer.dim) is int and layer.get_config()["dim"] == 4


@pytest.mark.parametrize("name", WEIGHTED)
def test_weighted_layers_require_dim(name):
    cls = act_module.ACTIVATION_CLASSES[name]
    for args in ((), (None,)):
        with pytest.raises(ValueError, match="dim=None"):
            cls(*args)


@pytest.mark.parametrize("name", WEIGHTLESS)
def test_weightless_layers_dim_optional(name):
    layer = act_module.ACTIVATION_CLASSES[name]()
    assert layer.dim is None and layer.get_config()["dim"] is None
    for d in (3, 8):  # any width, the config stays unbound
        x = randn(2, d)
        np.testing.assert_allclose(to_numpy(layer(x)), NP_ACTIVATIONS[name](x, {}), atol=1e-6)
    assert layer.get_config()["dim"] is None


@pytest.mark.parametrize("name", NAMES)
def test_unknown_kwarg_raises(name):
    with pytest.raises((TypeError, ValueError), match="bogus"):
        act_module.ACTIVATION_CLASSES[name](4, bogus=1)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_last_axis_raises_at_build(name):
    with pytest.raises(ValueError, match="dim=5"):
        get_activation(name, 5)(randn(2, 3, 4))
    with pytest.raises(ValueError, match="dim=5"):
        get_activation(name, 5)(keras.Input((3, 6)))
    with pytest.raises(ValueError, match="dim=5"):
        get_activation(name, 5).build((None, 4))


# ---------------------------------------------------------------- Keras integration
@pytest.mark.parametrize("name", NAMES)
def test_symbolic_dynamic_shapes_and_mask(name):
    d = 6
    layer = get_activation(name, d)
    assert layer.compute_output_shape((None, None, d)) == (None, None, d)
    inputs = keras.Input((None, d))
    outputs = layer(inputs)
    assert tuple(outputs.shape) == (None, None, d)
    model = keras.Model(inputs, outputs)
    x = randn(2, 5, d)
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), to_numpy(layer(x)),
                               atol=1e-6)
    mask = keras.ops.convert_to_tensor(np.array([[True, True, False]] * 2))
    assert layer.supports_masking
    np.testing.assert_array_equal(to_numpy(layer.compute_mask(randn(2, 3, d), mask)),
                                  to_numpy(mask))


@pytest.mark.parametrize("name", NAMES)
def test_mixed_bfloat16_policy(name):
    d = 6
    layer = get_activation(name, d)
    layer = type(layer).from_config({**layer.get_config(), "dtype": "mixed_bfloat16"})
    layer.build((None, d))
    randomize(layer, name)
    assert all(to_numpy(v).dtype == np.float32 for v in layer.weights)
    x = randn(4, d, scale=1.0)
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    want = NP_ACTIVATIONS[name](x.astype(np.float64), layer_weights(layer, name))
    got = to_numpy(keras.ops.cast(y, "float32"))
    np.testing.assert_allclose(got, want, atol=0.05 * max(1.0, np.abs(want).max()))


# ---------------------------------------------------------------- Keras names, callables
@pytest.mark.parametrize("name, keras_fn", [("relu", keras.activations.relu),
                                             ("gelu", keras.activations.gelu),
                                             ("silu", keras.activations.silu),
                                             ("silu", keras.activations.swish)])
def test_keras_names_are_keras_functions(name, keras_fn):
    x = randn(3, 5)
    ours = to_numpy(get_activation(name, 5)(x))
    np.testing.assert_allclose(ours, to_numpy(keras_fn(x)), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ours, NP_ACTIVATIONS[name](x.astype(np.float64), {}), atol=2e-6)


def test_silu_has_no_weights_and_swish_differs_once_beta_moves():
    silu = get_activation("silu", 4)
    silu.build((None, 4))
    assert silu.weights == [] and type(silu).__name__ == "SiLU"
    swish = built("swish", 4)  # beta = 0.7
    x = randn(2, 4)
    assert not np.allclose(to_numpy(swish(x)), to_numpy(silu(x)))


@keras.saving.register_keras_serializable(package="test_activations")
def _cube(x):
    return x * x * x


@pytest.mark.parametrize("fn, ref", [(keras.activations.tanh, np.tanh),
                                     (_cube, lambda x: x**3)])
def test_callable_activation_saves(fn, ref, tmp_path):
    layer = get_activation(fn, 4)
    assert type(layer) is act_module.ActivationFunction and layer.dim == 4
    x = randn(2, 3, 4, scale=0.5)
    np.testing.assert_allclose(to_numpy(layer(x)), ref(x.astype(np.float64)), atol=1e-6)
    config = layer.get_config()
    import json

    clone = act_module.ActivationFunction.from_config(json.loads(json.dumps(config)))
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(layer(x)), atol=0)
    model = keras.Sequential([keras.Input((3, 4)), get_activation(fn, 4)])
    path = str(tmp_path / "fn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), ref(x.astype(np.float64)),
                               atol=1e-6)


def test_infini_transformer_with_callable_activation_round_trips(tmp_path):
    from keras_infini import InfiniTransformer

    block = InfiniTransformer(8, 12, 4, 4, 2, keras.activations.tanh, segment_len=4)
    x = randn(2, 6, 8, scale=0.5)
    y = to_numpy(block(x))
    config = block.get_config()
    import json

    clone = InfiniTransformer.from_config(json.loads(json.dumps(config)))
    clone.build(x.shape)
    clone.set_weights(block.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), y, atol=1e-6)


@pytest.mark.parametrize("bad", [keras.layers.ReLU(), "silu "])
def test_layers_and_near_names_rejected(bad):
    with pytest.raises(ValueError, match="activation"):
        get_activation(bad, 4)
