"""Model- and sequence-parallel checks on 8 virtual CPU devices (JAX), in one process.

Run by tests/test_distribution.py in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` set before jax is imported; prints
one JSON line (`RESULTS {...}`) of measured errors and shardings, which the tests assert
on. Every check runs the same computation twice from the same weights: once on one
device without a distribution, once distributed, and reports the largest difference
(relative to the reference's largest magnitude, at least 1).
"""

import json
import re
import sys
import time

import jax
import keras
import numpy as np

from keras_infini import CompressiveMemory
from keras_infini import MoDInfiniTransformer
from keras_infini.distribution import SequenceParallel
from keras_infini.distribution import get_layout_map

assert len(jax.devices()) == 8, jax.devices()
DEVICES = keras.distribution.list_devices()
RESULTS = {}
TIMES = {}
_START = [time.perf_counter()]


def lap(name):
    now = time.perf_counter()
    TIMES[name] = round(now - _START[0], 1)
    _START[0] = now
SECTIONS = sys.argv[1:] or ["model", "sequence", "hlo"]


def error(reference, value):
    reference = np.asarray(reference, dtype="float64")
    value = np.asarray(value, dtype="float64")
    assert reference.shape == value.shape, (reference.shape, value.shape)
    if reference.size == 0:
        return 0.0
    scale = max(1.0, float(np.max(np.abs(reference))))
    return float(np.max(np.abs(reference - value)) / scale)


def max_error(references, values):
    return max(error(r, v) for r, v in zip(references, values))


# ----------------------------------------------------------------------- a small LM
VOCAB, L, D, HID, H, DK, DV, S = 16, 16, 32, 64, 8, 4, 4, 8
BATCH, SAMPLES, EPOCHS = 4, 12, 1  # 3 fit steps
rng = np.random.default_rng(0)
TOKENS = rng.integers(0, VOCAB, size=(SAMPLES, L)).astype("int32")
TARGETS = np.roll(TOKENS, -1, axis=1)


