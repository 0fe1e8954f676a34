"""Exact softmax attention inside each segment, all segments at once.

Tensors use the folded layout `(batch, num_segments, heads, segment_len, dim)`, so every
segment is attended to in one batched einsum: no loop over segments.

Isolation: a key a query may not see (masked, padding, or later in a causal segment)
reaches the query's output through selects only, never through a product with a zero
weight (`0 * nan = nan`), so its value cannot change the output whatever it is. The
logits are float32 under every dtype policy (queries and keys are cast before `QK^T`: a
float16 product overflows at 65504 before any later cast could help).
"""

from keras import ops

from keras_infini.ops import backend

# Finite "minus infinity" for masked logits. The scores are float32 when it is applied, and
# it must lie below every real score: with -3e4, inputs of magnitude ~1e3 gave real scores
# below it and the softmax moved onto masked (e.g. future) keys.
_MASKED_LOGIT = -1.0e30


def attention_mask(key_valid, causal, segment_len):
    """Boolean mask broadcastable to `(batch, n, heads, S, S)` (query axis -2, key axis -1).

    `key_valid` is a bool `(batch, n, S)` tensor (True where the key may be attended), or
    `None` when every key is valid: then the mask is the `(1, 1, 1, S, S)` causal triangle,
    or `None` when not `causal` either. Keeping all-valid inputs free of a `(batch, L)`
    mask matters under XLA: a mask built from constant ones was constant-folded at compile
    time, which took ~30 s at 64K tokens.
    """
    mask = None
    if key_valid is not None:
        mask = ops.cast(key_valid, "bool")[:, :, None, None, :]
    if causal:
        rows = ops.arange(segment_len)[:, None]
        cols = ops.arange(segment_len)[None, :]
        triangle = (cols <= rows)[None, None, None, :, :]
        mask = triangle if mask is None else ops.logical_and(mask, triangle)
    return mask


def _sees_non_finite_value(value, key_valid, causal, bad=None):
    """Bool `(batch, n, heads, S, 1)`: the query attends to a key whose value is not finite.

    `O(S)` per segment instead of an `(S, S)` pass: a causal query at position `q` sees a
    bad key iff a visible bad key lies at `<= q` (a running count along the segment).
    `bad`: bool `(batch, n, heads, S)` marking the bad keys, instead of reading `value`.
    """
    if bad is None:
        bad = ops.logical_not(ops.all(ops.isfinite(value), axis=-1))  # (b, n, h, S)
    if key_valid is not None:
        bad = ops.logical_and(bad, ops.cast(key_valid, "bool")[:, :, None, :])
    if not causal:
        return ops.any(bad, axis=-1, keepdims=True)[..., None]  # (b, n, h, 1, 1)
    return (ops.cumsum(ops.cast(bad, "int32"), axis=-1) > 0)[..., None]


def local_attention(query, key, value, key_valid, causal, implementation="auto"):
    """Softmax attention within each segment.

    Args:
        query, key: `(batch, n, heads, S, dim_key)`, already rotated if positions apply.
        value: `(batch, n, heads, S, dim_value)`.
        key_valid: bool `(batch, n, S)` (True: the key may be attended) or `None` (all).
        causal: a query attends only to keys at its position or before.
        implementation: `"fused"` (Keras' `ops.dot_product_attention`: PyTorch SDPA,
            cuDNN/flash attention where the backend has them), `"einsum"` (an einsum and a
            softmax), or `"auto"`: the one `backend.prefers_fused_attention()` names for the
            active backend (measured in `benchmarks/bench_attention.py`). Both give the
            same values (float32 logits) and the same isolation.

    Returns:
        `(batch, n, heads, S, dim_value)` in the dtype of `value`. A query with no key to
        attend to gets 0 (not NaN) in the output and in the gradients. A query that sees a
        non-finite value gets NaN; one that does not see it is unaffected.
    """
    segment_len = query.shape[-2]
    if segment_len is None:
        segment_len = ops.shape(query)[-2]
    if segment_len == 1:
        # One token per segment (e.g. a one-token call): it attends to itself if valid.
        if key_valid is None:
            return value
        keep = ops.cast(key_valid, "bool")[:, :, None, :, None]
        return ops.where(keep, value, ops.zeros_like(value))
    if implementation == "auto":
        implementation = "fused" if backend.prefers_fused_attention() else "einsum"
    if implementation == "fused":
        return _fused_attention(query, key, value, key_valid, causal, segment_len)
    if implementation != "einsum":
        raise ValueError(
            "Invalid implementation: expected 'auto', 'fused' or 'einsum'; "
            f"received {implementation!r}."
        )
    return _einsum_attention(query, key, value, key_valid, causal, segment_len)


