"""Hostile inputs: a clear error or a correct result, never NaN or a silent wrong answer.

Covers sequence length 1, lengths that are not a multiple of the segment, fully masked rows,
batch sizes 1 and 0, large-magnitude float16 inputs to a float32 layer, a 1,000,000-token
stream whose normaliser grows large, integer inputs, wrong ranks and widths, and a
property-based test (hypothesis) of finiteness, causality and masking over random small
configurations.
"""

import time

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import to_numpy
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_infini import ACTIVATIONS
from keras_infini import CompressiveMemory
from keras_infini import InfiniTransformer
from keras_infini import MoDInfiniTransformer
from keras_infini import RoPEEmbeddings
from keras_infini import get_activation

B, D, HID, H, DK, DV, S = 2, 8, 12, 2, 4, 3, 4
KINDS = ("cm", "infini", "mod")


def make(kind, **kwargs):
    if kind == "cm":
        return CompressiveMemory(D, DK, DV, H, S, causal=True, positional_embedder="rope",
                                 **kwargs)
    if kind == "infini":
        return InfiniTransformer(D, HID, DK, DV, H, "swiglu", S, causal=True,
                                 positional_embedder="rope", **kwargs)
    return MoDInfiniTransformer(D, HID, DK, DV, H, "gelu", S, sampling_factor=2, causal=True,
                                positional_embedder="rope", **kwargs)


def built(kind, **kwargs):
    layer = make(kind, **kwargs)
    layer.build((None, None, D))
    rng = np.random.default_rng(3)
    attention = layer if kind == "cm" else layer.attention
    attention.gate.assign(rng.normal(size=(H,)).astype("float32"))  # memory and local both count
    if kind == "mod":  # a router that routes some tokens and skips others
        layer.router.kernel.assign(rng.normal(size=(D, 1)).astype("float32"))
    return layer


