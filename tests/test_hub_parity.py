"""keras-hub parity of InfiniCausalLM (issue 35): every keras-hub sampler, presets of the
tokenizer, one LoRA mechanism, refusals by name, keras-hub argument names on the layers,
document windows."""

import keras
import numpy as np
import pytest
from keras import ops

keras_hub = pytest.importorskip("keras_hub")
from keras_infini.models import InfiniBackbone  # noqa: E402
from keras_infini.models import InfiniByteTokenizer  # noqa: E402
from keras_infini.models import InfiniCausalLM  # noqa: E402
from keras_infini.models import InfiniCausalLMPreprocessor  # noqa: E402

S = 4
LENGTHS = np.array([1, S - 1, S + 2])  # a batch of prompts of different lengths
MAX_LENGTH = S + 2 + 5
# torch: the decode step runs eagerly here. The compiled step (an Inductor compile per
# batch shape: ~30 s each on a 2-core CPU, and beam/contrastive expand the batch) is
# tested in tests/test_models.py; JAX and TensorFlow compile `generate` as users get it.
GENERATE = {"jit_compile": False} if keras.backend.backend() == "torch" else {}


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def backbone(**overrides):
    config = dict(vocabulary_size=259, num_layers=2, hidden_dim=16, intermediate_dim=32,
                  num_heads=2, segment_len=S, mod_every=2, update="delta")
    config.update(overrides)
    return InfiniBackbone(**config)


@pytest.fixture(scope="module")
def lm():
    keras.utils.set_random_seed(0)
    model = InfiniCausalLM(backbone())
    for block in model.backbone.transformer_layers:  # memory and local attention matter
        block.attention.gate.assign(np.array([1.0, -0.5], "float32"))
    return model


def prompts():
    rng = np.random.default_rng(0)
    mask = np.arange(MAX_LENGTH)[None] < LENGTHS[:, None]
    ids = np.where(mask, rng.integers(0, 256, size=mask.shape), 0).astype("int32")
    return ids, mask


def uncached_sample(lm, sampler, ids, mask, stop_token_ids=None):
    """The sampler on the full (uncached) model: every step runs the whole sequence."""

    def full(prompt):
        hidden = lm.backbone({"token_ids": prompt, "padding_mask": ops.ones_like(prompt)})
        return lm.backbone.token_embedding(hidden, reverse=True), hidden

    def next(prompt, cache, index):
        logits, hidden = full(prompt)
        return ops.take(logits, index - 1, axis=1), ops.take(hidden, index - 1, axis=1), cache

    index = max(int(LENGTHS.min()), 1)
    out = sampler(next=next, prompt=ops.convert_to_tensor(ids), cache=None, index=index,
                  mask=ops.convert_to_tensor(mask), stop_token_ids=stop_token_ids,
                  hidden_states=full(ops.convert_to_tensor(ids))[1], model=lm)
    if isinstance(out, tuple):  # return_all_beams=True: (beams, scores)
        return tuple(numpy(x) for x in out)
    return numpy(out)


def cached_generate(lm, sampler, ids, mask, stop_token_ids=None):
    lm.compile(sampler=sampler, **GENERATE)
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=stop_token_ids)
    return numpy(out["token_ids"]), numpy(out["padding_mask"])


@pytest.mark.parametrize("name", ["greedy_with_stop", "beam", "beam_of_one", "contrastive"])
def test_deterministic_samplers_equal_the_uncached_model(lm, name):
    ids, mask = prompts()
    samplers = keras_hub.samplers
    stop = None
    if name == "greedy_with_stop":
        # A stop token that one row generates early: that row ends there, the others go on.
        free, _ = cached_generate(lm, "greedy", ids, mask)
        stop = (int(free[0, 2]),)
        make = samplers.GreedySampler
    elif name == "beam":
        make = lambda: samplers.BeamSampler(num_beams=2)  # noqa: E731
    elif name == "beam_of_one":
        make = lambda: samplers.BeamSampler(num_beams=1)  # noqa: E731
    else:
        make = lambda: samplers.ContrastiveSampler(k=3, alpha=0.4)  # noqa: E731
    got, got_mask = cached_generate(lm, make(), ids, mask, stop)
    reference_sampler = samplers.GreedySampler() if name == "beam_of_one" else make()
    expected = uncached_sample(lm, reference_sampler, ids, mask, stop)
    np.testing.assert_array_equal(got[mask], ids[mask])  # prompts kept
    if stop is None:
        np.testing.assert_array_equal(got, expected)
        assert got_mask.all()
    else:
        ends = [np.flatnonzero((got[r] == stop[0]) & ~mask[r]) for r in range(len(got))]
        assert len(ends[0])  # row 0 stops
        for r, end in enumerate(ends):
            keep = np.arange(MAX_LENGTH) <= (end[0] if len(end) else MAX_LENGTH)
            np.testing.assert_array_equal(got_mask[r], keep, err_msg=f"row {r}")
            np.testing.assert_array_equal(got[r][keep], expected[r][keep], err_msg=f"row {r}")


