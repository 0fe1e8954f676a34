"""keras_infini.streaming: chunked runs equal one call; constant state size."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_infini import CompressiveMemory, InfiniTransformer, MoDInfiniTransformer
from keras_infini.streaming import Streamer, stream

D, SEG = 8, 4


def token_model(functional):
    layers = [
        keras.layers.Embedding(20, D),
        InfiniTransformer(D, 16, 4, 4, 2, "swiglu", SEG, update="delta", causal=True,
                          positional_embedder="rope", init_state_learnable=True),
        MoDInfiniTransformer(D, 16, 4, 4, 2, "gelu", 2 * SEG, 2, causal=True,
                             positional_embedder="rope"),
        CompressiveMemory(D, 4, 4, 2, SEG, causal=True),
        keras.layers.Dense(20),
    ]
    if not functional:
        return keras.Sequential([keras.Input((None,), dtype="int32")] + layers)
    inp = keras.Input((None,), dtype="int32")
    h = inp
    for layer in layers:
        h = layer(h)
    return keras.Model(inp, h)


@pytest.mark.parametrize("functional", [False, True])
def test_stream_equals_one_call(functional):
    model = token_model(functional)
    tokens = np.random.default_rng(0).integers(0, 20, size=(3, 37))
    full = to_numpy(model(tokens))
    streamer = Streamer(model)
    assert streamer.segment_len == 8
    parts = [to_numpy(streamer(tokens[:, i:i + 16])) for i in range(0, 37, 16)]
    np.testing.assert_allclose(np.concatenate(parts, 1), full, atol=2e-5)
    shapes = [tuple(m.shape) for m, _ in streamer.states]
    assert shapes == [(3, 2, 4, 4)] * 3
    gen = [to_numpy(p) for p in stream(model, (tokens[:, i:i + 8] for i in range(0, 37, 8)))]
    np.testing.assert_allclose(np.concatenate(gen, 1), full, atol=2e-5)


def test_reset_and_pure_run():
    model = token_model(False)
    streamer = Streamer(model)
    tokens = np.random.default_rng(1).integers(0, 20, size=(2, 16))
    first = to_numpy(streamer(tokens[:, :8]))
    streamer.reset()
    np.testing.assert_allclose(to_numpy(streamer(tokens[:, :8])), first, atol=1e-6)
    out, states = streamer.run(tokens[:, 8:], streamer.states)
    again, _ = streamer.run(tokens[:, 8:], streamer.states)  # run() does not commit
    np.testing.assert_allclose(to_numpy(out), to_numpy(again), atol=1e-6)


def test_rejects_models_that_are_not_chains():
    inp = keras.Input((None, D))
    a = InfiniTransformer(D, 16, 4, 4, 2, "gelu", SEG)(inp)
    out = keras.layers.Add()([a, inp])
    with pytest.raises(ValueError, match="chain"):
        Streamer(keras.Model(inp, out))
    with pytest.raises(ValueError, match="model_or_layers"):
        Streamer([keras.layers.Dense(3)])


def test_generate_matches_full_recomputation():
    from keras_infini.streaming import generate

    model = token_model(False)
    prompt = np.random.default_rng(2).integers(0, 20, size=(2, 5))
    out = generate(model, prompt, steps=6, temperature=0)
    assert out.shape == (2, 11)
    np.testing.assert_array_equal(out[:, :5], prompt)
    # Greedy decoding by re-running the whole prefix each step gives the same tokens.
    seq = prompt
    for _ in range(6):
        logits = to_numpy(model(seq))[:, -1]
        seq = np.concatenate([seq, logits.argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)
    sampled = generate(model, prompt, steps=3, temperature=1.0, top_k=3, seed=0)
    assert sampled.shape == (2, 8) and sampled.min() >= 0 and sampled.max() < 20


def test_generate_eager_and_compiled_agree_and_validate():
    from keras_infini.streaming import generate

    model = token_model(True)
    prompt = np.random.default_rng(4).integers(1, 20, size=(2, 9))
    compiled = generate(model, prompt, steps=5, temperature=0, pad_id=0)
    eager = generate(model, prompt, steps=5, temperature=0, compiled=False)
    np.testing.assert_array_equal(compiled, eager)
    for kwargs, name in (({"top_k": 0}, "top_k"), ({"steps": -1}, "steps"),
                         ({"temperature": -1.0}, "temperature")):
        call = dict(steps=2, **kwargs) if "steps" not in kwargs else kwargs
        with pytest.raises(ValueError, match=name):
            generate(model, prompt, **call)


def test_streamer_inference_records_no_autograd_graph():
    model = token_model(False)
    out = Streamer(model)(np.zeros((1, 8), "int32"))
    if keras.backend.backend() == "torch":
        assert not out.requires_grad
    trained = Streamer(model)(np.zeros((1, 8), "int32"), training=True)
    if keras.backend.backend() == "torch":
        assert trained.requires_grad


def test_streamer_compiles_its_inference_step_by_default():
    """The step is traced once per chunk shape (and once more for the first, stateless
    chunk) on JAX and TensorFlow; eager on torch. It reads the weights as they are now."""
    from keras_infini import InfiniTransformer
    from keras_infini.streaming import Streamer

    model = keras.Sequential([keras.Input((None, 8)),
                              InfiniTransformer(8, 16, 4, 4, 2, "gelu", 4, causal=True,
                                                update="delta")])
    streamer = Streamer(model)
    assert streamer.compiled
    calls = []
    run = streamer.run
    streamer.run = lambda *args, **kwargs: calls.append(1) or run(*args, **kwargs)
    x = np.random.default_rng(0).normal(size=(1, 20, 8)).astype("float32")
    parts = [to_numpy(streamer(x[:, i:i + 4])) for i in range(0, 20, 4)]
    np.testing.assert_allclose(np.concatenate(parts, 1), to_numpy(model(x)), atol=1e-5)
    assert len(calls) == (5 if keras.backend.backend() == "torch" else 2)
    # Weights changed after compiling are seen by the next call.
    streamer.reset()
    for weight in model.weights:
        weight.assign(weight * 0.5)
    np.testing.assert_allclose(to_numpy(streamer(x[:, :4])), to_numpy(model(x[:, :4])),
                               atol=1e-5)
    eager = Streamer(model, compiled=False)
    np.testing.assert_allclose(to_numpy(eager(x[:, :4])), to_numpy(model(x[:, :4])),
                               atol=1e-5)


# ----------------------------------------------------------------- issue 33 (round 3)
@pytest.mark.parametrize("compiled", [True, False])
def test_states_of_the_wrong_length_are_refused(compiled):
    """[12] `Streamer.states` with too few entries gave IndexError (TF: StagingError)."""
    model = token_model(functional=False)
    tokens = np.random.default_rng(4).integers(0, 20, size=(2, 8))
    streamer = Streamer(model, compiled=compiled)
    first = to_numpy(streamer(tokens))
    states = streamer.states
    assert len(states) == 3
    for wrong in (states[:2], states + states[:1], states[0]):
        streamer.states = wrong
        with pytest.raises(ValueError, match=r"Invalid states: .*expected None or a list "
                                             r"of 3 \(memory, norm\) pairs"):
            streamer(tokens)
        with pytest.raises(ValueError, match="Invalid states"):
            streamer.run(tokens, wrong)
    streamer.states = None  # the right ones still work
    np.testing.assert_allclose(to_numpy(streamer(tokens)), first, atol=1e-6)


def test_generate_refuses_infinite_temperature_and_float_prompts():
    """[12] `temperature=inf` was accepted; a float prompt was truncated to ints."""
    from keras_infini.streaming import generate

    model = token_model(functional=False)
    prompt = np.array([[1, 2, 3]])
    for temperature in (np.inf, np.nan, -1.0, True):
        with pytest.raises(ValueError, match=r"Invalid temperature="):
            generate(model, prompt, steps=2, temperature=temperature)
    for bad in (prompt + 0.5, prompt.astype("float32"), prompt > 1):
        with pytest.raises(ValueError, match=r"Invalid prompt of dtype"):
            generate(model, bad, steps=2, temperature=0)
    out = generate(model, keras.ops.convert_to_tensor(prompt, "int32"), steps=2,
                   temperature=0)
    np.testing.assert_array_equal(out, generate(model, prompt, steps=2, temperature=0))
