"""FFN activations as Keras layers: plain, Swish and the gated linear unit family.

Every layer maps inputs `(..., d)` to outputs `(..., d)` and works token by token, so it
passes a Keras mask through unchanged. `get_activation(name, dim)` builds a fresh layer by
name; the valid names are `ACTIVATIONS`:

- `relu`, `gelu` (exact, erf-based), `abs`, `silu` (`x * sigmoid(x)`): no weights.
- `swish`: `x * sigmoid(beta * x)`, trainable scalar `beta` (init 1).
- `swiglu`: `swish(x W + b) * (x V + c)` with its own trainable `beta`;
  `geglu`: `gelu(x W + b) * (x V + c)`. `W` = `kernel_gate`, `V` = `kernel_value`, both
  `(d, d)`; `b` = `bias_gate`, `c` = `bias_value`, both `(d,)`.
- `ffnglu`: `(sigmoid(x W1) * (x V)) W2`; `ffngeglu`: `(gelu(x W1) * (x V)) W2`;
  `ffnswiglu`: `(swish_1(x W1) * (x V)) W2` (`beta` fixed to 1, no weight). Inner width
  `ceil(2 d / 3)` (keeps the parameter count of a `d -> 2d -> d` two-matrix FFN roughly);
  `W1` = `kernel_gate`, `V` = `kernel_value`, both `(d, inner)`; `W2` = `kernel_out`
  `(inner, d)`; no biases.

Kernels are Glorot-uniform, biases zeros (Shazeer 2020, "GLU Variants Improve Transformer",
arXiv 2002.05202). `gelu` is always the exact GELU `x * Phi(x)`, never the tanh
approximation.

Keras names. `relu`, `gelu` and `silu` are exactly Keras' `keras.activations.relu`,
`keras.activations.gelu` (whose default is `approximate=False`, the erf form) and
`keras.activations.silu` (tested against NumPy and against the Keras functions). Note that
Keras' `"swish"` is an alias of `silu` with no weight, while this library's `"swish"` has a
trainable `beta` (equal to `silu` only while `beta == 1`); pass `"silu"` for Keras' function.
Any other function is accepted as a callable, e.g. `get_activation(keras.activations.tanh, d)`
(see `ActivationFunction`). Weights are stored in the variable dtype of the layer's dtype policy
(float32 under `mixed_bfloat16`/`mixed_float16`) and the math runs in its compute dtype.

Every layer takes `dim` (optional for the weightless ones, checked at build) and the
standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

Example:

>>> import keras
>>> from keras_infini import get_activation
>>> x = keras.ops.array([[-1.5, 2.0]])
>>> for name in ("relu", "abs", "gelu", "silu"):
...     print(name, keras.ops.convert_to_numpy(get_activation(name, 2)(x)).astype(float).round(4).tolist())
relu [[0.0, 2.0]]
abs [[1.5, 2.0]]
gelu [[-0.1002, 1.9545]]
silu [[-0.2736, 1.7616]]
"""


import keras
from keras import ops

from keras_infini import validation


def _exact_gelu(x):
    return ops.gelu(x, approximate=False)


def _swish(x, beta=None):
    """`x * sigmoid(beta * x)`; `beta=None` means 1."""
    return x * ops.sigmoid(x if beta is None else beta * x)


class _Activation(keras.layers.Layer):
    """Base: a per-token layer whose last axis has width `dim` (checked at build).

    Subclasses set `dim_required = True` when they hold weights, and create them in
    `build_weights()` once `self.dim` is known.
    """

    dim_required = False

    def __init__(self, dim=None, **kwargs):
        super().__init__(**kwargs)
        self.dim = validation.positive_int("dim", dim, allow_none=not self.dim_required)
        self.supports_masking = True

    def build(self, input_shape):
        last = input_shape[-1]
        if self.dim is not None and last is not None and int(last) != self.dim:
            raise ValueError(
                f"Invalid inputs for {type(self).__name__}: the last axis has size {last} but "
                f"the layer was created with dim={self.dim} (input shape {tuple(input_shape)})."
            )
        self.build_weights()
        if self.dim_required:  # weights fix the width: check it on every call
            self.input_spec = keras.InputSpec(min_ndim=1, axes={-1: self.dim})

    def build_weights(self):
        """Creates the layer's weights (none by default)."""

    def _kernel(self, name, shape):
        return self.add_weight(name=name, shape=shape, initializer="glorot_uniform")

    def _scalar_beta(self):
        return self.add_weight(name="beta", shape=(), initializer="ones")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["dim"] = self.dim
        return config


def _elementwise(name, function, doc):
    """A registered weightless `_Activation` subclass `name` computing `function(x)`."""

    def call(self, inputs):
        return function(inputs)

    cls = type(name, (_Activation,), {"__doc__": doc, "__module__": __name__, "call": call})
    return keras.saving.register_keras_serializable(package="keras_infini")(cls)


