"""LoRA (`keras_infini.enable_lora`): Keras' EinsumDense LoRA on our equations, training only
the adapters, the trainable parameter count, saving and errors."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_infini
from keras_infini import CompressiveMemory
from keras_infini import InfiniTransformer
from keras_infini import MoDInfiniTransformer
from keras_infini import enable_lora

B, L, D, HID, H, DK, DV, S, VOCAB, RANK = 2, 20, 8, 12, 2, 4, 3, 8, 11, 2


def example_model():
    tokens = keras.Input((L,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, D, name="embedding")(tokens)
    x = MoDInfiniTransformer(D, HID, DK, DV, H, "swiglu", S, sampling_factor=2,
                             update="delta", causal=True, positional_embedder="rope",
                             init_state_learnable=True, name="mod_block")(x)
    x = InfiniTransformer(D, HID, DK, DV, H, "gelu", S, causal=True,
                          init_state_learnable=True, name="infini_block")(x)
    logits = keras.layers.Dense(VOCAB, name="logits")(x)
    return keras.Model(tokens, logits)


def data(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(4, L)).astype("int32")
    return tokens, np.roll(tokens, -1, axis=1)


def count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def lora_count(din, dout, rank=RANK, heads=None):
    """Parameters of Keras' LoRA factors for a kernel `(*lead, dout)`: a = lead + (r,), b = (r, dout)."""
    lead = din * (heads or 1)
    return lead * rank + rank * dout


def expected_block_lora(targets):
    n = 0
    if "attention" in targets:
        n += 2 * lora_count(D, DK, heads=H)  # query, key: kernel (D, H, DK)
        n += lora_count(D, DV, heads=H)  # value: (D, H, DV)
        n += lora_count(H * DV, D)  # output: (H, DV, D) -> a (H, DV, r), b (r, D)
    if "mlp" in targets:
        n += lora_count(D, HID) + lora_count(HID, D)
    return n


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_keras_einsum_lora_matches_merged_kernels(update):
    """EinsumDense.enable_lora works with `bnsd,dhk->bnshk` and `bnhsv,hvd->bnsd`."""
    layer = CompressiveMemory(D, DK, DV, H, S, update=update, causal=True,
                              positional_embedder="rope")
    layer.build((None, None, D))
    plain = CompressiveMemory(D, DK, DV, H, S, update=update, causal=True,
                              positional_embedder="rope")
    plain.build((None, None, D))
    x = np.random.default_rng(0).normal(size=(B, L, D)).astype("float32")
    before = to_numpy(layer(x))
    changed = enable_lora(layer, RANK)
    assert changed == [layer.query_dense, layer.key_dense, layer.value_dense,
                       layer.output_dense]
    assert [d.equation for d in changed] == ["bnsd,dhk->bnshk"] * 2 + [
        "bnsd,dhv->bnshv", "bnhsv,hvd->bnsd"]
    # b starts at zero: LoRA does not change the layer until it is trained.
    np.testing.assert_allclose(to_numpy(layer(x)), before, atol=1e-6)

    rng = np.random.default_rng(1)
    merged = []
    for dense in changed:
        assert tuple(dense.lora_kernel_a.shape) == tuple(dense.kernel.shape[:-1]) + (RANK,)
        assert tuple(dense.lora_kernel_b.shape) == (RANK, dense.kernel.shape[-1])
        assert not dense._kernel.trainable
        dense.lora_kernel_b.assign(rng.normal(size=dense.lora_kernel_b.shape).astype("float32"))
        a, b = to_numpy(dense.lora_kernel_a), to_numpy(dense.lora_kernel_b)
        merged.append(to_numpy(dense._kernel) + (dense.lora_alpha / RANK) * (a @ b))
    for dense, kernel in zip([plain.query_dense, plain.key_dense, plain.value_dense,
                              plain.output_dense], merged):
        dense.kernel.assign(kernel)
    plain.gate.assign(to_numpy(layer.gate))
    got = to_numpy(layer(x))
    assert np.abs(got - before).max() > 1e-3  # the adapters do something
    np.testing.assert_allclose(got, to_numpy(plain(x)), rtol=1e-5, atol=1e-5)


