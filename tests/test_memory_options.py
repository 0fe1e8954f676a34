"""CompressiveMemory's memory options (feature map, write strength, gate parametrisation)
against a NumPy float64 reference written loop by loop, like tests/reference.py."""

import itertools
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKEND, gradients, to_numpy

import reference as ref
from keras_infini import InfiniTransformer, MoDInfiniTransformer
from keras_infini.layers.compressive_memory import CompressiveMemory
from keras_infini.ops import memory as memory_ops

B, D, H, DK, DV, S = 2, 8, 2, 4, 3, 4
ATOL = 2e-5


NORMALISED = ("elu1", "taylor")  # read `phi(q) M / (phi(q) z + eps)`; the others `phi(q) M`


def phi(t, name):
    """The feature maps from their papers' equations, float64, one vector at a time."""
    t = np.asarray(t, np.float64)
    if name == "elu1":
        return ref.sigma(t)
    if name == "taylor":  # Based: phi(q) . phi(k) = 1 + s + s^2 / 2, s = q . k / sqrt(d)
        d = len(t)
        second = [t[i] * t[j] / (math.sqrt(2.0) * math.sqrt(d))
                  for i in range(d) for j in range(d)]
        return np.concatenate([[1.0], t / d ** 0.25, second])
    if name.startswith("dpfp"):  # DPFP-nu (Schlag et al. 2021), then unit L2 norm
        nu = int(name[4:] or 1)
        r = np.concatenate([np.maximum(t, 0.0), np.maximum(-t, 0.0)])
        t = np.array([r[i] * r[(i - j) % len(r)] for j in range(1, nu + 1)
                      for i in range(len(r))])
    if name == "elu1_l2":
        t = ref.sigma(t)
    return t / max(np.linalg.norm(t), 1e-6)


def width(name):
    """The memory's key width for `name` (the reference's own count)."""
    return len(phi(np.ones(DK), name))


def beta_of(raw, kind):
    """Write strength from its logit: sigmoid (`True`) or Keras' hard sigmoid."""
    if kind == "hard_sigmoid":
        return min(max(raw / 6.0 + 0.5, 0.0), 1.0)
    return 1.0 / (1.0 + np.exp(-raw))


def reference(x, wq, wk, wv, wo, gate, *, segment_len, update, causal, feature_map,
              gate_scale=1.0, wb=None, bb=None, beta_kind=True, mask=None, memory0=None,
              norm0=None, decay=None, decay_coupled=False):
    """Infini-attention with the options, one batch element, head and token at a time.

    phi: "elu1" (read `phi(q) M / (phi(q) z + eps)`), "l2" (`t / ||t||`, read
    `phi(q) M`), "elu1_l2" (`sigma(t) / ||sigma(t)||`, read `phi(q) M`), "dpfp*" (DPFP-nu
    over its L2 norm, read `phi(q) M`) or "taylor" (read like "elu1"); see `phi`. Write strength
    beta_t = f(x_t wb + bb) (1 without `wb`), f sigmoid or hard sigmoid (`beta_kind`):
    linear M += beta phi(k)^T v; delta M += beta phi(k)^T (v - read(phi(k))), reading the
    state before the segment ("elu1", the paper) or the current state (DeltaNet, the
    unit-key maps: token by token);
    z += beta phi(k). Gate sigmoid(gate_scale * gate).
    `decay=(wd, bd, log_rate)` (Gated DeltaNet, unit-key delta only): before each token's
    write `M *= alpha_t`, `alpha_t = exp(-exp(log_rate_h) softplus(x_t wd + bd_h))`;
    `decay_coupled`: `M *= alpha_t ** beta_t` instead.
    """
    x = np.asarray(x, np.float64)
    bsz, length, _ = x.shape
    mask = np.ones((bsz, length), bool) if mask is None else np.asarray(mask, bool)
    x = np.where(mask[..., None], x, 0.0)  # a masked token enters as a zero input
    out = np.zeros((bsz, length, wo.shape[-1]))
    f = width(feature_map)
    memories = np.zeros((bsz, H, f, DV))
    norms = np.zeros((bsz, H, f))
    g = 1.0 / (1.0 + np.exp(-gate_scale * np.asarray(gate, np.float64)))
    normalised = feature_map in NORMALISED
    for b in range(bsz):
        for h in range(H):
            m = np.zeros((f, DV)) if memory0 is None else np.array(memory0[b, h], np.float64)
            z = np.zeros(f) if norm0 is None else np.array(norm0[b, h], np.float64)

            def read(vec, m=None, z=None):
                f = phi(vec, feature_map)
                if normalised:
                    return f @ m / (f @ z + ref.EPS)
                return f @ m

            for start in range(0, length, segment_len):
                stop = min(start + segment_len, length)
                # local attention
                a_dot = np.zeros((stop - start, DV))
                for t in range(start, stop):
                    allowed = [u for u in range(start, (t + 1) if causal else stop)
                               if mask[b, u]]
                    if not allowed:
                        continue
                    q = x[b, t] @ wq[:, h]
                    logits = np.array([q @ (x[b, u] @ wk[:, h]) for u in allowed])
                    w = np.exp(logits / math.sqrt(DK) - (logits / math.sqrt(DK)).max())
                    a_dot[t - start] = sum(wi * (x[b, u] @ wv[:, h])
                                           for wi, u in zip(w / w.sum(), allowed))
                # memory read with the state before the segment
                a_mem = np.array([read(x[b, t] @ wq[:, h], m, z) for t in range(start, stop)])
                # memory write, token by token inside the segment; the paper's rules
                # ("elu1") all read m_prev, DeltaNet's (unit-key maps) the current m
                m_prev, z_prev = m.copy(), z.copy()
                for t in range(start, stop):
                    if not mask[b, t]:
                        continue
                    k, v = x[b, t] @ wk[:, h], x[b, t] @ wv[:, h]
                    beta = 1.0 if wb is None else beta_of(x[b, t] @ wb[:, h] + bb[h],
                                                          beta_kind)
                    fk = phi(k, feature_map)
                    if decay is not None:
                        wd, bd, log_rate = decay
                        pre = x[b, t] @ wd[:, h] + bd[h]
                        log_alpha = -np.exp(log_rate[h]) * np.logaddexp(0.0, pre)
                        m = m * np.exp(log_alpha * (beta if decay_coupled else 1.0))
                    if update == "linear":
                        m = m + beta * np.outer(fk, v)
                    elif normalised:
                        m = m + beta * np.outer(fk, v - read(k, m_prev, z_prev))
                    else:
                        m = m + beta * np.outer(fk, v - read(k, m))
                    z = z + beta * fk
                a = g[h] * a_mem + (1 - g[h]) * a_dot
                out[b, start:stop] += a @ wo[h]
            memories[b, h], norms[b, h] = m, z
    return out, memories, norms


