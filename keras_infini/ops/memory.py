"""Infini-attention compressive memory (arXiv 2404.07143, sec. 2.1), segment-parallel.

Per head, with `sigma(t) = elu(t) + 1`, memory `M` `(dim_key, dim_value)` and normaliser
`z` `(dim_key,)`:

    retrieval  A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1} + eps)
    linear     M_s = M_{s-1} + sigma(K)^T V
    delta      M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1} + eps))
    both       z_s = z_{s-1} + sum_t sigma(K_t)

All tensors use the folded layout `(batch, n, heads, S, dim)` and all state is float32.
The functions return the state *before* each segment (`(batch, n, heads, ...)`), so the
retrieval for every segment is one batched einsum, plus the state after the last segment.
"""

import math

from keras import ops

from keras_infini.ops import backend as fast
from keras_infini.ops import loops

EPSILON = 1e-6


def sigma(x):
    """The ELU + 1 feature map, computed in float32."""
    return ops.elu(ops.cast(x, "float32")) + 1.0


def exclusive_cumsum(x):
    """Cumulative sum over axis 1 that excludes the current entry.

    A cumulative sum of the input shifted by one entry: entry `i` is a sum of entries
    `< i` only, so a non-finite later entry cannot reach an earlier one. (A triangular
    matmul would multiply later entries by 0, and `0 * nan = nan`.) Not `cumsum(x) - x`
    either: TF's graph optimiser folded `(cumsum(x) - x) + eps` so the epsilon vanished,
    and the subtraction would let a later `inf` cancel into `nan`.
    """
    shifted = ops.concatenate([ops.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    return ops.cumsum(shifted, axis=1)


def segment_norm_updates(sigma_k):
    """`sum_t sigma(K_t)` per segment: `(batch, n, h, S, dk)` -> `(batch, n, h, dk)`."""
    return ops.sum(sigma_k, axis=3)


def norm_states(sigma_k, norm0, sequence=None):
    """Normaliser before each segment and after the last one.

    Args:
        sigma_k: float32 `(batch, n, h, S, dk)`, zero for masked tokens.
        norm0: float32 `(batch, h, dk)`.
        sequence: a `keras_infini.distribution.SequenceSharding` when axis 1 is split
            over devices (see "Sequence sharding" below), else None.
    Returns:
        `(norm_before (batch, n, h, dk), norm_final (batch, h, dk))`.
    """
    updates = segment_norm_updates(sigma_k)
    if sequence is not None:
        return sharded_prefix_states(updates, norm0, sequence)
    before = norm0[:, None] + exclusive_cumsum(updates)
    final = norm0 + ops.sum(updates, axis=1)
    return before, final


def linear_update(write_k, value):
    """The `linear` rule's change of the memory from some tokens of one segment:
    `write_k^T V`, summed over the token axis (-2). Any leading axes.

    The full call applies it to whole segments at once, the decode cache to one token at
    a time (accumulating until the segment fills); both fold a segment as
    `memory + update` (see `fold`)."""
    return ops.einsum("...sk,...sv->...kv", write_k, value)


def delta_update(memory, read_k, write_k, value, norm, normalised=True):
    """The `delta` rule's change of the memory from some tokens of one segment:
    `write_k^T (V - read_k M / d)` with `d = read_k z + eps` when `normalised` (else 1),
    where `M`, `z` are the state *before* the segment. Leading axes: batch (and heads).

    Every token's term depends only on the state before its segment, so the update of a
    segment is the sum of its tokens' updates: the decode cache accumulates it token by
    token, the full call computes it for a whole segment in one einsum."""
    retrieved = ops.matmul(read_k, memory)
    if normalised:
        den = ops.einsum("...sk,...k->...s", read_k, norm) + EPSILON
        retrieved = retrieved / den[..., None]
    return ops.einsum("...sk,...sv->...kv", write_k, value - retrieved)


def fold(memory, norm, memory_update, norm_update):
    """The state after a segment: `(memory + memory_update, norm + norm_update)`."""
    return memory + memory_update, norm + norm_update


def linear_memory_states(sigma_k, value, memory0, sequence=None):
    """Memory before each segment for the `linear` update: an exclusive cumsum over segments.

    Args:
        sigma_k: float32 `(batch, n, h, S, dk)`, zero for masked tokens.
        value: float32 `(batch, n, h, S, dv)`.
        memory0: float32 `(batch, h, dk, dv)`.
        sequence: as in `norm_states`.
    Returns:
        `(memory_before (batch, n, h, dk, dv), memory_final (batch, h, dk, dv))`.
    """
    updates = linear_update(sigma_k, value)
    if sequence is not None:
        return sharded_prefix_states(updates, memory0, sequence)
    before = memory0[:, None] + exclusive_cumsum(updates)
    final = memory0 + ops.sum(updates, axis=1)
    return before, final


def _delta_step(memory, sigma_k, value, norm):
    """One delta-rule update for one segment (leading axes: batch)."""
    return memory + delta_update(memory, sigma_k, sigma_k, value, norm)


def delta_memory_states_scan(sigma_k, value, norm_before, memory0):
    """Delta-rule memory states with a sequential `ops.scan` over segments.

    The scan emits the carry it received (the state before the segment), so its outputs
    have the carry's structure: the portable pattern for TF graphs (see KERAS_NOTES).
    """
    # One stacked `xs` tensor: Keras' TF `scan` fails on several `xs` when the number of
    # segments is dynamic (it calls `assert_is_compatible_with` on a None dimension).
    # The normaliser is carried alongside the memory for the same reason.
    dim_key = sigma_k.shape[-1]
    xs = ops.moveaxis(ops.concatenate([sigma_k, value], axis=-1), 1, 0)

    def step(carry, segment):
        memory, norm = carry
        sk, v = segment[..., :dim_key], segment[..., dim_key:]
        new_memory = _delta_step(memory, sk, v, norm)
        return (new_memory, norm + ops.sum(sk, axis=2)), (memory, norm)

    (final, _), (before, _) = loops.scan(step, (memory0, norm_before[:, 0]), xs)
    return ops.moveaxis(before, 0, 1), final


delta_memory_states_scan = fast.compiled_when_eager(delta_memory_states_scan)


def delta_memory_states_associative(sigma_k, value, norm_before, memory0):
    """Delta-rule memory states with a parallel (Hillis-Steele) scan over segments.

    The update is affine in the memory, `M_s = A_s M_{s-1} + b_s` with
    `A_s = I - sigma(K)^T diag(1 / (sigma(K) z_{s-1} + eps)) sigma(K)` and
    `b_s = sigma(K)^T V` (z does not depend on M). Affine maps compose associatively, so
    `ceil(log2(n))` batched levels give every prefix. The first segment is applied to the
    initial memory directly and given `A_1 = 0`: with a zero normaliser `A_1` holds
    `1/eps`-sized entries that would overflow in products although they only multiply a
    zero memory.

    Needs a static number of segments (the level count is a Python int).
    """
    n = sigma_k.shape[1]
    if n is None:
        raise ValueError("delta_memory_states_associative needs a static number of segments.")
    dim_key = sigma_k.shape[-1]
    den = ops.einsum("bnhsk,bnhk->bnhs", sigma_k, norm_before) + EPSILON
    weighted = sigma_k / den[..., None]
    eye = ops.eye(dim_key, dtype="float32")
    transition = eye - ops.einsum("bnhsk,bnhsj->bnhkj", sigma_k, weighted)
    offset = ops.einsum("bnhsk,bnhsv->bnhkv", sigma_k, value)

    first = _delta_step(memory0, sigma_k[:, 0], value[:, 0], norm_before[:, 0])
    if n == 1:
        return memory0[:, None], first
    transition = ops.concatenate([ops.zeros_like(transition[:, :1]), transition[:, 1:]], 1)
    offset = ops.concatenate([first[:, None], offset[:, 1:]], axis=1)

    # Inclusive prefix composition: element i becomes the map of segments 1..i.
    shift = 1
    for _ in range(int(math.ceil(math.log2(n)))):
        prev_offset = ops.concatenate(
            [ops.zeros_like(offset[:, :shift]), offset[:, : n - shift]], axis=1
        )
        new_offset = ops.matmul(transition, prev_offset) + offset
        if 2 * shift < n:  # the last level does not need the composed transitions
            prev_transition = ops.concatenate(
                [
                    ops.broadcast_to(eye, ops.shape(transition[:, :shift])),
                    transition[:, : n - shift],
                ],
                axis=1,
            )
            transition = ops.matmul(transition, prev_transition)
        offset = new_offset
        shift *= 2
    # offset[:, i] is now the memory after segment i.
    before = ops.concatenate([memory0[:, None], offset[:, :-1]], axis=1)
    return before, offset[:, -1]


def delta_memory_states(sigma_k, value, norm_before, memory0, method="scan", sequence=None):
    """Delta-rule memory states.

    `method="scan"` (default): the sequential recurrence through `loops.scan` (fewest
    FLOPs; a bounded `tf.while_loop` on TensorFlow, differentiable under XLA).
    `method="associative"`: the log-depth parallel scan of the affine maps (static segment
    count; `dk^2 (dk + dv) log n` FLOPs per segment against `S dk dv`, slower on a 2-core
    CPU: train step 0.219 s vs 0.181 s at 4K tokens). Both are tested against each other.
    `sequence` (see `norm_states`): each device runs `method` on its own segments
    (`sharded_affine_states`).
    """
    if sequence is not None:
        return sharded_affine_states(
            lambda inputs, v, m0: delta_memory_states(inputs[0], v, inputs[1], m0, method),
            (sigma_k, norm_before), value, memory0, sequence,
        )
    if method == "associative":
        return delta_memory_states_associative(sigma_k, value, norm_before, memory0)
    if method == "scan":
        return delta_memory_states_scan(sigma_k, value, norm_before, memory0)
    raise ValueError(f"Invalid method={method!r}: expected 'scan' or 'associative'.")


def retrieve(sigma_q, memory_before, norm_before):
    """`A_mem = sigma(Q) M / (sigma(Q) z + eps)` for every segment at once (float32).

    Args:
        sigma_q: `(batch, n, h, S, dk)`; memory_before: `(batch, n, h, dk, dv)`;
        norm_before: `(batch, n, h, dk)`.
    Returns:
        `(batch, n, h, S, dv)` float32.
    """
    num = ops.matmul(sigma_q, memory_before)
    den = ops.einsum("bnhsk,bnhk->bnhs", sigma_q, norm_before) + EPSILON
    return num / den[..., None]


# --------------------------------------------------------------------------- memory options
# Feature maps for the memory's queries and keys (`CompressiveMemory(memory_feature_map=)`).
# "elu1" is the paper's `sigma` with the normalised retrieval above. "l2" is DeltaNet's
# (Yang et al. 2024): keys and queries divided by their L2 norm, read without a
# normaliser, `A_mem = phi(Q) M`, and its delta rule runs token by token inside a segment
# (`token_level_delta_inputs`): with unit keys and write strengths in [0, 1] each step is
# a contraction along its key (M stays bounded), and the retrieval of a stored
# key returns its value, not a value divided by an accumulated `phi(q) z`. "elu1_l2" is
# `(elu + 1)` divided by its L2 norm, also read without normaliser: unit keys for the delta
# rule that keep ELU+1's ability to learn sparse (nearly orthogonal) positive features.
#
# Two maps from the literature widen the memory key beyond `dim_key` (the state is then
# `(h, feature_dim, dv)`, see `feature_dim`), giving more nearly orthogonal keys:
# "dpfp", "dpfp2", "dpfp3" are DPFP-nu (Schlag et al. 2021) with nu = 1, 2, 3: with
# `r = [relu(t), relu(-t)]` (`2 dk`), `phi(t) = [r * roll(r, 1), ..., r * roll(r, nu)]`
# (`2 dk nu` non-negative, sparse features), then divided by its L2 norm so the delta rule
# stays a contraction (the paper sum-normalises instead), read like "l2". "taylor" is the
# second-order Taylor map of "Based" (Arora et al. 2024),
# `phi(t) = [1, t / dk^(1/4), vec(t t^T) / (sqrt(2) sqrt(dk))]` (`1 + dk + dk^2`), so that
# `phi(q) . phi(k) = 1 + s + s^2 / 2 >= 1/2` with `s = q . k / sqrt(dk)`, the start of
# `exp(s)`: positive, so it is read with the normaliser, like "elu1".
FEATURE_MAPS = ("elu1", "l2", "elu1_l2", "dpfp", "dpfp2", "dpfp3", "taylor")
NORMALISED_FEATURE_MAPS = ("elu1", "taylor")  # maps read with `/ (phi(q) z + eps)`
# The rest are unit-key maps, read `phi(q) M` (derived, so the two lists cannot drift).
UNIT_KEY_FEATURE_MAPS = tuple(m for m in FEATURE_MAPS if m not in NORMALISED_FEATURE_MAPS)
_DPFP_NU = {"dpfp": 1, "dpfp2": 2, "dpfp3": 3}


def feature_dim(name, dim_key):
    """The width of `feature_map(x, name)` for keys of width `dim_key`: the memory's
    first axis `M (feature_dim, dv)` and the normaliser's `z (feature_dim,)`."""
    if name in _DPFP_NU:
        return 2 * dim_key * _DPFP_NU[name]
    if name == "taylor":
        return 1 + dim_key + dim_key * dim_key
    return dim_key


def dpfp(x, nu):
    """Deterministic parameter-free projection (Schlag et al. 2021), float32, not
    normalised: `r = [relu(x), relu(-x)]`, `[r * roll(r, 1), ..., r * roll(r, nu)]`
    with `roll(r, j)[i] = r[i - j]` (cyclic)."""
    x = ops.cast(x, "float32")
    r = ops.concatenate([ops.relu(x), ops.relu(-x)], axis=-1)
    # Static: nu <= 3. `ops.roll` wraps, so a width-1 key (2 features) is rolled right.
    return ops.concatenate([r * ops.roll(r, j, axis=-1) for j in range(1, nu + 1)], axis=-1)


def taylor(x):
    """The second-order Taylor feature map of "Based", float32:
    `[1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]`, `d = x.shape[-1]` (static)."""
    x = ops.cast(x, "float32")
    d = int(x.shape[-1])
    # The outer product as `d` static slices (no reshape of dynamic leading axes).
    second = ops.concatenate([x[..., i:i + 1] * x for i in range(d)], axis=-1)
    return ops.concatenate(
        [ops.ones_like(x[..., :1]), x * (1.0 / d ** 0.25),
         second * (1.0 / (math.sqrt(2.0) * math.sqrt(d)))],
        axis=-1,
    )


def l2_normalize(x):
    """`x / max(||x||_2, eps)` over the last axis, in float32 (eps = 1e-6).

    The clamp is taken on the squared norm, so a zero vector (a masked or zero token) has
    a finite gradient: `sqrt` is never differentiated at 0.
    """
    x = ops.cast(x, "float32")
    squared = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x / ops.sqrt(ops.maximum(squared, EPSILON * EPSILON))


def feature_map(x, name):
    """The memory feature map `phi` named `name` (see `FEATURE_MAPS`), float32."""
    if name == "elu1":
        return sigma(x)
    if name == "l2":
        return l2_normalize(x)
    if name == "elu1_l2":
        return l2_normalize(sigma(x))
    if name in _DPFP_NU:
        return l2_normalize(dpfp(x, _DPFP_NU[name]))
    if name == "taylor":
        return taylor(x)
    raise ValueError(f"Unknown feature map {name!r}; expected one of {FEATURE_MAPS}.")


def _next_power_of_two(n):
    size = 1
    while size < n:
        size *= 2
    return size


def unit_lower_inverse(read_k, write_k, cum_log_decay=None):
    """`(I + A)^{-1}` for `A[t, i] = (k_t . w_i) e^(g_t - g_i)` when `i < t`, else 0
    (`k = read_k`, `w = write_k`, `g = cum_log_decay`, non-increasing; no decay: `g = 0`).

    Recursive block inversion of a unit lower triangular matrix (as DeltaNet's chunked
    kernels do): for `T = [[P, 0], [C, Q]]`, `T^{-1} = [[P^-1, 0], [-Q^-1 C P^-1, Q^-1]]`,
    from 1x1 blocks up to the whole (padded to a power of two) segment: `log2(S)`
    levels of batched matmuls, each off-diagonal block `C` made directly from the keys
    (strictly below the diagonal: no mask needed, every exponent `<= 0`). Only matmuls:
    no LAPACK call (XLA on CPU runs JAX's batched LU / triangular solve kernels on its
    own intra-op pool, where two of them at once can wait on each other forever; every
    backend takes this path so their results stay the same).

    Args:
        read_k, write_k: float32 `(..., S, dk)`; cum_log_decay: float32 `(..., S)` or None.
    Returns:
        float32 `(..., S, S)`, unit lower triangular.
    """
    length = read_k.shape[-2]
    size = _next_power_of_two(length)
    lead = tuple(ops.shape(read_k)[:-2])
    if size != length:
        pad = [(0, 0)] * (len(read_k.shape) - 2) + [(0, size - length), (0, 0)]
        read_k, write_k = ops.pad(read_k, pad), ops.pad(write_k, pad)
        if cum_log_decay is not None:  # the last value repeated: padded exponents <= 0
            last = ops.repeat(cum_log_decay[..., -1:], size - length, axis=-1)
            cum_log_decay = ops.concatenate([cum_log_decay, last], axis=-1)
    dim = read_k.shape[-1]
    inverse = ops.ones(lead + (size, 1, 1), dtype="float32")
    block = 1
    while block < size:
        pairs = size // (2 * block)
        k = ops.reshape(read_k, lead + (pairs, 2, block, dim))
        w = ops.reshape(write_k, lead + (pairs, 2, block, dim))
        lower = ops.einsum("...tk,...ik->...ti", k[..., 1, :, :], w[..., 0, :, :])
        if cum_log_decay is not None:
            g = ops.reshape(cum_log_decay, lead + (pairs, 2, block))
            lower = lower * ops.exp(g[..., 1, :, None] - g[..., 0, None, :])
        halves = ops.reshape(inverse, lead + (pairs, 2, block, block))
        first, second = halves[..., 0, :, :], halves[..., 1, :, :]
        corner = -ops.matmul(second, ops.matmul(lower, first))
        top = ops.concatenate([first, ops.zeros_like(first)], axis=-1)
        bottom = ops.concatenate([corner, second], axis=-1)
        inverse = ops.concatenate([top, bottom], axis=-2)  # (..., pairs, 2b, 2b)
        block *= 2
    inverse = ops.reshape(inverse, lead + (size, size))
    return inverse[..., :length, :length]


def token_level_delta_inputs(read_k, write_k, value):
    """The delta rule applied token by token inside each segment (DeltaNet, Yang et al.
    2024), rewritten as inputs of the segment-level form `M + W^T (V' - K' M)`.

    Token by token, `M_t = M_{t-1} + w_t^T (v_t - k_t M_{t-1})` (rows `k = read_k`,
    `w = write_k = beta k`). The errors `e_t = v_t - k_t M_{t-1}` satisfy
    `e_t = v_t - k_t M_0 - sum_{i<t} (k_t . w_i) e_i`, i.e. `(I + A) E = V - K M_0` with
    `A = strictly_lower(K W^T)`, so after the segment `M = M_0 + W^T E` with
    `[V' | K'] = (I + A)^{-1} [V | K]`: one triangular solve per segment (DeltaNet's UT
    transform), independent of the memory, so the recurrence over segments, its
    sequence-sharded form and the decode cache are those of the segment-level rule.
    The segment-level rule (every token reads the state before its segment) sums
    `sum_t beta_t k_t^T k_t` into one step, which for similar unit keys exceeds 2 along
    a direction and grows without bound over segments; token by token each step is
    `I - beta_t k_t^T k_t`, a contraction along `k_t` for unit keys and `beta_t` in
    [0, 1]. Masked tokens (zero keys) change nothing.

    Args:
        read_k, write_k: float32 `(..., S, dk)`; value: float32 `(..., S, dv)`.
    Returns:
        `(read_k', value')` with the shapes of `read_k` and `value`.
    """
    length = read_k.shape[-2]
    if length == 1:  # one token: A is empty
        return read_k, value
    dim_value = value.shape[-1]
    inverse = unit_lower_inverse(read_k, write_k)
    solved = ops.matmul(inverse, ops.concatenate([value, read_k], axis=-1))
    return solved[..., dim_value:], solved[..., :dim_value]


def gated_token_level_delta_inputs(read_k, write_k, value, log_decay):
    """`token_level_delta_inputs` with a decay per token (Gated DeltaNet, Yang et al.
    2025): `M_t = alpha_t (I - k_t^T w_t) M_{t-1} + w_t^T v_t`, `w_t = beta_t k_t`.

    With `g_t = sum_{i<=t} log alpha_i` (`log_decay`, `(..., S)`, values `<= 0`), the
    errors `e_t = v_t - alpha_t k_t M_{t-1}` satisfy `(I + A) E = V - diag(e^g) K M_0`
    with `A[t, i] = e^(g_t - g_i) k_t . w_i` for `i < t`, and after the segment
    `M = e^(g_S) M_0 + sum_i e^(g_S - g_i) w_i^T e_i`. So with
    `[V' | K'] = (I + A)^{-1} [V | diag(e^g) K]` and `W' = diag(e^(g_S - g)) W`, the
    segment's step is `M -> e^(g_S) M + W'^T (V' - K' M)` (one triangular solve, then the
    segment-level recurrence with a decay per segment, `delta_memory_states_general(...,
    log_decay=g_S)`). Every exponent is `<= 0` (the differences are taken for `i < t`
    only), so nothing overflows. A token with `log alpha = 0` and zero keys (masked)
    changes nothing. The system is solved by `unit_lower_inverse` (matmuls only).

    Args:
        read_k, write_k: float32 `(..., S, dk)`; value: float32 `(..., S, dv)`;
        log_decay: float32 `(..., S)`, `log alpha_t <= 0`.
    Returns:
        `(read_k', write_k', value', segment_log_decay (...,))`.
    """
    length = read_k.shape[-2]
    dim_value = value.shape[-1]
    g = ops.cumsum(log_decay, axis=-1)  # (..., S)
    last = g[..., -1:]
    scaled_k = read_k * ops.exp(g)[..., None]
    write_out = write_k * ops.exp(last - g)[..., None]
    if length == 1:  # one token: A is empty
        return scaled_k, write_out, value, last[..., 0]
    inverse = unit_lower_inverse(read_k, write_k, g)
    solved = ops.matmul(inverse, ops.concatenate([value, scaled_k], axis=-1))
    return solved[..., dim_value:], write_out, solved[..., :dim_value], last[..., 0]


def _delta_step_general(memory, read_k, write_k, value, norm, normalised):
    """One delta update with separate read and write keys (leading axes: batch, heads).

    `M += write_k^T (V - read_k M / d)`, `d = read_k z + eps` when `normalised`, else 1.
    `write_k = beta * read_k` gives DeltaNet's `M += k^T beta (v - k M)`.
    """
    return memory + delta_update(memory, read_k, write_k, value, norm, normalised)


def delta_memory_states_general(read_k, write_k, value, norm_before, memory0,
                                normalised=True, sequence=None, log_decay=None):
    """Delta-rule memory states with read keys `read_k` and write keys `write_k`.

    Same layout and contract as `delta_memory_states` (states before each segment and
    after the last, float32). With `write_k is read_k` and `normalised=True` it is the
    paper's delta rule. `log_decay` `(b, n, h)` (or None: 1): the memory is multiplied by
    `exp(log_decay)` in each segment's step, `M -> e^d M + write_k^T (V - read_k M)`
    (`gated_token_level_delta_inputs`). The recurrence runs over segments through
    `loops.scan`; `norm_before` (the normaliser before each segment) is an input, not
    carried. `sequence`: see `norm_states` (each device scans its own segments).
    """
    if sequence is not None:
        inputs = (read_k, write_k, norm_before)
        if log_decay is not None:
            inputs += (log_decay,)
        return sharded_affine_states(
            lambda inputs, v, m0: delta_memory_states_general(
                inputs[0], inputs[1], v, inputs[2], m0, normalised=normalised,
                log_decay=inputs[3] if len(inputs) > 3 else None,
            ),
            inputs, value, memory0, sequence,
        )
    return _delta_states_general_scan(read_k, write_k, value, norm_before, memory0,
                                      log_decay, normalised)


def _delta_states_general_scan(read_k, write_k, value, norm_before, memory0, log_decay,
                               normalised):
    dim_key = read_k.shape[-1]
    keys = ops.concatenate([read_k, write_k], axis=-1)  # one stacked tensor per segment

    # `loops.scan` over axis 1 (no transposed copies; TF: a bounded while loop), emitting
    # the carry it received (the state before the segment).
    def scan_step(memory, segment):
        both = segment["keys"]
        if "decay" not in segment:
            new_memory = _delta_step_general(
                memory, both[..., :dim_key], both[..., dim_key:], segment["value"],
                segment["norm"], normalised,
            )
        else:  # e^d M + W^T (V - K M): the update reads the undecayed M
            new_memory = segment["decay"][..., None, None] * memory + delta_update(
                memory, both[..., :dim_key], both[..., dim_key:], segment["value"],
                segment["norm"], normalised,
            )
        return new_memory, memory

    xs = {"keys": keys, "value": value, "norm": norm_before}
    if log_decay is not None:
        xs["decay"] = ops.exp(ops.cast(log_decay, "float32"))
    final, before = loops.scan(scan_step, memory0, xs, axis=1)
    return before, final


_delta_states_general_scan = fast.compiled_when_eager(
    _delta_states_general_scan, static_argnames=("normalised",)
)


def retrieve_unnormalised(phi_q, memory_before):
    """`A_mem = phi(Q) M` for every segment at once (float32), for maps like "l2"."""
    return ops.matmul(phi_q, memory_before)


# --------------------------------------------------------------------------- sequence sharding
# Under `keras_infini.distribution.SequenceParallel` the segment axis (axis 1) is split
# over the mesh axis `seq_dim` into `shards` contiguous blocks, one per device. The state
# before each segment is then computed the LASP-2 way: every device summarises its own
# segments, only the small summaries are all-gathered over `seq_dim`, and each device
# combines the summaries of the devices before it into its incoming state.
#   linear / norm: the summary is the sum of the device's updates; incoming state =
#       initial state + the sums of the earlier devices.
#   delta: the device's segments act on the memory as one affine map `M -> A M + B`
#       (the update is affine in M, and `z` does not depend on M); incoming memory =
#       the earlier devices' maps composed, applied to the initial memory.
# XLA's SPMD partitioner given only sharding annotations all-gathers the whole sequence
# of per-segment states for an exclusive cumsum over a sharded axis, and reshards the
# associative scan's log-depth shifts with collective-permutes and all-to-alls (measured,
# see the commit message and README "Scaling out"), hence this explicit form. The
# exchange itself (`ops.backend.sequence_shard_map`) is a JAX `shard_map`; the math is
# here, in keras.ops. Without a backend fast path it runs as one shard (the plain math).


def _sequence_map(fn, sharded, replicated, sequence):
    """`fn(index, shards, gather, sharded, replicated) -> (sharded_out, replicated_out)`
    run once per sequence shard (`index` its position, `gather(t)` stacks `t` from every
    shard on a new axis 0), or once on the whole sequence when `sequence` is None or the
    backend has no fast path."""
    if sequence is not None:
        n = sharded[0].shape[1]
        if n is None or n % sequence.size:
            raise ValueError(
                f"Invalid number of segments {n}: sequence sharding over "
                f"{sequence.seq_dim!r} needs a multiple of its size {sequence.size} (the "
                "layers pad to one; pad the input to segment_len * size tokens)."
            )
        try:
            return fast.sequence_shard_map(fn, tuple(sharded), tuple(replicated), sequence)
        except NotImplementedError:
            pass
    return fn(0, 1, lambda t: t[None], tuple(sharded), tuple(replicated))


def _earlier(index, shards, rank):
    """Bool `(shards, 1, ..., 1)` (rank `rank`): which shards come before `index`."""
    earlier = ops.arange(shards) < index
    return ops.reshape(earlier, (shards,) + (1,) * (rank - 1))


def sharded_prefix_states(updates, state0, sequence):
    """`state0 + exclusive prefix sum` of `updates` `(batch, n, ...)` over axis 1, with
    axis 1 split over `sequence`: `(before (batch, n, ...), final (batch, ...))`."""

    def per_shard(index, shards, gather, sharded, replicated):
        (local,), (initial,) = sharded, replicated
        total = ops.sum(local, axis=1)  # this shard's summary
        totals = gather(total)  # (shards, batch, ...)
        earlier = _earlier(index, shards, len(totals.shape))
        offset = ops.sum(ops.where(earlier, totals, ops.zeros_like(totals)), axis=0)
        before = (initial + offset)[:, None] + exclusive_cumsum(local)
        return (before,), (initial + ops.sum(totals, axis=0),)

    (before,), (final,) = _sequence_map(per_shard, (updates,), (state0,), sequence)
    return before, final


def sharded_affine_states(states_fn, inputs, value, memory0, sequence):
    """Memory states of an update that is affine in the memory, axis 1 split over
    `sequence`.

    `states_fn(inputs, value, memory0) -> (before (b, n, h, dk, dv), final (b, h, dk, dv))`
    is the one-device recurrence (e.g. `delta_memory_states`), with `inputs` a tuple of
    `(b, n, ...)` tensors and `value` `(b, n, h, S, dv)`. Every shard runs it once on the
    augmented memory `[A | B]` `(b, h, dk, dk + dv)` with values `[0 | V]`: starting from
    `[I | 0]` it yields, before each of its segments, the map `M -> A M + B` of its
    segments so far (the first shard starts from `[0 | memory0]`, so its states are the
    one-device states exactly). The shards' final maps are all-gathered and composed into
    each shard's incoming memory `M_in`; its states are `A M_in + B`.
    """
    dim_key = memory0.shape[-2]

    def per_shard(index, shards, gather, sharded, replicated):
        *local_inputs, local_value = sharded
        (initial,) = replicated
        first = index == 0
        eye = ops.broadcast_to(
            ops.eye(dim_key, dtype="float32"), tuple(initial.shape[:-2]) + (dim_key, dim_key)
        )
        start = ops.concatenate(
            [ops.where(first, ops.zeros_like(eye), eye),
             ops.where(first, initial, ops.zeros_like(initial))],
            axis=-1,
        )
        zeros = ops.zeros(tuple(local_value.shape[:-1]) + (dim_key,), dtype="float32")
        augmented_value = ops.concatenate([zeros, local_value], axis=-1)
        before, final = states_fn(tuple(local_inputs), augmented_value, start)
        maps = gather(final)  # (shards, b, h, dk, dk + dv)
        incoming = ops.zeros_like(initial)
        composed = ops.zeros_like(initial)
        for j in range(shards):  # the first shard's map is constant (A = 0)
            composed = ops.matmul(maps[j][..., :dim_key], composed) + maps[j][..., dim_key:]
            incoming = ops.where(j < index, composed, incoming)
        states = ops.matmul(before[..., :dim_key], incoming[:, None]) + before[..., dim_key:]
        return (states,), (composed,)

    (before,), (final,) = _sequence_map(
        per_shard, tuple(inputs) + (value,), (memory0,), sequence
    )
    return before, final