def test_fit_changes_only_lora_weights_and_count_drops():
    model = example_model()
    total_before = count(model.trainable_weights)
    assert total_before == count(model.weights)
    changed = enable_lora(model, RANK, targets=("attention", "mlp", "router"))
    # q, k, v, o, mlp_in, mlp_out per block, plus the MoD router.
    assert len(changed) == 2 * 6 + 1
    assert keras_infini.lora.lora_parameter_count(changed) == count(model.trainable_weights)
    expected = 2 * expected_block_lora(("attention", "mlp")) + lora_count(D, 1)
    assert count(model.trainable_weights) == expected
    assert count(model.non_trainable_weights) == count(model.weights) - expected
    assert count(model.weights) == total_before + expected
    lora_paths = {v.path for layer in changed for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    assert {v.path for v in model.trainable_weights} == lora_paths

    before = {v.path: to_numpy(v).copy() for v in model.weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens, targets = data()
    history = model.fit(tokens, targets, batch_size=2, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for v in model.weights:
        after = to_numpy(v)
        if v.path in lora_paths:  # 4 Adam steps: both factors moved
            assert not np.array_equal(after, before[v.path]), f"{v.path} did not train"
        else:
            np.testing.assert_array_equal(after, before[v.path], err_msg=v.path)


def test_targets_and_freeze_others():
    model = example_model()
    total = count(model.weights)
    changed = enable_lora(model, RANK, targets="attention", freeze_others=False)
    assert len(changed) == 8
    frozen_kernels = count([d._kernel for d in changed])
    lora = 2 * expected_block_lora(("attention",))
    assert count(model.trainable_weights) == total - frozen_kernels + lora


def test_saved_lora_model_reloads_with_equal_outputs(tmp_path):
    model = example_model()
    changed = enable_lora(model, RANK)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens, targets = data()
    model.fit(tokens, targets, batch_size=2, epochs=1, verbose=0)
    assert any(np.abs(to_numpy(d.lora_kernel_b)).max() > 0 for d in changed)
    want = to_numpy(model.predict(tokens, verbose=0))

    path = str(tmp_path / "lora.keras")
    model.save(path)
    # compile=False: the loaded model has no adapters (all weights trainable), so the
    # saved optimizer state (for the adapters only) does not apply to it.
    loaded = keras.models.load_model(path, compile=False)
    np.testing.assert_allclose(to_numpy(loaded.predict(tokens, verbose=0)), want,
                               rtol=1e-5, atol=1e-5)
    # The file holds merged kernels; adapters can be enabled again and start at zero.
    again = enable_lora(loaded, RANK)
    assert len(again) == len(changed)
    np.testing.assert_allclose(to_numpy(loaded.predict(tokens, verbose=0)), want,
                               rtol=1e-5, atol=1e-5)

    weights = str(tmp_path / "lora.weights.h5")
    model.save_weights(weights)
    plain = example_model()
    plain.load_weights(weights)
    np.testing.assert_allclose(to_numpy(plain.predict(tokens, verbose=0)), want,
                               rtol=1e-5, atol=1e-5)


def test_errors():
    model = example_model()
    for rank in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            enable_lora(model, rank)
    for targets in (("attention", "ffn"), ()):
        with pytest.raises(ValueError, match="targets"):
            enable_lora(model, RANK, targets=targets)
    with pytest.raises(ValueError, match="not built"):
        enable_lora(InfiniTransformer(D, HID, DK, DV, H, "gelu", S), RANK)
    with pytest.raises(ValueError, match="No keras_infini projection"):
        enable_lora(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), RANK)
    enable_lora(model, RANK)
    with pytest.raises(ValueError, match="already enabled"):
        enable_lora(model, RANK)
