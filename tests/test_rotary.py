"""Tests of RoPEEmbeddings and YaRNEmbeddings against a float64 NumPy reference."""

import json
import math

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import to_numpy

from keras_infini import RoPEEmbeddings
from keras_infini import YaRNEmbeddings


# ---------------------------------------------------------------- NumPy float64 reference
def ref_theta(dim, pct=0.5, base=10000.0):
    d_rot = int(dim * pct)
    d_rot -= d_rot % 2
    return float(base) ** (-2.0 * np.arange(d_rot // 2) / d_rot)


def ref_yarn_theta(dim, context_len, context_len_ext, pct=0.5, base=10000.0, alpha=1.0,
                   beta=32.0):
    theta = ref_theta(dim, pct, base)
    s = context_len_ext / context_len
    r = context_len / (2 * math.pi / theta)
    gamma = np.clip((r - alpha) / (beta - alpha), 0.0, 1.0)
    return (1 - gamma) * theta / s + gamma * theta


def ref_mscale(context_len, context_len_ext, len_scale=None):
    return len_scale if len_scale is not None else 0.1 * math.log(context_len_ext / context_len) + 1


def ref_rotate(x, positions, theta, scale=1.0):
    """RoFormer eq. 34, interleaved pairs; positions broadcast against `x[..., 0]`."""
    x = np.asarray(x, np.float64)
    p = np.asarray(positions, np.float64)
    out = x.copy()
    for i, t in enumerate(theta):
        c, s = np.cos(p * t), np.sin(p * t)
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * c - b * s
        out[..., 2 * i + 1] = a * s + b * c
    return out * scale


def randn(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


# ---------------------------------------------------------------- RoPE values
@pytest.mark.parametrize(
    "dim, pct, base",
    [(8, 0.5, 10000), (7, 1.0, 10000), (9, 0.5, 500.0), (12, 0.25, 10000), (6, 1.0, 10.0),
     (5, 0.5, 10000), (2, 1.0, 10000)],
)
def test_rope_default_positions(dim, pct, base):
    layer = RoPEEmbeddings(dim, dim_embeddings_pct=pct, base=base, sequence_axis=-2)
    x = randn(2, 3, 6, dim)  # (batch, heads, seq, dim): positions 0..5 along axis -2
    out = to_numpy(layer(x))
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref_rotate(x, np.arange(6), ref_theta(dim, pct, base)),
                               atol=2e-6)
    np.testing.assert_allclose(layer.inv_freq, ref_theta(dim, pct, base), rtol=1e-15)
    assert layer.d_rot == len(ref_theta(dim, pct, base)) * 2


def test_rope_default_positions_beyond_one_digit():
    layer = RoPEEmbeddings(4, dim_embeddings_pct=1.0, sequence_axis=0)
    x = randn(600, 4)
    np.testing.assert_allclose(to_numpy(layer(x)),
                               ref_rotate(x, np.arange(600), ref_theta(4, 1.0)), atol=2e-6)


@pytest.mark.parametrize("dim, pct", [(8, 0.5), (7, 1.0), (10, 0.25)])
def test_rope_explicit_positions_broadcast_over_heads(dim, pct):
    layer = RoPEEmbeddings(dim, seq_len=5, dim_embeddings_pct=pct)
    q = randn(2, 5, 3, dim)  # (batch, seq, heads, dim)
    positions = np.random.default_rng(1).integers(0, 3000, size=(2, 5, 1)).astype("int32")
    out = to_numpy(layer(q, positions=positions))
    np.testing.assert_allclose(out, ref_rotate(q, positions, ref_theta(dim, pct)), atol=2e-6)


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_rope_positions_beyond_seq_len_and_negative(dtype):
    layer = RoPEEmbeddings(6, seq_len=4, dim_embeddings_pct=1.0)
    positions = np.array([4, 255, 256, 65535, 65536, 10**6, 2**31 - 1, -1, -300, -2**31],
                         dtype=dtype)
    x = randn(len(positions), 6)
    out = to_numpy(layer(x, positions=positions))
    np.testing.assert_allclose(out, ref_rotate(x, positions, ref_theta(6, 1.0)), atol=2e-6)


@pytest.mark.parametrize("max_position, high", [(1, 1), (200, 200), (256, 256), (257, 257),
                                                (65536, 65536), (70000, 70000)])
@pytest.mark.parametrize("cls", [RoPEEmbeddings, YaRNEmbeddings])
def test_max_position_same_values_with_fewer_digits(cls, max_position, high,
                                                   rope_digit_levels):
    """Positions in `[0, max_position)` (the edges included) rotate exactly as without the
    hint, with only the digit levels they need looked up."""
    kwargs = dict(context_len=64, context_len_ext=256) if cls is YaRNEmbeddings else {}
    layer = cls(6, dim_embeddings_pct=1.0, **kwargs)
    rng = np.random.default_rng(2)
    positions = np.concatenate([[0, high - 1], rng.integers(0, high, 30)]).astype("int32")
    x = randn(len(positions), 6)
    hinted = to_numpy(layer(x, positions=positions, max_position=max_position))
    full = to_numpy(layer(x, positions=positions))
    np.testing.assert_allclose(hinted, full, atol=1e-6)
    want = 1 if max_position <= 256 else 2 if max_position <= 65536 else 3
    assert rope_digit_levels == [want, 4]
    if cls is RoPEEmbeddings:
        np.testing.assert_allclose(hinted, ref_rotate(x, positions, ref_theta(6, 1.0)),
                                   atol=2e-6)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "256", np.float32(8.0)])
