"""Mixed precision: `mixed_bfloat16` and `mixed_float16` on every backend (CPU).

Checks that the layers run and train under the policy, that the recurrent state (memory,
normaliser) and its learnable initial values stay float32, and that the outputs on a
32-segment sequence stay within a stated tolerance of the float32 run with the same weights.

Measured on the CPU test machines (jax 0.10.2, tensorflow-cpu 2.21, torch 2.13), error =
max |y_mixed - y_float32| / max |y_float32| over all configurations below (CompressiveMemory,
InfiniTransformer, MoDInfiniTransformer x linear/delta, causal, RoPE, learnable state,
256 tokens = 32 segments of 8): bfloat16 <= 9.4e-3, float16 <= 1.9e-3 (final memory: 4.2e-3
and 5.3e-4). The tolerances, 2.5e-2 and 5e-3, are ~2.7x above (README, "Mixed precision").
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import to_numpy

from keras_infini import CompressiveMemory
from keras_infini import InfiniTransformer
from keras_infini import MoDInfiniTransformer

B, D, HID, H, DK, DV, S, VOCAB = 2, 16, 32, 2, 8, 8, 8, 13
NUM_SEGMENTS = 32
L = NUM_SEGMENTS * S

# Relative tolerance: max |y_mixed - y_float32| <= TOL * max |y_float32| (see module doc).
TOLERANCE = {"mixed_bfloat16": 2.5e-2, "mixed_float16": 5e-3}
POLICIES = ("mixed_bfloat16", "mixed_float16")

# mixed_float16 works on CPU on all three backends here (forward, backward and the loss
# scale optimizer); a backend that cannot run it would be listed with the reason.
FLOAT16_UNSUPPORTED = {}


def skip_unsupported(policy):
    if policy == "mixed_float16" and BACKEND in FLOAT16_UNSUPPORTED:
        pytest.skip(FLOAT16_UNSUPPORTED[BACKEND])


@pytest.fixture(autouse=True)
def _reset_policy():
    yield
    keras.config.set_dtype_policy("float32")


def make_layer(kind, update):
    common = dict(update=update, causal=True, positional_embedder="rope",
                  init_state_learnable=True)
    if kind == "cm":
        return CompressiveMemory(D, DK, DV, H, S, **common)
    if kind == "infini":
        return InfiniTransformer(D, HID, DK, DV, H, "swiglu", S, **common)
    return MoDInfiniTransformer(D, HID, DK, DV, H, "gelu", S, sampling_factor=2,
                                return_router_outputs=True, **common)


def attention_of(layer):
    return layer if isinstance(layer, CompressiveMemory) else layer.attention


def perturbed_weights(layer, seed=1):
    """The layer's float32 weights plus noise, so gates and learnable state are non-trivial."""
    rng = np.random.default_rng(seed)
    weights = []
    for var in layer.weights:
        value = to_numpy(var).astype("float32")
        noise = 0.1 * rng.normal(size=value.shape)
        if var.path.endswith("initial_norm"):
            noise = np.abs(noise)
        weights.append((value + noise).astype("float32"))
    return weights


def router_safe_inputs(seed=0):
    """Inputs whose router logits (`x[..., 0]`, see `pin_router`) are >= 0.5 away from 0.

    Mixture-of-Depths routing is discrete: a token whose logit is within bfloat16 rounding
    of the decision threshold may be routed differently than in float32, which changes that
    segment's output by O(1). Bounding the logits away from 0 keeps the routing identical
    so the comparison measures the arithmetic only.
    """
    x = np.random.default_rng(seed).normal(size=(B, L, D)).astype("float32")
    x[..., 0] = np.sign(x[..., 0]) * (0.5 + np.abs(x[..., 0]))
    return x


def pin_router(layer):
    if isinstance(layer, MoDInfiniTransformer):
        kernel = np.zeros((D, 1), "float32")
        kernel[0, 0] = 1.0
        layer.router.kernel.assign(kernel)
        layer.router.bias.assign(np.zeros((1,), "float32"))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("kind", ["cm", "infini", "mod"])
