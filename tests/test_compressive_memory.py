"""CompressiveMemory against a NumPy float64 reference of Infini-attention's equations."""

import itertools

import keras
import numpy as np
import pytest
from conftest import BACKEND, gradients, to_numpy

import reference as ref
from keras_infini.layers.compressive_memory import CompressiveMemory
from keras_infini.layers.rotary import RoPEEmbeddings, YaRNEmbeddings
from keras_infini.ops import memory as memory_ops

B, D, H, DK, DV, S = 2, 8, 2, 4, 3, 4
ATOL = 2e-5


def make_embedder(kind, dim=DK, seg=S):
    if kind == "rope":
        return RoPEEmbeddings(dim=dim, seq_len=seg, dim_embeddings_pct=1.0, base=100)
    if kind == "yarn":
        return YaRNEmbeddings(dim=dim, seq_len=seg, context_len=seg, context_len_ext=4 * seg,
                              dim_embeddings_pct=1.0, base=100, alpha=1, beta=8)
    return None


def rotate_fn_for(kind, dim=DK, seg=S):
    if kind == "rope":
        theta = ref.rope_frequencies(dim, 1.0, 100)
        return lambda t, p: ref.rotate(t, p, theta)
    if kind == "yarn":
        theta = ref.yarn_frequencies(dim, seg, 4 * seg, 1.0, 100, 1, 8)
        scale = ref.yarn_mscale(seg, 4 * seg)
        return lambda t, p: ref.rotate(t, p, theta, scale)
    return None


def make_layer(update="linear", causal=False, embedder=None, learnable=False, **kw):
    layer = CompressiveMemory(D, DK, DV, H, S, update=update, causal=causal,
                              positional_embedder=make_embedder(embedder),
                              init_state_learnable=learnable, **kw)
    layer.build((None, None, D))
    rng = np.random.default_rng(7)
    layer.gate.assign(rng.normal(size=(H,)).astype("float32"))
    if learnable:
        layer.initial_memory.assign(0.3 * rng.normal(size=(H, DK, DV)).astype("float32"))
        layer.initial_norm.assign(rng.uniform(0.5, 2.0, size=(H, DK)).astype("float32"))
    return layer


def weights_of(layer):
    return dict(
        wq=to_numpy(layer.query_dense.kernel), wk=to_numpy(layer.key_dense.kernel),
        wv=to_numpy(layer.value_dense.kernel), wo=to_numpy(layer.output_dense.kernel),
        gate=to_numpy(layer.gate),
    )


def reference_for(layer, x, embedder=None, **kw):
    state = {}
    if layer.init_state_learnable:
        bsz = x.shape[0]
        state = dict(memory0=np.broadcast_to(to_numpy(layer.initial_memory), (bsz, H, DK, DV)),
                     norm0=np.broadcast_to(to_numpy(layer.initial_norm), (bsz, H, DK)))
    state.update(kw)
    return ref.compressive_memory(x, **weights_of(layer), segment_len=layer.segment_len,
                                  update=layer.update, causal=layer.causal,
                                  rotate_fn=rotate_fn_for(embedder), **state)


def inputs(length, batch=B, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, D)).astype("float32")


CONFIGS = list(itertools.product(["linear", "delta"], [False, True],
                                 [None, "rope", "yarn"], [False, True]))


@pytest.mark.parametrize("update,causal,embedder,learnable", CONFIGS)
def test_matches_reference(update, causal, embedder, learnable):
    layer = make_layer(update, causal, embedder, learnable, return_state=True)
    x = inputs(13)  # 3 full segments and a partial one
    out, memory, norm = layer(x)
    want, want_m, want_z = reference_for(layer, x, embedder)
    np.testing.assert_allclose(to_numpy(out), want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(memory), want_m, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(norm), want_z, atol=1e-4, rtol=1e-5)
    assert keras.backend.standardize_dtype(memory.dtype) == "float32"
    assert keras.backend.standardize_dtype(norm.dtype) == "float32"


