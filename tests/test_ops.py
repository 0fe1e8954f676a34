"""keras_infini.ops: shared math against NumPy (exclusive cumsum, grouped attention)."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_infini.ops import attention as attention_ops
from keras_infini.ops import memory as memory_ops


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 300])
def test_exclusive_cumsum_matches_numpy(n):
    x = np.random.default_rng(n).standard_normal((2, n, 3, 2)).astype("float32")
    expected = np.concatenate([np.zeros_like(x[:, :1]), np.cumsum(x, axis=1)[:, :-1]], 1)
    out = to_numpy(memory_ops.exclusive_cumsum(keras.ops.convert_to_tensor(x)))
    assert out.shape == x.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    # The first entry is exactly zero (no cancellation), so `+ eps` survives.
    assert np.all(out[:, 0] == 0.0)


def test_exclusive_cumsum_gradient_is_reverse_count():
    # d/dx_i sum_j before_j = number of later entries j > i.
    x = keras.Variable(np.ones((1, 37, 2), "float32"))
    from conftest import gradients

    (grad,) = gradients(lambda: keras.ops.sum(memory_ops.exclusive_cumsum(x)), [x])
    expected = np.broadcast_to((36 - np.arange(37))[None, :, None], (1, 37, 2))
    np.testing.assert_allclose(grad, expected)


@pytest.mark.parametrize("group", [None, 1, 2, 3, 10])
def test_grouped_attention_equals_direct(group):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 2, 4, 3)).astype("float32") for _ in range(3))
    valid = (rng.random((2, 7, 4)) > 0.2).astype("float32")
    direct = attention_ops.local_attention(q, k, v, attention_ops.attention_mask(valid, True))
    grouped = attention_ops.grouped_local_attention(q, k, v, valid, True, group)
    np.testing.assert_allclose(to_numpy(grouped), to_numpy(direct), atol=1e-6)
