"""Saving: `.keras` round trips in a fresh process and `.weights.h5` across backends.

- Every public layer (the three stateful layers, both embedders, every activation) and a
  small model like the main example (Embedding -> MoD block -> Infini block -> Dense) is
  saved with `model.save("*.keras")` and reloaded with `keras.models.load_model` in a fresh
  subprocess that only runs `import keras_infini` (no `custom_objects`): the outputs must be
  identical. One subprocess loads all the files.
- Cross-backend: the current backend writes the example model's architecture
  (`model.to_json()`), its `.weights.h5` and its predictions on a fixed input; one
  subprocess per *other* backend rebuilds the model from the JSON, loads the weights and
  compares its predictions (float32 tolerance).
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import to_numpy

from keras_infini import ACTIVATIONS
from keras_infini import CompressiveMemory
from keras_infini import InfiniTransformer
from keras_infini import MoDInfiniTransformer
from keras_infini import RoPEEmbeddings
from keras_infini import YaRNEmbeddings
from keras_infini import get_activation

B, L, D, HID, H, DK, DV, S, VOCAB = 2, 21, 8, 12, 2, 4, 3, 8, 11
BACKENDS = ("jax", "tensorflow", "torch")
SUBPROCESS_TIMEOUT_S = 600


def run_python(code, backend, cwd):
    """Runs `code` in a fresh interpreter with `KERAS_BACKEND=backend`; returns stdout."""
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("PYTHONPATH", None)  # only the installed package, not the test helpers
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=str(cwd), env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"subprocess ({backend}) failed with {proc.returncode}:\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


def randomize_weights(model, seed=0):
    """Non-trivial values for every weight (gates, norms, learnable state, biases)."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        shape = tuple(var.shape)
        name = var.path.split("/")[-1]
        if name in ("initial_norm", "gamma"):  # positive, as these weights should be
            value = rng.uniform(0.5, 1.5, size=shape)
        else:
            value = 0.4 * rng.normal(size=shape)
        var.assign(value.astype(keras.backend.standardize_dtype(var.dtype)))


def float_inputs(seed=1, length=L, dim=D):
    return np.random.default_rng(seed).normal(size=(B, length, dim)).astype("float32")


def token_inputs(seed=2, length=L):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(B, length)).astype("int32")


