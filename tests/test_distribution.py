"""Multi-device training through `keras.distribution`: data, model and sequence parallelism.

Data parallelism (JAX only): `keras.distribution.DataParallel` on 2 CPU devices. The
reference run trains here, on one device; a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=2` (set before jax is imported) trains the
same model from the same initial weights (`.weights.h5`) on the same data with
`keras.distribution.set_distribution(DataParallel(devices=list_devices()))`; the per-epoch
losses and the final weights must match the single-device run to float32 tolerance.
"""

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import to_numpy

jax_only = pytest.mark.skipif(
    BACKEND != "jax",
    reason="tests the JAX recipe (keras.distribution on virtual CPU devices); TensorFlow "
           "(tf.distribute.MirroredStrategy) and torch are documented, not tested",
)

L, D, HID, H, DK, DV, S, VOCAB = 16, 8, 12, 2, 4, 3, 8, 11
BATCH, SAMPLES, EPOCHS = 4, 8, 3  # batch divisible by the 2 devices; no partial batch

MODEL_CODE = f"""
import keras
from keras_infini import InfiniTransformer, MoDInfiniTransformer

def make_model():
    tokens = keras.Input(({L},), dtype="int32")
    x = keras.layers.Embedding({VOCAB}, {D})(tokens)
    x = MoDInfiniTransformer({D}, {HID}, {DK}, {DV}, {H}, "swiglu", {S}, sampling_factor=2,
                             update="delta", causal=True, positional_embedder="rope")(x)
    x = InfiniTransformer({D}, {HID}, {DK}, {DV}, {H}, "gelu", {S}, update="linear",
                          causal=True, init_state_learnable=True)(x)
    model = keras.Model(tokens, keras.layers.Dense({VOCAB})(x))
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model
"""


def train(model, tokens, targets):
    history = model.fit(tokens, targets, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                        verbose=0)
    return np.array(history.history["loss"])


