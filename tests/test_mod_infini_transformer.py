"""MoDInfiniTransformer: routing, reference values, router loss, causality, fit, saving."""

import keras
import numpy as np
import pytest
from blocks_common import D, DK, DV, H, HID, block_reference, randomize, rope_rotate_fn
from conftest import BACKEND, gradients, to_numpy

import reference as ref
from keras_infini.layers.activations import ACTIVATIONS
from keras_infini.layers.infini_transformer import InfiniTransformer
from keras_infini.layers.mod_infini_transformer import MoDInfiniTransformer, segment_capacity
from keras_infini.layers.rotary import RoPEEmbeddings, YaRNEmbeddings

SEG, FACTOR, K = 8, 2.5, 4  # ceil(8 / 2.5) = 4 slots per segment
JIT = BACKEND != "torch"


def make_block(activation="gelu", causal=True, seed=0, **kw):
    block = MoDInfiniTransformer(D, HID, DK, DV, H, activation, SEG, FACTOR, causal=causal,
                                 positional_embedder="rope", **kw)
    block.build((None, None, D))
    randomize(block, seed)
    return block


def inputs(length, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, D)).astype("float32")


def router_logits(block, x):
    return (np.asarray(x, np.float64) @ to_numpy(block.router.kernel))[..., 0] + to_numpy(
        block.router.bias)[0]


def test_capacity_is_exact():
    assert segment_capacity(21, 1.4) == 15
    assert segment_capacity(512, 8) == 64
    assert segment_capacity(10, 3) == 4
    assert segment_capacity(8, 2.5) == 4
    block = MoDInfiniTransformer(D, HID, DK, DV, H, "gelu", 21, 1.4, positional_embedder="rope")
    assert block.capacity == 15 and block.attention.segment_len == 15
    assert block.block.segment_len == 15 and block.segment_len == 21


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("normalize_first", [True, False])
def test_matches_reference(training, normalize_first):
    block = make_block(normalize_first=normalize_first, update="delta",
                       return_router_outputs=True, return_state=True)
    x = inputs(19)  # two full segments and a partial one
    mask = np.ones((2, 19), bool)
    mask[0, 3:14] = False  # example 0 keeps 3 and 2 real tokens in segments 0 and 1 (< k)
    out, selection, logits, memory, norm = block(x, mask=mask, training=training)
    r = router_logits(block, x)
    inner = block_reference(block, "gelu", rope_rotate_fn())
    want, want_sel, want_m, want_z = ref.mixture_of_depths(
        x, r, inner, segment_len=SEG, k=K, training=training, mask=mask)
    np.testing.assert_allclose(to_numpy(logits).reshape(2, 19), r, atol=1e-5)
    np.testing.assert_array_equal(to_numpy(selection).reshape(2, 19), want_sel)
    np.testing.assert_allclose(to_numpy(out), want, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(memory), want_m, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(to_numpy(norm), want_z, atol=1e-4, rtol=1e-5)
    if training:  # every segment routes min(k, real tokens)
        sel = want_sel
        assert sel[0, :8].sum() == 3 and sel[0, 8:16].sum() == 2  # fewer real tokens than k
        assert sel[1, :8].sum() == K and sel[1, 16:].sum() == 3  # full segment; partial one
    assert not np.any(want_sel[~mask])


def test_unselected_tokens_pass_through():
    block = make_block()
    x = inputs(16)
    out, selection, _ = make_block(return_router_outputs=True)(x, training=True)
    sel = to_numpy(selection).reshape(2, 16) > 0
    out = to_numpy(out)
    np.testing.assert_array_equal(out[~sel], x[~sel])
    assert np.abs(out[sel] - x[sel]).min() > 0
    del block


def test_router_loss_value_and_inference_has_none():
    block = make_block(router_loss_weight=0.7, return_router_outputs=True)
    x = inputs(16)
    mask = np.ones((2, 16), bool)
    mask[1, 10:] = False
    _, selection, logits = block(x, mask=mask, training=True)
    assert len(block.losses) == 1
    r = to_numpy(logits)[:, 0].astype(np.float64)
    y = to_numpy(selection)[:, 0]
    bce = np.maximum(r, 0) - r * y + np.log1p(np.exp(-np.abs(r)))
    want = 0.7 * bce[mask.reshape(-1)].mean()
    np.testing.assert_allclose(float(to_numpy(block.losses[0])), want, rtol=1e-5)
    block(x, mask=mask, training=False)
    assert len(block.losses) == 0


def test_router_gets_gradient_from_main_loss_alone():
    block = make_block(router_loss_weight=0.0)
    x = inputs(16)
    grads = gradients(lambda: keras.ops.mean(block(x, training=True) ** 2),
                      block.trainable_variables)
    by_name = {v.path: g for v, g in zip(block.trainable_variables, grads)}
    router_grads = [g for p, g in by_name.items() if "router" in p]
    assert len(router_grads) == 2
    for g in router_grads:
        assert g is not None and np.abs(g).max() > 0
    for path, g in by_name.items():
        assert g is not None and np.all(np.isfinite(g)), path


def test_batched_inference_equals_one_at_a_time():
    block = make_block(update="delta")
    x = inputs(21, batch=8, seed=3)
    batched = to_numpy(block(x, training=False))
    single = np.concatenate([to_numpy(block(x[i:i + 1], training=False)) for i in range(8)])
    np.testing.assert_allclose(batched, single, atol=2e-5)


def test_inference_is_causal():
    block = make_block(update="delta", return_router_outputs=True)
    x = inputs(24, seed=4)
    base, base_sel, _ = block(x, training=False)
    base, base_sel = to_numpy(base), to_numpy(base_sel).reshape(2, 24)
    assert 0 < base_sel.sum() < base_sel.size
    for t in [2, 9, 17]:
        x2 = x.copy()
        x2[:, t:] = np.random.default_rng(t).normal(size=x2[:, t:].shape)
        out, sel, _ = block(x2, training=False)
        np.testing.assert_allclose(to_numpy(out)[:, :t], base[:, :t], atol=1e-5)
        np.testing.assert_array_equal(to_numpy(sel).reshape(2, 24)[:, :t], base_sel[:, :t])


def test_streaming_inference_in_chunks():
    block = make_block(update="delta", return_state=True, init_state_learnable=True)
    x = inputs(20, seed=5)
    full = to_numpy(block(x)[0])
    state, outs = None, []
    for start, stop in [(0, 8), (8, 16), (16, 20)]:
        out, m, z = block(x[:, start:stop], initial_state=state)
        outs.append(to_numpy(out))
        state = (m, z)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5)


