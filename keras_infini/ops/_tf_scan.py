"""TensorFlow fast path: `scan` over a static leading axis that XLA can differentiate.

Keras 3.15's TF `ops.scan` lowers to a `tf.while_loop` without `maximum_iterations`, which
XLA (`jit_compile=True`) cannot differentiate. `while_scan` bounds the loop
(`maximum_iterations=n`), reads the inputs from `TensorArray`s and writes the outputs to
`TensorArray`s, which XLA compiles and differentiates; the loop body is traced once (plus
the peeled first step, which gives the output structure), so the graph and compile time
do not grow with `n`. Used by `loops.scan` on TensorFlow when `n` is static; the portable
fallback is `keras.ops.scan` (tested against each other in tests/test_ops.py).
"""

import tensorflow as tf
from keras import tree


def while_scan(f, init, xs):
    """`ops.scan(f, init, xs)` semantics: `f(carry, x) -> (carry, y)`, `ys` stacked on axis 0.

    `xs` is a pytree of tensors with the same static leading size `n >= 1`.
    """
    leaves = [tf.convert_to_tensor(leaf) for leaf in tree.flatten(xs)]
    n = leaves[0].shape[0]
    if n is None or n < 1:
        raise ValueError(f"Invalid xs: while_scan needs a static leading axis >= 1, got {n}.")
    inputs = [
        tf.TensorArray(leaf.dtype, size=n, element_shape=leaf.shape[1:]).unstack(leaf)
        for leaf in leaves
    ]

    def step_inputs(i):
        return tree.pack_sequence_as(xs, [ta.read(i) for ta in inputs])

    # The first step runs outside the loop: it fixes the structure, dtypes and shapes of
    # the outputs (the TensorArrays must exist before the loop).
    carry, y0 = f(init, tree.pack_sequence_as(xs, [leaf[0] for leaf in leaves]))
    y0_leaves = [tf.convert_to_tensor(y) for y in tree.flatten(y0)]
    outputs = [
        tf.TensorArray(y.dtype, size=n, element_shape=y.shape).write(0, y) for y in y0_leaves
    ]
    if n > 1:

        def body(i, carry, outputs):
            carry, y = f(carry, step_inputs(i))
            outputs = [ta.write(i, v) for ta, v in zip(outputs, tree.flatten(y))]
            return i + 1, carry, outputs

        _, carry, outputs = tf.while_loop(
            lambda i, *_: i < n,
            body,
            (tf.constant(1), carry, outputs),
            maximum_iterations=n - 1,
        )
    return carry, tree.pack_sequence_as(y0, [ta.stack() for ta in outputs])
