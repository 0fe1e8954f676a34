"""Bad input is refused by name: a `ValueError` naming the argument, its value and what is
allowed, raised before the math (constructors, call arguments, streaming and generation).

Every case here gave a silent wrong answer or an anonymous backend error before.
"""

import math

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_infini import CompressiveMemory
from keras_infini import InfiniTransformer
from keras_infini import MoDInfiniTransformer
from keras_infini.streaming import Streamer
from keras_infini.streaming import generate
from keras_infini.validation import MAX_SIZE

D, HID, H, DK, DV, S = 8, 12, 2, 4, 3, 4


def cm(**kwargs):
    args = dict(dim_input=D, dim_key=DK, dim_value=DV, num_heads=H, segment_len=S)
    args.update(kwargs)
    return CompressiveMemory(**args)


def block(cls=InfiniTransformer, **kwargs):
    args = dict(dim_input=D, dim_hidden=HID, dim_key=DK, dim_value=DV, num_heads=H,
                activation="gelu", segment_len=S)
    if cls is MoDInfiniTransformer:
        args["sampling_factor"] = 2
    args.update(kwargs)
    return cls(**args)


def normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# --------------------------------------------------------------------------- constructors
@pytest.mark.parametrize("name", ["causal", "init_state_learnable", "return_state"])
@pytest.mark.parametrize("value", ["False", "no", 0, 1, 2, None])
def test_booleans_must_be_booleans(name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}="):
        cm(**{name: value})


@pytest.mark.parametrize("cls", [InfiniTransformer, MoDInfiniTransformer])
@pytest.mark.parametrize("name", ["causal", "normalize_first", "init_state_learnable"])
def test_block_booleans_must_be_booleans(cls, name):
    for value in ("False", 2):
        with pytest.raises(ValueError, match=f"Invalid {name}="):
            block(cls, **{name: value})


def test_numpy_booleans_are_booleans():
    layer = cm(causal=np.bool_(True))
    assert layer.causal is True and layer.get_config()["causal"] is True


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 0.0])
def test_layer_norm_epsilon_must_be_finite_and_positive(value):
    with pytest.raises(ValueError, match="Invalid layer_norm_epsilon="):
        block(layer_norm_epsilon=value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5])
def test_router_loss_weight_must_be_finite_and_non_negative(value):
    with pytest.raises(ValueError, match="Invalid router_loss_weight="):
        block(MoDInfiniTransformer, router_loss_weight=value)


@pytest.mark.parametrize("value", [math.nan, math.inf, 1.0, S])
def test_sampling_factor_rules(value):
    with pytest.raises(ValueError, match="Invalid sampling_factor="):
        block(MoDInfiniTransformer, sampling_factor=value)


@pytest.mark.parametrize("value", [math.nan, math.inf, 1.0])
def test_dropout_must_be_a_rate(value):
    with pytest.raises(ValueError, match="Invalid dropout="):
        block(dropout=value)


@pytest.mark.parametrize("name", ["num_heads", "dim_key", "dim_value", "segment_len"])
def test_absurd_sizes_are_refused_at_construction(name):
    """`2**40` heads ended as a backend out-of-memory error."""
    with pytest.raises(ValueError, match=f"Invalid {name}=.*<= {MAX_SIZE}"):
        cm(**{name: 2**40})
    with pytest.raises(ValueError, match=f"Invalid {name}="):
        block(**{name: 2**40})


def test_update_must_be_known():
    with pytest.raises(ValueError, match="Invalid update='Delta'"):
        cm(update="Delta")


def test_unknown_width_with_dim_input_none_is_named():
    """Was `TypeError: int(None)`."""
    layer = block(dim_input=None)
    with pytest.raises(ValueError, match="dim_input=None"):
        layer.build((None, None, None))


# --------------------------------------------------------------------------- call arguments
@pytest.mark.parametrize("shape", [(2, 2 * S + 1), (2, 2 * S - 1), (2, 2 * S, 1), (2 * S,),
                                   (3, 2 * S)])
@pytest.mark.parametrize("make", [cm, block, lambda **kw: block(MoDInfiniTransformer, **kw)])
def test_mask_of_the_wrong_shape_is_refused(shape, make):
    """Shorter masks were accepted (the tail treated as masked); others failed in reshape."""
    layer = make()
    with pytest.raises(ValueError, match=r"Invalid mask with shape"):
        layer(normal((2, 2 * S, D)), mask=np.ones(shape, bool))


@pytest.mark.parametrize("shape", [(2, 2 * S - 1), (2, 2 * S + 1), (2 * S,), (2, 2 * S, 1)])
def test_positions_of_the_wrong_shape_are_refused(shape):
    layer = cm(positional_embedder="rope")
    with pytest.raises(ValueError, match=r"Invalid positions with shape"):
        layer(normal((2, 2 * S, D)), positions=np.zeros(shape, "int32"))


