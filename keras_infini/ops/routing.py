"""Mixture-of-Depths routing inside segments (arXiv 2404.02258), with static shapes.

Every segment of `S` tokens gets exactly `k` slots. Tensors use the folded layout
`(batch, n, S, ...)`. Gathering and scattering use `take_along_axis` on the segment axis,
so they cost `O(k * dim)` per segment; the only `S x k` work is on integer indices.
"""

from keras import ops

# Score given to tokens that must never be selected (masked or padding): below every
# finite float32 logit (selection validity is read from `valid`, not from this score).
_EXCLUDED = -3.0e38


def top_k_selection(logits, valid, k):
    """Training-time routing: the `k` highest-logit real tokens of every segment.

    Args:
        logits: float `(batch, n, S)` router logits.
        valid: float 0/1 `(batch, n, S)`: real, unmasked tokens.
        k: slots per segment.
    Returns:
        `(indices (batch, n, k) in increasing token order, slot_valid (batch, n, k) float)`.
        A segment with fewer than `k` real tokens selects all of them and marks the
        remaining slots invalid.
    """
    seg = logits.shape[-1]
    score = ops.where(valid > 0, ops.cast(logits, "float32"), _EXCLUDED)
    _, indices = ops.top_k(score, k, sorted=False)
    picked_valid = ops.take_along_axis(valid, indices, axis=-1) > 0
    # Keep the original order, with the slots of real tokens first (slot j holds the
    # j-th selected token; `scatter_slots` relies on it).
    key = ops.sort(ops.where(picked_valid, indices, indices + seg), axis=-1)
    slot_valid = ops.cast(key < seg, "float32")
    indices = ops.where(key < seg, key, key - seg)
    return indices, slot_valid


def causal_selection(logits, valid, k):
    """Inference-time routing, first come first served and causal.

    A token is routed iff its logit is positive and fewer than `k` earlier tokens of its
    segment were routed, so no token's routing depends on later tokens.

    Returns the same as `top_k_selection`.
    """
    wants = ops.logical_and(ops.cast(logits, "float32") > 0, valid > 0)
    count = ops.cumsum(ops.cast(wants, "int32"), axis=-1)
    routed = ops.logical_and(wants, count <= k)
    return ordered_indices(routed, k)


def ordered_indices(routed, k):
    """`k` slot indices per segment: the routed tokens in order, then unused slots."""
    seg = routed.shape[-1]
    position = ops.arange(seg, dtype="int32")
    # Routed tokens score S - t (> 0, earlier first); the others -1 - t (< 0).
    score = ops.where(routed, seg - position, -1 - position)
    _, indices = ops.top_k(score, k, sorted=True)
    slot_valid = ops.cast(ops.take_along_axis(routed, indices, axis=-1), "float32")
    return indices, slot_valid


def selection_mask(indices, slot_valid, seg):
    """Float 0/1 `(batch, n, S)`: which tokens took a valid slot."""
    position = ops.arange(seg, dtype=indices.dtype)
    hit = ops.cast(indices[..., :, None] == position, "float32") * slot_valid[..., None]
    # Valid slots hold distinct tokens, so the sum is 0/1. (`ops.max` raises on an empty
    # tensor, batch 0, on TensorFlow and torch.)
    return ops.sum(hit, axis=-2)


def gather_slots(x, indices):
    """`(batch, n, S, ...)` -> `(batch, n, k, ...)` along the segment axis."""
    idx = indices
    for _ in range(len(x.shape) - 3):
        idx = idx[..., None]
    return ops.take_along_axis(x, idx, axis=2)


def scatter_slots(slot_values, indices, selected):
    """Inverse of `gather_slots` for selected tokens: `(b, n, k, d)` -> `(b, n, S, d)`.

    Tokens that were not selected get 0. Implemented as a gather from the slot axis
    (each token reads the slot it took: the number of selected tokens before it), so the
    gradient is a `take_along_axis` scatter-add over `k` slots.
    """
    k = indices.shape[-1]
    slot = ops.cumsum(ops.cast(selected, "int32"), axis=-1) - 1
    slot = ops.clip(slot, 0, k - 1)
    gathered = ops.take_along_axis(slot_values, slot[..., None], axis=2)
    # A select, not a product with 0: an unselected token's slot may hold any value.
    return ops.where(ops.cast(selected, "bool")[..., None], gathered, ops.zeros_like(gathered))
