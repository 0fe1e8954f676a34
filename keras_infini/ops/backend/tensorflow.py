"""TensorFlow fast paths (see `keras_infini.ops.backend`).

`scan`: Keras 3.15's TF `ops.scan` lowers to a `tf.while_loop` without
`maximum_iterations`, which XLA (`jit_compile=True`, the default on GPU) cannot
differentiate. This loop bounds its iterations, reads the inputs from `TensorArray`s and
writes the outputs to `TensorArray`s, which XLA compiles and differentiates, for a static
or a dynamic (graph-mode `None`) number of steps. The body is traced once, plus the peeled
first step that fixes the output structure, so graph and compile time do not grow with the
number of steps. Tested against `keras.ops.scan` and NumPy in tests/test_ops.py.
"""

import tensorflow as tf
from keras import tree


def scan(f, init, xs, axis=0):
    """`ops.scan(f, init, xs)` semantics over `axis`: `f(carry, x) -> (carry, y)`, `ys`
    stacked on `axis`. Every leaf of `xs` has the same size `n >= 1` on `axis`."""
    leaves = [tf.convert_to_tensor(leaf) for leaf in tree.flatten(xs)]
    if axis != 0:
        leaves = [tf.experimental.numpy.moveaxis(leaf, axis, 0) for leaf in leaves]
    static_n = leaves[0].shape[0]
    if static_n == 0:
        raise ValueError(f"Invalid xs: scan needs at least one step (axis {axis} of size 0).")
    n = static_n if static_n is not None else tf.shape(leaves[0])[0]
    inputs = [
        tf.TensorArray(leaf.dtype, size=n, element_shape=leaf.shape[1:]).unstack(leaf)
        for leaf in leaves
    ]

    # The first step runs outside the loop: it fixes the structure, dtypes and shapes of
    # the outputs (the TensorArrays must exist before the loop).
    carry, y0 = f(init, tree.pack_sequence_as(xs, [leaf[0] for leaf in leaves]))
    y0_leaves = [tf.convert_to_tensor(y) for y in tree.flatten(y0)]
    outputs = [
        tf.TensorArray(y.dtype, size=n, element_shape=y.shape).write(0, y) for y in y0_leaves
    ]
    if static_n is None or static_n > 1:

        def body(i, carry, outputs):
            step = tree.pack_sequence_as(xs, [ta.read(i) for ta in inputs])
            carry, y = f(carry, step)
            outputs = [ta.write(i, v) for ta, v in zip(outputs, tree.flatten(y))]
            return i + 1, carry, outputs

        _, carry, outputs = tf.while_loop(
            lambda i, *_: i < n,
            body,
            (tf.constant(1), carry, outputs),
            maximum_iterations=n - 1,
        )
    ys = [ta.stack() for ta in outputs]
    if axis != 0:
        ys = [tf.experimental.numpy.moveaxis(y, 0, axis) for y in ys]
    return carry, tree.pack_sequence_as(y0, ys)


def compile_inference(fn, variables):
    """`tf.function` of `fn` (variables are captured by reference, read at every call)."""
    del variables
    return tf.function(fn, reduce_retracing=True)


def is_traced(x):
    return not tf.executing_eagerly() or tf.is_symbolic_tensor(x)


def branch_is_free(x):
    return is_traced(x) or "GPU" not in x.device.upper() and "TPU" not in x.device.upper()
