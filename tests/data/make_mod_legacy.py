"""Writes the MoD fixtures in tests/data with the code at commit cb3bf22 (MoD as a subclass).

Run once, with that commit's package on PYTHONPATH:
    KERAS_BACKEND=jax python tests/data/make_mod_legacy.py
The files pin the weight layout saved before MoDInfiniTransformer held an inner block
(`test_mod_infini_transformer.py::test_loads_files_saved_before_composition`).
"""

import os

import keras
import numpy as np

from keras_infini import MoDInfiniTransformer

HERE = os.path.dirname(os.path.abspath(__file__))


def build_model():
    inputs = keras.Input((16, 8))
    x = MoDInfiniTransformer(8, 16, 4, 4, 2, "swiglu", segment_len=8, sampling_factor=2,
                             causal=True, positional_embedder="rope", name="mod")(inputs)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


if __name__ == "__main__":
    keras.utils.set_random_seed(7)
    model = build_model()
    # Non-trivial values everywhere (norm scales, biases, router) so a misplaced weight shows.
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.normal(scale=0.5, size=w.shape).astype("float32")
                 + (1.0 if "gamma" in w.path else 0.0))
    x = rng.normal(size=(2, 16, 8)).astype("float32")
    y = model.predict(x, verbose=0)
    model.save(os.path.join(HERE, "mod_legacy.keras"))
    model.save_weights(os.path.join(HERE, "mod_legacy.weights.h5"))
    np.save(os.path.join(HERE, "mod_legacy_inputs.npy"), x)
    np.save(os.path.join(HERE, "mod_legacy_outputs.npy"), y)
    print([w.path for w in model.weights])