class LogitsSampler(keras_hub.samplers.Sampler):
    """Runs `next` at every position from `index` on (the prompt is kept: every position
    is a given token) and returns the logits of every position, `(batch, length, vocab)`,
    in place of tokens."""

    def __call__(self, next, prompt, cache=None, index=0, mask=None, **kwargs):
        length = ops.shape(prompt)[1]
        logits = ops.zeros((ops.shape(prompt)[0], length, 259), "float32")

        def body(cache, index, logits):
            step, _, cache = next(prompt, cache, index)
            logits = ops.slice_update(logits, [0, index - 1, 0],
                                      ops.cast(step, "float32")[:, None, :])
            return cache, index + 1, logits

        _, _, logits = self.run_loop(
            cond=lambda *_: True, body=body, loop_vars=(cache, ops.cast(index, "int32"), logits),
            maximum_iterations=length - index + 1, model=kwargs.get("model"))
        return logits


def test_every_step_returns_the_full_models_logits_inside_prefilled_prompts(lm):
    """keras-hub samplers read the logits of every step, at a row's prompt positions
    too (beam adds the best log-probabilities to its scores there, contrastive stores the
    hidden states): a row whose prompt is already prefilled past a position must get
    that position's logits as the full model gives them (without it: beam scores drift
    and beams change)."""
    ids, mask = prompts()
    lm.compile(sampler=LogitsSampler(), **GENERATE)
    lm.make_generate_function()  # compiled as generate compiles it
    got = numpy(lm.generate_function({"token_ids": ops.convert_to_tensor(ids),
                                      "padding_mask": ops.convert_to_tensor(mask)},
                                     None)["token_ids"])
    full = numpy(lm({"token_ids": ids, "padding_mask": np.ones_like(mask)}))
    assert got.shape == full.shape  # positions 0 .. MAX_LENGTH - 1
    np.testing.assert_allclose(got, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["top_k", "top_p", "random"])
def test_random_samplers_run_on_mixed_prompt_lengths(lm, name):
    ids, mask = prompts()
    samplers = keras_hub.samplers
    if name == "top_k":  # k=1 is greedy: compared with the uncached model
        sampler, reference = samplers.TopKSampler(k=1, seed=3), samplers.GreedySampler()
    elif name == "top_p":  # p -> 0 keeps the most likely token only: greedy too
        sampler, reference = samplers.TopPSampler(p=1e-9, seed=3), samplers.GreedySampler()
    else:
        sampler, reference = samplers.RandomSampler(seed=3), None
    got, got_mask = cached_generate(lm, sampler, ids, mask)
    np.testing.assert_array_equal(got[mask], ids[mask])
    assert got_mask.all() and got.min() >= 0 and got.max() < 259
    if reference is not None:
        np.testing.assert_array_equal(got, uncached_sample(lm, reference, ids, mask))


def test_document_windows_keep_every_byte_in_order():
    from keras_infini.models import document_windows

    window = 16
    text = "".join(chr(97 + i % 26) for i in range(5 * window))  # 5x the window
    preprocessor = InfiniCausalLMPreprocessor(InfiniByteTokenizer(), sequence_length=window)
    x, y, weight = preprocessor.windows(text)
    ids, mask = x["token_ids"], x["padding_mask"]
    assert ids.shape == (6, window)  # start + 80 bytes = 81 inputs -> 6 windows
    stream = np.array([257] + list(text.encode()) + [258])
    np.testing.assert_array_equal(ids[mask], stream[:-1])  # each token once, in order
    np.testing.assert_array_equal(y[mask], stream[1:])  # labels: the next token
    np.testing.assert_array_equal(weight > 0, mask)
    assert mask.sum() == len(text) + 1 and not mask[-1, 1:].any()
    x2, _, _ = document_windows([text, "ab"], window)
    assert x2["token_ids"].shape == (7, window)  # documents never share a window
    with pytest.raises(ValueError, match="sequence_length=0"):
        document_windows(text, 0)