def test_max_position_must_be_a_positive_int(bad):
    layer = RoPEEmbeddings(6)
    with pytest.raises(ValueError, match=r"Invalid max_position=.*positive Python int"):
        layer(randn(4, 6), positions=np.arange(4), max_position=bad)


def test_rope_float_positions():
    layer = RoPEEmbeddings(6, seq_len=4, dim_embeddings_pct=1.0)
    positions = np.array([0.0, 0.5, 3.25, 1000.75, 65535.5, -2.5], dtype="float32")
    x = randn(6, 6)
    out = to_numpy(layer(x, positions=positions))
    np.testing.assert_allclose(out, ref_rotate(x, positions, ref_theta(6, 1.0)), atol=2e-6)


def test_accuracy_at_65536_vs_naive_float32():
    """Unit vectors rotated at positions up to 65536 vs the float64 reference."""
    dim = 16
    layer = RoPEEmbeddings(dim, seq_len=64, dim_embeddings_pct=1.0)
    rng = np.random.default_rng(2)
    positions = np.concatenate(
        [np.arange(65536 - 4095, 65537), rng.integers(0, 65537, 4096)]
    ).astype("int32")
    x = np.zeros((len(positions), dim), "float32")
    x[:, 0::2] = 1.0  # a unit vector in every pair
    expected = ref_rotate(x, positions, ref_theta(dim, 1.0))
    err = np.abs(to_numpy(layer(x, positions=positions)) - expected).max()

    theta32 = ref_theta(dim, 1.0).astype("float32")
    angle32 = positions.astype("float32")[:, None] * theta32[None, :]  # naive float32 angle
    naive = np.empty_like(expected)
    naive[:, 0::2] = np.cos(angle32.astype(np.float64))
    naive[:, 1::2] = np.sin(angle32.astype(np.float64))
    naive_err = np.abs(naive - expected).max()

    # Measured (CPU, all three backends): 1.26e-7 here; the naive float32 product: 1.11e-3.
    assert naive_err > 2e-4, naive_err  # the tolerance can fail
    assert err <= 2e-4, err
    assert err <= 2e-6, err  # the digit tables are much better than required


