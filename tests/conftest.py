import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

BACKEND = keras.backend.backend()


@pytest.fixture(autouse=True)
def _seed_and_policy():
    """Deterministic seeds and a float32 policy for every test."""
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def gradients(loss_fn, variables):
    """Gradients of the scalar `loss_fn()` with respect to Keras `variables`, any backend.

    Returns NumPy arrays (None where a variable does not affect the loss).
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, [v.value for v in variables])
    elif BACKEND == "torch":
        import torch

        loss = loss_fn()
        grads = torch.autograd.grad(
            loss, [v.value for v in variables], allow_unused=True
        )
    elif BACKEND == "jax":
        import jax

        def pure(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return loss_fn()

        grads = jax.grad(pure)([v.value for v in variables])
    else:  # pragma: no cover
        raise NotImplementedError(BACKEND)
    return [None if g is None else to_numpy(g) for g in grads]


@pytest.fixture
def rope_digit_levels(monkeypatch):
    """The list of digit levels each rotary angle lookup used (`RoPEEmbeddings._cos_sin`,
    YaRN included), in call order, for the test's duration."""
    from keras_infini import RoPEEmbeddings

    levels = []
    original = RoPEEmbeddings._cos_sin

    def recording(self, positions, num_levels=4):
        levels.append(num_levels)
        return original(self, positions, num_levels)

    monkeypatch.setattr(RoPEEmbeddings, "_cos_sin", recording)
    return levels