def test_fractional_float_positions_keep_their_fraction():
    """Were truncated to integers."""
    layer = cm(positional_embedder="rope", causal=True)
    x = normal((1, S, D))
    half = np.array([[0.0, 1.5, 2.0, 3.0]], "float32")
    whole = np.array([[0.0, 1.0, 2.0, 3.0]], "float32")
    a, b = to_numpy(layer(x, positions=half)), to_numpy(layer(x, positions=whole))
    assert np.abs(a - b)[0, 1:].max() > 1e-4
    np.testing.assert_allclose(to_numpy(layer(x, positions=whole.astype("int32"))), b,
                               atol=1e-6)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_initial_state_is_checked_by_name(update):
    layer = cm(update=update)
    x = normal((2, 2 * S, D))
    memory = np.zeros((2, H, DK, DV), "float32")
    norm = np.zeros((2, H, DK), "float32")
    bad = [
        np.zeros((1, H, DK, DV), "float32"),  # batch 1: broadcast with linear, failed delta
        np.zeros((3, H, DK, DV), "float32"),
        np.zeros((2, H, DK + 1, DV), "float32"),
        np.zeros((2, H, DK), "float32"),
    ]
    for memory_bad in bad:
        with pytest.raises(ValueError, match="Invalid initial_state: memory has shape"):
            layer(x, initial_state=(memory_bad, norm))
    with pytest.raises(ValueError, match="Invalid initial_state: norm has shape"):
        layer(x, initial_state=(memory, np.zeros((2, H), "float32")))
    for structure in (memory, (memory,), [memory, norm, norm]):
        with pytest.raises(ValueError, match="Invalid initial_state="):
            layer(x, initial_state=structure)


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("make", [cm, block, lambda **kw: block(MoDInfiniTransformer, **kw)])
def test_length_zero_gives_an_empty_output(update, make):
    """delta raised IndexError on JAX and torch."""
    layer = make(update=update, return_state=True)
    out, memory, norm = layer(np.zeros((2, 0, D), "float32"))
    assert tuple(out.shape) == (2, 0, D)
    assert tuple(memory.shape) == (2, H, DK, DV) and tuple(norm.shape) == (2, H, DK)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_short_input_is_not_padded_to_a_huge_segment(update):
    """`segment_len=65536` on an 8-token input padded to a full segment and allocated 2^32
    scores; one segment covering the input now does the work of its real length."""
    small = cm(update=update, causal=True, segment_len=8, return_state=True)
    huge = cm(update=update, causal=True, segment_len=65536, return_state=True)
    small.build((None, None, D))
    huge.build((None, None, D))
    huge.set_weights(small.get_weights())
    x = normal((2, 8, D))
    for got, want in zip(huge(x), small(x)):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- streaming
def infini(**kwargs):
    return block(causal=True, positional_embedder="rope", **kwargs)


def test_streamer_walks_nested_models():
    """A nested Sequential's stateful layers were silently run without state (streamed
    output differed from one call by 0.5-0.8)."""
    model = keras.Sequential([keras.Input((None, D)), infini(),
                              keras.Sequential([infini(update="delta")])])
    x = normal((2, 5 * S + 1, D))
    whole = to_numpy(model(x))
    streamer = Streamer(model)
    parts = [to_numpy(streamer(x[:, i:i + 2 * S])) for i in range(0, x.shape[1], 2 * S)]
    assert len(streamer.states) == 2
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-5, atol=1e-5)


def test_streamer_refuses_stateful_layers_it_cannot_reach():
    class Wrapper(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = infini()

        def call(self, x):
            return self.inner(x)

        def compute_output_shape(self, shape):
            return shape

    model = keras.Sequential([keras.Input((None, D)), Wrapper(name="wrapper"), infini()])
    with pytest.raises(ValueError, match="'wrapper'.*cannot carry their state"):
        Streamer(model)


def test_streamer_carries_keras_masks_through_a_list_of_layers():
    """Masks were dropped with a list of layers (differences up to 2.6)."""
    embedding = keras.layers.Embedding(11, D, mask_zero=True)
    layers = [embedding, infini(), keras.layers.Dense(11)]
    tokens = np.random.default_rng(0).integers(1, 11, size=(2, 3 * S))
    tokens[0, [2, 5, 9]] = 0
    tokens[1, 4 * 0 + 3] = 0
    inp = keras.Input((None,), dtype="int32")
    h = inp
    for layer in layers:
        h = layer(h)
    model = keras.Model(inp, h)
    whole = to_numpy(model(tokens))
    streamer = Streamer(layers)
    parts = [to_numpy(streamer(tokens[:, i:i + S])) for i in range(0, 3 * S, S)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-5, atol=1e-5)


def test_streamer_accepts_functional_models_with_mask_zero():
    """Refused with a misleading "layers do not form a single chain"."""
    inp = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(11, D, mask_zero=True)(inp)
    h = infini()(h)
    h = infini(update="delta")(h)
    model = keras.Model(inp, keras.layers.Dense(11)(h))
    tokens = np.random.default_rng(1).integers(0, 11, size=(2, 3 * S + 2))
    whole = to_numpy(model(tokens))
    streamer = Streamer(model)
    parts = [to_numpy(streamer(tokens[:, i:i + S])) for i in range(0, tokens.shape[1], S)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-5, atol=1e-5)


def lm(causal=True):
    return keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(13, D),
        block(causal=causal, positional_embedder="rope"),
        keras.layers.Dense(13),
    ])


def test_generate_refuses_a_non_causal_model():
    """Returned tokens that differed from a full re-run."""
    with pytest.raises(ValueError, match="causal=False"):
        generate(lm(causal=False), np.ones((1, 3), "int32"), steps=2)


@pytest.mark.parametrize("pad_id", [13, 10**6, -1])
def test_generate_refuses_an_out_of_vocabulary_pad_id(pad_id):
    """JAX looked up NaN for an out-of-range id and silently produced other tokens."""
    with pytest.raises(ValueError, match=f"Invalid pad_id={pad_id}"):
        generate(lm(), np.ones((1, 3), "int32"), steps=2, pad_id=pad_id)


def test_generate_refuses_out_of_vocabulary_prompts():
    with pytest.raises(ValueError, match="Invalid prompt: token ids"):
        generate(lm(), np.array([[1, 20]], "int32"), steps=2)


def test_generate_refuses_top_k_larger_than_the_vocabulary():
    """Was `IndexError: index -1000`."""
    with pytest.raises(ValueError, match="Invalid top_k=1000"):
        generate(lm(), np.ones((1, 3), "int32"), steps=2, top_k=1000)