def test_outputs_close_to_float32_and_state_float32(kind, update, policy):
    skip_unsupported(policy)
    x = router_safe_inputs()
    keras.config.set_dtype_policy("float32")
    reference = make_layer(kind, update)
    reference.build((None, None, D))
    weights = perturbed_weights(reference)
    reference.set_weights(weights)
    pin_router(reference)
    weights = [to_numpy(w) for w in reference.weights]
    want = [to_numpy(t) for t in reference(x, return_state=True)]

    keras.config.set_dtype_policy(policy)
    layer = make_layer(kind, update)
    layer.build((None, None, D))
    layer.set_weights(weights)
    compute = keras.config.dtype_policy().compute_dtype
    attention = attention_of(layer)
    assert attention.initial_memory.dtype == "float32"
    assert attention.initial_norm.dtype == "float32"
    got = layer(x, return_state=True)
    outputs, memory, norm = got[0], got[-2], got[-1]
    assert keras.backend.standardize_dtype(outputs.dtype) == compute
    assert keras.backend.standardize_dtype(memory.dtype) == "float32"
    assert keras.backend.standardize_dtype(norm.dtype) == "float32"
    if kind == "mod":  # same routing as in float32 (see router_safe_inputs)
        np.testing.assert_array_equal(to_numpy(got[1]), want[1])

    y = to_numpy(keras.ops.cast(outputs, "float32"))
    assert np.all(np.isfinite(y))
    error = np.abs(y - want[0]).max() / np.abs(want[0]).max()
    memory_error = np.abs(to_numpy(memory) - want[-2]).max() / np.abs(want[-2]).max()
    print(f"{BACKEND} {policy} {kind} {update}: output rel err {error:.3g}, "
          f"memory rel err {memory_error:.3g}")
    assert error <= TOLERANCE[policy], error
    assert memory_error <= TOLERANCE[policy], memory_error


def example_model():
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, D)(tokens)
    x = MoDInfiniTransformer(D, HID, DK, DV, H, "ffnswiglu", S, sampling_factor=2,
                             update="delta", causal=True, positional_embedder="rope",
                             init_state_learnable=True, name="mod_block")(x)
    x = InfiniTransformer(D, HID, DK, DV, H, "geglu", S, update="linear", causal=True,
                          init_state_learnable=True, name="infini_block")(x)
    # The logits layer computes in float32: the usual mixed-precision recipe.
    logits = keras.layers.Dense(VOCAB, dtype="float32")(x)
    return keras.Model(tokens, logits)


@pytest.mark.parametrize("policy", POLICIES)
def test_fit_finite_loss_and_float32_state(policy):
    skip_unsupported(policy)
    keras.config.set_dtype_policy(policy)
    model = example_model()
    optimizer = keras.optimizers.Adam(1e-2)
    if policy == "mixed_float16" and BACKEND == "tensorflow":
        # Keras 3.15 on TensorFlow: `LossScaleOptimizer.check_finite` densifies an
        # IndexedSlices gradient (the Embedding's) with `tensor_scatter_nd_update`, so an
        # overflowed value at a repeated token id can be overwritten by a finite one; the
        # step is applied and the embedding becomes NaN. Starting from a loss scale that
        # does not overflow on the first steps avoids it (README, "Mixed precision").
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0**8)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(4, 4 * S + 3)).astype("int32")
    targets = np.roll(tokens, -1, axis=1)
    history = model.fit(tokens, targets, batch_size=2, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses

    for name in ("mod_block", "infini_block"):
        block = model.get_layer(name)
        assert block.compute_dtype == keras.config.dtype_policy().compute_dtype
        attention = block.attention
        for var in (attention.initial_memory, attention.initial_norm):
            assert var.dtype == "float32", var.path
            assert np.all(np.isfinite(to_numpy(var)))
        assert np.all(to_numpy(attention.initial_norm) >= 0)  # NonNeg constraint held
        # The state returned by the trained block is float32 too.
        x = keras.ops.cast(to_numpy(model.layers[1](tokens[:1])), block.compute_dtype)
        if name == "infini_block":
            x = model.get_layer("mod_block")(x)
        outputs, memory, norm = block(x, return_state=True)
        assert keras.backend.standardize_dtype(memory.dtype) == "float32"
        assert keras.backend.standardize_dtype(norm.dtype) == "float32"
        assert np.all(np.isfinite(to_numpy(keras.ops.cast(outputs, "float32"))))