def example_model(name="example"):
    """Like the README example: Embedding -> MoD block -> Infini block -> Dense (logits)."""
    tokens = keras.Input((L,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCAB, D, name="embedding")(tokens)
    x = MoDInfiniTransformer(D, HID, DK, DV, H, "ffngeglu", segment_len=S, sampling_factor=2,
                             update="delta", causal=True, positional_embedder="rope",
                             name="mod_block")(x)
    x = InfiniTransformer(D, HID, DK, DV, H, "swiglu", segment_len=S, update="linear",
                          causal=True,
                          positional_embedder=YaRNEmbeddings(DK, S, context_len=S,
                                                             context_len_ext=4 * S),
                          init_state_learnable=True, name="infini_block")(x)
    logits = keras.layers.Dense(VOCAB, name="logits")(x)
    return keras.Model(tokens, logits, name=name)


def layer_cases():
    """`(file stem, model builder, input builder)` for every public layer."""

    def seq(layer, shape=(L, D)):
        return lambda: keras.Sequential([keras.Input(shape), layer()])

    cases = [
        ("cm_linear_rope", seq(lambda: CompressiveMemory(
            D, DK, DV, H, S, update="linear", causal=True, positional_embedder="rope",
            name="cm")), float_inputs),
        ("cm_delta_yarn_state", lambda: _functional(lambda: CompressiveMemory(
            D, DK, DV, H, S, sampling_factor=2.0, update="delta", causal=False,
            positional_embedder=YaRNEmbeddings(DK, S, context_len=S, context_len_ext=3 * S,
                                               dim_embeddings_pct=1.0),
            init_state_learnable=True, return_state=True, name="cm")), float_inputs),
        ("infini_postnorm_rope_obj", seq(lambda: InfiniTransformer(
            D, HID, DK, DV, H, "geglu", S, update="delta", causal=True,
            positional_embedder=RoPEEmbeddings(DK, S, base=500.0), dropout=0.1,
            normalize_first=False, layer_norm_epsilon=1e-4, name="blk")), float_inputs),
        ("infini_state", lambda: _functional(lambda: InfiniTransformer(
            D, HID, DK, DV, H, "relu", S, init_state_learnable=True, return_state=True,
            name="blk")), float_inputs),
        ("mod_router_outputs", lambda: _functional(lambda: MoDInfiniTransformer(
            D, HID, DK, DV, H, "swish", S, sampling_factor=1.5, update="delta", causal=True,
            positional_embedder="rope", router_loss_weight=0.5, return_router_outputs=True,
            name="mod")), float_inputs),
        ("rope", seq(lambda: RoPEEmbeddings(D, S, dim_embeddings_pct=0.75, base=1000.0)),
         float_inputs),
        ("yarn", seq(lambda: YaRNEmbeddings(D, S, context_len=S, context_len_ext=8 * S,
                                            alpha=2, beta=16, len_scale=1.2)), float_inputs),
        ("example", lambda: example_model(), token_inputs),
    ]
    for name in ACTIVATIONS:
        cases.append((f"act_{name}", seq(lambda n=name: get_activation(n, D)), float_inputs))
    return cases


def _functional(make_layer):
    inp = keras.Input((L, D))
    return keras.Model(inp, make_layer()(inp))


def as_list(outputs):
    if isinstance(outputs, (list, tuple)):
        return [to_numpy(o) for o in outputs]
    return [to_numpy(outputs)]


def test_keras_round_trip_in_fresh_process(tmp_path):
    """Every public layer reloads from `.keras` with identical outputs, no custom_objects."""
    stems = []
    for stem, build, make_input in layer_cases():
        model = build()
        randomize_weights(model, seed=len(stems))
        if stem == "example":  # also restores a compiled, trained state
            model.compile(optimizer=keras.optimizers.Adam(1e-3),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(token_inputs(seed=5), token_inputs(seed=6), epochs=1, batch_size=B,
                      verbose=0)
        x = make_input()
        outputs = as_list(model.predict(x, verbose=0))
        model.save(str(tmp_path / f"{stem}.keras"))
        np.savez(tmp_path / f"{stem}.npz", x=x, *outputs)
        stems.append(stem)
    with open(tmp_path / "stems.json", "w") as f:
        json.dump(stems, f)

    out = run_python("""
        import json, numpy as np, keras
        import keras_infini
        stems = json.load(open("stems.json"))
        for stem in stems:
            model = keras.models.load_model(stem + ".keras")
            data = np.load(stem + ".npz")
            got = model.predict(data["x"], verbose=0)
            got = list(got) if isinstance(got, (list, tuple)) else [got]
            want = [data[f"arr_{i}"] for i in range(len(data.files) - 1)]
            assert len(got) == len(want), (stem, len(got), len(want))
            for g, w in zip(got, want):
                g = keras.ops.convert_to_numpy(g)
                assert g.shape == w.shape and g.dtype == w.dtype, (stem, g.shape, g.dtype)
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=stem)
            if stem == "example":  # the compiled state came back: training continues
                assert model.optimizer is not None and model.optimizer.iterations.numpy() > 0
                x = data["x"]
                history = model.fit(x, x, epochs=1, batch_size=x.shape[0], verbose=0)
                assert np.isfinite(history.history["loss"][-1])
            print("ok", stem)
        """, BACKEND, tmp_path)
    assert out.count("ok ") == len(stems), out


def test_weights_cross_backend(tmp_path):
    """`.weights.h5` written here is read by the two other backends: same predictions."""
    model = example_model()
    randomize_weights(model, seed=42)
    x = token_inputs(seed=7)
    want = to_numpy(model.predict(x, verbose=0))
    assert np.all(np.isfinite(want))
    model.save_weights(str(tmp_path / "example.weights.h5"))
    with open(tmp_path / "example.json", "w") as f:
        f.write(model.to_json())
    np.savez(tmp_path / "example_predictions.npz", x=x, y=want)

    code = """
        import numpy as np, keras
        import keras_infini
        model = keras.models.model_from_json(open("example.json").read())
        model.load_weights("example.weights.h5")
        data = np.load("example_predictions.npz")
        got = keras.ops.convert_to_numpy(model.predict(data["x"], verbose=0))
        want = data["y"]
        scale = float(np.abs(want).max())
        err = float(np.abs(got - want).max())
        print("max_abs_err", err, "scale", scale)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
        print("ok")
        """
    for other in BACKENDS:
        if other == BACKEND:
            continue
        out = run_python(code, other, tmp_path)
        assert "ok" in out, (other, out)
