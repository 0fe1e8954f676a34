"""keras_infini.ops: shared math against NumPy (exclusive cumsum, local attention, loops)."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_infini.ops import attention as attention_ops
from keras_infini.ops import backend as fast_paths
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


def test_exclusive_cumsum_isolates_later_non_finite_entries():
    """A NaN or inf entry reaches only the sums after it (no `0 * nan` from a matmul)."""
    x = np.random.default_rng(0).standard_normal((1, 40, 3)).astype("float32")
    x[0, 25, 1] = np.nan
    x[0, 30, 2] = np.inf
    out = to_numpy(memory_ops.exclusive_cumsum(keras.ops.convert_to_tensor(x)))
    expected = np.concatenate([np.zeros_like(x[:, :1]), np.cumsum(x[:, :25], axis=1)], 1)
    np.testing.assert_allclose(out[:, :26], expected, rtol=1e-5, atol=1e-4)
    assert np.isnan(out[0, 26:, 1]).all() and np.isinf(out[0, 31:, 2]).all()
    assert np.isfinite(out[0, :, 0]).all()


def _attention_reference(q, k, v, valid, causal):
    """float64 per query: softmax over the keys it may see (masked/future keys never read)."""
    b, n, h, s, _ = q.shape
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for idx in np.ndindex(b, n, h):
        for i in range(s):
            keys = [j for j in range(s) if valid[idx[0], idx[1], j] and (not causal or j <= i)]
            if not keys:
                continue
            logits = q[idx][i] @ k[idx][keys].T / np.sqrt(q.shape[-1])
            p = np.exp(logits - logits.max())
            out[idx][i] = (p / p.sum()) @ v[idx][keys]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_isolates_non_finite_hidden_keys(causal):
    """NaN/inf values and keys of masked (and, causally, later) tokens change nothing that
    may not see them; queries that do see a non-finite value get NaN."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 2, 6, 4)) for _ in range(3))
    valid = rng.random((2, 3, 6)) > 0.25
    valid[0, 0] = False  # one fully masked segment: zeros
    clean = _attention_reference(q, k, v, valid, causal)
    k_bad, v_bad = k.copy(), v.copy()
    k_bad[..., 4, :] = np.nan  # token 4 of every segment: NaN key, inf value
    v_bad[..., 4, 1] = np.inf
    v_bad = np.where(valid[:, :, None, :, None], v_bad, np.nan)  # masked tokens: NaN values
    out = to_numpy(attention_ops.local_attention(
        *(keras.ops.convert_to_tensor(t.astype("float32")) for t in (q, k_bad, v_bad)),
        keras.ops.convert_to_tensor(valid), causal))
    sees = valid[:, :, 4][:, :, None, None, None] & (np.arange(6)[:, None] >= 4 if causal else True)
    sees = np.broadcast_to(sees, out.shape[:-1] + (1,))
    np.testing.assert_allclose(np.where(sees, 0, out), np.where(sees, 0, clean), atol=1e-5)
    assert np.isnan(out[np.broadcast_to(sees, out.shape)]).all()
    np.testing.assert_array_equal(out[0, 0], 0.0)


def _scan_reference(w, h0, xs):
    """NumPy loop: carry h <- tanh(h @ w + x_t); outputs (h_t * 2, row sums of x_t)."""
    h, ys, sums = h0, [], []
    for x in xs:
        h = np.tanh(h @ w + x["a"]) * x["b"]
        ys.append(2.0 * h)
        sums.append(x["a"].sum(axis=-1))
    return h, np.stack(ys), np.stack(sums)