def test_output_structure():
    x = inputs(10)
    assert tuple(make_block()(x).shape) == (2, 10, D)
    outs = make_block(return_router_outputs=True, return_state=True)(x)
    assert [tuple(o.shape) for o in outs] == [(2, 10, D), (20, 1), (20, 1), (2, H, DK, DV),
                                              (2, H, DK)]
    outs = make_block(return_state=True)(x)
    assert [tuple(o.shape) for o in outs] == [(2, 10, D), (2, H, DK, DV), (2, H, DK)]


def test_keras_mask_through_block():
    tokens = np.array([[3, 4, 5, 6, 7, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]])
    inp = keras.Input((None,), dtype="int32")
    emb = keras.layers.Embedding(10, D, mask_zero=True)
    e = emb(inp)
    out, selection, _ = MoDInfiniTransformer(D, HID, DK, DV, H, "gelu", SEG, FACTOR,
                                             causal=True, return_router_outputs=True)(e)
    pooled = keras.layers.GlobalAveragePooling1D()(out)  # consumes the propagated mask
    model = keras.Model(inp, [e, out, selection, pooled])
    e_v, out_v, sel_v, pooled_v = (to_numpy(t) for t in model(tokens, training=True))
    sel_v = sel_v.reshape(2, 10)
    assert not np.any(sel_v[0, 5:])  # masked tokens never routed
    assert sel_v[0, :5].sum() == K  # ... and do not take the real tokens' slots
    np.testing.assert_allclose(out_v[0, 5:], e_v[0, 5:], atol=1e-6)  # they pass through
    np.testing.assert_allclose(pooled_v[0], out_v[0, :5].mean(0), atol=1e-5)