# ---------------------------------------------------------------- RoPE properties
def test_pass_through_channels_unchanged():
    layer = RoPEEmbeddings(11, seq_len=4, dim_embeddings_pct=0.25)  # d_rot = 2
    x = randn(3, 4, 11)
    out = to_numpy(layer(x, positions=np.arange(100, 104)))
    assert layer.d_rot == 2
    np.testing.assert_array_equal(out[..., 2:], x[..., 2:])
    assert not np.allclose(out[..., :2], x[..., :2])


def test_rope_preserves_norm():
    layer = RoPEEmbeddings(9, seq_len=8, dim_embeddings_pct=1.0)
    x = randn(2, 8, 9)
    out = to_numpy(layer(x, positions=np.arange(8) * 977))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


def test_rope_relative_property():
    """q(p) . k(p') depends only on p - p'."""
    layer = RoPEEmbeddings(8, seq_len=8, dim_embeddings_pct=1.0)
    q, k = randn(2, 8)
    offsets = np.array([0, 1, 100, 60000], "int32")
    dots = []
    for delta in (0, 3, -7):
        qr = to_numpy(layer(np.tile(q, (4, 1)), positions=offsets + delta))
        kr = to_numpy(layer(np.tile(k, (4, 1)), positions=offsets))
        d = np.sum(qr * kr, axis=-1)
        np.testing.assert_allclose(d, d[0], atol=1e-5)
        dots.append(d[0])
    assert abs(dots[0] - dots[1]) > 1e-3  # and it does depend on p - p'


@pytest.mark.parametrize("dtype, atol", [("bfloat16", 5e-2), ("float16", 5e-3)])
def test_low_precision_input_keeps_dtype(dtype, atol):
    layer = RoPEEmbeddings(8, seq_len=4)
    x = keras.ops.cast(randn(2, 4, 8), dtype)
    out = layer(x, positions=np.array([1, 50, 5000, 65536]))
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    x64 = to_numpy(keras.ops.cast(x, "float32"))
    expected = ref_rotate(x64, [1, 50, 5000, 65536], ref_theta(8))
    np.testing.assert_allclose(to_numpy(keras.ops.cast(out, "float32")), expected, atol=atol)


def test_no_autocast_under_mixed_policy():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = RoPEEmbeddings(8, seq_len=4)
    out = layer(randn(2, 4, 8))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    sym = layer(keras.Input((4, 8), dtype="bfloat16"))
    assert sym.dtype == "bfloat16"


def test_no_weights():
    layer = YaRNEmbeddings(8, 4, 16, 64)
    layer(randn(1, 4, 8))
    assert layer.weights == [] and layer.built


# ---------------------------------------------------------------- YaRN
@pytest.mark.parametrize(
    "dim, pct, cl, cle, alpha, beta, len_scale",
    [
        (8, 0.5, 16, 64, 1, 32, None),
        (8, 1.0, 16, 64, 1, 32, 1.3),
        (9, 1.0, 64, 1024, 1, 32, None),
        (12, 0.5, 100, 400, 0.5, 8, None),
        (16, 1.0, 2048, 8192, 2, 64, 0.9),
        (6, 1.0, 32, 32, 1, 32, None),  # s = 1: plain RoPE
    ],
)
def test_yarn_values(dim, pct, cl, cle, alpha, beta, len_scale):
    layer = YaRNEmbeddings(dim, 4, cl, cle, dim_embeddings_pct=pct, alpha=alpha, beta=beta,
                           len_scale=len_scale)
    theta = ref_yarn_theta(dim, cl, cle, pct, 10000.0, alpha, beta)
    scale = ref_mscale(cl, cle, len_scale)
    np.testing.assert_allclose(layer.inv_freq, theta, rtol=1e-14)
    assert layer.mscale == pytest.approx(scale, rel=1e-14)
    q = randn(2, 4, 3, dim)
    positions = np.array([[0, 1, 2, 3], [5000, 5001, 70000, 9]])[:, :, None]
    out = to_numpy(layer(q, positions=positions))
    np.testing.assert_allclose(out, ref_rotate(q, positions, theta, scale), atol=3e-6)
    x = randn(3, 4, dim)
    np.testing.assert_allclose(to_numpy(layer(x)), ref_rotate(x, np.arange(4), theta, scale),
                               atol=3e-6)