@pytest.mark.parametrize("n,axis", [(1, 0), (2, 0), (7, 0), (1, 1), (7, 1)])
def test_loops_scan_matches_numpy_values_and_gradients(n, axis):
    """`loops.scan` over `axis` (steps on axis 0, or on axis 1 with outputs stacked there)."""
    from conftest import gradients

    from keras_infini.ops import loops

    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, 2, 3)).astype("float32")
    b = rng.uniform(0.5, 1.5, size=(n, 2, 3)).astype("float32")
    w0 = rng.standard_normal((3, 3)).astype("float32") * 0.5
    w = keras.Variable(w0)

    def run():
        def step(h, x):
            h = keras.ops.tanh(keras.ops.matmul(h, w) + x["a"]) * x["b"]
            return h, (2.0 * h, keras.ops.sum(x["a"], axis=-1))

        # axis 1: the step axis moved to 1, (2, n, 3); outputs come back with it there.
        xs = {
            "a": keras.ops.convert_to_tensor(np.moveaxis(a, 0, axis)),
            "b": keras.ops.convert_to_tensor(np.moveaxis(b, 0, axis)),
        }
        return loops.scan(step, keras.ops.zeros((2, 3)), xs, axis=axis)

    h, (ys, sums) = run()
    want_h, want_ys, want_sums = _scan_reference(
        w0.astype("float64"), np.zeros((2, 3)), [{"a": a[i], "b": b[i]} for i in range(n)]
    )
    assert tuple(ys.shape) == np.moveaxis(want_ys, 0, axis).shape
    np.testing.assert_allclose(to_numpy(h), want_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(ys), np.moveaxis(want_ys, 0, axis), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(sums), np.moveaxis(want_sums, 0, axis), rtol=1e-5, atol=1e-5
    )

    # Gradient of sum(ys) + sum(h) w.r.t. w against central finite differences.
    def loss():
        h, (ys, _) = run()
        return keras.ops.sum(ys) + keras.ops.sum(h)

    (grad,) = gradients(loss, [w])
    eps = 1e-3
    numeric = np.zeros((3, 3))
    xs_list = [{"a": a[i], "b": b[i]} for i in range(n)]
    for i in range(3):
        for j in range(3):
            vals = []
            for sign in (1, -1):
                wp = w0.astype("float64").copy()
                wp[i, j] += sign * eps
                hh, yy, _ = _scan_reference(wp, np.zeros((2, 3)), xs_list)
                vals.append(yy.sum() + hh.sum())
            numeric[i, j] = (vals[0] - vals[1]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dynamic", [False, True])
def test_fast_scan_differentiates_under_jit(dynamic):
    """The backend fast path (`keras_infini.ops.backend.scan`; TF: bounded while loop)
    compiles and differentiates under jit, for a static and (TF graph) a dynamic number of
    steps, matching the eager `keras.ops.scan` fallback."""
    from keras_infini.ops import backend as fast_paths

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the TF fast path; torch's is covered by the loops.scan tests")
    import tensorflow as tf

    rng = np.random.default_rng(0)
    xs_value = rng.standard_normal((5, 2, 3)).astype("float32")
    w = tf.Variable(rng.standard_normal((3, 3)).astype("float32") * 0.5)

    def step(h, x):
        h = tf.tanh(h @ w + x)
        return h, h * 2.0

    def loss_with(scan, xs):
        with tf.GradientTape() as tape:
            h, ys = scan(step, tf.zeros((2, 3)), xs)
            loss = tf.reduce_sum(ys) + tf.reduce_sum(h)
        return loss, tape.gradient(loss, w)

    spec = tf.TensorSpec((None if dynamic else 5, 2, 3), "float32")
    compiled = tf.function(lambda xs: loss_with(fast_paths.scan, xs), jit_compile=True,
                           input_signature=[spec])
    fast = compiled(tf.constant(xs_value))
    slow = loss_with(keras.ops.scan, tf.constant(xs_value))
    np.testing.assert_allclose(fast[0].numpy(), slow[0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(fast[1].numpy(), slow[1].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one step"):
        fast_paths.scan(step, tf.zeros((2, 3)), tf.constant(xs_value[:0]))


@pytest.mark.parametrize("implementation", ["fused", "einsum", "fused-no-branch"])
@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_implementations_match_reference(implementation, causal,
                                                         monkeypatch):
    """Both paths (Keras' fused `dot_product_attention` and the einsum) on every backend:
    values and isolation as the float64 reference, NaN/inf keys and values included.
    `fused-no-branch`: the fused path as on an accelerator, where it does not branch on
    whether a token is bad (`branch_is_free` False)."""
    if implementation == "fused-no-branch":
        monkeypatch.setattr(fast_paths, "branch_is_free", lambda x: False)
        implementation = "fused"
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, 2, 5, 4)) for _ in range(3))
    valid = rng.random((2, 3, 5)) > 0.3
    valid[1, 2] = False
    valid[0, 1] = [False, False, True, True, True]  # causal: queries 0, 1 see no key
    clean = _attention_reference(q, k, v, valid, causal)
    k_bad, v_bad = k.copy(), v.copy()
    k_bad[:, :, 0, 3, 0] = np.nan  # head 0: a NaN key; head 1: an inf value
    v_bad[:, :, 1, 3, 1] = np.inf
    v_bad = np.where(valid[:, :, None, :, None], v_bad, np.nan)
    out = to_numpy(attention_ops.local_attention(
        *(keras.ops.convert_to_tensor(t.astype("float32")) for t in (q, k_bad, v_bad)),
        keras.ops.convert_to_tensor(valid), causal, implementation=implementation))
    sees = valid[:, :, 3][:, :, None, None, None] & (np.arange(5)[:, None] >= 3 if causal else True)
    sees = np.broadcast_to(sees, out.shape[:-1] + (1,))
    np.testing.assert_allclose(np.where(sees, 0, out), np.where(sees, 0, clean), atol=1e-5)
    assert np.isnan(out[np.broadcast_to(sees, out.shape)]).all()
    # All keys valid (no key mask): the causal triangle alone, or plain attention.
    all_valid = np.ones_like(valid)
    out = to_numpy(attention_ops.local_attention(
        *(keras.ops.convert_to_tensor(t.astype("float32")) for t in (q, k, v)),
        None, causal, implementation=implementation))
    np.testing.assert_allclose(out, _attention_reference(q, k, v, all_valid, causal), atol=1e-5)


@pytest.mark.parametrize("implementation", ["fused", "einsum", "fused-no-branch"])
@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_isolates_huge_finite_hidden_keys(implementation, causal,
                                                           monkeypatch):
    """Issue 33 item 2: finite keys and values up to the float32 max in masked (and,
    causally, later) tokens change nothing that may not see them, on both paths (the
    fused path kept huge finite entries, whose logits overflowed or outweighed Keras'
    finite mask bias on PyTorch)."""
    if implementation == "fused-no-branch":
        monkeypatch.setattr(fast_paths, "branch_is_free", lambda x: False)
        implementation = "fused"
    top = float(np.finfo("float32").max)
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 2, 2, 5, 4)) for _ in range(3))
    valid = rng.random((2, 2, 5)) > 0.3
    valid[:, :, 0] = True
    k_bad, v_bad = k.copy(), v.copy()
    hidden = ~valid
    k_bad[hidden[:, :, None, :, None].repeat(2, 2).repeat(4, 4)] = top
    v_bad[hidden[:, :, None, :, None].repeat(2, 2).repeat(4, 4)] = -top
    if causal:  # a visible last token, huge: only the last query sees it
        valid[:, :, 4] = True
        k_bad[:, :, :, 4] = 1e38 * np.sign(rng.standard_normal(4))
        v_bad[:, :, :, 4] = top
    out = to_numpy(attention_ops.local_attention(
        *(keras.ops.convert_to_tensor(t.astype("float32")) for t in (q, k_bad, v_bad)),
        keras.ops.convert_to_tensor(valid), causal, implementation=implementation))
    want = _attention_reference(q, k, v, valid, causal)
    rows = slice(0, 4) if causal else slice(None)
    assert np.isfinite(out[..., rows, :]).all()
    np.testing.assert_allclose(out[..., rows, :], want[..., rows, :], atol=1e-5)