def test_tokenizer_loads_from_a_saved_preset(tmp_path):
    model = InfiniCausalLM(
        backbone(num_layers=1, mod_every=0),
        InfiniCausalLMPreprocessor(InfiniByteTokenizer(), sequence_length=8),
    )
    model.save_to_preset(str(tmp_path))
    for cls in (InfiniByteTokenizer, keras_hub.tokenizers.Tokenizer):
        tokenizer = cls.from_preset(str(tmp_path))
        assert isinstance(tokenizer, InfiniByteTokenizer)
        np.testing.assert_array_equal(numpy(tokenizer("hi")), [104, 105])


def test_keras_infini_lora_and_backbone_lora_are_one_mechanism(tmp_path):
    import keras_infini

    ids = np.random.default_rng(3).integers(0, 256, size=(2, 6)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    path = str(tmp_path / "adapters.lora.h5")
    first = InfiniCausalLM(backbone(num_layers=2, mod_every=2))
    second = InfiniCausalLM(backbone(num_layers=2, mod_every=2))
    second.set_weights(first.get_weights())  # the same base model
    layers = keras_infini.enable_lora(first, rank=2)
    for layer in layers:  # non-zero adapters
        layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.05, "float32"))
    first.backbone.save_lora_weights(path)  # keras-hub's saver sees keras_infini's LoRA
    second.backbone.enable_lora(rank=2)  # keras-hub's entry point: the same layers
    assert [lyr.path for lyr in keras_infini.lora.projections(second)] == \
        [lyr.path for lyr in layers]
    second.backbone.load_lora_weights(path)
    np.testing.assert_allclose(numpy(second(x)), numpy(first(x)), atol=1e-5)


def test_lora_finds_projections_by_role_not_by_name():
    import keras_infini

    layer = keras_infini.InfiniTransformer(8, 16, 4, 4, 2, "gelu", 4, causal=True)
    layer.build((None, None, 8))
    up, down = layer.mlp_in, layer.mlp_out
    del layer.mlp_in, layer.mlp_out  # an MLP under other names (e.g. a converted model)
    layer.up_proj, layer.down_proj = up, down
    found = keras_infini.enable_lora(layer, rank=2)
    assert {id(up), id(down)} <= {id(f) for f in found}
    assert len(found) == 6  # query, key, value, output and the two MLP projections


def test_refusals_by_name():
    with pytest.raises(ValueError, match="nonsense_option=1"):
        backbone(nonsense_option=1)
    with pytest.raises(ValueError, match="nonsense_option=1"):
        InfiniCausalLM(backbone(num_layers=1, mod_every=0), nonsense_option=1)
    small = backbone(num_layers=1, mod_every=0, vocabulary_size=256)
    with pytest.raises(ValueError, match="vocabulary_size=259.*vocabulary_size=256"):
        InfiniCausalLM(small, InfiniCausalLMPreprocessor(InfiniByteTokenizer(),
                                                         sequence_length=8))
    model = InfiniCausalLM(small)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    ids = np.full((2, 6), 258, "int32")  # the byte tokenizer's end id, beyond 256 ids
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    with pytest.raises(ValueError, match=r"x\['token_ids'\].*id 258.*vocabulary_size=256"):
        model.fit(x, np.zeros_like(ids), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"Invalid y.*id -1"):
        model.fit({"token_ids": ids * 0, "padding_mask": ids > 0}, ids * 0 - 1, verbose=0)