def test_yarn_frequency_parts_and_logit_scale():
    cl, cle = 1024, 4096
    layer = YaRNEmbeddings(64, 8, cl, cle, dim_embeddings_pct=1.0)
    theta = ref_theta(64, 1.0)
    rotations = cl * theta / (2 * math.pi)
    high, low = rotations > 32, rotations < 1
    assert high.any() and low.any()
    np.testing.assert_allclose(layer.inv_freq[high], theta[high], rtol=1e-15)  # kept
    np.testing.assert_allclose(layer.inv_freq[low], theta[low] / 4, rtol=1e-15)  # interpolated
    np.testing.assert_allclose(layer.theta, theta, rtol=1e-15)
    # Logits of q.k scale by mscale**2 relative to RoPE with the same frequencies.
    q, k = randn(2, 64)
    qr = to_numpy(layer(q[None], positions=np.array([10])))
    kr = to_numpy(layer(k[None], positions=np.array([3])))
    plain = ref_rotate(q, 10, layer.inv_freq) @ ref_rotate(k, 3, layer.inv_freq)
    assert float(qr[0] @ kr[0]) == pytest.approx(layer.mscale**2 * plain, rel=1e-5)


def test_yarn_scales_pass_through_channels():
    layer = YaRNEmbeddings(10, 4, 16, 64, dim_embeddings_pct=0.4, len_scale=1.5)
    x = randn(4, 10)
    out = to_numpy(layer(x, positions=np.arange(4)))
    np.testing.assert_allclose(out[:, 4:], 1.5 * x[:, 4:], rtol=1e-6)


# ---------------------------------------------------------------- compiled models
@pytest.mark.parametrize("jit", [False, True])
def test_compiled_model_dynamic_seq(jit):
    if jit and BACKEND == "torch":
        pytest.skip("torch.compile is slow and not what this checks (JAX jit / TF XLA)")
    rope = RoPEEmbeddings(8, seq_len=4)
    yarn = YaRNEmbeddings(8, seq_len=4, context_len=8, context_len_ext=32, len_scale=1.2)
    x_in = keras.Input((None, 8))
    q_in = keras.Input((None, 2, 8))
    p_in = keras.Input((None, 1), dtype="int32")
    model = keras.Model([x_in, q_in, p_in], [rope(x_in), yarn(q_in, positions=p_in)])
    model.compile(jit_compile=jit)
    x = randn(2, 5, 8)
    q = randn(2, 5, 2, 8)
    p = (np.arange(10).reshape(2, 5, 1) * 9000).astype("int32")
    out_x, out_q = model.predict([x, q, p], verbose=0)
    np.testing.assert_allclose(out_x, ref_rotate(x, np.arange(5), ref_theta(8)), atol=2e-6)
    np.testing.assert_allclose(
        out_q, ref_rotate(q, p, ref_yarn_theta(8, 8, 32), 1.2), atol=3e-6
    )


def test_backend_jit_function():
    layer = RoPEEmbeddings(8, seq_len=4, dim_embeddings_pct=1.0)
    x = randn(2, 4, 8)
    p = np.array([[70000, 3, 65536, 1]], "int32")  # (1, seq): broadcast over the batch
    if BACKEND == "jax":
        import jax

        fn = jax.jit(lambda a, b: layer(a, positions=b))
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda a, b: layer(a, positions=b), jit_compile=True)
    else:
        pytest.skip("JAX / TF only")
    out = to_numpy(fn(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(p)))
    np.testing.assert_allclose(out, ref_rotate(x, p, ref_theta(8, 1.0)), atol=2e-6)