def normal(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype("float32")


def first(outputs):
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def assert_finite(x):
    x = to_numpy(x)
    assert np.all(np.isfinite(x)), "non-finite values"
    return x


# --------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("kind", KINDS)
def test_length_one_and_partial_segments_match_the_prefix(kind):
    """Causal layers: the output on a prefix equals the prefix of the output, whatever its
    length (1, or not a multiple of the segment: padding must not leak)."""
    layer = built(kind)
    x = normal((B, 3 * S + 1, D))
    full = assert_finite(layer(x))
    for length in (1, 2, S - 1, S + 1, 2 * S + 3):
        part = assert_finite(layer(x[:, :length]))
        assert part.shape == (B, length, D)
        np.testing.assert_allclose(part, full[:, :length], rtol=1e-5, atol=1e-5,
                                   err_msg=f"length {length}")


# --------------------------------------------------------------------------- masks
def test_fully_masked_rows_give_zero_attention_output():
    layer = built("cm")
    x = normal((3, 2 * S + 1, D))
    mask = np.ones((3, 2 * S + 1), bool)
    mask[0] = False  # a fully masked row
    mask[1, S:] = False  # a row masked from the second segment on
    y, memory, norm = layer(x, mask=mask, return_state=True)
    y = assert_finite(y)
    np.testing.assert_allclose(y[0], 0.0, atol=1e-6)  # nothing to attend, empty memory
    np.testing.assert_allclose(to_numpy(memory)[0], 0.0, atol=0)  # nothing written
    np.testing.assert_allclose(to_numpy(norm)[0], 0.0, atol=0)
    # The partly masked row's state holds only its first segment.
    _, memory_1, norm_1 = layer(x[1:2, :S], return_state=True)
    np.testing.assert_allclose(to_numpy(memory)[1], to_numpy(memory_1)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(norm)[1], to_numpy(norm_1)[0], rtol=1e-5, atol=1e-6)


def test_fully_masked_rows_with_learnable_state_are_finite():
    layer = built("cm", init_state_learnable=True)
    layer.initial_memory.assign(normal((H, DK, DV), seed=4))
    x = normal((2, 2 * S, D))
    mask = np.zeros((2, 2 * S), bool)
    y, memory, norm = layer(x, mask=mask, return_state=True)
    assert_finite(y)
    # Nothing is written: the state stays the learned initial state.
    np.testing.assert_allclose(to_numpy(memory)[0], to_numpy(layer.initial_memory), atol=0)
    np.testing.assert_allclose(to_numpy(norm)[1], to_numpy(layer.initial_norm), atol=0)


def test_fully_masked_rows_in_blocks():
    x = normal((2, 2 * S + 1, D))
    mask = np.ones((2, 2 * S + 1), bool)
    mask[0] = False
    # InfiniTransformer: a masked token's output is the block's output for a zero input
    # (the attention contributes 0, the MLP runs on it).
    block = built("infini")
    y = assert_finite(block(x, mask=mask))
    t = keras.ops.zeros_like(keras.ops.convert_to_tensor(x[:1]))
    want = t + block.mlp(block.mlp_norm(t))
    np.testing.assert_allclose(y[0], to_numpy(want)[0], rtol=1e-5, atol=1e-5)
    # MoD: masked tokens are never routed, so they pass through unchanged.
    mod = built("mod")
    for training in (False, True):
        y = assert_finite(mod(x, mask=mask, training=training))
        np.testing.assert_array_equal(y[0], x[0])


# --------------------------------------------------------------------------- batch
@pytest.mark.parametrize("kind", KINDS)
def test_batch_one_matches_a_row_of_a_batch(kind):
    layer = built(kind)
    x = normal((3, 2 * S + 3, D))
    full = assert_finite(layer(x))
    one = assert_finite(layer(x[1:2]))
    np.testing.assert_allclose(one, full[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_zero(kind):
    kwargs = dict(return_router_outputs=True) if kind == "mod" else {}
    layer = built(kind, **kwargs)
    x = np.zeros((0, 2 * S + 1, D), "float32")
    outputs = layer(x, return_state=True)
    y, memory, norm = outputs[0], outputs[-2], outputs[-1]
    assert tuple(y.shape) == (0, 2 * S + 1, D)
    assert tuple(memory.shape) == (0, H, DK, DV)
    assert tuple(norm.shape) == (0, H, DK)
    if kind == "mod":
        assert tuple(outputs[1].shape) == (0, 1)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("kind", KINDS)
def test_large_float16_inputs_to_float32_layer(kind):
    """Float16 inputs of magnitude ~1e4 are cast to float32: finite, equal to the float32
    input, and still causal (masked logits must lie below the huge real scores)."""
    layer = built(kind)
    x16 = normal((B, 2 * S + 1, D), scale=1e4).astype("float16")
    y = layer(x16)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    y = assert_finite(y)
    np.testing.assert_array_equal(y, to_numpy(layer(x16.astype("float32"))))
    t = S + 1
    x2 = x16.copy()
    x2[:, t] = -x2[:, t]
    y2 = assert_finite(layer(x2))
    np.testing.assert_allclose(y2[:, :t], y[:, :t], rtol=1e-6, atol=1e-6 * np.abs(y).max())
    assert np.abs(y2[:, t] - y[:, t]).max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_integer_inputs_are_cast(kind):
    layer = built(kind)
    x = np.random.default_rng(0).integers(-3, 4, size=(B, 2 * S + 1, D)).astype("int32")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    np.testing.assert_allclose(assert_finite(y), to_numpy(layer(x.astype("float32"))),
                               rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(B, D), (B, 3, 5, D), (B, 5, D + 1)],
                         ids=["rank2", "rank4", "width"])
def test_wrong_rank_or_width_raises_value_error(kind, shape):
    fresh = make(kind)
    with pytest.raises(ValueError):
        fresh(np.zeros(shape, "float32"))
    layer = built(kind)  # and after build, on every call
    with pytest.raises(ValueError):
        layer(np.zeros(shape, "float32"))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_width_mismatch_raises_value_error(name):
    layer = get_activation(name, D)
    layer(np.ones((2, 3, D), "float32"))
    if not layer.weights:  # weightless: any width is correct
        y = layer(np.ones((2, 3, D + 1), "float32"))
        assert tuple(y.shape) == (2, 3, D + 1)
        return
    with pytest.raises(ValueError):
        layer(np.ones((2, 3, D + 1), "float32"))


def test_rotary_width_mismatch_raises_value_error():
    rope = RoPEEmbeddings(DK, S)
    with pytest.raises(ValueError):
        rope(np.ones((2, 3, DK + 1), "float32"))


# --------------------------------------------------------------------------- long stream
STREAM_TOKENS = 1_000_000
STREAM_CHUNK = 65_536


def test_million_token_stream_stays_finite():
    """1,000,000 tokens in chunks of 65,536 through CompressiveMemory (linear, tiny dims)
    with the state carried: the normaliser reaches ~1e6 and every output stays finite; the
    final state equals the float64 sums over all tokens."""
    dim, heads, dk, dv, seg = 4, 1, 2, 2, 64
    layer = CompressiveMemory(dim, dk, dv, heads, seg, update="linear", causal=True)
    layer.build((None, None, dim))
    layer.gate.assign(np.array([2.0], "float32"))  # mostly memory retrieval
    wk = to_numpy(layer.key_dense.kernel).astype("float64")
    wv = to_numpy(layer.value_dense.kernel).astype("float64")
    rng = np.random.default_rng(0)
    state = None
    norm_sum = np.zeros((heads, dk))
    memory_sum = np.zeros((heads, dk, dv))
    start, done = time.perf_counter(), 0
    while done < STREAM_TOKENS:
        n = min(STREAM_CHUNK, STREAM_TOKENS - done)  # the last chunk: 16,960 = 265 segments
        x = (1.0 + 0.5 * rng.normal(size=(1, n, dim))).astype("float32")
        y, memory, norm = layer(x, initial_state=state, return_state=True)
        assert_finite(y)
        state = (memory, norm)
        k = np.einsum("bld,dhk->bhlk", x.astype("float64"), wk)
        sigma_k = np.where(k > 0, k + 1.0, np.exp(k))
        v = np.einsum("bld,dhv->bhlv", x.astype("float64"), wv)
        norm_sum += sigma_k.sum(axis=2)[0]
        memory_sum += np.einsum("bhlk,bhlv->bhkv", sigma_k, v)[0]
        done += n
    elapsed = time.perf_counter() - start
    print(f"{BACKEND}: {done} tokens streamed in {elapsed:.1f} s")
    norm = to_numpy(state[1])[0]
    assert norm.min() > 1e5  # the normaliser did grow large
    np.testing.assert_allclose(norm, norm_sum, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(state[0])[0], memory_sum, rtol=1e-4,
                               atol=1e-4 * np.abs(memory_sum).max())


# --------------------------------------------------------------------------- properties
@st.composite
def configurations(draw):
    dim_key = draw(st.integers(1, 4))
    config = dict(
        update=draw(st.sampled_from(["linear", "delta"])),
        causal=draw(st.booleans()),
        segment_len=draw(st.integers(1, 5)),
        num_heads=draw(st.integers(1, 3)),
        dim_key=dim_key,
        dim_value=draw(st.integers(1, 4)),
        dim_input=draw(st.integers(1, 6)),
        rope=dim_key >= 4 and draw(st.booleans()),
    )
    length = draw(st.integers(1, 12))
    batch = draw(st.integers(1, 2))
    use_mask = draw(st.booleans())
    mask = None
    if use_mask:
        mask = np.array(draw(st.lists(st.booleans(), min_size=batch * length,
                                      max_size=batch * length))).reshape(batch, length)
    position = draw(st.integers(0, length - 1))
    seed = draw(st.integers(0, 2**16))
    return config, length, batch, mask, position, seed


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")  # segment_len=1
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configurations())
def test_property_finite_causal_and_masked(case):
    """Finite outputs; perturbing token t leaves every earlier output unchanged (causal) or
    every output of earlier segments (non-causal); a masked token influences no other
    token."""
    config, length, batch, mask, t, seed = case
    rope = config.pop("rope")
    layer = CompressiveMemory(positional_embedder="rope" if rope else None, **config)
    d, seg = config["dim_input"], config["segment_len"]
    layer.build((None, None, d))
    layer.gate.assign(np.random.default_rng(seed).normal(size=(config["num_heads"],))
                      .astype("float32"))
    x = normal((batch, length, d), seed=seed)
    x2 = x.copy()
    x2[:, t] += normal((batch, d), seed=seed + 1, scale=3.0)
    # One call on both inputs (rows are independent): half the eager op compilations on JAX.
    both_mask = None if mask is None else np.concatenate([mask, mask])
    both = assert_finite(layer(np.concatenate([x, x2]), mask=both_mask))
    y, y2 = both[:batch], both[batch:]
    scale = 1e-5 * max(1.0, np.abs(y).max())
    unchanged = t if config["causal"] else (t // seg) * seg
    np.testing.assert_allclose(y2[:, :unchanged], y[:, :unchanged], rtol=1e-5, atol=scale)
    if mask is not None:
        for b in range(batch):
            if not mask[b, t]:  # a masked token is neither attended to nor memorised
                others = np.arange(length) != t
                np.testing.assert_allclose(y2[b, others], y[b, others], rtol=1e-5, atol=scale)


def test_mod_router_loss_of_an_empty_batch_is_zero():
    layer = built("mod")
    layer(np.zeros((0, 2 * S + 1, D), "float32"), training=True)
    assert len(layer.losses) == 1
    assert float(to_numpy(layer.losses[0])) == 0.0
