"""A shared layer test harness, after keras-hub's `TestCase.run_layer_test`.

`run_layer_test(cls, init_kwargs, input_shape, tmp_path)` checks, for one layer class:

1. config: `get_config()` -> JSON -> `from_config()` gives the same config;
2. build: `layer.build(input_shape)` builds the layer (and every sublayer);
3. symbolic vs eager: calling on `keras.Input` and on data gives the same output structure,
   shapes and dtypes (the symbolic shapes may have `None` where the eager ones are known);
4. fit: one `fit` step of `Input -> Dense -> layer` (first output) with an MSE loss gives a
   finite loss, and the layer's trainable weights (if any) change;
5. mixed precision: under `mixed_bfloat16` the outputs are finite, float outputs are
   `bfloat16` (or the input dtype for layers that do not autocast) and state outputs
   (`returns_state=True`: the last two, `memory` and `norm`) stay `float32`;
6. saving: a `.keras` round trip of `Input -> layer` gives equal outputs.

Keep the shapes tiny: every backend runs every check.
"""

import json

import keras
import numpy as np


def _flat(outputs):
    return keras.tree.flatten(outputs)


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def _data(input_shape, seed=0):
    return np.random.default_rng(seed).normal(size=input_shape).astype("float32")


def check_config_round_trip(cls, init_kwargs):
    layer = cls(**init_kwargs)
    config = layer.get_config()
    restored = json.loads(json.dumps(config))
    clone = cls.from_config(restored)
    assert type(clone) is cls
    assert clone.get_config() == config, (clone.get_config(), config)
    return layer


def check_build(cls, init_kwargs, input_shape):
    layer = cls(**init_kwargs)
    layer.build(input_shape)
    assert layer.built
    for sub in layer._flatten_layers(include_self=False, recursive=True):
        assert sub.built or not sub.weights, f"sublayer {sub.name!r} of {cls.__name__} not built"
    return layer


def check_symbolic_matches_eager(cls, init_kwargs, input_shape, call_kwargs):
    x = _data(input_shape)
    eager = _flat(cls(**init_kwargs)(x, **call_kwargs))
    symbolic = _flat(
        cls(**init_kwargs)(keras.Input(batch_shape=(None,) + tuple(input_shape[1:])),
                           **call_kwargs)
    )
    assert len(eager) == len(symbolic)
    for e, s in zip(eager, symbolic):
        assert len(e.shape) == len(s.shape), (e.shape, s.shape)
        for de, ds in zip(tuple(e.shape), tuple(s.shape)):
            assert ds is None or ds == de, (e.shape, s.shape)
        assert _dtype(e) == _dtype(s), (_dtype(e), _dtype(s))
    return eager


def _model(cls, init_kwargs, input_shape, call_kwargs, dense_first=False, first_only=False):
    inputs = keras.Input(batch_shape=(None,) + tuple(input_shape[1:]))
    h = keras.layers.Dense(input_shape[-1], name="pre")(inputs) if dense_first else inputs
    outputs = cls(**init_kwargs)(h, **call_kwargs)
    if first_only:
        outputs = _flat(outputs)[0]
    return keras.Model(inputs, outputs)


def check_fit_step(cls, init_kwargs, input_shape, call_kwargs):
    model = _model(cls, init_kwargs, input_shape, call_kwargs, dense_first=True,
                   first_only=True)
    layer = model.layers[-1]
    before = [_numpy(w).copy() for w in layer.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = _data(input_shape)
    y = _data((input_shape[0],) + tuple(model.outputs[0].shape[1:]), seed=1)
    history = model.fit(x, y, batch_size=input_shape[0], epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]), history
    if before:
        after = [_numpy(w) for w in layer.trainable_weights]
        assert any(not np.array_equal(b, a) for b, a in zip(before, after)), (
            f"{cls.__name__}: no trainable weight changed in one fit step"
        )
    return history


def check_mixed_precision(cls, init_kwargs, input_shape, call_kwargs, returns_state):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = cls(**init_kwargs)
        outputs = _flat(layer(_data(input_shape), **call_kwargs))
    finally:
        keras.config.set_dtype_policy(previous)
    for w in layer.weights:
        assert _dtype(w) == "float32", (w.path, _dtype(w))
    state = outputs[-2:] if returns_state else []
    for t in outputs:
        assert np.all(np.isfinite(_numpy(keras.ops.cast(t, "float32"))))
    assert _dtype(outputs[0]) in ("bfloat16", "float32")
    if layer.autocast:
        assert _dtype(outputs[0]) == "bfloat16", _dtype(outputs[0])
    for t in state:
        assert _dtype(t) == "float32", _dtype(t)
    return outputs


def check_saving(cls, init_kwargs, input_shape, call_kwargs, tmp_path):
    model = _model(cls, init_kwargs, input_shape, call_kwargs)
    x = _data(input_shape, seed=2)
    want = [_numpy(t) for t in _flat(model(x, training=False))]
    path = str(tmp_path / f"{cls.__name__}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    got = [_numpy(t) for t in _flat(loaded(x, training=False))]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-6)


def run_layer_test(
    cls,
    init_kwargs,
    input_shape,
    tmp_path,
    call_kwargs=None,
    returns_state=False,
    run_training=True,
    run_mixed_precision=True,
    run_saving=True,
):
    """Runs every check above for `cls(**init_kwargs)` on float32 inputs `input_shape`."""
    call_kwargs = dict(call_kwargs or {})
    check_config_round_trip(cls, init_kwargs)
    check_build(cls, init_kwargs, input_shape)
    check_symbolic_matches_eager(cls, init_kwargs, input_shape, call_kwargs)
    if run_training:
        check_fit_step(cls, init_kwargs, input_shape, call_kwargs)
    if run_mixed_precision:
        check_mixed_precision(cls, init_kwargs, input_shape, call_kwargs, returns_state)
    if run_saving:
        check_saving(cls, init_kwargs, input_shape, call_kwargs, tmp_path)
