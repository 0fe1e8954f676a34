"""Decode cache of CompressiveMemory, InfiniTransformer and MoDInfiniTransformer.

The exactness criterion (issue 14): a prompt prefilled with the cache and then decoded one
token at a time gives the outputs of one normal call on the whole sequence (float32, 1e-4),
for prompts of 1, S-1, S, S+1 and 3S+5 tokens and 2S generated tokens, linear and delta,
without embedder / RoPE / YaRN, plain and MoD blocks, batch 1 and 4; rows of different
prompt lengths (a padding mask) keep exactly their own tokens.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_infini import CompressiveMemory
from keras_infini import InfiniTransformer
from keras_infini import MoDInfiniTransformer
from keras_infini import YaRNEmbeddings
from keras_infini.ops import backend as fast_paths

S = 4  # segment length
DIM, HEADS, DK = 16, 2, 8
PROMPTS = (1, S - 1, S, S + 1, 3 * S + 5)
NEW = 2 * S
ATOL = 1e-4


def embedder(name):
    if name == "yarn":
        return YaRNEmbeddings(dim=DK, seq_len=S, context_len=S, context_len_ext=4 * S)
    return name


def make(kind, update, emb=None, **options):
    common = dict(update=update, causal=True, positional_embedder=embedder(emb), **options)
    if kind == "cm":
        layer = CompressiveMemory(DIM, DK, DK, HEADS, S, **common)
    elif kind == "block":
        layer = InfiniTransformer(DIM, 2 * DIM, DK, DK, HEADS, "gelu", S, **common)
    else:
        layer = MoDInfiniTransformer(DIM, 2 * DIM, DK, DK, HEADS, "gelu", S,
                                     sampling_factor=2, **common)
    layer.build((None, None, DIM))
    if kind == "mod":  # most tokens want a slot: capacity binds in some segments
        layer.router.bias.assign(np.array([0.4], "float32"))
    # Gates away from 0.5 so that memory and local attention both matter, per head.
    attention = layer if kind == "cm" else layer.attention
    attention.gate.assign(np.array([1.0, -0.5], "float32"))
    if options.get("init_state_learnable"):
        rng = np.random.default_rng(1)
        attention.initial_memory.assign(rng.normal(size=attention.initial_memory.shape))
        attention.initial_norm.assign(rng.uniform(0.5, 1.5, attention.initial_norm.shape))
    return layer


def compiled(layer):
    """`(full, prefill, step)` compiled once each (jax.jit / tf.function; on torch a
    `make_fx` trace without Inductor, which proves the control flow static as jit does):
    the full call; a prefill at index 0 of a fixed-length input whose mask says how many
    tokens each row takes (so one program serves every prompt length); a one-token step
    at a tensor index (one program for every position)."""

    def full(x):
        return layer(x)

    def prefill(x, cache, mask):
        return layer(x, cache=cache, cache_update_index=0, mask=mask)

    def step(x, cache, index, mask):
        return layer(x, cache=cache, cache_update_index=index, mask=mask)

    return [fast_paths.compile_static_inference(f, layer.variables, optimize=False)
            for f in (full, prefill, step)]


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def decode(layer, x, prompt_len, prefill, step, end):
    """Prefill `prompt_len` tokens of `x` (through the padding mask of a full-length
    prefill), then decode one token at a time up to `end`."""
    batch = x.shape[0]
    mask = np.broadcast_to(np.arange(x.shape[1]) < prompt_len, x.shape[:2])
    y, cache = prefill(x, layer.build_cache(batch), mask)
    outputs = [numpy(y)[:, :prompt_len]]
    for t in range(prompt_len, end):
        y, cache = step(x[:, t:t + 1], cache, ops.convert_to_tensor(t, "int32"),
                        np.ones((batch, 1), bool))
        outputs.append(numpy(y))
    return np.concatenate(outputs, axis=1), cache


CASES = [
    # kind, update, embedder, batch, options
    ("cm", "linear", None, 4, {}),
    ("cm", "delta", "rope", 1, {"init_state_learnable": True}),
    ("block", "linear", "yarn", 4, {"write_strength": True, "gate_lr_scale": 10.0}),
    ("block", "delta", "rope", 1, {"memory_feature_map": "l2", "write_strength": True,
                                   "normalize_first": False}),
    ("mod", "linear", "rope", 1, {}),
    ("mod", "delta", "yarn", 4, {"memory_feature_map": "elu1_l2"}),
    ("block", "delta", "rope", 4, {"memory_feature_map": "l2", "write_strength": "hard_sigmoid",
                                   "memory_decay": True}),
    ("mod", "delta", "rope", 1, {"memory_feature_map": "elu1_l2", "memory_decay": True}),
    ("block", "delta", "rope", 1, {"memory_feature_map": "l2", "write_strength": "hard_sigmoid",
                                   "memory_decay": "coupled"}),
    # Maps wider than dim_key: the cache's memory and normaliser take their width.
    ("cm", "delta", "rope", 4, {"memory_feature_map": "taylor", "write_strength": True}),
    ("mod", "delta", "rope", 1, {"memory_feature_map": "dpfp2", "init_state_learnable": True,
                                 "write_strength": "hard_sigmoid", "memory_decay": "coupled"}),
    # Grouped-query heads (2 query heads on 1 key/value head): the cache keeps the
    # key/value heads, the memory per key/value head or per query head; the tanh gate.
    ("block", "delta", "rope", 4, {"num_key_value_heads": 1, "memory_feature_map": "l2",
                                   "write_strength": "hard_sigmoid", "memory_decay": "coupled",
                                   "memory_gate": "tanh", "gate_init": 0.4}),
    ("cm", "delta", "rope", 1, {"num_key_value_heads": 1, "memory_heads": "query",
                                "write_strength": True, "qkv_bias": True,
                                "init_state_learnable": True}),
    ("mod", "linear", None, 4, {"num_key_value_heads": 1, "memory_gate": "tanh",
                                "gate_init": [0.5, -0.2]}),
]


@pytest.mark.parametrize("kind,update,emb,batch,options", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-b{c[3]}" for c in CASES])
def test_cached_decoding_equals_one_full_call(kind, update, emb, batch, options):
    layer = make(kind, update, emb, **options)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, max(PROMPTS) + NEW, DIM)).astype("float32")
    if kind == "mod":
        # The routing must be exercised every way: tokens routed, not routed (logit <= 0)
        # and refused for lack of capacity (more positive logits than slots in a segment).
        wants = numpy(layer.router(x))[..., 0] > 0
        per_segment = wants[:, :(x.shape[1] // S) * S].reshape(batch, -1, S).sum(-1)
        assert wants.any() and not wants.all() and (per_segment > layer.capacity).any()
    full, prefill, step = compiled(layer)
    full = numpy(full(x))
    for prompt_len in PROMPTS:
        end = prompt_len + NEW
        got, cache = decode(layer, x, prompt_len, prefill, step, end)
        np.testing.assert_allclose(got, full[:, :end], atol=ATOL,
                                   err_msg=f"prompt of {prompt_len} tokens")
        lengths = numpy(cache["length"] if kind != "mod" else cache["attention"]["length"])
        assert lengths.tolist() == [end] * batch


@pytest.mark.parametrize("kind,update", [("block", "delta"), ("mod", "linear")])
def test_rows_of_different_prompt_lengths_keep_their_own_tokens(kind, update):
    # keras-hub's generation pattern: right-padded prompts, prefilled with their padding
    # mask; then one position at a time for the whole batch, each row taking a token only
    # once its own prompt is in the cache. The padding holds NaN: no row may see it.
    layer = make(kind, update, "rope")
    lengths = np.array([1, S - 1, S + 1, 3 * S + 5])
    total = max(lengths) + NEW
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, total, DIM)).astype("float32")
    full, prefill, step = compiled(layer)
    full = numpy(full(x))  # rows are independent: each row's own full call
    prompt_mask = np.arange(total)[None] < lengths[:, None]
    padded = np.where(prompt_mask[..., None], x, np.nan).astype("float32")
    y, cache = prefill(padded, layer.build_cache(4), prompt_mask)
    y = numpy(y)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(y[row, :n], full[row, :n], atol=ATOL)
    # Positions from the shortest prompt on: row r feeds its own token at position t and
    # takes it iff its cache holds exactly t tokens (its prompt is in).
    for t in range(int(lengths.min()), total):
        takes = (t >= lengths)[:, None]
        token = np.where(prompt_mask[:, t:t + 1, None] | takes[..., None], x[:, t:t + 1],
                         np.nan).astype("float32")
        y, cache = step(token, cache, ops.convert_to_tensor(t, "int32"), takes)
        y = numpy(y)
        for row in np.flatnonzero(takes[:, 0]):
            np.testing.assert_allclose(y[row, 0], full[row, t], atol=ATOL,
                                       err_msg=f"row {row}, position {t}")
    lengths_now = cache["length"] if kind != "mod" else cache["attention"]["length"]
    assert numpy(lengths_now).tolist() == [total] * 4


def test_chunks_of_any_length_continue_the_cache():
    # Several tokens at an index inside a segment: the tokens up to the boundary one at a
    # time, the rest segment-parallel; any chunking gives the full call's outputs.
    layer = make("cm", "delta", "rope", write_strength=True)
    x = np.random.default_rng(3).normal(size=(2, 9, DIM)).astype("float32")
    full = numpy(layer(x))
    cache = layer.build_cache(2)
    outputs, start = [], 0
    for size in (3, 6):  # the second chunk: 1 token to the boundary, then 5 (one segment+1)
        y, cache = layer(x[:, start:start + size], cache=cache, cache_update_index=start)
        outputs.append(numpy(y))
        start += size
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), full, atol=ATOL)


@pytest.mark.parametrize("kind", ["cm", "mod"])
def test_positions_built_by_the_layer_use_one_digit_level(kind, rope_digit_levels):
    """In-segment positions the layer builds itself (full call, prefill, decode step) lie in
    `[0, segment_len)`: with segment_len <= 256, RoPE looks up one base-256 digit level
    (`max_position`), a smaller decode program; positions passed by the user keep all 4.
    The MoD block's inner attention gets its routed tokens' in-segment positions."""
    levels = rope_digit_levels
    layer = make(kind, "delta", "rope")
    x = np.random.default_rng(4).normal(size=(2, 2 * S + 2, DIM)).astype("float32")
    full = numpy(layer(x))
    cache = layer.build_cache(2)
    y1, cache = layer(x[:, :S + 1], cache=cache, cache_update_index=0)  # prefill
    y2, cache = layer(x[:, S + 1:S + 2], cache=cache, cache_update_index=S + 1)  # a step
    np.testing.assert_allclose(numpy(y1), full[:, :S + 1], atol=ATOL)
    np.testing.assert_allclose(numpy(y2), full[:, S + 1:S + 2], atol=ATOL)
    assert levels and set(levels) == {1}, levels
    if kind == "cm":  # the MoD block takes no positions: it builds them all
        levels.clear()
        positions = np.tile(np.arange(2 * S + 2) % S, (2, 1)).astype("int32")
        layer(x, positions=positions)
        assert levels and set(levels) == {4}, levels


def test_cache_has_fixed_shapes_and_float32_state_under_mixed_precision():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = CompressiveMemory(DIM, DK, DK, HEADS, S, causal=True, update="delta",
                                  positional_embedder="rope")
        layer.build((None, None, DIM))
        cache = layer.build_cache(3)
        x = np.random.default_rng(4).normal(size=(3, 5, DIM)).astype("float32")
        y, cache = layer(x[:, :4], cache=cache, cache_update_index=0)
        y, new = layer(x[:, 4:], cache=cache, cache_update_index=4)
    finally:
        keras.config.set_dtype_policy(policy)
    expected = layer.cache_shapes(3)
    for name, tensor in new.items():
        assert tuple(tensor.shape) == expected[name], name
    for name in ("memory", "norm", "memory_update", "norm_update"):
        assert keras.backend.standardize_dtype(new[name].dtype) == "float32", name
    assert keras.backend.standardize_dtype(new["key"].dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"


# ----------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def block():
    return make("block", "linear", "rope")


def test_non_causal_layers_refuse_a_cache():
    for layer in (CompressiveMemory(DIM, DK, DK, HEADS, S),
                  InfiniTransformer(DIM, 2 * DIM, DK, DK, HEADS, "gelu", S),
                  MoDInfiniTransformer(DIM, 2 * DIM, DK, DK, HEADS, "gelu", S, 2)):
        with pytest.raises(ValueError, match="causal=False"):
            layer.build_cache(2)
    causal = make("cm", "linear")
    cache = causal.build_cache(1)
    layer = CompressiveMemory(DIM, DK, DK, HEADS, S)
    with pytest.raises(ValueError, match="causal=False"):
        layer(np.zeros((1, 1, DIM), "float32"), cache=cache, cache_update_index=0)


def test_a_cache_of_another_batch_size_or_layer_is_refused(block):
    x = np.zeros((2, 1, DIM), "float32")
    with pytest.raises(ValueError, match=r"Invalid cache .*batch_size=2"):
        block(x, cache=block.build_cache(3), cache_update_index=0)
    other = InfiniTransformer(DIM, 2 * DIM, 4, 4, HEADS, "gelu", S, causal=True)
    other.build((None, None, DIM))
    with pytest.raises(ValueError, match=r"Invalid cache .*memory has shape"):
        block(x, cache=other.build_cache(2), cache_update_index=0)
    mod = make("mod", "linear")
    with pytest.raises(ValueError, match=r"Invalid cache .*entries"):
        block(x, cache=mod.build_cache(2), cache_update_index=0)
    with pytest.raises(ValueError, match=r"Invalid cache .*entries"):
        mod(x, cache=block.build_cache(2), cache_update_index=0)
    with pytest.raises(ValueError, match="batch_size"):
        block.build_cache(0)


@pytest.mark.parametrize("index", [None, -1, True, 1.0, "0"])
def test_invalid_cache_update_index(block, index):
    with pytest.raises(ValueError, match="cache_update_index"):
        block(np.zeros((1, 1, DIM), "float32"), cache=block.build_cache(1),
              cache_update_index=index)


def test_cache_update_index_outside_the_cache(block):
    cache = block.build_cache(2)
    x = np.zeros((2, 3, DIM), "float32")
    _, cache = block(x, cache=cache, cache_update_index=0)
    for index in (2, 4, ops.convert_to_tensor(5, "int32")):
        with pytest.raises(ValueError, match=r"cache_update_index=\d+: outside the cache"):
            block(x[:, :1], cache=cache, cache_update_index=index)
    with pytest.raises(ValueError, match="one new token only"):
        block(x, cache=cache, cache_update_index=ops.convert_to_tensor(3, "int32"))
    block(x[:, :1], cache=cache, cache_update_index=3)  # the right one works


@pytest.mark.parametrize("name,value", [("positions", np.zeros((1, 1), "int32")),
                                        ("return_state", True)])
def test_cached_calls_refuse_arguments_they_cannot_honour(block, name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        block(np.zeros((1, 1, DIM), "float32"), cache=block.build_cache(1),
              cache_update_index=0, **{name: value})


@pytest.mark.parametrize("optimize", [False, True] if keras.backend.backend() == "torch"
                         else [False])
def test_compiled_step_reads_the_current_weights(optimize):
    # A compiled decode step takes the variables' values at every call (weights trained
    # or assigned after compiling are used) and equals the eager step. torch with
    # `optimize=True` runs the traced graph through torch.compile (Inductor).
    layer = make("block", "linear", "rope")
    x = np.random.default_rng(3).normal(size=(1, S + 2, DIM)).astype("float32")
    _, cache = layer(x[:, :S + 1], cache=layer.build_cache(1), cache_update_index=0)
    step = fast_paths.compile_static_inference(
        lambda t, c, i: layer(t, cache=c, cache_update_index=i), layer.variables,
        optimize=optimize,
    )
    index = ops.convert_to_tensor(S + 1, "int32")
    outputs = []
    for gate in ([1.0, -0.5], [-2.0, 2.0]):
        layer.attention.gate.assign(np.array(gate, "float32"))
        got, _ = step(x[:, S + 1:], cache, index)
        want, _ = layer(x[:, S + 1:], cache=cache, cache_update_index=S + 1)
        np.testing.assert_allclose(numpy(got), numpy(want), atol=ATOL)
        outputs.append(numpy(got))
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3
