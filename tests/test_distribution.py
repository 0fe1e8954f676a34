"""Multi-device data parallelism (JAX only): `keras.distribution.DataParallel` on 2 CPU devices.

The reference run trains here, on one device; a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=2` (set before jax is imported) trains the
same model from the same initial weights (`.weights.h5`) on the same data with
`keras.distribution.set_distribution(DataParallel(devices=list_devices()))`; the per-epoch
losses and the final weights must match the single-device run to float32 tolerance.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import to_numpy

pytestmark = pytest.mark.skipif(
    BACKEND != "jax",
    reason="tests the JAX recipe (keras.distribution.DataParallel); TensorFlow "
           "(tf.distribute.MirroredStrategy) and torch are documented, not tested",
)

L, D, HID, H, DK, DV, S, VOCAB = 16, 8, 12, 2, 4, 3, 8, 11
BATCH, SAMPLES, EPOCHS = 4, 8, 3  # batch divisible by the 2 devices; no partial batch

MODEL_CODE = f"""
import keras
from keras_infini import InfiniTransformer, MoDInfiniTransformer

def make_model():
    tokens = keras.Input(({L},), dtype="int32")
    x = keras.layers.Embedding({VOCAB}, {D})(tokens)
    x = MoDInfiniTransformer({D}, {HID}, {DK}, {DV}, {H}, "swiglu", {S}, sampling_factor=2,
                             update="delta", causal=True, positional_embedder="rope")(x)
    x = InfiniTransformer({D}, {HID}, {DK}, {DV}, {H}, "gelu", {S}, update="linear",
                          causal=True, init_state_learnable=True)(x)
    model = keras.Model(tokens, keras.layers.Dense({VOCAB})(x))
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model
"""


def train(model, tokens, targets):
    history = model.fit(tokens, targets, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                        verbose=0)
    return np.array(history.history["loss"])


def test_data_parallel_matches_single_device(tmp_path):
    namespace = {}
    exec(MODEL_CODE, namespace)
    model = namespace["make_model"]()
    model.save_weights(str(tmp_path / "init.weights.h5"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(SAMPLES, L)).astype("int32")
    targets = np.roll(tokens, -1, axis=1)
    np.savez(tmp_path / "data.npz", tokens=tokens, targets=targets)
    single = train(model, tokens, targets)
    single_weights = [to_numpy(w) for w in model.weights]
    assert np.all(np.isfinite(single)) and single[-1] < single[0]

    script = MODEL_CODE + textwrap.dedent(f"""
        import jax, numpy as np
        assert len(jax.devices()) == 2, jax.devices()
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        model = make_model()
        model.load_weights("init.weights.h5")
        kernel = model.weights[0].value
        assert len(kernel.sharding.device_set) == 2, kernel.sharding  # replicated on both
        data = np.load("data.npz")
        history = model.fit(data["tokens"], data["targets"], batch_size={BATCH},
                            epochs={EPOCHS}, shuffle=False, verbose=0)
        np.save("losses.npy", np.array(history.history["loss"]))
        np.savez("weights.npz", *[keras.ops.convert_to_numpy(w) for w in model.weights])
        print("devices", devices)
        """)
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip()
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    parallel = np.load(tmp_path / "losses.npy")
    print("single-device losses", single, "data-parallel losses", parallel)
    np.testing.assert_allclose(parallel, single, rtol=1e-5)
    parallel_weights = np.load(tmp_path / "weights.npz")
    for i, want in enumerate(single_weights):
        np.testing.assert_allclose(parallel_weights[f"arr_{i}"], want, rtol=1e-4, atol=1e-5,
                                   err_msg=model.weights[i].path)
