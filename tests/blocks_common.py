"""Helpers shared by the block tests: weights -> NumPy reference closures."""

import numpy as np
from conftest import to_numpy

import reference as ref

B, D, HID, H, DK, DV, S = 2, 8, 12, 2, 4, 3, 4
NP_ACTIVATIONS = {"gelu": ref.gelu, "relu": ref.relu, "abs": np.abs}


def randomize(block, seed=0):
    """Non-trivial gate, norms and learnable state so every term is exercised."""
    rng = np.random.default_rng(seed)
    att = block.attention
    att.gate.assign(rng.normal(size=att.gate.shape).astype("float32"))
    for ln in (block.attention_norm, block.mlp_norm):
        ln.gamma.assign(rng.uniform(0.5, 1.5, size=ln.gamma.shape).astype("float32"))
        ln.beta.assign(0.1 * rng.normal(size=ln.beta.shape).astype("float32"))
    for dense in (block.mlp_in, block.mlp_out):
        dense.bias.assign(0.1 * rng.normal(size=dense.bias.shape).astype("float32"))
    if att.init_state_learnable:
        att.initial_memory.assign(0.3 * rng.normal(size=att.initial_memory.shape).astype("float32"))
        att.initial_norm.assign(rng.uniform(0.5, 2, size=att.initial_norm.shape).astype("float32"))
    router = getattr(block, "router", None)
    if router is not None:
        router.kernel.assign(rng.normal(size=router.kernel.shape).astype("float32"))
        router.bias.assign(np.array([0.2], "float32"))


def block_reference(block, activation, rotate_fn=None, memory0=None, norm0=None):
    """A closure `(x, mask, positions) -> (y, memory, norm)` with the block's weights."""
    att = block.attention
    w = dict(wq=to_numpy(att.query_dense.kernel), wk=to_numpy(att.key_dense.kernel),
             wv=to_numpy(att.value_dense.kernel), wo=to_numpy(att.output_dense.kernel),
             gate=to_numpy(att.gate))
    w_in, b_in = to_numpy(block.mlp_in.kernel), to_numpy(block.mlp_in.bias)
    w_out, b_out = to_numpy(block.mlp_out.kernel), to_numpy(block.mlp_out.bias)
    act = NP_ACTIVATIONS[activation]
    ln1 = (to_numpy(block.attention_norm.gamma), to_numpy(block.attention_norm.beta))
    ln2 = (to_numpy(block.mlp_norm.gamma), to_numpy(block.mlp_norm.beta))

    def run(x, mask=None, positions=None):
        bsz = x.shape[0]
        if mask is not None:  # masked tokens enter as zeros (their outputs: a zero input's)
            x = np.where(np.asarray(mask, bool)[..., None], x, 0.0)
        m0, z0 = memory0, norm0
        if m0 is None and att.init_state_learnable:
            m0 = np.broadcast_to(to_numpy(att.initial_memory), (bsz,) + tuple(att.initial_memory.shape))
            z0 = np.broadcast_to(to_numpy(att.initial_norm), (bsz,) + tuple(att.initial_norm.shape))

        def attention(t):
            return ref.compressive_memory(
                t, **w, segment_len=att.segment_len, update=att.update, causal=att.causal,
                mask=mask, positions=positions, rotate_fn=rotate_fn, memory0=m0, norm0=z0)

        def mlp(t):
            return act(t @ w_in + b_in) @ w_out + b_out

        return ref.infini_transformer(x, attention, mlp, ln1=ln1, ln2=ln2,
                                      eps=block.layer_norm_epsilon,
                                      normalize_first=block.normalize_first)

    return run


def rope_rotate_fn(dim=DK, pct=0.5, base=10000):
    theta = ref.rope_frequencies(dim, pct, base)
    return lambda t, p: ref.rotate(t, p, theta)
