"""JAX fast paths (see `keras_infini.ops.backend`)."""

import jax
import keras


def compile_inference(fn, variables):
    """`jax.jit` of `fn` with the variables' values as arguments (read at every call)."""

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    jitted = jax.jit(pure)

    def run(*args):
        return jitted([variable.value for variable in variables], *args)

    return run


def is_traced(x):
    return isinstance(x, jax.core.Tracer)