def make_layer(update="delta", feature_map="l2", write_strength=True, gate_lr_scale=1.0,
               gate_init=0.0, causal=True, **kw):
    layer = CompressiveMemory(D, DK, DV, H, S, update=update, causal=causal,
                              memory_feature_map=feature_map, write_strength=write_strength,
                              gate_init=gate_init, gate_lr_scale=gate_lr_scale, **kw)
    layer.build((None, None, D))
    rng = np.random.default_rng(5)
    layer.gate.assign(rng.normal(size=(H,)).astype("float32"))
    if write_strength:
        layer.beta_dense.kernel.assign(rng.normal(size=(D, H)).astype("float32"))
        layer.beta_dense.bias.assign(rng.normal(size=(H,)).astype("float32"))
    if layer.memory_decay:  # decays from ~0.99 to ~0.1 per token
        layer.decay_dense.kernel.assign(0.5 * rng.normal(size=(D, H)).astype("float32"))
        layer.decay_bias.assign(np.array([-3.0, 0.5], "float32"))
        layer.decay_log_rate.assign(np.array([0.3, -0.2], "float32"))
    return layer


def reference_for(layer, x, **kw):
    extra = {}
    if layer.write_strength:
        extra = dict(wb=to_numpy(layer.beta_dense.kernel), bb=to_numpy(layer.beta_dense.bias),
                     beta_kind=layer.write_strength)
    if layer.memory_decay:
        extra["decay"] = tuple(to_numpy(w) for w in (
            layer.decay_dense.kernel, layer.decay_bias, layer.decay_log_rate))
        extra["decay_coupled"] = layer.memory_decay == "coupled"
    return reference(
        x, to_numpy(layer.query_dense.kernel), to_numpy(layer.key_dense.kernel),
        to_numpy(layer.value_dense.kernel), to_numpy(layer.output_dense.kernel),
        to_numpy(layer.gate), segment_len=layer.segment_len, update=layer.update,
        causal=layer.causal, feature_map=layer.memory_feature_map,
        gate_scale=layer.gate_lr_scale, **{**extra, **kw},
    )


def inputs(length, batch=B, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, D)).astype("float32")


OPTIONS = list(itertools.product(["linear", "delta"], ["elu1", "l2", "elu1_l2"],
                                 [False, True])) + [("linear", "elu1", "hard_sigmoid"),
                                                     ("delta", "l2", "hard_sigmoid")] + [
    # The maps that widen the memory key (DPFP, Taylor).
    ("linear", "taylor", False), ("delta", "taylor", False), ("delta", "taylor", True),
    ("linear", "dpfp", True), ("delta", "dpfp", False), ("delta", "dpfp2", "hard_sigmoid"),
    ("delta", "dpfp3", True)]


@pytest.mark.parametrize("length", [8, 14])
@pytest.mark.parametrize("update,feature_map,write_strength", OPTIONS)
def test_matches_reference(update, feature_map, write_strength, length):
    # 14: 3 full segments and a partial one, with a fully masked segment. 8: 2 segments,
    # as many as heads (TF's `ops.add` once added a `(h, 1)` bias on the segment axis).
    layer = make_layer(update, feature_map, write_strength, gate_lr_scale=3.0,
                       return_state=True)
    x = inputs(length)
    mask = np.random.default_rng(3).uniform(size=(B, length)) > 0.3
    mask[0, :4] = False
    out, memory, norm = layer(x, mask=mask)
    want, want_m, want_z = reference_for(layer, x, mask=mask)
    np.testing.assert_allclose(to_numpy(out), want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(memory), want_m, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(norm), want_z, atol=1e-4, rtol=1e-5)
    assert keras.backend.standardize_dtype(memory.dtype) == "float32"
    assert tuple(memory.shape) == (B, H, width(feature_map), DV) == \
        (B, H, layer.memory_dim, DV)