# ---------------------------------------------------------------- serialisation
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (RoPEEmbeddings, dict(dim=7, seq_len=5, dim_embeddings_pct=1.0, base=500.0)),
        (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=16, context_len_ext=80,
                              dim_embeddings_pct=0.75, base=20000, alpha=2, beta=16,
                              len_scale=1.1)),
        (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=16, context_len_ext=80)),
    ],
)
def test_config_round_trip(cls, kwargs):
    layer = cls(**kwargs, name="emb")
    config = layer.get_config()
    json.dumps(config)
    for key, value in kwargs.items():
        if key != "seq_len":
            assert config[key] == value
    assert "seq_len" not in config  # deprecated, ignored, not serialised
    if cls is YaRNEmbeddings:
        assert set(config) >= {"dim", "context_len", "context_len_ext", "sequence_axis",
                               "feature_axis", "dim_embeddings_pct", "base", "alpha", "beta",
                               "len_scale"}
    clone = cls.from_config(config)
    assert clone.get_config() == config
    np.testing.assert_array_equal(clone.inv_freq, layer.inv_freq)
    x = randn(2, 4, kwargs["dim"])
    np.testing.assert_array_equal(to_numpy(clone(x)), to_numpy(layer(x)))
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is cls and revived.get_config() == config


def test_keras_save_load(tmp_path):
    x_in = keras.Input((None, 2, 8))
    p_in = keras.Input((None, 1), dtype="int32")
    h = keras.layers.Dense(8)(x_in)
    h = RoPEEmbeddings(8, seq_len=4, dim_embeddings_pct=0.75)(h, positions=p_in)
    h = YaRNEmbeddings(8, seq_len=4, context_len=8, context_len_ext=64, beta=16)(h)
    model = keras.Model([x_in, p_in], h)
    x = randn(2, 3, 2, 8)
    p = np.array([[[5], [6], [7]], [[1000], [1001], [1002]]], "int32")
    path = str(tmp_path / "rotary.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(loaded.predict([x, p], verbose=0), model.predict([x, p], verbose=0),
                               atol=1e-6)
    assert isinstance(loaded.layers[-1], YaRNEmbeddings)


# ---------------------------------------------------------------- validation
BAD_ARGS = [
    (RoPEEmbeddings, dict(dim=0, seq_len=4), "dim"),
    (RoPEEmbeddings, dict(dim=8.0, seq_len=4), "dim"),
    (RoPEEmbeddings, dict(dim=True, seq_len=4), "dim"),
    (RoPEEmbeddings, dict(dim=8, seq_len=0), "seq_len"),
    (RoPEEmbeddings, dict(dim=8, seq_len=-3), "seq_len"),
    (RoPEEmbeddings, dict(dim=8, sequence_axis=1.0), "sequence_axis"),
    (RoPEEmbeddings, dict(dim=8, feature_axis=True), "feature_axis"),
    (RoPEEmbeddings, dict(dim=8, sequence_axis=2, feature_axis=2), "sequence_axis"),
    (YaRNEmbeddings, dict(dim=8, context_len=None, context_len_ext=8), "context_len"),
    (RoPEEmbeddings, dict(dim=8, seq_len=4, dim_embeddings_pct=0), "dim_embeddings_pct"),
    (RoPEEmbeddings, dict(dim=8, seq_len=4, dim_embeddings_pct=1.5), "dim_embeddings_pct"),
    (RoPEEmbeddings, dict(dim=8, seq_len=4, dim_embeddings_pct=0.2), "dim_embeddings_pct"),
    (RoPEEmbeddings, dict(dim=3, seq_len=4, dim_embeddings_pct=0.5), "dim_embeddings_pct"),
    (RoPEEmbeddings, dict(dim=1, seq_len=4, dim_embeddings_pct=1.0), "dim_embeddings_pct"),
    (RoPEEmbeddings, dict(dim=8, seq_len=4, base=1), "base"),
    (RoPEEmbeddings, dict(dim=8, seq_len=4, base=-10), "base"),
    (RoPEEmbeddings, dict(dim=8, seq_len=4, base=float("inf")), "base"),
    (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=0, context_len_ext=8), "context_len"),
    (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=-4, context_len_ext=8), "context_len"),
    (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=8, context_len_ext=0),
     "context_len_ext"),
    (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=8, context_len_ext=4),
     "context_len_ext"),
    (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=8, context_len_ext=16, alpha=4, beta=4),
     "beta"),
    (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=8, context_len_ext=16, alpha=8, beta=2),
     "beta"),
    (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=8, context_len_ext=16, len_scale=0),
     "len_scale"),
    (YaRNEmbeddings, dict(dim=8, seq_len=4, context_len=8, context_len_ext=16, len_scale=-1.0),
     "len_scale"),
    (YaRNEmbeddings, dict(dim=0, seq_len=4, context_len=8, context_len_ext=16), "dim"),
]