@pytest.mark.parametrize("length", [1, 3, 4, 5, 9])
def test_odd_lengths(length):
    layer = make_layer("delta", True, "rope")
    x = inputs(length)
    want, _, _ = reference_for(layer, x, "rope")
    np.testing.assert_allclose(to_numpy(layer(x)), want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("update,causal", [("linear", False), ("linear", True),
                                           ("delta", False), ("delta", True)])
def test_mask(update, causal):
    layer = make_layer(update, causal, "rope", return_state=True)
    x = inputs(14)
    mask = np.random.default_rng(3).uniform(size=(B, 14)) > 0.4
    mask[0, :5] = False  # first segment fully masked, and the first token of the second
    mask[1, 4] = False  # with causal, query 4 of batch 1 has no key to attend to
    out, memory, norm = layer(x, mask=mask)
    # A masked token's own output is the output for a zero input (it enters nothing).
    zeroed = np.where(mask[..., None], x, 0.0).astype("float32")
    want, want_m, want_z = reference_for(layer, zeroed, "rope", mask=mask)
    np.testing.assert_allclose(to_numpy(out), want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(memory), want_m, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(norm), want_z, atol=1e-4, rtol=1e-5)
    # Masked tokens neither enter the memory nor get attended: changing them only changes
    # their own outputs.
    x2 = x.copy()
    x2[~mask] += 5.0
    out2 = to_numpy(layer(x2, mask=mask)[0])
    np.testing.assert_allclose(out2[mask], to_numpy(out)[mask], atol=1e-5)


def test_fully_masked_rows_give_zero_attention_and_finite_gradients():
    layer = make_layer("delta", True, None)
    layer.gate.assign(np.full((H,), -30.0, "float32"))  # local attention only
    x = inputs(8)
    mask = np.zeros((B, 8), bool)
    mask[1, 5:] = True
    out = to_numpy(layer(x, mask=mask))
    np.testing.assert_allclose(out[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[1, :5], 0.0, atol=1e-6)
    assert np.all(np.isfinite(out))
    grads = gradients(lambda: keras.ops.sum(layer(x, mask=mask) ** 2), layer.trainable_variables)
    for g in grads:
        assert g is not None and np.all(np.isfinite(g))


def test_explicit_positions():
    layer = make_layer("linear", True, "yarn")
    x = inputs(11)
    positions = np.random.default_rng(5).integers(0, 3 * S, size=(B, 11)).astype("int32")
    want, _, _ = reference_for(layer, x, "yarn", positions=positions)
    got = to_numpy(layer(x, positions=positions))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)
    default = to_numpy(layer(x))
    assert np.abs(got - default).max() > 1e-3  # positions matter


def test_positions_ignored_without_embedder():
    layer = make_layer("linear", True, None)
    x = inputs(8)
    positions = np.full((B, 8), 3, "int32")
    np.testing.assert_allclose(to_numpy(layer(x, positions=positions)), to_numpy(layer(x)),
                               atol=1e-6)


def test_initial_state_overrides():
    layer = make_layer("delta", False, None, learnable=True, return_state=True)
    x = inputs(9)
    rng = np.random.default_rng(11)
    m0 = rng.normal(size=(B, H, DK, DV)).astype("float32")
    z0 = rng.uniform(0.5, 1.5, size=(B, H, DK)).astype("float32")
    out, memory, norm = layer(x, initial_state=(m0, z0))
    want, want_m, want_z = reference_for(layer, x, memory0=m0, norm0=z0)
    np.testing.assert_allclose(to_numpy(out), want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(memory), want_m, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(norm), want_z, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_causality(update):
    layer = make_layer(update, True, "rope")
    x = inputs(16)
    base = to_numpy(layer(x))
    for t in [0, 5, 11, 15]:
        x2 = x.copy()
        x2[:, t] += 3.0
        out = to_numpy(layer(x2))
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5)
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-4


def test_non_causal_only_sees_own_and_earlier_segments():
    layer = make_layer("delta", False, None)
    x = inputs(16)
    base = to_numpy(layer(x))
    x2 = x.copy()
    x2[:, 9] += 3.0  # segment 2
    out = to_numpy(layer(x2))
    np.testing.assert_allclose(out[:, :8], base[:, :8], atol=1e-5)
    assert np.abs(out[:, 8] - base[:, 8]).max() > 1e-4  # same segment sees the future


@pytest.mark.parametrize("update,embedder", [("linear", "rope"), ("delta", "yarn")])
def test_streaming_chunks_equal_one_call(update, embedder):
    layer = make_layer(update, True, embedder, learnable=True, return_state=True)
    x = inputs(22)
    full, full_m, full_z = layer(x)
    state = None
    outs = []
    for start, stop in [(0, 8), (8, 12), (12, 20), (20, 22)]:
        out, m, z = layer(x[:, start:stop], initial_state=state)
        outs.append(to_numpy(out))
        state = (m, z)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), to_numpy(full), atol=1e-5)
    np.testing.assert_allclose(to_numpy(state[0]), to_numpy(full_m), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(state[1]), to_numpy(full_z), atol=1e-4, rtol=1e-6)