def _einsum_attention(query, key, value, key_valid, causal, segment_len,
                      masked_values_finite=False):
    """Softmax attention of `(batch, n, heads, S, d)` tensors with the isolation rules.

    `masked_values_finite`: the caller guarantees that the values of keys outside
    `key_valid` are finite (the decode cache). Then no pass scans the values: a zero
    probability meets only finite values, so a non-finite output comes from a visible key
    or value, and that query gets NaN in every channel (`p * inf` alone would be inf).
    """
    dim_key = query.shape[-1]
    mask = attention_mask(key_valid, causal, segment_len)
    # The scale goes on the queries (S x dk) rather than the scores (S x S): one fewer
    # elementwise pass over the largest tensor, which dominates on eager torch.
    query = ops.cast(query, "float32") * (1.0 / float(dim_key) ** 0.5)
    scores = ops.einsum("bnhqd,bnhkd->bnhqk", query, ops.cast(key, "float32"))
    if mask is None:
        return ops.matmul(ops.cast(ops.softmax(scores, axis=-1), value.dtype), value)
    scores = ops.where(mask, scores, _MASKED_LOGIT)
    probs = ops.cast(ops.softmax(scores, axis=-1), value.dtype)
    if masked_values_finite:
        attended = ops.matmul(probs, value)
        sees_bad = ops.logical_not(ops.all(ops.isfinite(attended), axis=-1, keepdims=True))
        attended = ops.where(sees_bad, float("nan"), attended)
        has_key = ops.any(mask, axis=-1, keepdims=True)
        return ops.where(has_key, attended, ops.zeros_like(attended))
    # A zero probability times a non-finite value is NaN: the matmul gets the finite part
    # of the values, and the queries that really see a non-finite value get NaN back.
    finite = ops.isfinite(value)
    attended = ops.matmul(probs, ops.where(finite, value, ops.zeros_like(value)))
    bad = ops.logical_not(ops.all(finite, axis=-1))  # (b, n, h, S)
    sees_bad = _sees_non_finite_value(None, key_valid, causal, bad=bad)
    # NaN for those queries as a per-query factor (1 or NaN, exact): XLA on CPU fuses a
    # multiply into the matmul's epilogue and runs the fused kernel markedly faster than
    # the same matmul followed by a select (`benchmarks/bench_attention.py`, forward).
    factor = ops.where(sees_bad, float("nan"), 1.0)
    attended = attended * ops.cast(factor, attended.dtype)
    if key_valid is None:
        return attended  # every query sees at least its own key (causal) or all keys
    # Rows whose keys are all masked received a uniform softmax over _MASKED_LOGIT; zero
    # their output (S x dv, cheaper than zeroing the S x S probabilities; same gradients).
    has_key = ops.any(mask, axis=-1, keepdims=True)
    return ops.where(has_key, attended, ops.zeros_like(attended))


def _fused_magnitude_limit(dim_key):
    """Largest `|entry|` of a query or key that the fused path passes to the kernel.

    Keras' `dot_product_attention` hides keys by adding a finite bias (`-0.7 * float32
    max`, torch) to their logits, and a logit of a hidden key that reaches ~1e38 outweighs
    it (the hidden key then wins the softmax), or overflows to inf (`inf - big = inf`,
    `inf - inf = nan`). With every query and key entry within this limit a logit is at
    most `dim_key * limit^2 / sqrt(dim_key) = 1e36` in magnitude, so a hidden key's
    biased logit stays below every visible one and its probability is exactly 0.
    """
    return (1.0e36 / float(dim_key) ** 0.5) ** 0.5


