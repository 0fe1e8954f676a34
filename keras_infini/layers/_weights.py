"""Initializer, regularizer and constraint arguments, passed to every projection the way
Keras' `MultiHeadAttention` does (each sublayer gets its own clone of the initializer)."""

import keras

KERNEL_ARGS = ("kernel_initializer", "kernel_regularizer", "kernel_constraint")
BIAS_ARGS = ("bias_initializer", "bias_regularizer", "bias_constraint")
_DEFAULTS = {"kernel_initializer": "glorot_uniform", "bias_initializer": "zeros"}
_GETTERS = {"initializer": keras.initializers, "regularizer": keras.regularizers,
            "constraint": keras.constraints}


def _module(name):
    return _GETTERS[name.rsplit("_", 1)[1]]


class WeightArgsMixin:
    """Stores the weight arguments (`kernel_*`, and `bias_*` when `with_bias`)."""

    def set_weight_args(self, kwargs, with_bias):
        names = KERNEL_ARGS + (BIAS_ARGS if with_bias else ())
        self._weight_arg_names = names
        for name in names:
            value = kwargs.pop(name, _DEFAULTS.get(name))
            try:
                resolved = _module(name).get(value)
            except (ValueError, TypeError) as error:
                raise ValueError(f"Invalid {name}={value!r}: {error}") from None
            setattr(self, name, resolved)
        return kwargs

    def weight_kwargs(self, bias=True):
        """Keyword arguments for a `Dense` / `EinsumDense` sublayer (fresh clones)."""
        names = KERNEL_ARGS + (BIAS_ARGS if bias else ())
        out = {}
        for name in names:
            value = getattr(self, name, None)
            if value is not None:
                out[name] = _module(name).get(_module(name).serialize(value))
        return out

    def weight_config(self):
        return {name: _module(name).serialize(getattr(self, name))
                for name in self._weight_arg_names}