def next_token_model(sequential, vocab=32, seq=None):
    blocks = [
        InfiniTransformer(D, HID, DK, DV, H, "swiglu", SEG, causal=True,
                          positional_embedder="rope"),
        MoDInfiniTransformer(D, HID, DK, DV, H, "gelu", SEG, FACTOR, causal=True,
                             positional_embedder="rope", router_loss_weight=1.0),
    ]
    if sequential:
        return keras.Sequential([keras.Input((seq,), dtype="int32"),
                                 keras.layers.Embedding(vocab, D), *blocks,
                                 keras.layers.Dense(vocab)])
    inp = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, D)(inp)
    for blk in blocks:
        h = blk(h)
    return keras.Model(inp, keras.layers.Dense(vocab)(h))


@pytest.mark.parametrize("sequential", [False, True])
def test_fit_end_to_end(sequential):
    tokens = np.tile(np.arange(33) % 7, (4, 1)) + np.arange(4)[:, None]
    x, y = tokens[:, :-1], tokens[:, 1:]
    model = next_token_model(sequential, seq=32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # lr = 0: the reported loss is the loss of the current weights in training mode.
    model.compile(keras.optimizers.SGD(0.0), loss_fn, jit_compile=JIT)
    reported = model.fit(x, y, batch_size=4, epochs=1, verbose=0).history["loss"][0]
    main = float(to_numpy(loss_fn(y, model(x, training=True))))
    router = float(sum(to_numpy(l) for l in model.losses))
    assert router > 0.05
    np.testing.assert_allclose(reported, main + router, rtol=1e-4)

    model.compile(keras.optimizers.Adam(1e-2), loss_fn, jit_compile=JIT)
    losses = model.fit(x, y, batch_size=2, epochs=8, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
    assert model.predict(x[:3], verbose=0).shape == (3, 32, 32)


def test_fit_dynamic_length_with_dropout():
    inp = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(16, D)(inp)
    h = MoDInfiniTransformer(D, HID, DK, DV, H, "ffngeglu", SEG, FACTOR, causal=True,
                             dropout=0.2, positional_embedder="rope")(h)
    model = keras.Model(inp, keras.layers.Dense(16)(h))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=JIT)
    tokens = np.random.default_rng(0).integers(0, 16, size=(4, 20))
    losses = model.fit(tokens[:, :-1], tokens[:, 1:], epochs=4, batch_size=2,
                       verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert model.predict(tokens[:3, :5], verbose=0).shape == (3, 5, 16)


EMBEDDERS = [None, "rope", "rope_obj", "yarn_obj"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("embedder", EMBEDDERS)
def test_serialization_round_trip(activation, embedder, tmp_path):
    if embedder == "rope_obj":
        embedder = RoPEEmbeddings(dim=DK, seq_len=SEG, dim_embeddings_pct=1.0)
    elif embedder == "yarn_obj":
        embedder = YaRNEmbeddings(dim=DK, seq_len=SEG, context_len=SEG, context_len_ext=4 * SEG)
    block = MoDInfiniTransformer(D, HID, DK, DV, H, activation, SEG, FACTOR, update="delta",
                                 causal=True, positional_embedder=embedder,
                                 init_state_learnable=True, router_loss_weight=0.3,
                                 name="mod")
    config = block.get_config()
    assert MoDInfiniTransformer.from_config(config).get_config() == config
    model = keras.Sequential([keras.Input((None, D)), block])
    x = inputs(12)
    want = to_numpy(model(x))
    path = str(tmp_path / "mod.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(x)), want, atol=1e-5)


@pytest.mark.parametrize("kwargs,name", [
    (dict(sampling_factor=1.0), "sampling_factor"), (dict(sampling_factor=SEG), "sampling_factor"),
    (dict(sampling_factor=None), "sampling_factor"), (dict(router_loss_weight=-1), "router_loss_weight"),
    (dict(activation="tanh"), "activation"), (dict(dropout=1.5), "dropout"),
    (dict(layer_norm_epsilon=-1e-5), "layer_norm_epsilon"), (dict(dim_hidden=0), "dim_hidden"),
    (dict(num_heads=0), "num_heads"), (dict(unknown_arg=3), "unknown_arg"),
])
def test_bad_arguments(kwargs, name):
    args = dict(dim_input=D, dim_hidden=HID, dim_key=DK, dim_value=DV, num_heads=H,
                activation="gelu", segment_len=SEG, sampling_factor=FACTOR)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        MoDInfiniTransformer(**args)


# ---------------------------------------------------------------- composition (issue 12)
DATA = __import__("os").path.join(__import__("os").path.dirname(__file__), "data")


def _legacy_model():
    import sys

    sys.path.insert(0, DATA)
    try:
        import make_mod_legacy
    finally:
        sys.path.remove(DATA)
    return make_mod_legacy.build_model()


def test_loads_files_saved_before_composition():
    # Written by tests/data/make_mod_legacy.py with the subclass layout (commit cb3bf22).
    import os

    x = np.load(os.path.join(DATA, "mod_legacy_inputs.npy"))
    want = np.load(os.path.join(DATA, "mod_legacy_outputs.npy"))
    loaded = keras.saving.load_model(os.path.join(DATA, "mod_legacy.keras"), compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=1e-5, rtol=1e-5)
    model = _legacy_model()
    model.load_weights(os.path.join(DATA, "mod_legacy.weights.h5"))
    np.testing.assert_allclose(model.predict(x, verbose=0), want, atol=1e-5, rtol=1e-5)


def test_weight_layout_unchanged(tmp_path):
    import os

    import h5py

    def paths(path):
        found = []
        with h5py.File(path) as f:
            f.visit(lambda n: found.append(n) if "/vars/" in n else None)
        return sorted(found)

    model = _legacy_model()
    model.save_weights(str(tmp_path / "new.weights.h5"))
    assert paths(tmp_path / "new.weights.h5") == paths(os.path.join(DATA, "mod_legacy.weights.h5"))


def test_block_is_a_composed_infini_transformer():
    block = make_block(activation="swiglu")
    assert not isinstance(block, InfiniTransformer)
    assert isinstance(block.block, InfiniTransformer) and block.block.name == "block"
    assert block.block.segment_len == K and block.block.return_state
    assert block.attention is block.block.attention and block.mlp_in is block.block.mlp_in
    assert isinstance(block.router, keras.layers.Dense) and block.router.units == 1
    # Every stateful sublayer of the block is reachable under a saved alias.
    from keras_infini.layers.mod_infini_transformer import _BLOCK_SUBLAYERS

    with_state = {id(v) for layer in block.block._layers for v in layer.variables}
    aliased = {id(v) for name in _BLOCK_SUBLAYERS for v in getattr(block, name).variables}
    assert with_state == aliased and not block.block._trainable_variables
    assert sorted(block.get_config()) == sorted(
        ["name", "trainable", "dtype", "dim_input", "dim_hidden", "dim_key", "dim_value",
         "num_heads", "activation", "segment_len", "sampling_factor", "update", "causal",
         "positional_embedder", "init_state_learnable", "dropout", "normalize_first",
         "layer_norm_epsilon", "return_state", "router_loss_weight", "return_router_outputs",
         "kernel_initializer", "bias_initializer", "kernel_regularizer", "bias_regularizer",
         "kernel_constraint", "bias_constraint", "memory_feature_map", "write_strength",
         "gate_init", "gate_lr_scale", "memory_decay", "num_key_value_heads", "memory_heads",
         "memory_gate"])


def test_router_loss_logged_by_fit():
    tokens = keras.Input((16, D))
    block = MoDInfiniTransformer(D, HID, DK, DV, H, "gelu", SEG, FACTOR, causal=True,
                                 router_loss_weight=0.5)
    model = keras.Model(tokens, block(tokens))
    model.compile("sgd", "mse")
    x = inputs(16, batch=4)
    history = model.fit(x, x, batch_size=2, epochs=2, verbose=0).history
    assert "router_loss" in history and "loss" in history
    values = np.asarray(history["router_loss"])
    assert np.all(np.isfinite(values))
    if BACKEND == "jax":
        # Keras' stateless JAX fit step cannot update a layer's metric (keras #19402,
        # #21639): the entry is logged but stays 0 there (documented).
        assert np.all(values == 0)
    else:
        assert np.all(values > 0)
        # Eager check: one training call updates the tracker with the added loss.
        block.router_loss_tracker.reset_state()
        block(x[:2], training=True)
        np.testing.assert_allclose(float(block.router_loss_tracker.result()),
                                   float(to_numpy(block.losses[-1])), rtol=1e-6)