ReLU = _elementwise("ReLU", ops.relu, "`max(x, 0)`, elementwise, no weights.")
GELU = _elementwise(
    "GELU",
    _exact_gelu,
    "Exact GELU, `x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))` (not the tanh form), no weights.",
)
Abs = _elementwise("Abs", ops.abs, "`|x|`, elementwise, no weights.")
SiLU = _elementwise(
    "SiLU", _swish, "`x * sigmoid(x)` (SiLU), no weights; exactly `keras.activations.silu`."
)


@keras.saving.register_keras_serializable(package="keras_infini")
class ActivationFunction(_Activation):
    """Wraps an elementwise (or per-token) function `f` as a layer: `f(x)`, no weights.

    `get_activation(f, dim)` builds one for a callable `f`. The function is saved with
    `keras.saving.serialize_keras_object`, so Keras' own activations
    (`keras.activations.tanh`, ...) and functions registered with
    `@keras.saving.register_keras_serializable()` survive `get_config()` / `.keras` files;
    a lambda or an unregistered local function works in memory but cannot be saved.

    Args:
        function: a callable mapping a tensor `(..., d)` to a tensor of the same shape, or
            its serialised form (a dict, as written by `get_config()`).
        dim: optional int, the size of the last axis of the inputs; checked at build.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:

    >>> import keras
    >>> from keras_infini import get_activation
    >>> layer = get_activation(keras.activations.tanh, 4)
    >>> type(layer).__name__, tuple(layer(keras.ops.ones((2, 4))).shape)
    ('ActivationFunction', (2, 4))
    """

    def __init__(self, function, dim=None, **kwargs):
        super().__init__(dim=dim, **kwargs)
        if isinstance(function, dict):
            function = keras.saving.deserialize_keras_object(function)
        if not callable(function) or isinstance(function, keras.layers.Layer):
            raise ValueError(
                f"Invalid function={function!r}: expected a callable that is not a layer."
            )
        self.function = function

    def call(self, inputs):
        return self.function(inputs)

    def get_config(self):
        config = super().get_config()
        config["function"] = keras.saving.serialize_keras_object(self.function)
        return config


@keras.saving.register_keras_serializable(package="keras_infini")
class Swish(_Activation):
    """`x * sigmoid(beta * x)` with a trainable scalar `beta` (initialised to 1).

    Args:
        dim: int, the size of the last axis of the inputs (checked at build; `beta` is a
            single scalar whatever the width).
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Attributes:
        beta: the scalar weight, shape `()`.

    Example:

    >>> import keras
    >>> from keras_infini.layers.activations import Swish
    >>> layer = Swish(4)
    >>> tuple(layer(keras.ops.ones((2, 3, 4))).shape), float(layer.beta.numpy())
    ((2, 3, 4), 1.0)
    """

    dim_required = True

    def build_weights(self):
        self.beta = self._scalar_beta()

    def call(self, inputs):
        return _swish(inputs, ops.cast(self.beta, inputs.dtype))


class _GatedUnit(_Activation):
    """`gate(x W + b) * (x V + c)`: the base of `SwiGLU` and `GeGLU`.

    Args:
        dim: int, the size `d` of the last axis of the inputs (and outputs).
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Attributes:
        kernel_gate: `W`, `(d, d)`, Glorot-uniform.
        bias_gate: `b`, `(d,)`, zeros.
        kernel_value: `V`, `(d, d)`, Glorot-uniform.
        bias_value: `c`, `(d,)`, zeros.

    Example:

    >>> import keras
    >>> from keras_infini.layers.activations import GeGLU, SwiGLU
    >>> swiglu, geglu = SwiGLU(4), GeGLU(4)
    >>> tuple(swiglu(keras.ops.ones((2, 3, 4))).shape), len(swiglu.trainable_weights)
    ((2, 3, 4), 5)
    >>> _ = geglu(keras.ops.ones((2, 4)))
    >>> len(geglu.trainable_weights)
    4
    """

    dim_required = True

    def gate(self, t):
        raise NotImplementedError

    def build_weights(self):
        d = self.dim
        self.kernel_gate = self._kernel("kernel_gate", (d, d))
        self.bias_gate = self.add_weight(name="bias_gate", shape=(d,), initializer="zeros")
        self.kernel_value = self._kernel("kernel_value", (d, d))
        self.bias_value = self.add_weight(name="bias_value", shape=(d,), initializer="zeros")

    def call(self, inputs):
        gated = self.gate(ops.matmul(inputs, self.kernel_gate) + self.bias_gate)
        return gated * (ops.matmul(inputs, self.kernel_value) + self.bias_value)


@keras.saving.register_keras_serializable(package="keras_infini")
class SwiGLU(_GatedUnit):
    """`swish(x W + b) * (x V + c)`, `swish(t) = t * sigmoid(beta * t)`.

    Weights as `_GatedUnit`, plus `beta`: a trainable scalar `()`, initialised to 1.
    """

    def build_weights(self):
        super().build_weights()
        self.beta = self._scalar_beta()

    def gate(self, t):
        return _swish(t, ops.cast(self.beta, t.dtype))