def test_delta_scan_and_associative_agree():
    rng = np.random.default_rng(2)
    n = 11
    bsz, heads, seg, dk, dv = 2, 3, 5, 4, 6
    sk = ref.sigma(rng.normal(size=(bsz, n, heads, seg, dk))).astype("float32")
    sk[0, 3] = 0.0  # an all-masked segment
    v = rng.normal(size=(bsz, n, heads, seg, dv)).astype("float32")
    m0 = np.zeros((bsz, heads, dk, dv), "float32")
    z0 = np.zeros((bsz, heads, dk), "float32")
    sk, v, m0, z0 = (keras.ops.convert_to_tensor(t) for t in (sk, v, m0, z0))
    z_before, _ = memory_ops.norm_states(sk, z0)
    a_before, a_final = memory_ops.delta_memory_states(sk, v, z_before, m0, "associative")
    s_before, s_final = memory_ops.delta_memory_states(sk, v, z_before, m0, "scan")
    np.testing.assert_allclose(to_numpy(a_before), to_numpy(s_before), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_numpy(a_final), to_numpy(s_final), rtol=1e-4, atol=1e-4)


def test_weights_and_initial_values():
    layer = CompressiveMemory(None, 4, 3, 2, 8, init_state_learnable=True)
    layer.build((None, None, 6))
    assert layer.dim_input == 6
    assert tuple(layer.query_dense.kernel.shape) == (6, 2, 4)
    assert tuple(layer.key_dense.kernel.shape) == (6, 2, 4)
    assert tuple(layer.value_dense.kernel.shape) == (6, 2, 3)
    assert tuple(layer.output_dense.kernel.shape) == (2, 3, 6)
    for dense in [layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense]:
        assert dense.bias is None
    np.testing.assert_array_equal(to_numpy(layer.gate), np.zeros(2))
    np.testing.assert_array_equal(to_numpy(layer.initial_memory), np.zeros((2, 4, 3)))
    np.testing.assert_array_equal(to_numpy(layer.initial_norm), np.ones((2, 4)))
    assert layer.initial_norm.constraint is not None
    plain = CompressiveMemory(6, 4, 3, 2, 8)
    plain.build((None, None, 6))
    assert len(plain.trainable_variables) == 5