def test_keras_hub_argument_names_on_the_layers():
    import keras_infini

    keras.utils.set_random_seed(0)
    positional = keras_infini.InfiniTransformer(8, 16, 4, 2, 2, "gelu", 4, causal=True)
    named = keras_infini.InfiniTransformer(hidden_dim=8, intermediate_dim=16, key_dim=4,
                                           value_dim=2, num_heads=2, activation="gelu",
                                           segment_len=4, causal=True)
    assert named.get_config() == dict(positional.get_config(), name=named.name)
    memory = keras_infini.CompressiveMemory(hidden_dim=8, key_dim=4, value_dim=2,
                                            num_heads=2, segment_len=4)
    assert (memory.dim_input, memory.dim_key, memory.dim_value) == (8, 4, 2)
    mod = keras_infini.MoDInfiniTransformer(hidden_dim=8, intermediate_dim=16, key_dim=4,
                                            value_dim=2, num_heads=2, activation="gelu",
                                            segment_len=4, sampling_factor=2)
    assert "dim_hidden" in mod.get_config() and "intermediate_dim" not in mod.get_config()
    x = np.random.default_rng(0).normal(size=(1, 5, 8)).astype("float32")
    named.set_weights(positional.get_weights()) if named.build((None, None, 8)) is None \
        and positional.build((None, None, 8)) is None else None
    np.testing.assert_allclose(numpy(named(x)), numpy(positional(x)), atol=1e-6)
    with pytest.raises(ValueError, match="hidden_dim=8 together with dim_input=8"):
        keras_infini.CompressiveMemory(8, 4, 2, 2, 4, hidden_dim=8)
    with pytest.raises(ValueError, match="key_dim=4 together with dim_key=4"):
        keras_infini.InfiniTransformer(8, 16, dim_key=4, key_dim=4, dim_value=2,
                                       num_heads=2, activation="gelu", segment_len=4)


def test_prefill_through_the_decode_loop_gives_the_same_tokens(lm):
    ids, mask = prompts()
    lm.compile(sampler="greedy", prefill="steps", **GENERATE)
    try:
        out = numpy(lm.generate({"token_ids": ids, "padding_mask": mask},
                                stop_token_ids=None)["token_ids"])
    finally:
        lm.compile(sampler="greedy", **GENERATE)
    reference = uncached_sample(lm, keras_hub.samplers.GreedySampler(), ids, mask)
    np.testing.assert_array_equal(out, reference)
    with pytest.raises(ValueError, match="prefill='all'"):
        lm.compile(prefill="all")


def _cache_leaves(cache, prefix=""):
    """`{path: array}` of a model cache (a list of the blocks' nested dicts)."""
    out = {}
    items = enumerate(cache) if isinstance(cache, list) else cache.items()
    for key, value in items:
        if isinstance(value, (list, dict)):
            out.update(_cache_leaves(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = numpy(value)
    return out


@pytest.mark.parametrize("config", [
    dict(update="linear"),
    dict(update="delta"),
    dict(update="delta", memory_feature_map="l2", write_strength=True,
         memory_decay="coupled", mod_every=0),
    dict(update="delta", memory_feature_map="l2"),
    dict(update="delta", memory_feature_map="dpfp", write_strength=True,
         memory_decay=True),
])
def test_chunked_prefill_equals_the_segment_parallel_prefill(config):
    """`generate`'s prefill runs one segment at a time (`_chunked_prefill`, a loop whose
    step holds one segment's program); its hidden states and cache equal the
    segment-parallel prefill of `call_with_cache` (the whole-sequence path): prompts
    ending inside a segment, on a boundary (the segment folded), after one token (nothing
    consumed) and several segments long."""
    keras.utils.set_random_seed(1)
    model = InfiniCausalLM(backbone(**config))
    rng = np.random.default_rng(2)
    for block in model.backbone.transformer_layers:  # an open memory
        block.attention.gate.assign(rng.uniform(0.5, 1.5, 2).astype("float32"))
    lengths = np.array([3 * S + 2, 2 * S + 1, 1, S + 1])  # consumes length - 1
    total = 3 * S + 3
    mask = np.arange(total)[None] < lengths[:, None]
    ids = np.where(mask, rng.integers(0, 256, size=mask.shape), 0).astype("int32")
    prefill_mask = np.arange(total)[None] < (lengths - 1)[:, None]
    hidden, cache = model._build_cache(ops.convert_to_tensor(ids), ops.convert_to_tensor(mask))
    want_hidden, want_cache = model._blocks_with_cache(
        ops.convert_to_tensor(ids), model.build_cache(4), 0, ops.convert_to_tensor(prefill_mask)
    )
    np.testing.assert_allclose(numpy(hidden)[prefill_mask], numpy(want_hidden)[prefill_mask],
                               rtol=1e-5, atol=1e-5)
    got, want = _cache_leaves(cache), _cache_leaves(want_cache)
    assert sorted(got) == sorted(want)
    for name in want:
        g, w = got[name], want[name]
        if name.endswith(("/key", "/value")):  # only the current segment's valid slots
            valid = got[name[:name.rindex("/")] + "/valid"]
            np.testing.assert_array_equal(valid, want[name[:name.rindex("/")] + "/valid"])
            g, w = g[valid], w[valid]
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    assert got["0/memory"].any() and got["0/key"].any()  # the test compares something