@pytest.mark.parametrize("cls, kwargs, name", BAD_ARGS)
def test_bad_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}=") as info:
        cls(**kwargs)
    assert repr(kwargs[name]) in str(info.value)


@pytest.mark.parametrize("cls", [RoPEEmbeddings, YaRNEmbeddings])
def test_unknown_kwarg_raises(cls):
    args = (8, 4) if cls is RoPEEmbeddings else (8, 4, 8, 16)
    with pytest.raises((TypeError, ValueError), match="bogus"):
        cls(*args, bogus=1)


def test_wrong_last_axis_raises():
    layer = RoPEEmbeddings(8, seq_len=4)
    with pytest.raises(ValueError, match="dim=8"):
        layer(randn(2, 4, 6))
    with pytest.raises(ValueError, match="dim=8"):
        layer(keras.Input((None, 6)))


# ---------------------------------------------------------------- keras-hub axes (issue 12)
@pytest.mark.parametrize("dim, pct", [(8, 0.5), (7, 1.0)])
def test_default_sequence_axis_is_1_for_batch_seq_heads_dim(dim, pct):
    # keras-hub RotaryEmbedding default: sequence_axis=1, feature_axis=-1. Before, the
    # default positions ran along axis -2 (the heads axis of this input).
    layer = RoPEEmbeddings(dim, dim_embeddings_pct=pct)
    q = randn(2, 5, 3, dim)  # (batch, seq, heads, dim)
    expected = ref_rotate(q, np.arange(5)[None, :, None], ref_theta(dim, pct))
    np.testing.assert_allclose(to_numpy(layer(q)), expected, atol=2e-6)
    x = randn(2, 5, dim)  # rank 3: the same axis as before
    np.testing.assert_allclose(to_numpy(layer(x)),
                               ref_rotate(x, np.arange(5)[None, :], ref_theta(dim, pct)),
                               atol=2e-6)


@pytest.mark.parametrize("start", [0, 7, 300, 65530, -20])
def test_start_index_int(start):
    layer = RoPEEmbeddings(8, dim_embeddings_pct=1.0)
    q = randn(2, 6, 3, 8)
    expected = ref_rotate(q, (start + np.arange(6))[None, :, None], ref_theta(8, 1.0))
    np.testing.assert_allclose(to_numpy(layer(q, start_index=start)), expected, atol=2e-6)


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32"])
def test_start_index_tensor(dtype):
    layer = YaRNEmbeddings(8, context_len=8, context_len_ext=32, dim_embeddings_pct=1.0)
    q = randn(2, 6, 3, 8)
    start = keras.ops.convert_to_tensor(np.array(70000, dtype))
    expected = ref_rotate(q, (70000 + np.arange(6))[None, :, None], ref_yarn_theta(8, 8, 32, 1.0),
                          ref_mscale(8, 32))
    np.testing.assert_allclose(to_numpy(layer(q, start_index=start)), expected, atol=3e-6)


def test_start_index_offsets_explicit_positions():
    layer = RoPEEmbeddings(8)
    q = randn(2, 4, 8)
    p = np.array([[3, 1, 4, 1]], "int32")
    np.testing.assert_allclose(to_numpy(layer(q, positions=p, start_index=100)),
                               ref_rotate(q, p + 100, ref_theta(8)), atol=2e-6)


