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
    return numpy(out)


def cached_generate(lm, sampler, ids, mask, stop_token_ids=None):
    lm.compile(sampler=sampler)
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
