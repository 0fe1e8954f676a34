"""Exact softmax attention inside each segment, all segments at once.

Tensors use the folded layout `(batch, num_segments, heads, segment_len, dim)`, so every
segment is attended to in one batched einsum: no loop over segments.
"""

from keras import ops

from keras_infini.ops import loops

# Finite "minus infinity" for masked logits. The scores are float32 when it is applied, and
# it must lie below every real score: with -3e4, inputs of magnitude ~1e3 gave real scores
# below it and the softmax moved onto masked (e.g. future) keys.
_MASKED_LOGIT = -1.0e30


def attention_mask(key_valid, causal, segment_len=None):
    """Boolean mask broadcastable to `(batch, n, heads, S, S)` (query axis -2, key axis -1).

    `key_valid` is a float or bool `(batch, n, S)` tensor (1 where the key may be
    attended), or `None` when every key is valid: then the mask is the `(1, 1, 1, S, S)`
    causal triangle (`segment_len` gives `S`), or `None` when not `causal` either. Keeping
    all-valid inputs free of a `(batch, L)` mask matters under XLA: a mask built from
    constant ones was constant-folded at compile time, which took ~30 s at 64K tokens.
    """
    mask = None
    if key_valid is not None:
        mask = ops.cast(key_valid, "bool")[:, :, None, None, :]
    if causal:
        seg = segment_len if key_valid is None else key_valid.shape[-1]
        if seg is None:
            seg = ops.shape(key_valid)[-1]
        rows = ops.arange(seg)[:, None]
        cols = ops.arange(seg)[None, :]
        triangle = (cols <= rows)[None, None, None, :, :]
        mask = triangle if mask is None else ops.logical_and(mask, triangle)
    return mask


def local_attention(query, key, value, mask):
    """Softmax attention within each segment.

    Args:
        query, key: `(batch, n, heads, S, dim_key)`, already rotated if positions apply.
        value: `(batch, n, heads, S, dim_value)`.
        mask: boolean, broadcastable to `(batch, n, heads, S, S)` (query, key), or
            `None` (every query attends to every key of its segment).

    Returns:
        `(batch, n, heads, S, dim_value)` in the dtype of `value`. A query with no key to
        attend to gets 0 (not NaN) in the output and in the gradients.
    """
    dim_key = query.shape[-1]
    # The scale goes on the queries (S x dk) rather than the scores (S x S): one fewer
    # elementwise pass over the largest tensor, which dominates on eager torch.
    query = ops.multiply(query, ops.cast(1.0 / float(dim_key) ** 0.5, query.dtype))
    scores = ops.einsum("bnhqd,bnhkd->bnhqk", query, key)
    # Softmax in float32: stable under mixed precision and exact for masked logits.
    scores = ops.cast(scores, "float32")
    if mask is None:
        return ops.matmul(ops.cast(ops.softmax(scores, axis=-1), value.dtype), value)
    scores = ops.where(mask, scores, _MASKED_LOGIT)
    probs = ops.cast(ops.softmax(scores, axis=-1), value.dtype)
    # Rows whose keys are all masked received a uniform softmax over _MASKED_LOGIT; zero
    # their output (S x dv, cheaper than zeroing the S x S probabilities; same gradients).
    has_key = ops.cast(ops.any(mask, axis=-1, keepdims=True), value.dtype)
    return ops.multiply(ops.matmul(probs, value), has_key)


def grouped_local_attention(query, key, value, key_valid, causal, group_segments):
    """`local_attention` over groups of `group_segments` segments at a time.

    Folding every segment of a long input into one batch makes the `(S, S)` score tensors
    of all segments live at once (hundreds of MB at 64K tokens), so long inputs become
    memory-bound. Mapping over fixed-size groups with `ops.map` keeps the working set
    constant: `tf.map_fn` (TensorFlow, differentiable under XLA: it bounds its loop),
    `lax.map` (JAX) or a loop over `unstack`ed groups (torch, `loops.map`). Inputs of at most one group take the direct path.

    Args:
        query, key, value: `(batch, n, heads, S, dim)`.
        key_valid: float 0/1 `(batch, n, S)`, or `None` (every key valid).
        causal: causal mask inside each segment.
        group_segments: segments per group (a Python int), or `None`: no grouping.
    """
    n = query.shape[1]
    seg = query.shape[-2]
    if n is None or group_segments is None or n <= group_segments:
        return local_attention(query, key, value, attention_mask(key_valid, causal, seg))
    groups = -(-n // group_segments)
    pad = groups * group_segments - n

    def to_groups(t):
        if pad:
            filler = ops.zeros_like(t[:, :pad])
            t = ops.concatenate([t, filler], axis=1)
        shape = [ops.shape(t)[0], groups, group_segments] + list(t.shape[2:])
        return ops.moveaxis(ops.reshape(t, shape), 1, 0)

    if key_valid is None:
        key_valid = ops.ones(ops.shape(query)[:2] + (seg,), dtype="float32")

    def attend(parts):
        q, k, v, valid = parts
        return local_attention(q, k, v, attention_mask(valid, causal, seg))

    out = loops.map(attend, tuple(to_groups(t) for t in (query, key, value, key_valid)))
    out = ops.moveaxis(out, 0, 1)  # (batch, groups, G, heads, S, dv)
    out = ops.reshape(out, [ops.shape(out)[0], groups * group_segments] + list(out.shape[3:]))
    return out[:, :n] if pad else out