@keras.saving.register_keras_serializable(package="keras_infini")
class GeGLU(_GatedUnit):
    """`gelu(x W + b) * (x V + c)` with the exact (erf) GELU; weights as `_GatedUnit`."""

    def gate(self, t):
        return _exact_gelu(t)


class _GatedFFN(_Activation):
    """`(gate(x W1) * (x V)) W2`, inner width `ceil(2 d / 3)`, no biases: the base of
    `FFNGLU`, `FFNGeGLU` and `FFNSwiGLU`.

    Args:
        dim: int, the size `d` of the last axis of the inputs (and outputs).
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Attributes:
        kernel_gate: `W1`, `(d, inner)`, Glorot-uniform.
        kernel_value: `V`, `(d, inner)`, Glorot-uniform.
        kernel_out: `W2`, `(inner, d)`, Glorot-uniform.
        inner_dim: `ceil(2 d / 3)`.

    Example:

    >>> import keras
    >>> from keras_infini.layers.activations import FFNGLU
    >>> layer = FFNGLU(7)
    >>> tuple(layer(keras.ops.ones((2, 7))).shape), tuple(layer.kernel_out.shape)
    ((2, 7), (5, 7))
    """

    dim_required = True

    def gate(self, t):
        raise NotImplementedError

    @property
    def inner_dim(self):
        """`ceil(2 * dim / 3)`, the width of the gated hidden layer."""
        return (2 * self.dim + 2) // 3

    def build_weights(self):
        d, inner = self.dim, self.inner_dim
        self.kernel_gate = self._kernel("kernel_gate", (d, inner))
        self.kernel_value = self._kernel("kernel_value", (d, inner))
        self.kernel_out = self._kernel("kernel_out", (inner, d))

    def call(self, inputs):
        hidden = self.gate(ops.matmul(inputs, self.kernel_gate))
        hidden = hidden * ops.matmul(inputs, self.kernel_value)
        return ops.matmul(hidden, self.kernel_out)


@keras.saving.register_keras_serializable(package="keras_infini")
class FFNGLU(_GatedFFN):
    """`(sigmoid(x W1) * (x V)) W2`; weights as `_GatedFFN`."""

    def gate(self, t):
        return ops.sigmoid(t)


@keras.saving.register_keras_serializable(package="keras_infini")
class FFNGeGLU(_GatedFFN):
    """`(gelu(x W1) * (x V)) W2` with the exact (erf) GELU; weights as `_GatedFFN`."""

    def gate(self, t):
        return _exact_gelu(t)


@keras.saving.register_keras_serializable(package="keras_infini")
class FFNSwiGLU(_GatedFFN):
    """`(swish_1(x W1) * (x V)) W2`, `swish_1(t) = t * sigmoid(t)` (no `beta` weight);
    weights as `_GatedFFN`."""

    def gate(self, t):
        return _swish(t)


ACTIVATION_CLASSES = {
    "relu": ReLU,
    "gelu": GELU,
    "abs": Abs,
    "silu": SiLU,
    "swish": Swish,
    "swiglu": SwiGLU,
    "geglu": GeGLU,
    "ffnglu": FFNGLU,
    "ffngeglu": FFNGeGLU,
    "ffnswiglu": FFNSwiGLU,
}
"""Activation name -> layer class, the table `get_activation` reads."""

ACTIVATIONS = tuple(ACTIVATION_CLASSES)
"""The valid activation names, in the order of the module docstring."""


def get_activation(activation, dim, **kwargs):
    """A fresh activation layer `activation` for inputs of width `dim`.

    Args:
        activation: str, exactly one of `ACTIVATIONS` (lower case), or a callable (not a layer)
            applied elementwise, wrapped in `ActivationFunction` (saved through
            `keras.saving.serialize_keras_object`: use Keras' own or registered functions).
        dim: int > 0, the size `d` of the last axis of the inputs.
        **kwargs: standard `keras.layers.Layer` arguments for the new layer (`name`,
            `dtype`, ...).

    Returns:
        A new, unbuilt layer instance (never shared between calls).

    Raises:
        ValueError: for an unknown name or a value that is neither a string nor a callable
            (the message names the argument `activation` and lists the valid names), or a
            `dim` that is not a positive int.

    Example:

    >>> import keras
    >>> from keras_infini import get_activation
    >>> layer = get_activation("ffnswiglu", 6)
    >>> type(layer).__name__, tuple(layer(keras.ops.ones((2, 6))).shape)
    ('FFNSwiGLU', (2, 6))
    """
    name = activation
    if isinstance(name, dict):  # a serialised function, as InfiniTransformer's config holds
        name = keras.saving.deserialize_keras_object(name)
    if callable(name) and not isinstance(name, keras.layers.Layer):
        return ActivationFunction(name, validation.positive_int("dim", dim), **kwargs)
    if not isinstance(name, str) or name not in ACTIVATION_CLASSES:
        raise ValueError(
            f"Invalid activation={name!r}: expected one of {', '.join(ACTIVATIONS)}, or a "
            "callable."
        )
    return ACTIVATION_CLASSES[name](validation.positive_int("dim", dim), **kwargs)
