"""Plain NumPy float64 references of the papers' equations, written loop-by-loop.

These are deliberately naive (a Python loop over segments, heads and tokens where the
paper has one) so they read like the equations, not like the layers they check.
"""

import math

import numpy as np

EPS = 1e-6


def rope_frequencies(dim, dim_embeddings_pct=0.5, base=10000.0):
    d_rot = int(dim * dim_embeddings_pct)
    d_rot -= d_rot % 2
    i = np.arange(d_rot // 2, dtype=np.float64)
    return base ** (-2.0 * i / d_rot)


def yarn_frequencies(dim, context_len, context_len_ext, dim_embeddings_pct=0.5,
                     base=10000.0, alpha=1.0, beta=32.0):
    theta = rope_frequencies(dim, dim_embeddings_pct, base)
    s = context_len_ext / context_len
    wavelength = 2 * math.pi / theta
    ratio = context_len / wavelength
    gamma = np.clip((ratio - alpha) / (beta - alpha), 0.0, 1.0)
    return (1 - gamma) * theta / s + gamma * theta


def yarn_mscale(context_len, context_len_ext, len_scale=None):
    if len_scale is not None:
        return float(len_scale)
    return 0.1 * math.log(context_len_ext / context_len) + 1.0


def rotate(x, positions, theta, scale=1.0):
    """RoFormer eq. 34 on interleaved pairs: x `(..., dim)`, positions broadcast to x[..., 0]."""
    x = np.asarray(x, np.float64)
    out = x.copy()
    p = np.asarray(positions, np.float64)
    for i, t in enumerate(theta):
        ang = p * t
        c, s = np.cos(ang), np.sin(ang)
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * c - b * s
        out[..., 2 * i + 1] = a * s + b * c
    return out * scale


def sigma(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def compressive_memory(x, wq, wk, wv, wo, gate, *, segment_len, update="linear",
                       causal=False, mask=None, positions=None, rotate_fn=None,
                       memory0=None, norm0=None):
    """Infini-attention (arXiv 2404.07143 eqs. 3-10) for one batch, segment by segment.

    x `(B, L, D)`; wq/wk `(D, H, dk)`; wv `(D, H, dv)`; wo `(H, dv, D)`; gate `(H,)`.
    `rotate_fn(t, pos)` rotates `(S, dk)` by integer positions `(S,)`.
    Returns `(outputs (B, L, D), memory (B, H, dk, dv), norm (B, H, dk))`.
    """
    x = np.asarray(x, np.float64)
    bsz, length, _ = x.shape
    heads, dk = wq.shape[1], wq.shape[2]
    dv = wv.shape[2]
    mask = np.ones((bsz, length), bool) if mask is None else np.asarray(mask, bool)
    x = np.where(mask[..., None], x, 0.0)  # a masked token enters as a zero input
    if positions is None:
        positions = np.tile(np.arange(length) % segment_len, (bsz, 1))
    outputs = np.zeros((bsz, length, wo.shape[-1]))
    memories = np.zeros((bsz, heads, dk, dv))
    norms = np.zeros((bsz, heads, dk))
    g = 1.0 / (1.0 + np.exp(-np.asarray(gate, np.float64)))
    for b in range(bsz):
        q_all = np.einsum("ld,dhk->lhk", x[b], wq)
        k_all = np.einsum("ld,dhk->lhk", x[b], wk)
        v_all = np.einsum("ld,dhv->lhv", x[b], wv)
        for h in range(heads):
            m = np.zeros((dk, dv)) if memory0 is None else np.array(memory0[b, h], np.float64)
            z = np.zeros(dk) if norm0 is None else np.array(norm0[b, h], np.float64)
            for start in range(0, length, segment_len):
                sl = slice(start, min(start + segment_len, length))
                q, k, v = q_all[sl, h], k_all[sl, h], v_all[sl, h]
                valid = mask[b, sl]
                pos = positions[b, sl]
                qr, kr = (q, k) if rotate_fn is None else (rotate_fn(q, pos), rotate_fn(k, pos))
                n = q.shape[0]
                # 1. local softmax attention
                a_dot = np.zeros((n, dv))
                for t in range(n):
                    allowed = valid.copy()
                    if causal:
                        allowed[t + 1:] = False
                    if not allowed.any():
                        continue
                    logits = kr[allowed] @ qr[t] / math.sqrt(dk)
                    w = np.exp(logits - logits.max())
                    a_dot[t] = (w / w.sum()) @ v[allowed]
                # 2. memory retrieval with the state before this segment
                sq = sigma(q)
                a_mem = (sq @ m) / (sq @ z + EPS)[:, None]
                # 3. memory update with this segment's unmasked tokens
                sk = sigma(k)[valid]
                vv = v[valid]
                if update == "linear":
                    m = m + sk.T @ vv
                else:
                    m = m + sk.T @ (vv - (sk @ m) / (sk @ z + EPS)[:, None])
                z = z + sk.sum(axis=0)
                # 4. gate
                a = g[h] * a_mem + (1 - g[h]) * a_dot
                outputs[b, sl] += a @ wo[h]
            memories[b, h], norms[b, h] = m, z
    return outputs, memories, norms


def layer_norm(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def relu(x):
    return np.maximum(x, 0.0)


def infini_transformer(x, attention, mlp, *, ln1, ln2, eps, normalize_first=True):
    """The block's equations. `attention(t)` -> (out, memory, norm); `mlp(t)` -> array;
    `ln1`/`ln2` are `(gamma, beta)`."""
    x = np.asarray(x, np.float64)
    norm1 = lambda t: layer_norm(t, *ln1, eps)  # noqa: E731
    norm2 = lambda t: layer_norm(t, *ln2, eps)  # noqa: E731
    if normalize_first:
        a, m, z = attention(norm1(x))
        h = x + a
        return h + mlp(norm2(h)), m, z
    a, m, z = attention(x)
    h = norm1(x + a)
    return norm2(h + mlp(h)), m, z


def mod_select(r, valid, k, training):
    """Indices (in order) of the routed tokens of one segment: r, valid `(S,)`."""
    if training:
        order = sorted(np.flatnonzero(valid), key=lambda t: -r[t])[:k]
        return sorted(order)
    routed = []
    for t in range(len(r)):
        if valid[t] and r[t] > 0 and len(routed) < k:
            routed.append(t)
    return routed


def mixture_of_depths(x, r, block, *, segment_len, k, training, mask=None):
    """MoD around `block(x_sel, slot_mask, positions)` -> (y_sel, memory, norm).

    x `(B, L, D)`, r `(B, L)` router logits. Gathers each segment's selected tokens into
    `k` slots (unused slots masked), runs the block on all of them, and returns
    `(outputs, selection (B, L), memory, norm)` with
    `out = x + sigmoid(r) * (block(x_sel) - x)` on selected tokens.
    """
    x = np.asarray(x, np.float64)
    bsz, length, dim = x.shape
    mask = np.ones((bsz, length), bool) if mask is None else np.asarray(mask, bool)
    n = -(-length // segment_len)
    gathered = np.zeros((bsz, n * k, dim))
    slot_mask = np.zeros((bsz, n * k), bool)
    slot_pos = np.zeros((bsz, n * k), int)
    slot_token = -np.ones((bsz, n * k), int)
    for b in range(bsz):
        for s in range(n):
            start = s * segment_len
            seg = slice(start, min(start + segment_len, length))
            chosen = mod_select(r[b, seg], mask[b, seg], k, training)
            for j, t in enumerate(chosen):
                gathered[b, s * k + j] = x[b, start + t]
                slot_mask[b, s * k + j] = True
                slot_pos[b, s * k + j] = t
                slot_token[b, s * k + j] = start + t
    y, memory, norm = block(gathered, slot_mask, slot_pos)
    out = x.copy()
    selection = np.zeros((bsz, length))
    for b in range(bsz):
        for j in np.flatnonzero(slot_mask[b]):
            t = slot_token[b, j]
            gate = 1.0 / (1.0 + np.exp(-r[b, t]))
            out[b, t] = x[b, t] + gate * (y[b, j] - x[b, t])
            selection[b, t] = 1.0
    return out, selection, memory, norm
