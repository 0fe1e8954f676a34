"""TensorFlow fast path: the delta-rule recurrence over segments.

The default on TensorFlow (`memory.delta_memory_states(method="auto")`), for static and
dynamic numbers of segments. Keras' `ops.scan` lowers to a
`tf.while_loop` without `maximum_iterations`, which XLA (`jit_compile=True`, the default
on GPU) cannot differentiate; this loop bounds its iterations and collects the states in
a `TensorArray`, which XLA compiles and differentiates. The portable fallback is
`memory.delta_memory_states_scan`; both are tested against each other.
"""

import tensorflow as tf


def delta_memory_states_while(sigma_k, value, norm_before, memory0, delta_step):
    """Same contract as `memory.delta_memory_states_scan` (TensorFlow tensors)."""
    n = tf.shape(sigma_k)[1]
    sk_t = tf.transpose(sigma_k, [1, 0, 2, 3, 4])
    v_t = tf.transpose(value, [1, 0, 2, 3, 4])
    z_t = tf.transpose(norm_before, [1, 0, 2, 3])
    states = tf.TensorArray(memory0.dtype, size=n, element_shape=memory0.shape)

    def body(i, memory, states):
        states = states.write(i, memory)
        memory = delta_step(memory, sk_t[i], v_t[i], z_t[i])
        return i + 1, memory, states

    _, final, states = tf.while_loop(
        lambda i, *_: i < n, body, (tf.constant(0), memory0, states), maximum_iterations=n
    )
    before = tf.transpose(states.stack(), [1, 0, 2, 3, 4])
    return before, final