def test_start_index_under_jit():
    layer = RoPEEmbeddings(8, dim_embeddings_pct=1.0)
    q = randn(2, 5, 2, 8)
    if BACKEND == "jax":
        import jax

        fn = jax.jit(lambda a, b: layer(a, start_index=b))
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda a, b: layer(a, start_index=b), jit_compile=True)
    else:
        fn = lambda a, b: layer(a, start_index=b)  # noqa: E731
    out = to_numpy(fn(keras.ops.convert_to_tensor(q), keras.ops.convert_to_tensor(np.int32(513))))
    np.testing.assert_allclose(
        out, ref_rotate(q, (513 + np.arange(5))[None, :, None], ref_theta(8, 1.0)), atol=2e-6
    )


def test_feature_axis_and_sequence_axis():
    # (batch, dim, seq, heads): channels on axis 1, positions along axis 2.
    layer = RoPEEmbeddings(6, dim_embeddings_pct=1.0, sequence_axis=2, feature_axis=1)
    x = randn(2, 6, 5, 3)
    moved = np.moveaxis(x, 1, -1)  # (batch, seq, heads, dim)
    expected = ref_rotate(moved, (4 + np.arange(5))[None, :, None], ref_theta(6, 1.0))
    out = to_numpy(layer(x, start_index=4))
    assert out.shape == x.shape
    np.testing.assert_allclose(out, np.moveaxis(expected, -1, 1), atol=2e-6)
    # Explicit positions broadcast against the shape without the feature axis.
    p = np.arange(10).reshape(2, 5, 1) * 1000
    np.testing.assert_allclose(to_numpy(layer(x, positions=p)),
                               np.moveaxis(ref_rotate(moved, p, ref_theta(6, 1.0)), -1, 1),
                               atol=2e-6)


def test_sequence_axis_minus_2_keeps_the_old_default():
    layer = RoPEEmbeddings(8, sequence_axis=-2)
    x = randn(2, 3, 6, 8)  # (batch, heads, seq, dim)
    np.testing.assert_allclose(to_numpy(layer(x)), ref_rotate(x, np.arange(6), ref_theta(8)),
                               atol=2e-6)


def test_symbolic_start_index_and_axes_in_a_model():
    q_in = keras.Input((None, 2, 8))
    s_in = keras.Input((), dtype="int32", batch_size=1)
    rope = RoPEEmbeddings(8)
    model = keras.Model([q_in, s_in], rope(q_in, start_index=keras.ops.squeeze(s_in)))
    q = randn(1, 5, 2, 8)
    out = model.predict([q, np.array([40], "int32")], verbose=0)
    np.testing.assert_allclose(out, ref_rotate(q, (40 + np.arange(5))[None, :, None],
                                               ref_theta(8)), atol=2e-6)


def test_configs_saved_with_seq_len_still_load():
    old = {"name": "rope", "trainable": True, "dtype": "float32", "dim": 8, "seq_len": 16,
           "dim_embeddings_pct": 0.5, "base": 10000}
    layer = RoPEEmbeddings.from_config(old)
    assert "seq_len" not in layer.get_config()
    assert layer.get_config()["sequence_axis"] == 1
    yarn = YaRNEmbeddings.from_config({"dim": 8, "seq_len": 4, "context_len": 16,
                                       "context_len_ext": 64})
    assert "seq_len" not in yarn.get_config()
    positional = YaRNEmbeddings(8, 4, 16, 64, name=yarn.name)  # old positional order
    assert positional.get_config() == yarn.get_config()


@pytest.mark.parametrize(
    "kwargs, shape, call_kwargs, match",
    [
        (dict(), (6, 8), {}, "same axis"),  # rank 2: axis 1 is the feature axis
        (dict(sequence_axis=3), (2, 4, 8), {}, "sequence_axis"),
        (dict(feature_axis=1), (2, 4, 8), {}, "feature_axis"),
    ],
)
def test_axis_errors(kwargs, shape, call_kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoPEEmbeddings(8, **kwargs)(randn(*shape), **call_kwargs)