def test_gradients_reach_every_weight():
    layer = make_layer("delta", True, "rope", learnable=True)
    x = inputs(12)
    grads = gradients(lambda: keras.ops.mean(layer(x) ** 2), layer.trainable_variables)
    assert len(grads) == 7
    for var, g in zip(layer.trainable_variables, grads):
        assert g is not None, var.path
        assert np.all(np.isfinite(g)), var.path
        assert np.abs(g).max() > 0, var.path


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_fit_jit_compile(update):
    seq = 24
    inp = keras.Input((seq, D))
    layer = CompressiveMemory(D, DK, DV, H, S, update=update, causal=True,
                              positional_embedder="rope", init_state_learnable=True)
    model = keras.Model(inp, layer(inp))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse",
                  jit_compile=BACKEND != "torch")
    x = inputs(seq, batch=4)
    y = np.roll(x, 1, axis=1)
    before = [to_numpy(v).copy() for v in model.trainable_variables]
    history = model.fit(x, y, epochs=3, batch_size=2, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    for var, old in zip(model.trainable_variables, before):
        new = to_numpy(var)
        assert np.all(np.isfinite(new)), var.path
        assert np.abs(new - old).max() > 0, var.path


def test_dynamic_sequence_length_model():
    inp = keras.Input((None, D))
    layer = CompressiveMemory(D, DK, DV, H, S, update="delta", causal=True,
                              positional_embedder="rope")
    model = keras.Model(inp, layer(inp))
    model.compile(optimizer="sgd", loss="mse")
    for length in [5, 12]:
        x = inputs(length)
        assert model.predict(x, verbose=0).shape == (B, length, D)
    model.fit(inputs(12), inputs(12), epochs=1, verbose=0)


def test_keras_mask_propagates_from_embedding():
    tokens = np.array([[3, 4, 5, 0, 0], [1, 2, 3, 4, 5]])
    inp = keras.Input((None,), dtype="int32")
    emb = keras.layers.Embedding(10, D, mask_zero=True)(inp)
    out = CompressiveMemory(D, DK, DV, H, S, causal=True)(emb)
    pooled = keras.layers.GlobalAveragePooling1D()(out)  # uses the propagated mask
    model = keras.Model(inp, [out, pooled])
    out_v, pooled_v = model(tokens)
    np.testing.assert_allclose(to_numpy(pooled_v)[0], to_numpy(out_v)[0, :3].mean(0), atol=1e-5)


def test_config_round_trip_and_saving(tmp_path):
    for embedder in [None, "rope", make_embedder("rope"), make_embedder("yarn")]:
        layer = CompressiveMemory(D, DK, DV, H, S, sampling_factor=2.0, update="delta",
                                  causal=True, positional_embedder=embedder,
                                  init_state_learnable=True, name="cm")
        config = layer.get_config()
        clone = CompressiveMemory.from_config(config)
        assert clone.get_config() == config
        inp = keras.Input((None, D))
        model = keras.Model(inp, layer(inp))
        x = inputs(10)
        want = to_numpy(model(x))
        path = str(tmp_path / "cm.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(to_numpy(loaded(x)), want, atol=1e-6)
        emb = loaded.get_layer("cm").positional_embedder
        assert type(emb) is type(layer.positional_embedder)


def test_sampling_factor_does_not_change_computation():
    a = make_layer("linear", True, None)
    b = CompressiveMemory(D, DK, DV, H, S, sampling_factor=4, causal=True)
    b.build((None, None, D))
    b.set_weights(a.get_weights())
    x = inputs(9)
    np.testing.assert_allclose(to_numpy(a(x)), to_numpy(b(x)), atol=1e-6)


def test_string_rope_builds_matching_embedder():
    layer = CompressiveMemory(D, DK, DV, H, S, positional_embedder="rope")
    assert isinstance(layer.positional_embedder, RoPEEmbeddings)
    assert layer.positional_embedder.dim == DK and layer.positional_embedder.name == "positional_embedder"


@pytest.mark.parametrize("kwargs,name", [
    (dict(dim_key=0), "dim_key"), (dict(dim_value=-1), "dim_value"),
    (dict(num_heads=0), "num_heads"), (dict(segment_len=0), "segment_len"),
    (dict(dim_input=0), "dim_input"), (dict(dim_key=2.5), "dim_key"),
    (dict(update="exp"), "update"), (dict(positional_embedder="alibi"), "positional_embedder"),
    (dict(positional_embedder="yarn"), "YaRNEmbeddings"),
    (dict(positional_embedder=object()), "positional_embedder"),
    (dict(sampling_factor=1.0), "sampling_factor"), (dict(sampling_factor="2"), "sampling_factor"),
    (dict(bogus_kwarg=1), "bogus_kwarg"),
])
def test_bad_arguments(kwargs, name):
    args = dict(dim_input=D, dim_key=DK, dim_value=DV, num_heads=H, segment_len=S)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        CompressiveMemory(**args)


def test_embedder_dim_must_match_dim_key():
    with pytest.raises(ValueError, match="dim_key"):
        CompressiveMemory(D, DK, DV, H, S, positional_embedder=RoPEEmbeddings(dim=6, seq_len=S))


def test_bad_input_shapes():
    layer = CompressiveMemory(D, DK, DV, H, S)
    with pytest.raises(ValueError, match="dim_input"):
        layer(np.zeros((2, 5, D + 1), "float32"))
    with pytest.raises(ValueError, match="rank 3"):
        CompressiveMemory(D, DK, DV, H, S)(np.zeros((2, D), "float32"))


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_grouped_attention_matches_reference(update):
    layer = make_layer(update, True, "rope", return_state=True)
    layer.group_tokens = 2 * S  # groups of 2 segments: 27 tokens -> 4 groups
    x = inputs(27)
    mask = np.random.default_rng(9).uniform(size=(B, 27)) > 0.3
    out, memory, _ = layer(x, mask=mask)
    want, want_m, _ = reference_for(layer, x, "rope", mask=mask)
    np.testing.assert_allclose(to_numpy(out), want, atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(memory), want_m, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_grouped_layer_equals_one_batch_with_positions_and_gradients(update):
    """Grouped (whole layer per group, output projection included) vs no grouping:
    values and gradients."""
    x = keras.ops.convert_to_tensor(inputs(29))
    rng = np.random.default_rng(11)
    mask = rng.uniform(size=(B, 29)) > 0.25
    positions = rng.integers(0, 3 * S, size=(B, 29))
    results, weights = [], None
    for group in (None, 2 * S):
        layer = make_layer(update, True, "rope", learnable=True)
        layer.group_tokens = group
        if weights is None:
            layer.initial_norm.assign(np.full((H, DK), 0.5, "float32"))
            weights = layer.get_weights()
        layer.set_weights(weights)

        def loss():
            out, memory, norm = layer(x, mask=mask, positions=positions, return_state=True)
            return (keras.ops.sum(out ** 2) + keras.ops.sum(memory) * 1e-2
                    + keras.ops.sum(norm) * 1e-2)

        out = to_numpy(layer(x, mask=mask, positions=positions))
        results.append((out, gradients(loss, layer.trainable_weights)))
    (out_a, grads_a), (out_b, grads_b) = results
    np.testing.assert_allclose(out_b, out_a, atol=1e-5, rtol=1e-4)
    for ga, gb in zip(grads_a, grads_b):
        np.testing.assert_allclose(gb, ga, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_grouped_layer_mixed_precision(update):
    """Grouped under `mixed_bfloat16`: outputs in bfloat16 close to the float32 reference,
    returned state float32 and equal to the ungrouped layer's."""
    x = inputs(27)
    mask = np.random.default_rng(5).uniform(size=(B, 27)) > 0.3
    weights = make_layer(update, True, "rope").get_weights()
    results = []
    for group in (None, 2 * S):
        layer = make_layer(update, True, "rope", return_state=True, dtype="mixed_bfloat16")
        layer.set_weights(weights)
        layer.group_tokens = group
        results.append(layer(x, mask=mask))
    (out_a, mem_a, norm_a), (out_b, mem_b, norm_b) = results
    assert keras.backend.standardize_dtype(out_b.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(mem_b.dtype) == "float32"
    assert keras.backend.standardize_dtype(norm_b.dtype) == "float32"
    reference_layer = make_layer(update, True, "rope")
    reference_layer.set_weights(weights)
    want, _, _ = reference_for(reference_layer, x, "rope", mask=mask)
    out_b = to_numpy(keras.ops.cast(out_b, "float32"))
    np.testing.assert_allclose(out_b, want, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(
        out_b, to_numpy(keras.ops.cast(out_a, "float32")), atol=3e-2, rtol=3e-2
    )
    np.testing.assert_allclose(to_numpy(mem_b), to_numpy(mem_a), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(to_numpy(norm_b), to_numpy(norm_a), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_grouped_attention_fit_jit_compile(update):
    seq = 40
    inp = keras.Input((seq, D))
    layer = CompressiveMemory(D, DK, DV, H, S, update=update, causal=True,
                              positional_embedder="rope")
    layer.group_tokens = 3 * S  # 10 segments -> 4 groups, one padded
    model = keras.Model(inp, layer(inp))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse",
                  jit_compile=BACKEND != "torch")
    x = inputs(seq, batch=4)
    losses = model.fit(x, np.roll(x, 1, axis=1), epochs=3, batch_size=2, verbose=0)
    losses = losses.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_fit_jit_compile_with_changing_lengths():
    """Varying lengths make TF retrace with a None length (dynamic number of segments)."""
    inp = keras.Input((None, D))
    layer = CompressiveMemory(D, DK, DV, H, S, update="delta", causal=True,
                              positional_embedder="rope")
    model = keras.Model(inp, layer(inp))
    model.compile(optimizer="sgd", loss="mse", jit_compile=BACKEND != "torch")
    for length in [12, 20, 9]:
        x = inputs(length, batch=4)
        loss = model.fit(x, x, batch_size=2, epochs=1, verbose=0).history["loss"][0]
        assert np.isfinite(loss)