def _fused_attention(query, key, value, key_valid, causal, segment_len):
    """`ops.dot_product_attention` over `(batch * n, S, heads, dim)`, float32 throughout.

    The fused kernels add a large negative bias to hidden logits (or skip them blockwise),
    so a key or value may still reach a query that must not see it: `nan + bias = nan`,
    `0 * nan = nan`, and a huge finite key's logit can overflow or outweigh the bias.
    A token is "bad" when its key or value has a non-finite entry or its key an entry
    beyond `_fused_magnitude_limit` (it could overflow a logit): its whole key and value
    rows are replaced by zeros before the call, and the queries that really see a bad
    token get NaN back afterwards (as with the einsum path, where a query that sees a
    non-finite value gets NaN). A query beyond the limit (or non-finite) spoils only its
    own row: it is zeroed for the kernel and its row is NaN.
    """
    batch, num, heads = ops.shape(query)[0], ops.shape(query)[1], query.shape[2]
    out_dtype = value.dtype
    dim_value = value.shape[-1]
    hides_keys = causal or key_valid is not None
    bad = bad_query = None

    def to_bthd(t, drop=None):
        t = ops.cast(t, "float32")
        if drop is not None:  # whole rows of bad tokens (any value) replaced by zeros
            t = ops.where(drop[..., None], ops.zeros_like(t), t)
        # Heads and tokens swapped first, then merged: the projections' einsum leaves
        # `(b, n, h, S, d)` as a permuted view of a `(b, n, S, h, d)` buffer, which this
        # order turns into `(b * n, S, h, d)` without a copy.
        t = ops.swapaxes(t, 2, 3)
        return ops.reshape(t, (batch * num, segment_len, heads, t.shape[-1]))

    if hides_keys:
        limit = _fused_magnitude_limit(query.shape[-1])
        key32, value32, query32 = (ops.cast(t, "float32") for t in (key, value, query))
        # Sums catch NaN/inf on every backend (a max may skip NaN); the magnitude test
        # catches keys that are finite but could overflow a logit (`any`, not `max`: torch
        # refuses the max of an empty batch).
        sums = ops.sum(key32, axis=-1) + ops.sum(value32, axis=-1)
        bad = ops.logical_or(ops.logical_not(ops.isfinite(sums)),
                             ops.any(ops.abs(key32) > limit, axis=-1))  # (b, n, h, S)
        bad_query = ops.logical_or(ops.logical_not(ops.isfinite(ops.sum(query32, axis=-1))),
                                   ops.any(ops.abs(query32) > limit, axis=-1))
        # The replacement passes (and their backward) run only when some token is bad,
        # where that branch costs no device sync (host memory, or traced: compiled).
        any_bad = ops.logical_or(ops.any(bad), ops.any(bad_query)) \
            if backend.branch_is_free(bad) else None
        replaced = lambda: (to_bthd(query32, bad_query), to_bthd(key32, bad),  # noqa: E731
                            to_bthd(value32, bad))
        if any_bad is None:
            query, key, value = replaced()
        else:
            query, key, value = ops.cond(
                any_bad, replaced,
                lambda: (to_bthd(query32), to_bthd(key32), to_bthd(value32)),
            )
    else:
        query, key, value = to_bthd(query), to_bthd(key), to_bthd(value)
    mask = None
    if key_valid is not None:
        valid = ops.cast(key_valid, "bool")
        # A segment without any valid key would give the kernel an all-hidden row; let it
        # see everything (finite values) and zero its output below.
        any_valid = ops.any(valid, axis=-1, keepdims=True)
        mask = ops.reshape(
            ops.logical_or(valid, ops.logical_not(any_valid)),
            (batch * num, 1, 1, segment_len),
        )
    attended = ops.dot_product_attention(query, key, value, mask=mask, is_causal=causal)
    attended = ops.reshape(attended, (batch, num, segment_len, heads, dim_value))
    attended = ops.swapaxes(attended, 2, 3)
    if hides_keys:
        def with_nan():
            sees_bad = _sees_non_finite_value(None, key_valid, causal, bad=bad)
            sees_bad = ops.logical_or(sees_bad, bad_query[..., None])
            return ops.where(sees_bad, ops.cast(float("nan"), attended.dtype), attended)

        attended = with_nan() if any_bad is None else ops.cond(
            any_bad, with_nan, lambda: attended
        )
    if key_valid is not None:
        # A query has a key iff a valid key lies at or before it (causal), or anywhere.
        valid_i = ops.cast(key_valid, "int32")
        seen = ops.cumsum(valid_i, axis=-1) if causal else ops.sum(valid_i, -1, keepdims=True)
        has_key = (seen > 0)[:, :, None, :, None]
        attended = ops.where(has_key, attended, ops.zeros_like(attended))
    return ops.cast(attended, out_dtype)


def cached_attention(query, key, value, key_valid, freed_slots_finite=False):
    """Softmax attention of new queries over the current segment's cached keys (decoding).

    Args:
        query: `(batch, heads, T, dim_key)`, already rotated.
        key: `(batch, S, heads, dim_key)`, the cached keys of the current segment (rotated
            at their own positions), in the layout of the decode cache.
        value: `(batch, S, heads, dim_value)`.
        key_valid: bool `(batch, S)`: the slots that hold a key of this segment that the
            queries may see (the caller has written the new tokens into the cache).
        freed_slots_finite: the caller guarantees that every slot outside `key_valid`
            holds a finite value (the layers' decode cache zeroes values when it frees
            slots). Then the values are not scanned for non-finite entries at every step:
            a zero probability meets only finite values, and a non-finite output can only
            come from a valid slot (`0 * nan`, `p * inf`), which is made NaN. Same results.

    Returns:
        `(batch, heads, T, dim_value)` in the dtype of `value`. Same isolation as
        `local_attention`: invalid slots (stale entries of an earlier segment included)
        enter through selects only; a query that sees a non-finite value gets NaN.
    """
    # The local attention's einsum path with one "segment" (the cache) and no causal
    # triangle: the same logits, isolation and empty-row handling.
    keys, values = ops.swapaxes(key, 1, 2), ops.swapaxes(value, 1, 2)  # (b, h, S, d)
    attended = _einsum_attention(
        query[:, None], keys[:, None], values[:, None],
        ops.cast(key_valid, "bool")[:, None], False, key.shape[1],
        masked_values_finite=freed_slots_finite,
    )
    return attended[:, 0]
