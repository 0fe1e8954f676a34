"""FFN activations as Keras layers: plain, Swish and the gated linear unit family.

Every layer preserves the last axis `d`. Names (for `get_activation(name, dim)`):

- `relu`, `gelu` (exact, erf), `abs`: no weights.
- `swish`: `x * sigmoid(beta * x)`, trainable scalar `beta` (init 1).
- `swiglu`: `swish(x W + b) * (x V + c)` with its own `beta`; `geglu`: `gelu(x W + b) * (x V + c)`;
  `W` = `kernel_gate`, `V` = `kernel_value` `(d, d)`, `b` = `bias_gate`, `c` = `bias_value`.
- `ffnglu`: `(sigmoid(x W1) * (x V)) W2`; `ffngeglu`: `(gelu(x W1) * (x V)) W2`;
  `ffnswiglu`: `(swish_1(x W1) * (x V)) W2`; inner width `ceil(2 d / 3)`; `W1` =
  `kernel_gate`, `V` = `kernel_value` `(d, inner)`, `W2` = `kernel_out` `(inner, d)`.

Kernels are Glorot-uniform, biases zeros (Shazeer 2020, "GLU Variants Improve Transformer").
"""

import numbers

import keras
from keras import ops


def _check_dim(dim, allow_none):
    if dim is None and allow_none:
        return None
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0:
        allowed = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"Invalid dim={dim!r}: expected {allowed}.")
    return int(dim)


def _exact_gelu(x):
    return ops.gelu(x, approximate=False)


class _Activation(keras.layers.Layer):
    """Base: a per-token layer of width `dim` (checked against the input at build)."""

    weighted = False

    def __init__(self, dim=None, **kwargs):
        super().__init__(**kwargs)
        self.dim = _check_dim(dim, allow_none=not self.weighted)
        self.supports_masking = True

    def build(self, input_shape):
        last = input_shape[-1]
        if self.dim is None:
            self.dim = None if last is None else int(last)
        elif last is not None and int(last) != self.dim:
            raise ValueError(
                f"Invalid inputs for {type(self).__name__}: last axis {last} does not match "
                f"dim={self.dim}."
            )
        if self.weighted and self.dim is None:
            raise ValueError(f"{type(self).__name__} needs a known last axis (dim).")
        self.build_weights()
        self.built = True

    def build_weights(self):
        pass

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["dim"] = self.dim
        return config


@keras.saving.register_keras_serializable(package="keras_infini")
class ReLU(_Activation):
    """`max(x, 0)`.

    Args:
        dim: optional width of the last axis (checked at build).

    Example:

    >>> from keras_infini.layers.activations import ReLU
    >>> ReLU()(keras.ops.array([[-1.0, 2.0]]))  # [[0., 2.]]  # doctest: +SKIP
    """

    def call(self, inputs):
        return ops.relu(inputs)


@keras.saving.register_keras_serializable(package="keras_infini")
class GELU(_Activation):
    """Exact GELU, `x * Phi(x)` with the erf (not the tanh approximation).

    Args:
        dim: optional width of the last axis (checked at build).

    Example:

    >>> from keras_infini.layers.activations import GELU
    >>> y = GELU()(keras.random.normal((2, 4)))
    """

    def call(self, inputs):
        return _exact_gelu(inputs)


@keras.saving.register_keras_serializable(package="keras_infini")
class Abs(_Activation):
    """`|x|`.

    Args:
        dim: optional width of the last axis (checked at build).

    Example:

    >>> from keras_infini.layers.activations import Abs
    >>> y = Abs()(keras.random.normal((2, 4)))
    """

    def call(self, inputs):
        return ops.abs(inputs)


def _add_beta(layer):
    layer.beta = layer.add_weight(name="beta", shape=(), initializer="ones", trainable=True)


@keras.saving.register_keras_serializable(package="keras_infini")
class Swish(_Activation):
    """`x * sigmoid(beta * x)` with a trainable scalar `beta` (initialised to 1).

    Args:
        dim: optional width of the last axis (checked at build).

    Example:

    >>> from keras_infini.layers.activations import Swish
    >>> y = Swish(4)(keras.random.normal((2, 4)))
    """

    def build_weights(self):
        _add_beta(self)

    def call(self, inputs):
        return inputs * ops.sigmoid(ops.cast(self.beta, inputs.dtype) * inputs)


class _GatedUnit(_Activation):
    """`gate(x W + b) * (x V + c)` with `(d, d)` kernels and biases."""

    weighted = True

    def gate(self, t):
        raise NotImplementedError

    def build_weights(self):
        d = self.dim
        self.kernel_gate = self.add_weight(name="kernel_gate", shape=(d, d),
                                           initializer="glorot_uniform")
        self.bias_gate = self.add_weight(name="bias_gate", shape=(d,), initializer="zeros")
        self.kernel_value = self.add_weight(name="kernel_value", shape=(d, d),
                                            initializer="glorot_uniform")
        self.bias_value = self.add_weight(name="bias_value", shape=(d,), initializer="zeros")

    def call(self, inputs):
        gated = self.gate(ops.matmul(inputs, self.kernel_gate) + self.bias_gate)
        return gated * (ops.matmul(inputs, self.kernel_value) + self.bias_value)