def make_model():
    tokens = keras.Input((L,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, D)(tokens)
    x = MoDInfiniTransformer(D, HID, DK, DV, H, "ffnswiglu", S, sampling_factor=2,
                             update="delta", causal=True, positional_embedder="rope",
                             write_strength=True, init_state_learnable=True)(x)
    x = keras.layers.LayerNormalization()(x)
    model = keras.Model(tokens, keras.layers.Dense(VOCAB)(x))
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def train(model, predict=True):
    prediction = model.predict(TOKENS, batch_size=BATCH, verbose=0) if predict else None
    history = model.fit(TOKENS, TARGETS, batch_size=BATCH, epochs=EPOCHS, shuffle=False,
                        verbose=0)
    weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
    return prediction, np.array(history.history["loss"]), weights


keras.utils.set_random_seed(0)
reference_model = make_model()
INITIAL = reference_model.get_weights()
REFERENCE = train(reference_model)
lap("reference_fit")


def compare_training(distribution, predict=True):
    with distribution.scope():
        model = make_model()
        model.set_weights(INITIAL)
        prediction, losses, weights = train(model, predict)
    return model, {
        "prediction": error(REFERENCE[0], prediction) if predict else None,
        "losses": error(REFERENCE[1], losses),
        "weights": max_error(REFERENCE[2], weights),
        "reference_losses": REFERENCE[1].tolist(),
    }


if "model" in SECTIONS:
    for shape in ((2, 4), (1, 8)):  # forward outputs compared at 2x4 (compile time)
        mesh = keras.distribution.DeviceMesh(shape, ("batch", "model"), DEVICES)
        layout_map = get_layout_map(mesh)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        model, result = compare_training(distribution, predict=shape == (2, 4))
        fractions = {}
        for variable in model.weights:
            layout = layout_map[variable.path]
            sharding = variable.value.sharding
            local = [s.data.shape for s in variable.value.addressable_shards]
            held = int(np.prod(sharding.shard_shape(tuple(variable.shape))))
            assert all(tuple(shape_) == sharding.shard_shape(tuple(variable.shape))
                       for shape_ in local)
            fractions[variable.path] = {
                "sharded": layout is not None and "model" in layout.axes,
                "fraction": held / max(1, int(np.prod(variable.shape))),
                "devices": len(sharding.device_set),
            }
        result["fractions"] = fractions
        RESULTS[f"model_parallel_{shape[0]}x{shape[1]}"] = result
        lap(f"model_parallel_{shape[0]}x{shape[1]}")


# ----------------------------------------------------------------------- sequence parallel
def run_layer(layer, x, mask, call_kwargs, distribution=None):
    """Outputs, state and gradients (weights and input) of `layer` under jit."""
    trainable = layer.trainable_variables
    non_trainable = layer.non_trainable_variables

    def loss_fn(values, x):
        (outputs, memory, norm), _ = layer.stateless_call(
            values, [v.value for v in non_trainable], x, mask=mask, return_state=True,
            **call_kwargs,
        )
        loss = (keras.ops.sum(keras.ops.sin(outputs)) + 1e-2 * keras.ops.sum(memory)
                + 1e-3 * keras.ops.sum(norm))
        return loss, (outputs, memory, norm)

    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    if distribution is not None:
        layout = distribution.get_data_layout(x.shape).backend_layout
        x = jax.device_put(x, layout)
        if mask is not None:
            mask = jax.device_put(mask, distribution.get_data_layout(mask.shape).backend_layout)
    (_, (outputs, memory, norm)), (grad_w, grad_x) = step([v.value for v in trainable], x)
    return {"outputs": outputs, "state": (memory, norm), "grad_weights": grad_w,
            "grad_input": grad_x, "output_sharding": str(outputs.sharding.spec)
            if hasattr(outputs.sharding, "spec") else ""}


def compare_layer(name, make_layer, length, shape, masked, call_kwargs=None, batch=2):
    call_kwargs = call_kwargs or {}
    local_rng = np.random.default_rng(len(RESULTS))
    x = local_rng.normal(size=(batch, length, D)).astype("float32")
    mask = None
    if masked:
        mask = local_rng.random((batch, length)) > 0.25
        mask[:, -3:] = False  # a masked tail
    keras.utils.set_random_seed(1)
    layer = make_layer()
    layer.build((None, None, D))
    weights = layer.get_weights()
    reference = run_layer(layer, x, mask, call_kwargs)
    mesh = keras.distribution.DeviceMesh(shape, ("batch", "seq"), DEVICES)
    distribution = SequenceParallel(mesh)
    with distribution.scope():
        sharded_layer = make_layer()
        sharded_layer.build((None, None, D))
        sharded_layer.set_weights(weights)
        sharded = run_layer(sharded_layer, x, mask, call_kwargs, distribution)
    RESULTS[name] = {
        "outputs": error(reference["outputs"], sharded["outputs"]),
        "state": max_error(reference["state"], sharded["state"]),
        "grad_weights": max_error(reference["grad_weights"], sharded["grad_weights"]),
        "grad_input": error(reference["grad_input"], sharded["grad_input"]),
        "output_sharding": sharded["output_sharding"],
        "finite": bool(np.all(np.isfinite(np.asarray(reference["outputs"])))),
    }
    lap(name)


if "sequence" in SECTIONS:
    def memory(**kwargs):
        return lambda: CompressiveMemory(D, DK, DV, H // 2, S, **kwargs)

    # 123 tokens at 1x8: padded to 128 = 16 segments inside the layer (and not a multiple
    # of 8, so the data is not split on input); 120 at 2x4: padded to 128 (4 segments
    # per device). The paper's delta (`delta_memory_states`) here and the general delta
    # of the memory options (`delta_memory_states_general`, the MoD block with write
    # strength in the fit below) both go through `sharded_affine_states`.
    compare_layer("seq_linear_causal_mask_odd_1x8", memory(update="linear", causal=True),
                  123, (1, 8), masked=True)
    compare_layer("seq_delta_noncausal_mask_learnable_rope_pad_2x4",
                  memory(update="delta", init_state_learnable=True,
                         positional_embedder="rope"), 120, (2, 4), masked=True)
    # DeltaNet's token-level rule (unit keys, write strength): the triangular solve runs
    # per segment on each device, then the same `sharded_affine_states`.
    compare_layer("seq_deltanet_l2_causal_mask_odd_2x4",
                  memory(update="delta", causal=True, memory_feature_map="l2",
                         write_strength=True), 123, (2, 4), masked=True)
    # Gated DeltaNet (a decay per token): the segment's decay is part of each device's
    # affine map.
    compare_layer("seq_gated_deltanet_causal_mask_odd_2x4",
                  memory(update="delta", causal=True, memory_feature_map="l2",
                         write_strength="hard_sigmoid", memory_decay=True), 123, (2, 4),
                  masked=True)
    # The maps that widen the memory key: each device's affine map is then
    # `(memory_dim, memory_dim + dv)` (the paper's normalised delta with "taylor", the
    # gated token-level delta with "dpfp").
    compare_layer("seq_taylor_delta_causal_mask_odd_2x4",
                  memory(update="delta", causal=True, memory_feature_map="taylor"), 123,
                  (2, 4), masked=True)
    compare_layer("seq_dpfp_gated_deltanet_causal_mask_odd_2x4",
                  memory(update="delta", causal=True, memory_feature_map="dpfp2",
                         write_strength="hard_sigmoid", memory_decay="coupled"), 123, (2, 4),
                  masked=True)
    # Data + sequence + model parallel training: batch x seq x model = 2 x 2 x 2: the
    # MoD block (top-k routing, router loss, causal delta with write strength: the
    # general delta path) of make_model().
    mesh = keras.distribution.DeviceMesh((2, 2, 2), ("batch", "seq", "model"), DEVICES)
    _, result = compare_training(SequenceParallel(mesh, layout_map=get_layout_map(mesh)),
                                 predict=False)
    RESULTS["seq_model_fit_2x2x2"] = result
    lap("seq_model_fit_2x2x2")


# ----------------------------------------------------------------------- compiled program
def collectives(text):
    counts = {}
    for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all",
               "reduce-scatter"):
        counts[op] = len(re.findall(rf"= [^=]*? {op}(?:-start)?\(", text))
    return counts


def largest_all_gather(text):
    """Elements of the largest all-gather result in the HLO text."""
    largest = 0
    for match in re.finditer(r"= \(?([a-z0-9]+)\[([0-9,]*)\][^=]*? all-gather(?:-start)?\(",
                             text):
        dims = [int(d) for d in match.group(2).split(",") if d]
        largest = max(largest, int(np.prod(dims)) if dims else 1)
    return largest


def compiled_train_step(update, length, shards, segment_len=64, heads=4, dim=32,
                        key_dim=8):
    """Compiled fwd+grad of one CompressiveMemory on a 1 x `shards` SequenceParallel mesh:
    (temp bytes per device, HLO text)."""
    mesh = keras.distribution.DeviceMesh((1, shards), ("batch", "seq"), DEVICES[:shards])
    distribution = SequenceParallel(mesh)
    with distribution.scope():
        layer = CompressiveMemory(dim, key_dim, key_dim, heads, segment_len, update=update,
                                  causal=True)
        layer.build((None, None, dim))
        values = [v.value for v in layer.trainable_variables]

        def loss_fn(values, x):
            outputs, _ = layer.stateless_call(values, [], x)
            return keras.ops.sum(keras.ops.square(outputs))

        layout = distribution.get_data_layout((1, length, dim)).backend_layout
        x = jax.ShapeDtypeStruct((1, length, dim), "float32", sharding=layout)
        compiled = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(values, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


if "hlo" in SECTIONS:
    LENGTH = 2048  # 32 segments of 64; the 64K/256K curves are in bench_distributed.py
    for update in ("delta",):
        one, _ = compiled_train_step(update, LENGTH, 1)
        eight, text = compiled_train_step(update, LENGTH, 8)
        RESULTS[f"hlo_{update}"] = {
            "temp_bytes_1": int(one),
            "temp_bytes_8": int(eight),
            "collectives_8": collectives(text),
            "largest_all_gather_8": largest_all_gather(text),
            "input_elements": LENGTH * 32,  # (1, LENGTH, dim=32)
        }
        lap(f"hlo_{update}")

RESULTS["seconds"] = TIMES
print("RESULTS " + json.dumps(RESULTS))