def test_wide_feature_maps_follow_their_equations():
    """The reference's maps (and so the layer's, via test_matches_reference) are the
    papers': Taylor's inner product is `1 + s + s^2 / 2` (`s = q . k / sqrt(dk)`), DPFP-1
    has `2 dk` non-negative features `r_i r_{i-1}`, zero where neighbours' signs differ;
    and `memory_ops.feature_map` equals the reference on random vectors."""
    rng = np.random.default_rng(11)
    q, k = rng.normal(size=(2, DK))
    s = q @ k / math.sqrt(DK)
    np.testing.assert_allclose(phi(q, "taylor") @ phi(k, "taylor"), 1 + s + s * s / 2,
                               rtol=1e-12)
    assert width("taylor") == 1 + DK + DK * DK
    for nu in (1, 2, 3):
        assert width("dpfp" if nu == 1 else f"dpfp{nu}") == 2 * DK * nu
    t = np.array([1.0, 2.0, -3.0, 0.5])  # r = [1, 2, 0, .5, 0, 0, 3, 0]
    raw = np.array([0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # r_i r_{i-1}, cyclic
    np.testing.assert_allclose(phi(t, "dpfp"), raw / 2.0, rtol=1e-12)
    x = rng.normal(size=(3, DK)).astype("float32")
    for name in ("dpfp", "dpfp2", "dpfp3", "taylor"):
        got = to_numpy(memory_ops.feature_map(keras.ops.convert_to_tensor(x), name))
        want = np.stack([phi(row, name) for row in x])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
        assert memory_ops.feature_dim(name, DK) == width(name)
    # A key of width 1: r has 2 features, so rolls by 2 and 3 wrap around.
    one = np.array([[0.7], [-1.3]], "float32")
    got = to_numpy(memory_ops.feature_map(keras.ops.convert_to_tensor(one), "dpfp3"))
    np.testing.assert_allclose(got, np.stack([phi(row, "dpfp3") for row in one]),
                               rtol=1e-6, atol=1e-7)


def test_reference_with_paper_options_is_the_paper_reference():
    """The test's reference at the defaults equals tests/reference.py's."""
    rng = np.random.default_rng(1)
    wq, wk = rng.normal(size=(2, D, H, DK))
    wv, wo = rng.normal(size=(D, H, DV)), rng.normal(size=(H, DV, D))
    gate = rng.normal(size=(H,))
    x = inputs(10)
    for update in ("linear", "delta"):
        a = reference(x, wq, wk, wv, wo, gate, segment_len=S, update=update, causal=True,
                      feature_map="elu1")
        b = ref.compressive_memory(x, wq, wk, wv, wo, gate, segment_len=S, update=update,
                                   causal=True)
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-10)


def test_defaults_are_the_paper_layer():
    plain = CompressiveMemory(D, DK, DV, H, S, update="delta", causal=True)
    explicit = CompressiveMemory(D, DK, DV, H, S, update="delta", causal=True,
                                 memory_feature_map="elu1", write_strength=False,
                                 gate_init=0.0, gate_lr_scale=1.0)
    for layer in (plain, explicit):
        layer.build((None, None, D))
    explicit.set_weights(plain.get_weights())
    assert len(plain.trainable_variables) == 5  # no beta projection
    np.testing.assert_array_equal(to_numpy(plain.gate), np.zeros(H))
    x = inputs(11)
    np.testing.assert_array_equal(to_numpy(explicit(x)), to_numpy(plain(x)))
    config = plain.get_config()
    assert (config["memory_feature_map"], config["write_strength"], config["gate_init"],
            config["gate_lr_scale"]) == ("elu1", False, 0.0, 1.0)


def test_general_delta_equals_paper_delta():
    rng = np.random.default_rng(2)
    n = 7
    sk = ref.sigma(rng.normal(size=(B, n, H, S, DK))).astype("float32")
    v = rng.normal(size=(B, n, H, S, DV)).astype("float32")
    m0 = (0.1 * rng.normal(size=(B, H, DK, DV))).astype("float32")
    z0 = rng.uniform(0.5, 1.0, size=(B, H, DK)).astype("float32")
    sk, v, m0, z0 = (keras.ops.convert_to_tensor(t) for t in (sk, v, m0, z0))
    z_before, _ = memory_ops.norm_states(sk, z0)
    want_before, want_final = memory_ops.delta_memory_states(sk, v, z_before, m0, "scan")
    before, final = memory_ops.delta_memory_states_general(sk, sk, v, z_before, m0)
    np.testing.assert_allclose(to_numpy(before), to_numpy(want_before), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(final), to_numpy(want_final), rtol=1e-5, atol=1e-5)


def test_l2_delta_with_unit_write_stores_the_value_exactly():
    """DeltaNet property: writing (k, v) with beta = 1 and unit k, then reading k, gives v,
    whatever was stored under k before."""
    rng = np.random.default_rng(4)
    k = memory_ops.l2_normalize(rng.normal(size=(1, 2, 1, 1, DK)).astype("float32"))
    k = keras.ops.concatenate([k[:, :1], k[:, :1]], axis=1)  # same key in 2 segments
    v = keras.ops.convert_to_tensor(rng.normal(size=(1, 2, 1, 1, DV)).astype("float32"))
    m0 = keras.ops.convert_to_tensor(rng.normal(size=(1, 1, DK, DV)).astype("float32"))
    z = keras.ops.zeros((1, 2, 1, DK))
    _, final = memory_ops.delta_memory_states_general(k, k, v, z, m0, normalised=False)
    got = memory_ops.retrieve_unnormalised(k[:, 1], final[:, None])
    np.testing.assert_allclose(to_numpy(got).reshape(-1), to_numpy(v)[0, 1].reshape(-1), atol=1e-5)


def test_token_level_delta_stays_bounded_where_the_segment_level_rule_diverges():
    """Unit keys, beta = 1, the same key written by every token of 12 segments of 4:
    token by token (DeltaNet) the memory holds v after the first token and stays there;
    the segment-level step `m + 4 (v - m)` multiplies the error by -3 per segment."""
    rng = np.random.default_rng(6)
    k = memory_ops.l2_normalize(rng.normal(size=(1, 1, 1, 1, DK)).astype("float32"))
    keys = keras.ops.broadcast_to(k, (1, 12, 1, S, DK))
    v = rng.normal(size=(1, 1, 1, 1, DV)).astype("float32")
    values = keras.ops.broadcast_to(keras.ops.convert_to_tensor(v), (1, 12, 1, S, DV))
    m0 = keras.ops.zeros((1, 1, DK, DV))
    z = keras.ops.zeros((1, 12, 1, DK))
    read_k, value = memory_ops.token_level_delta_inputs(keys, keys, values)
    before, final = memory_ops.delta_memory_states_general(read_k, keys, value, z, m0,
                                                           normalised=False)
    for state in (before[:, 1:], final[:, None]):
        got = to_numpy(memory_ops.retrieve_unnormalised(keys[:, :1, :, :1], state))
        np.testing.assert_allclose(got, np.broadcast_to(v, got.shape), atol=1e-5)
    _, diverged = memory_ops.delta_memory_states_general(keys, keys, values, z, m0,
                                                         normalised=False)
    assert np.abs(to_numpy(diverged)).max() > 1e3 * np.abs(v).max()


def test_gate_init_and_lr_scale():
    inits = [-2.0, 1.5]
    layer = CompressiveMemory(D, DK, DV, H, S, gate_init=inits, gate_lr_scale=4.0)
    layer.build((None, None, D))
    np.testing.assert_allclose(to_numpy(layer.gate), np.array(inits) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(layer.gate_values()),
                               1 / (1 + np.exp(-np.array(inits))), rtol=1e-6)
    scalar = CompressiveMemory(D, DK, DV, H, S, gate_init=3.0)
    scalar.build((None, None, D))
    np.testing.assert_allclose(to_numpy(scalar.gate), [3.0, 3.0])
    # With Adam, one step moves the gate logit gate_lr_scale times further.
    moved = []
    for scale in (1.0, 10.0):
        inp = keras.Input((8, D))
        cm = CompressiveMemory(D, DK, DV, H, S, causal=True, gate_lr_scale=scale)
        model = keras.Model(inp, cm(inp))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        model.train_on_batch(inputs(8), inputs(8, seed=1))
        moved.append(np.abs(to_numpy(cm.gate) * scale))
    np.testing.assert_allclose(moved[1], 10 * moved[0], rtol=1e-2)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_streaming_chunks_equal_one_call(update):
    layer = make_layer(update, "l2", True, return_state=True)
    x = inputs(22)
    full, full_m, full_z = layer(x)
    state, outs = None, []
    for start, stop in [(0, 8), (8, 12), (12, 20), (20, 22)]:
        out, m, z = layer(x[:, start:stop], initial_state=state)
        outs.append(to_numpy(out))
        state = (m, z)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), to_numpy(full), atol=1e-5)
    np.testing.assert_allclose(to_numpy(state[0]), to_numpy(full_m), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(state[1]), to_numpy(full_z), atol=1e-4, rtol=1e-5)