def test_local_attention_rejects_unknown_implementation():
    x = keras.ops.zeros((1, 1, 1, 2, 2))
    with pytest.raises(ValueError, match="implementation"):
        attention_ops.local_attention(x, x, x, None, True, implementation="flash")


@pytest.mark.parametrize("general", [False, True])
def test_delta_states_eager_calls_trace_the_scan_once(monkeypatch, general):
    """Eager calls of the delta update give the float64 recurrence; on JAX the scan body
    is traced once per shape (a compiled function), not again at every call."""
    from keras_infini.ops import memory as memory_ops

    step_name = "_delta_step_general" if general else "_delta_step"
    original = getattr(memory_ops, step_name)
    traces = []

    def counting(*args):
        traces.append(1)
        return original(*args)

    monkeypatch.setattr(memory_ops, step_name, counting)
    rng = np.random.default_rng(3)
    b, n, h, s, dk, dv = 1, 5, 2, 3, 7, 2  # shapes used by no other test (fresh compile)
    sk = rng.uniform(0.1, 1.0, (b, n, h, s, dk))
    v = rng.standard_normal((b, n, h, s, dv))
    m0 = rng.standard_normal((b, h, dk, dv)) * 0.1
    z0 = rng.uniform(0.5, 1.0, (b, h, dk))
    z_before = z0[:, None] + np.concatenate(
        [np.zeros_like(sk[:, :1, :, 0]), np.cumsum(sk.sum(3), 1)[:, :-1]], 1)
    expected, m = [], m0
    for i in range(n):  # the delta rule, float64
        den = np.einsum("bhsk,bhk->bhs", sk[:, i], z_before[:, i]) + 1e-6
        expected.append(m)
        m = m + np.einsum("bhsk,bhsv->bhkv", sk[:, i], v[:, i] - sk[:, i] @ m / den[..., None])
    args = [keras.ops.convert_to_tensor(t.astype("float32")) for t in (sk, v, z_before, m0)]

    def run():
        if general:
            return memory_ops.delta_memory_states_general(args[0], args[0], *args[1:])
        return memory_ops.delta_memory_states(*args)

    for call in range(3):
        before, final = run()
        np.testing.assert_allclose(to_numpy(before), np.stack(expected, 1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(to_numpy(final), m, rtol=1e-4, atol=1e-5)
        if call == 0:
            first = len(traces)
    assert first > 0
    if keras.backend.backend() == "jax":
        assert len(traces) == first, "eager JAX calls retraced the scan body"


def test_cached_attention_matches_reference_and_isolates_slots():
    """Decode attention over the cache: softmax over the valid slots only (float64
    reference), a NaN/inf in an invalid (stale) slot reaches nothing, a NaN value in a
    valid slot gives NaN to that row and head only, a row without a valid slot gets 0."""
    rng = np.random.default_rng(3)
    b, h, s, dk, dv = 4, 2, 6, 5, 3
    query = rng.normal(size=(b, h, 1, dk)).astype("float32")
    key = rng.normal(size=(b, s, h, dk)).astype("float32")
    value = rng.normal(size=(b, s, h, dv)).astype("float32")
    valid = np.ones((b, s), bool)
    valid[0, 4:] = False
    key[0, 5], value[0, 4] = np.inf, np.nan  # stale slots of row 0
    valid[1] = False  # row 1: empty segment
    value[2, 1, 0] = np.nan  # row 2 sees it (valid slot)
    out = to_numpy(attention_ops.cached_attention(query, key, value, valid))

    expected = np.zeros((b, h, 1, dv))
    for i in range(b):
        if not valid[i].any():
            continue
        k, v = key[i][valid[i]].astype("float64"), value[i][valid[i]].astype("float64")
        logits = np.einsum("hqd,shd->hqs", query[i].astype("float64"), k) / np.sqrt(dk)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        expected[i] = np.einsum("hqs,shv->hqv", p, v)
    assert np.isnan(out[2, 0]).all()  # head 0 of row 2 sees the NaN value
    np.testing.assert_allclose(out[2, 1], expected[2, 1], atol=1e-5)  # head 1 does not
    np.testing.assert_allclose(out[[0, 1, 3]], expected[[0, 1, 3]], atol=1e-5)
    np.testing.assert_array_equal(out[1], 0.0)


def test_cached_attention_with_finite_freed_slots_matches_the_general_path():
    """`freed_slots_finite=True` (the decode cache zeroes freed slots) skips the scan of
    the values and gives the general path's results: the float64 softmax over valid
    slots, NaN for a row and head that sees a NaN or inf value or key, 0 without a slot."""
    rng = np.random.default_rng(4)
    b, h, s, dk, dv = 5, 2, 6, 5, 3
    query = rng.normal(size=(b, h, 1, dk)).astype("float32")
    key = rng.normal(size=(b, s, h, dk)).astype("float32")
    value = rng.normal(size=(b, s, h, dv)).astype("float32")
    valid = rng.random((b, s)) < 0.7
    valid[:, 0] = True
    valid[1] = False  # an empty segment
    value[~valid] = 0.0  # what the cache holds in freed slots
    value[2, 0, 0, 1] = np.nan  # valid slot: row 2, head 0
    value[3, 0, 1, 2] = np.inf  # valid slot: row 3, head 1 (p * inf would be inf)
    key[4, 0, 0, 0] = np.nan  # valid key: row 4, head 0
    general = to_numpy(attention_ops.cached_attention(query, key, value, valid))
    fast = to_numpy(attention_ops.cached_attention(query, key, value, valid,
                                                   freed_slots_finite=True))
    assert np.isnan(fast[2, 0]).all() and np.isnan(fast[3, 1]).all()
    assert np.isnan(fast[4, 0]).all()
    np.testing.assert_array_equal(fast[1], 0.0)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(general))
    finite = ~np.isnan(general)
    np.testing.assert_allclose(fast[finite], general[finite], atol=1e-6)
    for i, j in ((0, 0), (0, 1), (2, 1), (3, 0), (4, 1)):  # float64 reference
        k = key[i][valid[i]][:, j].astype("float64")
        v = value[i][valid[i]][:, j].astype("float64")
        logits = k @ query[i, j, 0].astype("float64") / np.sqrt(dk)
        p = np.exp(logits - logits.max())
        np.testing.assert_allclose(fast[i, j, 0], (p / p.sum()) @ v, atol=1e-5)


def test_branch_is_free_on_host_tensors():
    """On this CPU-only machine a branch on a tensor's value needs no device sync."""
    assert fast_paths.branch_is_free(keras.ops.convert_to_tensor(np.ones(3, "float32")))