@jax_only
def test_data_parallel_matches_single_device(tmp_path):
    namespace = {}
    exec(MODEL_CODE, namespace)
    model = namespace["make_model"]()
    model.save_weights(str(tmp_path / "init.weights.h5"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(SAMPLES, L)).astype("int32")
    targets = np.roll(tokens, -1, axis=1)
    np.savez(tmp_path / "data.npz", tokens=tokens, targets=targets)
    single = train(model, tokens, targets)
    single_weights = [to_numpy(w) for w in model.weights]
    assert np.all(np.isfinite(single)) and single[-1] < single[0]

    script = MODEL_CODE + textwrap.dedent(f"""
        import jax, numpy as np
        assert len(jax.devices()) == 2, jax.devices()
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        model = make_model()
        model.load_weights("init.weights.h5")
        kernel = model.weights[0].value
        assert len(kernel.sharding.device_set) == 2, kernel.sharding  # replicated on both
        data = np.load("data.npz")
        history = model.fit(data["tokens"], data["targets"], batch_size={BATCH},
                            epochs={EPOCHS}, shuffle=False, verbose=0)
        np.save("losses.npy", np.array(history.history["loss"]))
        np.savez("weights.npz", *[keras.ops.convert_to_numpy(w) for w in model.weights])
        print("devices", devices)
        """)
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=2").strip()
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    parallel = np.load(tmp_path / "losses.npy")
    print("single-device losses", single, "data-parallel losses", parallel)
    np.testing.assert_allclose(parallel, single, rtol=1e-5)
    parallel_weights = np.load(tmp_path / "weights.npz")
    for i, want in enumerate(single_weights):
        np.testing.assert_allclose(parallel_weights[f"arr_{i}"], want, rtol=1e-4, atol=1e-5,
                                   err_msg=model.weights[i].path)


# =============================================================================== layouts
# Backend-agnostic: a DeviceMesh of device names and a LayoutMap need no devices.
def fake_mesh(shape, names):
    count = int(np.prod(shape))
    return keras.distribution.DeviceMesh(shape, names, [f"cpu:{i}" for i in range(count)])


def every_layer_weights():
    """The weights of every keras_infini layer kind and weight option (plus an Embedding,
    a LayerNormalization and a Dense head), built without a forward pass."""
    from keras_infini import CompressiveMemory
    from keras_infini import InfiniTransformer
    from keras_infini import MoDInfiniTransformer

    layers = [
        (keras.layers.Embedding(32, 32), (None, 16)),
        # SwiGLU: (F, F) kernels, biases and a scalar beta; MoD router.
        (MoDInfiniTransformer(32, 64, 8, 8, 8, "swiglu", 8, sampling_factor=2,
                              update="delta", positional_embedder="rope",
                              write_strength=True, init_state_learnable=True),
         (None, 16, 32)),
        (InfiniTransformer(32, 64, 8, 8, 8, "ffngeglu", 8), (None, 16, 32)),  # (F, 43)
        (InfiniTransformer(32, 64, 8, 8, 8, "gelu", 8, update="delta",
                           memory_feature_map="l2", memory_decay=True), (None, 16, 32)),
        (CompressiveMemory(32, 8, 8, 8, 8), (None, 16, 32)),
        (keras.layers.LayerNormalization(), (None, 16, 32)),
        (keras.layers.Dense(32), (None, 16, 32)),
    ]
    for layer, shape in layers:
        layer.build(shape)
    return [w for layer, _ in layers for w in layer.weights]


SHARDED_ON_MODEL = {  # path ending (regex) -> axis sharded over the model axis
    "/query/kernel": 1, "/key/kernel": 1, "/value/kernel": 1, "/output/kernel": 0,
    "/write_strength/kernel": 1, "/write_strength/bias": 0,
    "/decay/kernel": 1, "/decay_log_rate": 0, "/decay_bias": 0,
    "/mlp_in/kernel": 1, "/mlp_in/bias": 0, "/mlp_out/kernel": 0,
    "/kernel_gate": 0, "/kernel_value": 0, "/kernel_out": 1,
    "/embeddings": 1, r"^dense(_\d+)?/kernel": 1, r"^dense(_\d+)?/bias": 0,
}



@pytest.mark.parametrize("shape", [(2, 4), (1, 8)])
def test_layout_map_covers_every_weight(shape):
    from keras_infini.distribution import get_layout_map

    mesh = fake_mesh(shape, ("batch", "model"))
    layout_map = get_layout_map(mesh)
    sharded = 0
    for variable in every_layer_weights():
        layout = layout_map[variable.path]  # Keras raises if two keys match
        assert layout is not None, f"{variable.path} is not in the layout map"
        assert len(layout.axes) <= len(variable.shape), (variable.path, layout.axes)
        suffix = [s for s in SHARDED_ON_MODEL if re.search(s + "$", variable.path)]
        want = [None] * len(variable.shape)
        if suffix:
            want[SHARDED_ON_MODEL[suffix[0]]] = "model"
            sharded += 1
        got = list(layout.axes) + [None] * (len(variable.shape) - len(layout.axes))
        assert got == want, (variable.path, layout.axes)
        for axis, name in enumerate(got):
            if name is not None:
                assert variable.shape[axis] % shape[1] == 0, (variable.path, variable.shape)
    assert sharded >= 24, sharded


def test_layout_map_options_and_refusals():
    from keras_infini.distribution import get_layout_map

    mesh = fake_mesh((2, 4), ("data", "tensor"))
    layout_map = get_layout_map(mesh, model_dim="tensor", batch_dim="data")
    assert layout_map["block/attention/query/kernel"].axes == (None, "tensor", None)
    replicated = get_layout_map(mesh, model_dim=None, batch_dim=None)
    assert replicated["block/attention/query/kernel"].axes == (None, None, None)
    with pytest.raises(ValueError, match=r"model_dim='model'.*\('data', 'tensor'\)"):
        get_layout_map(mesh)  # the default axis name does not exist in this mesh
    with pytest.raises(ValueError, match=r"batch_dim='batch'"):
        get_layout_map(mesh, model_dim="tensor")
    with pytest.raises(ValueError, match=r"device_mesh=.*DeviceMesh"):
        get_layout_map((2, 4))
    with pytest.raises(ValueError, match="Invalid axis names"):  # Keras' own check
        layout_map["extra"] = ("tensor", "seq")


@pytest.mark.skipif(BACKEND == "jax", reason="the refusal off JAX; JAX runs it below")
def test_sequence_parallel_refused_off_jax():
    from keras_infini.distribution import SequenceParallel

    with pytest.raises(ValueError, match=rf"backend='{BACKEND}'.*jax"):
        SequenceParallel(fake_mesh((2, 4), ("batch", "seq")))


@jax_only
def test_sequence_parallel_argument_errors():
    from keras_infini.distribution import SequenceParallel
    from keras_infini.distribution import get_layout_map

    mesh = fake_mesh((2, 4), ("batch", "seq"))
    with pytest.raises(ValueError, match=r"seq_dim='sequence'"):
        SequenceParallel(mesh, seq_dim="sequence")
    with pytest.raises(ValueError, match=r"seq_dim='batch'"):
        SequenceParallel(mesh, seq_dim="batch")
    with pytest.raises(ValueError, match=r"layout_map=\{"):
        SequenceParallel(mesh, layout_map={})
    with pytest.raises(ValueError, match="another device mesh"):
        SequenceParallel(mesh, layout_map=get_layout_map(fake_mesh((8,), ("model",)),
                                                         batch_dim=None))
    bad = keras.distribution.LayoutMap(mesh)
    bad["x/kernel"] = (None, "seq")
    with pytest.raises(ValueError, match="shards a weight over seq_dim='seq'"):
        SequenceParallel(mesh, layout_map=bad)


# ====================================================== sequence-sharded states (math)
def emulated_shard_map(fn, sharded, replicated, sequence):
    """`ops.backend.sequence_shard_map` emulated on one device, any backend: the shards
    run one after the other; a first pass records what each shard gathers."""
    from keras import ops

    size = sequence.size
    pieces = [ops.split(t, size, axis=1) for t in sharded]
    shards = [tuple(p[i] for p in pieces) for i in range(size)]
    recorded = []

    def record(t):
        recorded.append(t)
        return ops.stack([t] * size)  # placeholder, results of this pass are dropped

    for i in range(size):
        fn(i, size, record, shards[i], replicated)
    gathered = ops.stack(recorded)  # one gather per shard
    outputs = [fn(i, size, lambda t: gathered, shards[i], replicated) for i in range(size)]
    # The replicated outputs are the last shard's (every shard computes them alike from
    # the gathered summaries; the real shard_map checks that they do not vary).
    joined = tuple(ops.concatenate([o[0][j] for o in outputs], axis=1)
                   for j in range(len(outputs[0][0])))
    return joined, outputs[-1][1]


@pytest.mark.skipif(BACKEND == "jax", reason="JAX runs the real shard_map on 8 devices "
                    "(distributed_checks.py); this emulation checks the math elsewhere")
@pytest.mark.parametrize("shards", [4])
def test_sequence_sharded_states_equal_one_device(monkeypatch, shards):
    """The LASP-2 combination (prefix sums and composed affine maps of the delta rule)
    equals the one-device states, on every backend (shards emulated one by one)."""
    from keras import ops

    from keras_infini.distribution import SequenceSharding
    from keras_infini.ops import backend as fast
    from keras_infini.ops import memory as memory_ops

    monkeypatch.setattr(fast, "sequence_shard_map", emulated_shard_map)
    sequence = SequenceSharding(None, None, "seq", shards)
    rng = np.random.default_rng(shards)
    b, n, h, s, dk, dv = 2, 8, 2, 4, 3, 5
    keys = rng.normal(size=(b, n, h, s, dk)).astype("float32")
    keys[:, :3] = 0.0  # a masked start: the normaliser is still 0 on the second shard
    read_k = memory_ops.sigma(ops.convert_to_tensor(keys))
    read_k = ops.where(ops.convert_to_tensor(keys) == 0.0, 0.0, read_k)
    write_k = read_k * ops.convert_to_tensor(rng.random((b, n, h, s, 1)).astype("float32"))
    value = ops.convert_to_tensor(rng.normal(size=(b, n, h, s, dv)).astype("float32"))
    memory0 = ops.convert_to_tensor(rng.normal(size=(b, h, dk, dv)).astype("float32"))
    norm0 = ops.zeros((b, h, dk))

    def both(fn, *args, **kwargs):
        def run(*args):
            return fn(*args, **kwargs), fn(*args, sequence=sequence, **kwargs)

        one, many = run(*args)
        for a, m in zip(one, many):
            a, m = to_numpy(a), to_numpy(m)
            scale = max(1.0, float(np.max(np.abs(a))))  # float32: relative to the largest
            np.testing.assert_allclose(m, a, rtol=0, atol=2e-5 * scale)
        return one

    norm_before, _ = both(memory_ops.norm_states, read_k, norm0)
    both(memory_ops.linear_memory_states, write_k, value, memory0)
    both(memory_ops.delta_memory_states, read_k, value, norm_before, memory0)
    both(memory_ops.delta_memory_states, read_k, value, norm_before, memory0,
         method="associative")
    for normalised in (True, False):
        both(memory_ops.delta_memory_states_general, read_k, write_k, value, norm_before,
             memory0, normalised=normalised)


def test_sequence_sharded_states_refuse_indivisible_segments():
    from keras import ops

    from keras_infini.distribution import SequenceSharding
    from keras_infini.ops import memory as memory_ops

    sequence = SequenceSharding(None, None, "seq", 4)
    with pytest.raises(ValueError, match="number of segments 6.*'seq'.*size 4"):
        memory_ops.linear_memory_states(ops.ones((1, 6, 1, 2, 3)), ops.ones((1, 6, 1, 2, 3)),
                                        ops.zeros((1, 1, 3, 3)), sequence=sequence)


# =================================================== 8 virtual devices (JAX subprocess)
@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """tests/distributed_checks.py once, with 8 virtual CPU devices: its JSON results."""
    import json

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    # Lower LLVM optimisation: a third less compile time, same HLO (memory analysis).
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                        " --xla_backend_optimization_level=0").strip()
    env["PYTHONPATH"] = os.path.dirname(here)
    proc = subprocess.run([sys.executable, os.path.join(here, "distributed_checks.py")],
                          cwd=str(tmp_path_factory.mktemp("dist")), env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")][-1]
    results = json.loads(line[len("RESULTS "):])
    print("seconds per check", results["seconds"])
    return results


@jax_only
@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_model_parallel_matches_single_device(distributed, mesh):
    result = distributed[f"model_parallel_{mesh}"]
    if result["prediction"] is not None:
        assert result["prediction"] < 1e-5, result["prediction"]  # forward outputs
    assert result["losses"] < 1e-5, result
    assert result["weights"] < 1e-4, result["weights"]  # after 3 fit steps
    model_size = int(mesh.split("x")[1])
    fractions = result["fractions"]
    sharded = {p: f for p, f in fractions.items() if f["sharded"]}
    assert len(sharded) >= 12, sorted(sharded)
    for path, f in fractions.items():
        assert f["devices"] == 8, (path, f)
        want = 1 / model_size if f["sharded"] else 1.0
        assert f["fraction"] == pytest.approx(want), (path, f)


SEQUENCE_CHECKS = [
    "seq_linear_causal_mask_odd_1x8",
    "seq_delta_noncausal_mask_learnable_rope_pad_2x4",
    "seq_deltanet_l2_causal_mask_odd_2x4",
    "seq_gated_deltanet_causal_mask_odd_2x4",
    "seq_taylor_delta_causal_mask_odd_2x4",
    "seq_dpfp_gated_deltanet_causal_mask_odd_2x4",
]


@jax_only
@pytest.mark.parametrize("name", SEQUENCE_CHECKS)
def test_sequence_parallel_matches_single_device(distributed, name):
    result = distributed[name]
    assert result["finite"]
    for key in ("outputs", "state", "grad_weights", "grad_input"):
        assert result[key] < 2e-5, (key, result)
    if "odd" not in name and "pad" not in name:  # lengths that do not split on output
        assert "'seq'" in result["output_sharding"], result["output_sharding"]


@jax_only
def test_data_sequence_model_parallel_fit_matches_single_device(distributed):
    """A MoD block (top-k routing, router loss, write strength, learnable initial state,
    delta) and a Dense head trained on batch x seq x model = 2 x 2 x 2."""
    result = distributed["seq_model_fit_2x2x2"]
    assert result["losses"] < 1e-5, result
    assert result["weights"] < 1e-4, result


@jax_only
def test_sequence_parallel_compiled_program_is_sharded(distributed):
    """fwd+grad of a delta CompressiveMemory, 2048 tokens: 8 devices need at most 1/4 of
    one device's temporary memory, and no collective moves activations (only the small
    per-device summaries are all-gathered; weight gradients are all-reduced)."""
    result = distributed["hlo_delta"]
    assert result["temp_bytes_8"] * 4 <= result["temp_bytes_1"], result
    assert result["largest_all_gather_8"] * 4 < result["input_elements"], result
    counts = result["collectives_8"]
    assert counts["all-to-all"] == 0 and counts["collective-permute"] == 0, counts
    assert counts["all-gather"] >= 1, counts
