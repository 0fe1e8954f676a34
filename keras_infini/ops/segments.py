"""Splitting a long sequence into fixed-length segments and putting it back.

Every layer of keras_infini works on segments: the sequence axis `(batch, L, ...)` is padded
to a multiple of `segment_len` and viewed as `(batch, num_segments, segment_len, ...)`.
These helpers work with static lengths (JAX, torch, TF with known shapes) and with a
dynamic length (TF graph mode with `keras.Input((None, d))`).
"""

from keras import ops


def static_or_dynamic_dim(x, axis):
    """The size of `x` along `axis`: a Python int when static, else a scalar tensor."""
    dim = x.shape[axis]
    if dim is not None:
        return int(dim)
    return ops.shape(x)[axis]


def num_segments(length, segment_len):
    """`ceil(length / segment_len)` for an int or a scalar integer tensor."""
    if isinstance(length, int):
        return -(-length // segment_len)
    return (length + segment_len - 1) // segment_len


def pad_to_segments(x, segment_len, axis=1, value=0):
    """Pads `x` along `axis` at the end up to a multiple of `segment_len`.

    Returns the padded tensor. When the length is already a multiple the tensor is
    returned through `ops.convert_to_tensor` unchanged in value.
    """
    length = static_or_dynamic_dim(x, axis)
    if isinstance(length, int):
        pad = (-length) % segment_len
        if pad == 0:
            return x
        pad_shape = [static_or_dynamic_dim(x, i) for i in range(len(x.shape))]
        pad_shape[axis] = pad
    else:
        pad = (segment_len - length % segment_len) % segment_len
        pad_shape = [ops.shape(x)[i] for i in range(len(x.shape))]
        pad_shape[axis] = pad
    filler = ops.full(pad_shape, value, dtype=x.dtype)
    return ops.concatenate([x, filler], axis=axis)


def fold(x, segment_len):
    """`(batch, n * segment_len, ...)` -> `(batch, n, segment_len, ...)`."""
    batch = static_or_dynamic_dim(x, 0)
    rest = [static_or_dynamic_dim(x, i) for i in range(2, len(x.shape))]
    # A static segment count instead of -1: reshaping a zero-size tensor (batch 0) with
    # -1 fails on JAX and torch.
    n = -1 if x.shape[1] is None else int(x.shape[1]) // segment_len
    return ops.reshape(x, [batch, n, segment_len] + rest)


def unfold(x):
    """`(batch, n, segment_len, ...)` -> `(batch, n * segment_len, ...)`."""
    batch = static_or_dynamic_dim(x, 0)
    rest = [static_or_dynamic_dim(x, i) for i in range(3, len(x.shape))]
    known = x.shape[1] is not None and x.shape[2] is not None
    length = int(x.shape[1]) * int(x.shape[2]) if known else -1  # -1 fails for batch 0
    return ops.reshape(x, [batch, length] + rest)


def trim(x, length, axis=1):
    """Keeps the first `length` entries of `x` along `axis` (undoes `pad_to_segments`)."""
    if isinstance(length, int) and x.shape[axis] == length:
        return x
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(0, length)
    return x[tuple(index)]


def valid_tokens(inputs, mask, segment_len):
    """Float32 `(batch, padded_len)` weights: 1 for real unmasked tokens, 0 for the rest.

    `inputs` is `(batch, L, ...)`; `mask` is `None` or `(batch, L)` (bool or numeric).
    Padding added by `pad_to_segments` is marked 0.
    """
    batch = static_or_dynamic_dim(inputs, 0)
    length = static_or_dynamic_dim(inputs, 1)
    if mask is None:
        valid = ops.ones((batch, length), dtype="float32")
    else:
        valid = ops.cast(ops.cast(mask, "bool"), "float32")
    return pad_to_segments(valid, segment_len, axis=1, value=0)