@keras.saving.register_keras_serializable(package="keras_infini")
class SwiGLU(_GatedUnit):
    """`swish(x W + b) * (x V + c)`, with its own trainable `beta`.

    Args:
        dim: width `d` of the last axis.

    Example:

    >>> from keras_infini.layers.activations import SwiGLU
    >>> y = SwiGLU(4)(keras.random.normal((2, 3, 4)))
    """

    def build_weights(self):
        super().build_weights()
        _add_beta(self)

    def gate(self, t):
        return t * ops.sigmoid(ops.cast(self.beta, t.dtype) * t)


@keras.saving.register_keras_serializable(package="keras_infini")
class GeGLU(_GatedUnit):
    """`gelu(x W + b) * (x V + c)` (exact GELU).

    Args:
        dim: width `d` of the last axis.

    Example:

    >>> from keras_infini.layers.activations import GeGLU
    >>> y = GeGLU(4)(keras.random.normal((2, 3, 4)))
    """

    def gate(self, t):
        return _exact_gelu(t)


class _GatedFFN(_Activation):
    """`(gate(x W1) * (x V)) W2` with inner width `ceil(2 d / 3)`, no biases."""

    weighted = True

    def gate(self, t):
        raise NotImplementedError

    @property
    def inner_dim(self):
        return (2 * self.dim + 2) // 3

    def build_weights(self):
        d, inner = self.dim, self.inner_dim
        self.kernel_gate = self.add_weight(name="kernel_gate", shape=(d, inner),
                                           initializer="glorot_uniform")
        self.kernel_value = self.add_weight(name="kernel_value", shape=(d, inner),
                                            initializer="glorot_uniform")
        self.kernel_out = self.add_weight(name="kernel_out", shape=(inner, d),
                                          initializer="glorot_uniform")

    def call(self, inputs):
        hidden = self.gate(ops.matmul(inputs, self.kernel_gate))
        hidden = hidden * ops.matmul(inputs, self.kernel_value)
        return ops.matmul(hidden, self.kernel_out)


@keras.saving.register_keras_serializable(package="keras_infini")
class FFNGLU(_GatedFFN):
    """`(sigmoid(x W1) * (x V)) W2`.

    Args:
        dim: width `d` of the last axis.

    Example:

    >>> from keras_infini.layers.activations import FFNGLU
    >>> y = FFNGLU(6)(keras.random.normal((2, 6)))
    """

    def gate(self, t):
        return ops.sigmoid(t)


@keras.saving.register_keras_serializable(package="keras_infini")
class FFNGeGLU(_GatedFFN):
    """`(gelu(x W1) * (x V)) W2` (exact GELU).

    Args:
        dim: width `d` of the last axis.

    Example:

    >>> from keras_infini.layers.activations import FFNGeGLU
    >>> y = FFNGeGLU(6)(keras.random.normal((2, 6)))
    """

    def gate(self, t):
        return _exact_gelu(t)


@keras.saving.register_keras_serializable(package="keras_infini")
class FFNSwiGLU(_GatedFFN):
    """`(swish_1(x W1) * (x V)) W2` with a fixed `beta = 1`.

    Args:
        dim: width `d` of the last axis.

    Example:

    >>> from keras_infini.layers.activations import FFNSwiGLU
    >>> y = FFNSwiGLU(6)(keras.random.normal((2, 6)))
    """

    def gate(self, t):
        return t * ops.sigmoid(t)


_CLASSES = {
    "relu": ReLU,
    "gelu": GELU,
    "abs": Abs,
    "swish": Swish,
    "swiglu": SwiGLU,
    "geglu": GeGLU,
    "ffnglu": FFNGLU,
    "ffngeglu": FFNGeGLU,
    "ffnswiglu": FFNSwiGLU,
}
ACTIVATIONS = tuple(_CLASSES)


def get_activation(name, dim):
    """A fresh activation layer `name` of width `dim`.

    Args:
        name: one of `ACTIVATIONS`.
        dim: width `d` of the last axis, a positive int.

    Raises:
        ValueError: naming the argument `activation` (with the valid names) or `dim`.
    """
    if not isinstance(name, str) or name not in _CLASSES:
        raise ValueError(
            f"Invalid activation={name!r}: expected one of {', '.join(ACTIVATIONS)}."
        )
    return _CLASSES[name](_check_dim(dim, allow_none=False))