def test_grouped_layer_matches_reference():
    layer = make_layer("delta", "l2", True, return_state=True)
    layer.group_tokens = 2 * S  # 27 tokens -> 4 groups of 2 segments
    x = inputs(27)
    mask = np.random.default_rng(9).uniform(size=(B, 27)) > 0.3
    out, memory, _ = layer(x, mask=mask)
    want, want_m, _ = reference_for(layer, x, mask=mask)
    np.testing.assert_allclose(to_numpy(out), want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(memory), want_m, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("feature_map", ["elu1", "l2"])
def test_nan_in_masked_token_does_not_leak_into_memory(feature_map):
    layer = make_layer("delta", feature_map, True, return_state=True)
    x = inputs(12)
    mask = np.ones((B, 12), bool)
    mask[:, 5] = False
    x_nan = x.copy()
    x_nan[:, 5] = np.nan
    out, memory, norm = layer(x_nan, mask=mask)
    assert np.all(np.isfinite(to_numpy(memory))) and np.all(np.isfinite(to_numpy(norm)))
    want, want_m, _ = reference_for(layer, x, mask=mask)
    np.testing.assert_allclose(to_numpy(memory), want_m, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("feature_map", ["l2", "elu1_l2"])
def test_padded_batch_trains_with_finite_weights(feature_map):
    """`model.fit` on a batch with padding (`mask_zero=True`): the padded tokens enter the
    memory as zero vectors, and the unit-norm maps must not turn them into NaN gradients
    (one NaN step would poison every weight)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(20, 16, mask_zero=True),
        InfiniTransformer(16, 32, 4, 4, 4, "gelu", 4, update="delta", causal=True,
                          memory_feature_map=feature_map, memory_decay=True),
        keras.layers.Dense(20),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).integers(1, 20, (4, 12))
    x[:, -5:] = 0
    history = model.fit(x, x, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])), history.history["loss"]
    for weight in model.weights:
        assert np.all(np.isfinite(to_numpy(weight))), weight.path


def test_gradients_reach_every_weight():
    layer = make_layer("delta", "l2", True, gate_lr_scale=5.0)
    x = inputs(12)
    grads = gradients(lambda: keras.ops.mean(layer(x) ** 2), layer.trainable_variables)
    assert len(grads) == 7  # q, k, v, output, gate, beta kernel, beta bias
    for var, g in zip(layer.trainable_variables, grads):
        assert g is not None and np.all(np.isfinite(g)) and np.abs(g).max() > 0, var.path


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_fit_jit_compile(update):
    seq = 24
    inp = keras.Input((seq, D))
    layer = CompressiveMemory(D, DK, DV, H, S, update=update, causal=True,
                              memory_feature_map="l2", write_strength=True,
                              gate_init=[0.5, -0.5], gate_lr_scale=10.0)
    model = keras.Model(inp, layer(inp))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse",
                  jit_compile=BACKEND != "torch")
    x = inputs(seq, batch=4)
    before = [to_numpy(v).copy() for v in model.trainable_variables]
    losses = model.fit(x, np.roll(x, 1, axis=1), epochs=3, batch_size=2,
                       verbose=0).history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    for var, old in zip(model.trainable_variables, before):
        assert np.abs(to_numpy(var) - old).max() > 0, var.path


# The recommended memory (README: l2, hard write strength, gate scale, coupled decay), the
# plain decay, and the maps that widen the key.
RECOMMENDED = dict(write_strength="hard_sigmoid", gate_lr_scale=10.0, memory_decay="coupled")


@pytest.mark.parametrize("feature_map,options", [
    ("l2", dict(write_strength=True)),
    ("l2", RECOMMENDED),
    ("l2", dict(write_strength="hard_sigmoid", memory_decay=True)),
    ("dpfp", dict(write_strength=True)),
    ("taylor", dict(write_strength=True)),
])
def test_mixed_precision_state_is_float32(feature_map, options):
    """Under mixed_bfloat16 the state (and the feature maps, computed in float32) stay
    float32, and the output is close to the float32 layer's with the same weights."""
    layer32 = CompressiveMemory(D, DK, DV, H, S, update="delta", causal=True,
                                memory_feature_map=feature_map, return_state=True,
                                **options)
    want, want_m, _ = layer32(inputs(13))
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = CompressiveMemory(D, DK, DV, H, S, update="delta", causal=True,
                              memory_feature_map=feature_map, return_state=True,
                              **options)
    layer.build((None, None, D))
    layer.set_weights(layer32.get_weights())
    out, memory, norm = layer(inputs(13))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(memory.dtype) == "float32"
    assert keras.backend.standardize_dtype(norm.dtype) == "float32"
    out32 = to_numpy(keras.ops.cast(out, "float32"))
    assert np.all(np.isfinite(out32))
    if feature_map == "dpfp":
        # DPFP's products of relus can nearly vanish for a 4-wide key; the direction of
        # such a vector, once normalised, moves with bfloat16 rounding of the projection
        # (measured: one output off by 0.3 on PyTorch). Dtypes and finiteness only.
        return
    scale = np.abs(to_numpy(want)).max()
    assert np.abs(out32 - to_numpy(want)).max() < 0.05 * scale
    assert np.abs(to_numpy(memory) - to_numpy(want_m)).max() < 0.05 * np.abs(
        to_numpy(want_m)).max()


OPTION_KWARGS = dict(update="delta", memory_feature_map="l2", write_strength=True,
                     gate_init=[1.0, -1.0], gate_lr_scale=5.0, memory_decay=True)


@pytest.mark.parametrize("decay", [True, "coupled"])
def test_config_round_trip_and_saving(tmp_path, decay):
    options = {**OPTION_KWARGS, "memory_decay": decay}
    layers = [
        CompressiveMemory(D, DK, DV, H, S, causal=True, name="m", **options),
        InfiniTransformer(D, 16, DK, DV, H, "gelu", S, causal=True, name="m", **options),
        MoDInfiniTransformer(D, 16, DK, DV, H, "gelu", S, sampling_factor=2, causal=True,
                             name="m", **options),
    ]
    for layer in layers:
        config = layer.get_config()
        for key in ("memory_feature_map", "write_strength", "gate_init", "gate_lr_scale",
                    "memory_decay"):
            assert config[key] == options[key] or (
                key == "gate_lr_scale" and config[key] == 5.0), key
        clone = type(layer).from_config(config)
        assert clone.get_config() == config
        inp = keras.Input((None, D))
        model = keras.Model(inp, layer(inp))
        x = inputs(10)
        want = to_numpy(model(x))
        path = str(tmp_path / "m.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(to_numpy(loaded(x)), want, atol=1e-6)
        attention = loaded.get_layer("m")
        attention = getattr(attention, "attention", attention)
        assert attention.write_strength is True and attention.memory_feature_map == "l2"
        assert attention.memory_decay == decay and type(attention.memory_decay) is type(decay)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(memory_feature_map="elu"), "memory_feature_map"),
        (dict(memory_feature_map=None), "memory_feature_map"),
        (dict(memory_feature_map="dpfp4"), "memory_feature_map"),
        (dict(memory_feature_map="Taylor"), "memory_feature_map"),
        (dict(write_strength=1), "write_strength"),
        (dict(write_strength="yes"), "write_strength"),
        (dict(write_strength="hard"), "write_strength"),
        (dict(write_strength=None), "write_strength"),
        (dict(gate_init=[0.0]), "gate_init"),
        (dict(gate_init=[0.0, float("nan")]), "gate_init"),
        (dict(gate_init=True), "gate_init"),
        (dict(gate_init="0"), "gate_init"),
        (dict(gate_lr_scale=0.0), "gate_lr_scale"),
        (dict(gate_lr_scale=-1), "gate_lr_scale"),
        (dict(gate_lr_scale=float("inf")), "gate_lr_scale"),
        (dict(gate_lr_scale=True), "gate_lr_scale"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CompressiveMemory(D, DK, DV, H, S, **kwargs)
    with pytest.raises(ValueError, match=name):
        InfiniTransformer(D, 16, DK, DV, H, "gelu", S, **kwargs)


@pytest.mark.parametrize("feature_map", ["dpfp2", "taylor"])
def test_wide_memory_state_shapes_saving_and_streaming(tmp_path, feature_map):
    """With a map wider than `dim_key` every piece of state has the feature width: the
    learned initial state, `initial_state` (a `dim_key`-wide one is refused by name),
    the returned state, streaming by chunks and a saved model."""
    f = width(feature_map)
    layer = CompressiveMemory(D, DK, DV, H, S, update="delta", causal=True,
                              memory_feature_map=feature_map, write_strength=True,
                              init_state_learnable=True, return_state=True, name="m")
    x = inputs(3 * S)
    out, memory, norm = layer(x)
    assert tuple(layer.initial_memory.shape) == (H, f, DV)
    assert tuple(layer.initial_norm.shape) == (H, f)
    assert tuple(memory.shape) == (B, H, f, DV) and tuple(norm.shape) == (B, H, f)
    assert layer.compute_output_shape((B, 3 * S, D))[1] == (B, H, f, DV)
    narrow = (np.zeros((B, H, DK, DV), "float32"), np.ones((B, H, DK), "float32"))
    with pytest.raises(ValueError, match="initial_state"):
        layer(x, initial_state=narrow)
    first, m1, z1 = layer(x[:, :S])
    second, m2, z2 = layer(x[:, S:], initial_state=(m1, z1))
    np.testing.assert_allclose(np.concatenate([to_numpy(first), to_numpy(second)], 1),
                               to_numpy(out), atol=1e-5)
    np.testing.assert_allclose(to_numpy(m2), to_numpy(memory), atol=1e-5)
    for block in (InfiniTransformer(D, 16, DK, DV, H, "gelu", S, update="delta",
                                    memory_feature_map=feature_map, return_state=True),
                  MoDInfiniTransformer(D, 16, DK, DV, H, "gelu", S, sampling_factor=2,
                                       update="delta", memory_feature_map=feature_map,
                                       return_state=True)):
        assert block.memory_dim == f
        assert tuple(block(x)[-2].shape) == (B, H, f, DV)
    inp = keras.Input((None, D))
    model = keras.Model(inp, layer(inp)[0])
    path = str(tmp_path / "wide.keras")
    model.save(path)
    np.testing.assert_allclose(to_numpy(keras.models.load_model(path)(x)), to_numpy(out),
                               atol=1e-6)


def test_hard_sigmoid_write_strength_skips_tokens_exactly_and_saves():
    """Tokens whose write logit is below -3 leave the memory exactly unchanged (the
    sigmoid's small writes add up over long inputs); "sigmoid" is saved as True."""
    layer = make_layer("delta", "l2", "hard_sigmoid", return_state=True)
    layer.beta_dense.bias.assign(np.full((H,), -3.5, "float32"))
    layer.beta_dense.kernel.assign(np.zeros((D, H), "float32"))
    m0 = np.random.default_rng(2).normal(size=(B, H, DK, DV)).astype("float32")
    z0 = np.ones((B, H, DK), "float32")
    _, memory, norm = layer(inputs(4 * S), initial_state=(m0, z0))
    np.testing.assert_array_equal(to_numpy(memory), m0)
    np.testing.assert_array_equal(to_numpy(norm), z0)
    assert layer.get_config()["write_strength"] == "hard_sigmoid"
    clone = CompressiveMemory.from_config(layer.get_config())
    assert clone.write_strength == "hard_sigmoid"
    assert CompressiveMemory(D, DK, DV, H, S, write_strength="sigmoid").write_strength is True


# ----------------------------------------------------------------------------- decay
DECAY_OPTIONS = [("l2", "hard_sigmoid", True), ("l2", False, True), ("elu1_l2", True, True),
                 ("l2", "hard_sigmoid", "coupled"), ("elu1_l2", True, "coupled"),
                 ("dpfp", "hard_sigmoid", "coupled"), ("dpfp2", True, True)]


@pytest.mark.parametrize("length", [8, 14])
@pytest.mark.parametrize("feature_map,write_strength,decay", DECAY_OPTIONS)
def test_decay_matches_reference(feature_map, write_strength, decay, length):
    """Gated DeltaNet: `M_t = alpha_t (I - beta_t k_t^T k_t) M_{t-1} + beta_t k_t^T v_t`
    token by token (`"coupled"`: `alpha_t ** beta_t`), masked tokens (a fully masked
    segment too) keep the memory."""
    layer = make_layer("delta", feature_map, write_strength, gate_lr_scale=3.0,
                       return_state=True, memory_decay=decay)
    x = inputs(length)
    mask = np.random.default_rng(3).uniform(size=(B, length)) > 0.3
    mask[0, :4] = False
    f = layer.memory_dim
    m0 = np.random.default_rng(8).normal(size=(B, H, f, DV)).astype("float32")
    z0 = np.ones((B, H, f), "float32")
    out, memory, norm = layer(x, mask=mask, initial_state=(m0, z0))
    want, want_m, want_z = reference_for(layer, x, mask=mask, memory0=m0, norm0=z0)
    np.testing.assert_allclose(to_numpy(out), want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(memory), want_m, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(norm), want_z, atol=1e-4, rtol=1e-5)
    # The same layer without the decay, or with the other decay, differs (the test can
    # fail; 100x the tolerance).
    no_decay, _, _ = reference_for(layer, x, mask=mask, memory0=m0, norm0=z0, decay=None)
    assert np.abs(no_decay - want).max() > 2e-3
    if write_strength:  # with beta = 1 both decays are the same
        other, _, _ = reference_for(layer, x, mask=mask, memory0=m0, norm0=z0,
                                    decay_coupled=decay != "coupled")
        assert np.abs(other - want).max() > 2e-3


def test_decay_initialisation_and_segment_decay():
    """At initialisation `softplus(decay_bias)` runs log-spaced over [0.001, 0.1] across
    heads; `gated_token_level_delta_inputs` with zero keys only decays the memory."""
    layer = CompressiveMemory(D, DK, DV, 4, S, update="delta", memory_feature_map="l2",
                              memory_decay=True)
    layer.build((None, None, D))
    steps = np.log1p(np.exp(to_numpy(layer.decay_bias)))
    np.testing.assert_allclose(steps, np.geomspace(1e-3, 1e-1, 4), rtol=1e-5)
    np.testing.assert_array_equal(to_numpy(layer.decay_log_rate), np.zeros(4))
    zeros_k = keras.ops.zeros((1, 1, 1, S, DK))
    log_decay = keras.ops.convert_to_tensor(np.full((1, 1, 1, S), -0.25, "float32"))
    read_k, write_k, value, seg = memory_ops.gated_token_level_delta_inputs(
        zeros_k, zeros_k, keras.ops.ones((1, 1, 1, S, DV)), log_decay)
    np.testing.assert_allclose(to_numpy(seg), [[[-0.25 * S]]], rtol=1e-6)
    m0 = keras.ops.ones((1, 1, DK, DV))
    _, final = memory_ops.delta_memory_states_general(
        read_k, write_k, value, keras.ops.zeros((1, 1, 1, DK)), m0, normalised=False,
        log_decay=seg)
    np.testing.assert_allclose(to_numpy(final), np.full((1, 1, DK, DV), np.exp(-0.25 * S)),
                               rtol=1e-5)


def test_decay_gradients_and_bad_arguments():
    layer = make_layer("delta", "l2", "hard_sigmoid", memory_decay=True)
    layer.beta_dense.bias.assign(np.zeros((H,), "float32"))  # inside the linear range
    x = inputs(12)
    grads = gradients(lambda: keras.ops.mean(layer(x) ** 2), layer.trainable_variables)
    # q, k, v, output, gate, beta kernel and bias, decay kernel, log rate, bias
    assert len(grads) == 10
    for var, g in zip(layer.trainable_variables, grads):
        assert g is not None and np.all(np.isfinite(g)) and np.abs(g).max() > 0, var.path
    for kwargs in (dict(update="linear", memory_feature_map="l2"),
                   dict(update="delta", memory_feature_map="elu1"),
                   dict(update="delta", memory_feature_map="taylor"),
                   dict(update="linear", memory_feature_map="dpfp")):
        with pytest.raises(ValueError, match="memory_decay"):
            CompressiveMemory(D, DK, DV, H, S, memory_decay=True, **kwargs)
    with pytest.raises(ValueError, match="memory_decay='coupled' with write_strength=False"):
        CompressiveMemory(D, DK, DV, H, S, update="delta", memory_feature_map="l2",
                          memory_decay="coupled")
    for bad in ("yes", 1, None, "Coupled"):
        with pytest.raises(ValueError, match="memory_decay"):
            InfiniTransformer(D, 16, DK, DV, H, "gelu", S, update="delta",
                              memory_feature_map="l2", memory_decay=bad)


GRADIENT_OPTIONS = [
    ("linear", "elu1", False, False),
    ("delta", "elu1", False, False),
    ("delta", "l2", True, False),
    ("delta", "l2", "hard_sigmoid", True),
    ("delta", "elu1_l2", True, True),
    ("delta", "l2", "hard_sigmoid", "coupled"),
    ("delta", "taylor", "hard_sigmoid", False),
    ("delta", "dpfp", "hard_sigmoid", "coupled"),
]


def _keep_off_relu_kinks(layer, x, margin=0.03):
    """DPFP is piecewise (relu): a central difference whose step moves a query or key
    component across 0 is not a derivative. Query and key kernels drawn (the same on every
    backend) so that every component is at least `margin` from 0, ~10x the change a step
    of the test makes."""
    for seed in range(200):
        rng = np.random.default_rng(100 + seed)
        wq, wk = rng.normal(size=(2, D, H, DK))
        if min(np.abs(np.einsum("bld,dhk->blhk", x, w)).min() for w in (wq, wk)) > margin:
            layer.query_dense.kernel.assign(wq.astype("float32"))
            layer.key_dense.kernel.assign(wk.astype("float32"))
            return
    raise AssertionError("no kernels clear of the relu kinks")


@pytest.mark.parametrize("update,feature_map,write_strength,decay", GRADIENT_OPTIONS)
def test_gradients_match_reference_finite_differences(update, feature_map, write_strength,
                                                      decay):
    """Every weight's gradient, projected on random directions, equals the central
    difference of the float64 reference: the backward pass (the segment-parallel scans,
    the decay's cumulative products) is checked against the equations, not only the
    forward values. Loss `sum(out * t)` over 3 segments with masked tokens, which enter as
    zero vectors: the L2 maps must have finite gradients there."""
    layer = make_layer(update, feature_map, write_strength, gate_lr_scale=3.0,
                       memory_decay=decay)
    if write_strength == "hard_sigmoid":  # keep the pre-activations off the kinks
        layer.beta_dense.kernel.assign(0.1 * to_numpy(layer.beta_dense.kernel))
        layer.beta_dense.bias.assign(np.zeros((H,), "float32"))
    length = 3 * S
    x = inputs(length)
    if feature_map.startswith("dpfp"):
        _keep_off_relu_kinks(layer, x)
    mask = np.random.default_rng(4).uniform(size=(B, length)) > 0.25
    target = np.random.default_rng(6).normal(size=(B, length, D))
    variables = layer.trainable_variables
    target32 = keras.ops.convert_to_tensor(target.astype("float32"))
    grads = gradients(lambda: keras.ops.sum(layer(x, mask=mask) * target32), variables)
    values = [to_numpy(v).astype("float64") for v in variables]

    def loss(arrays):
        for var, value in zip(variables, arrays):  # float32 round-off is far below eps
            var.assign(value.astype("float32"))
        try:
            return float(np.sum(reference_for(layer, x, mask=mask)[0] * target))
        finally:
            for var, value in zip(variables, values):
                var.assign(value.astype("float32"))

    rng = np.random.default_rng(7)
    eps = 1e-3
    for i, (var, grad) in enumerate(zip(variables, grads)):
        assert grad is not None, var.path
        for _ in range(2):
            direction = rng.normal(size=values[i].shape)
            up = [v + eps * direction if j == i else v for j, v in enumerate(values)]
            down = [v - eps * direction if j == i else v for j, v in enumerate(values)]
            numeric = (loss(up) - loss(down)) / (2 * eps)
            analytic = float(np.sum(grad * direction))
            np.testing.assert_allclose(analytic, numeric, rtol=1e-3,
                                       atol=1e-3 * (abs(numeric) + 1e-2), err_msg=var.path)


def test_decay_compiled_fit_runs_several_steps(tmp_path):
    """A compiled training step with the decay keeps making progress. With JAX's
    triangular solve in `gated_token_level_delta_inputs` this exact `fit` (batches of
    32 x 128) waited forever inside the first compiled step; the child process and its
    timeout turn such a wait into a failure instead of a stuck suite."""
    script = textwrap.dedent("""
        import numpy as np, keras
        from keras_infini import CompressiveMemory
        keras.utils.set_random_seed(0)
        inp = keras.Input((None, 64))
        layer = CompressiveMemory(64, 16, 16, 4, 32, update="delta", causal=True,
                                  memory_feature_map="l2", write_strength="hard_sigmoid",
                                  memory_decay=True, gate_lr_scale=10.0)
        model = keras.Model(inp, layer(inp))
        model.compile("adam", "mse", jit_compile=keras.backend.backend() != "torch")
        x = np.random.default_rng(0).normal(size=(4 * 32, 128, 64)).astype("float32")
        losses = model.fit(x, np.roll(x, 1, axis=1), batch_size=32, epochs=3,
                           verbose=0).history["loss"]
        np.save("losses.npy", np.array(losses))
        """)
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("12 compiled training steps with memory_decay=True did not finish "
                    "in 300 s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = np.load(tmp_path / "losses.npy")
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("length", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("decay", [False, True])
def test_unit_lower_inverse_matches_float64_inverse(length, decay):
    """`(I + A)^{-1}` by recursive block inversion (matmuls only) equals NumPy's float64
    inverse, for lengths that are and are not powers of two, with and without decay; for
    identical unit keys (`A` all ones below the diagonal) the inverse is bidiagonal."""
    rng = np.random.default_rng(length)
    keys = rng.normal(size=(2, 3, length, 8))
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    write = keys * rng.uniform(0, 1, size=(2, 3, length, 1))
    g = np.cumsum(-rng.uniform(0, 0.3, size=(2, 3, length)), -1) if decay else None
    steps = np.einsum("...tk,...ik->...ti", keys, write)
    if decay:
        steps = steps * np.exp(g[..., :, None] - g[..., None, :])
    expected = np.linalg.inv(np.tril(steps, -1) + np.eye(length))
    got = to_numpy(memory_ops.unit_lower_inverse(
        keys.astype("float32"), write.astype("float32"),
        None if g is None else g.astype("float32")))
    np.testing.assert_allclose(got, expected, atol=2e-6)
    same = np.full((1, length, 4), 0.5, "float32")
    bidiagonal = np.eye(length) - np.eye(length, k=-1)
    np.testing.assert_allclose(to_numpy(memory_ops.unit_lower_inverse(same, same))[0],
                               bidiagonal, atol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's compiled program")
@pytest.mark.parametrize("decay", [False, True])
def test_delta_rule_compiles_without_lapack_calls(decay):
    """The token-level delta rule's compiled train step calls no LAPACK kernel. XLA on
    CPU runs JAX's batched LU / triangular-solve kernels on its own intra-op thread pool,
    where two of them at once waited on each other forever (a converted model's
    `generate` hung at some prompt lengths); the solve is made of matmuls instead."""
    import jax

    layer = CompressiveMemory(32, 8, 8, 2, 16, update="delta", causal=True,
                              memory_feature_map="l2", write_strength="hard_sigmoid",
                              memory_decay=decay)
    x = np.random.default_rng(0).normal(size=(2, 64, 32)).astype("float32")
    layer(x)

    def loss(trainable, x):
        out, _ = layer.stateless_call(trainable, [v.value for v in
                                                  layer.non_trainable_variables], x)
        return jax.numpy.sum(out ** 2)

    text = jax.jit(jax.grad(loss)).lower(
        [v.value for v in layer.trainable_variables], x).compile().as_text()
    assert "custom-call" not in text or not any(
        name in text for name in ("lapack", "getrf", "trsm", "LuDecomposition")), [
        line for line in text.splitlines() if "custom-call" in line][:5]
