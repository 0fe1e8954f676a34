"""Model and sequence (context) parallelism through `keras.distribution`.

Two pieces, both plain Keras distribution objects:

- `get_layout_map(device_mesh, model_dim="model", batch_dim="batch")`: a
  `keras.distribution.LayoutMap` for every weight of every keras_infini layer (and the
  Keras `Embedding` / `Dense` / `LayerNormalization` a language model wraps around
  them), for `keras.distribution.ModelParallel`. Attention projections are sharded on
  heads, the MLP on its hidden axis, embeddings on the model width; gates, initial
  states, norms, the MoD router and the scalar activation parameters are replicated.
- `SequenceParallel(device_mesh, layout_map=None, batch_dim="batch", seq_dim="seq")`: a
  `ModelParallel` distribution that also splits the *sequence* axis of the data over the
  mesh axis `seq_dim`. Inside every `CompressiveMemory` (and `MoDInfiniTransformer`) the
  folded segment axis carries a sharding constraint on that axis, so each device holds
  the activations of its own segments only; the memory states that cross devices are
  exchanged as per-device summaries (see `keras_infini.ops.memory`, "Sequence
  sharding"). JAX only: Keras' distribution API runs on JAX, and the summaries'
  exchange is a JAX `shard_map`.

The layers read the active distribution with `sequence_sharding()`: nothing changes in
a model's code or config between one device and many.
"""

import collections
import contextlib

import keras

from keras_infini import validation

# --------------------------------------------------------------------------- layout map
# (variable path regex, axes by role). Regexes are matched with `re.fullmatch` against
# `variable.path` (e.g. "infini_transformer/attention/query/kernel"); each path must
# match at most one of them (Keras' LayoutMap raises otherwise). "model" marks the axis
# sharded over `model_dim`; `()` is replicated whatever the rank (a JAX PartitionSpec
# shorter than the array leaves the remaining axes unsharded).
_PREFIX = r"(?:.*/)?"
_RULES = (
    # CompressiveMemory: projections on heads (query/key/value (D, h, k); output (h, v, D)).
    (_PREFIX + r"(?:query|key|value)/kernel", (None, "model", None)),
    (_PREFIX + r"output/kernel", ("model", None, None)),
    # Write strength (D, h) and its bias (h,): per head, like the projections.
    (_PREFIX + r"write_strength/kernel", (None, "model")),
    (_PREFIX + r"write_strength/bias", ("model",)),
    # Memory decay (D, h) and its per-head rate and bias (h,).
    (_PREFIX + r"decay/kernel", (None, "model")),
    (_PREFIX + r"decay_(?:log_rate|bias)", ("model",)),
    # InfiniTransformer MLP: in on the hidden axis (columns), out on its rows.
    (_PREFIX + r"mlp_in/kernel", (None, "model")),
    (_PREFIX + r"mlp_in/bias", ("model",)),
    (_PREFIX + r"mlp_out/kernel", ("model", None)),
    # Converted keras-hub decoders (InfiniDecoderBlock): gated MLP, gate/up on the hidden
    # axis, down on its rows; Qwen's q/k/v biases (h, k) on heads.
    (_PREFIX + r"mlp_(?:gate|up)/kernel", (None, "model")),
    (_PREFIX + r"mlp_down/kernel", ("model", None)),
    (_PREFIX + r"(?:query|key|value)/bias", ("model", None)),
    # Gated activations at width dim_hidden: their kernels are sharded on the dim_hidden
    # input axis (the FFN* inner width ceil(2 d / 3) rarely divides), `kernel_out`
    # (inner, hidden) on its hidden output axis.
    (_PREFIX + r"mlp_activation/kernel_(?:gate|value)", ("model", None)),
    (_PREFIX + r"mlp_activation/kernel_out", (None, "model")),
    # Embeddings (vocab, D) on the width (every model width divides; vocabularies often
    # do not), and an unnamed Keras Dense (`dense`, `dense_3`: a language-model head
    # `(D, vocab)`) on its output axis.
    (_PREFIX + r"embeddings", (None, "model")),
    # keras-hub's untied ReversibleEmbedding output matrix (D, vocab): on the width too.
    (_PREFIX + r"reverse_embeddings", ("model", None)),
    (_PREFIX + r"dense(?:_\d+)?/kernel", (None, "model")),
    (_PREFIX + r"dense(?:_\d+)?/bias", ("model",)),
    # Replicated: gates (h,), initial memory/normaliser, the MoD router Dense(1) (its
    # output axis cannot split), norms (gamma/beta), activation biases and scalars, the
    # MLP output bias (D,).
    (
        _PREFIX
        + r"(?:gate|initial_memory|initial_norm|router/kernel|router/bias|gamma|beta|scale"
        r"|mlp_out/bias|mlp_activation/bias_(?:gate|value))",
        (),
    ),
)


def _check_mesh(device_mesh):
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            f"Invalid device_mesh={device_mesh!r}: expected a keras.distribution.DeviceMesh."
        )
    return device_mesh


def _check_axis(name, value, device_mesh, allow_none=False):
    """A mesh axis name (`validation.choice` over the mesh's axis names)."""
    if value is None and allow_none:
        return None
    return validation.choice(name, value, tuple(device_mesh.axis_names))


def get_layout_map(device_mesh, model_dim="model", batch_dim="batch"):
    """A `keras.distribution.LayoutMap` for every keras_infini weight, for `ModelParallel`.

    Shards the weights that grow with the model over the mesh axis `model_dim`:

    | weight (path ends with) | shape | layout |
    |---|---|---|
    | `query/kernel`, `key/kernel`, `value/kernel` | `(D, h, k)` | `(None, model, None)` |
    | `output/kernel` | `(h, v, D)` | `(model, None, None)` |
    | `write_strength/kernel`, `/bias` | `(D, h)`, `(h,)` | `(None, model)`, `(model,)` |
    | `decay/kernel`; `decay_log_rate`, `decay_bias` | `(D, h)`; `(h,)` | `(None, model)`; `(model,)` |
    | `mlp_in/kernel`, `/bias` | `(D, F)`, `(F,)` | `(None, model)`, `(model,)` |
    | `mlp_out/kernel` | `(F, D)` | `(model, None)` |
    | `mlp_activation/kernel_gate`, `kernel_value` | `(F, F or ceil(2F/3))` | `(model, None)` |
    | `mlp_activation/kernel_out` | `(ceil(2F/3), F)` | `(None, model)` |
    | `embeddings` (Keras `Embedding`) | `(vocab, D)` | `(None, model)` |
    | `dense*/kernel`, `/bias` (unnamed Keras `Dense`) | `(D, V)`, `(V,)` | `(None, model)`, `(model,)` |
    | everything else named here | | replicated |

    Replicated: `gate`, `initial_memory`, `initial_norm`, `router/*` (MoD's `Dense(1)`),
    `gamma`, `beta` (norms, activation scalars), `mlp_out/bias`, the activation biases.

    So `num_heads`, `dim_hidden`, the embedding width and an unnamed `Dense`'s units
    must divide by the size of `model_dim` (Keras refuses an axis that does not split).
    Name a head whose units do not divide (e.g. `Dense(1, name="score")`) to keep it
    replicated. Any other weight (LoRA factors, your own layers) is replicated unless
    you add a key. Weights are not sharded over `batch_dim` (no FSDP); it is checked so
    a misspelt axis fails here.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        model_dim: the mesh axis to shard weights over, or `None` to replicate every
            weight (data or sequence parallelism only).
        batch_dim: the mesh axis of the data (the distribution's `batch_dim_name`),
            or `None`.

    Returns:
        A `keras.distribution.LayoutMap`; pass it to `ModelParallel(layout_map=...)` or
        `SequenceParallel(..., layout_map=...)`, and add your own keys to it.

    Raises:
        ValueError: `device_mesh` is not a `DeviceMesh`, or `model_dim` / `batch_dim`
            is not one of its axis names.
    """
    device_mesh = _check_mesh(device_mesh)
    model_dim = _check_axis("model_dim", model_dim, device_mesh, allow_none=True)
    _check_axis("batch_dim", batch_dim, device_mesh, allow_none=True)
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in _RULES:
        layout_map[pattern] = tuple(model_dim if axis == "model" else None for axis in axes)
    return layout_map


# --------------------------------------------------------------------------- sequence
SequenceSharding = collections.namedtuple(
    "SequenceSharding", ["device_mesh", "batch_dim", "seq_dim", "size"]
)
SequenceSharding.__doc__ = """What a layer needs to shard its segments: the Keras
`device_mesh`, its data axis `batch_dim` (or None), its sequence axis `seq_dim` and that
axis' `size` (the number of sequence shards)."""

SUPPORTED_BACKENDS = ("jax",)


def _check_backend():
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"Invalid backend={backend!r} for SequenceParallel: sequence parallelism runs "
            f"on {SUPPORTED_BACKENDS} only (Keras' distribution API and the JAX shard_map "
            "that exchanges the memory summaries). On TensorFlow and PyTorch use data "
            "parallelism (README, 'Scaling out')."
        )


class SequenceParallel(keras.distribution.ModelParallel):
    """Data + sequence (context) parallelism, optionally with model-parallel weights.

    The mesh has a data axis `batch_dim` and a sequence axis `seq_dim` (and optionally
    a model axis used by `layout_map`). Input data of rank >= 2 is split over both: axis
    0 over `batch_dim` and axis 1 (the sequence) over `seq_dim`. Every
    `CompressiveMemory` pads its input to a multiple of `segment_len * size` tokens
    (`size` = the `seq_dim` axis size; the padding is masked and trimmed, as for any
    length) and constrains its folded `(batch, segments, segment_len, ...)` tensors to
    `(batch_dim, seq_dim)`: local attention never leaves a device, and the memory state
    before each segment is an exclusive prefix over the device's own segments plus the
    incoming state composed from the other devices' per-device summaries (`linear`: sums
    of `phi(K)^T V`; `delta`: the affine maps `M -> A M + B` of each device's segments).
    Results equal the single-device run to float32 rounding.

    Lengths: give data whose length is a multiple of `segment_len * size` to keep every
    activation on its device. A length that is not a multiple of `size` cannot be split
    on input: that data axis is then left unsplit over `seq_dim` (each device gets the
    whole sequence of its batch rows until the first CompressiveMemory reshards it), and
    a length that is a multiple of `size` but not of `segment_len * size` is padded
    inside the layers (a reshuffle of activations between devices). Both work and give
    the same results.

    `group_tokens` is not used under sequence parallelism: each device runs its own
    segments in one batch (its working set is `L / size` tokens).

    JAX only: constructing it on another backend raises a `ValueError` naming the backend.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with axes `batch_dim` and
            `seq_dim` (e.g. `DeviceMesh((2, 4), ("batch", "seq"))`, or
            `(2, 2, 2), ("batch", "seq", "model")` with a `get_layout_map(mesh)`).
        layout_map: optional `LayoutMap` for the weights (default: every weight
            replicated), e.g. `get_layout_map(device_mesh)` when the mesh has a model axis.
        batch_dim: the data axis name.
        seq_dim: the sequence axis name.
        auto_shard_dataset: as in `keras.distribution.ModelParallel`.

    Example (JAX, 8 devices):

        mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "seq"))
        keras.distribution.set_distribution(SequenceParallel(mesh))
        model = make_model()     # after set_distribution
        model.fit(tokens, targets, batch_size=2)   # tokens (N, L), L % (4 * segment_len) == 0
    """

    def __init__(self, device_mesh, layout_map=None, batch_dim="batch", seq_dim="seq",
                 auto_shard_dataset=True):
        _check_backend()
        device_mesh = _check_mesh(device_mesh)
        batch_dim = _check_axis("batch_dim", batch_dim, device_mesh)
        seq_dim = _check_axis("seq_dim", seq_dim, device_mesh)
        if seq_dim == batch_dim:
            raise ValueError(
                f"Invalid seq_dim={seq_dim!r}: expected a mesh axis other than "
                f"batch_dim={batch_dim!r}."
            )
        if layout_map is None:
            layout_map = keras.distribution.LayoutMap(device_mesh)
        elif not isinstance(layout_map, keras.distribution.LayoutMap):
            raise ValueError(
                f"Invalid layout_map={layout_map!r}: expected None or a "
                "keras.distribution.LayoutMap (e.g. get_layout_map(device_mesh))."
            )
        elif layout_map.device_mesh is not device_mesh:
            raise ValueError(
                "Invalid layout_map: it was made for another device mesh "
                f"({layout_map.device_mesh}); expected one for device_mesh={device_mesh}."
            )
        for key in layout_map:
            if seq_dim in layout_map[key].axes:
                raise ValueError(
                    f"Invalid layout_map: key {key!r} shards a weight over seq_dim="
                    f"{seq_dim!r}; weights are replicated over the sequence axis."
                )
        super().__init__(
            layout_map=layout_map, batch_dim_name=batch_dim,
            auto_shard_dataset=auto_shard_dataset,
        )
        self._seq_dim = seq_dim

    @property
    def seq_dim(self):
        return self._seq_dim

    @property
    def sequence_shards(self):
        """The size of the `seq_dim` mesh axis."""
        mesh = self.device_mesh
        return int(mesh.shape[list(mesh.axis_names).index(self._seq_dim)])

    def get_data_layout(self, data_shape):
        axes = [None] * len(data_shape)
        axes[0] = self.batch_dim_name
        if len(data_shape) >= 2 and data_shape[1] is not None:
            if int(data_shape[1]) % self.sequence_shards == 0:
                axes[1] = self._seq_dim
        return keras.distribution.TensorLayout(axes, self.device_mesh)


_UNSHARDED = [0]  # depth of `unsharded()` scopes in progress


@contextlib.contextmanager
def unsharded():
    """A scope in which the layers do not shard the sequence (`sequence_sharding()` is
    None) under a `SequenceParallel`: the decode cache's calls run in it. A cached call
    has one current segment (and a prefill a handful), which cannot be split over the
    sequence axis; its tensors are small and, like the weights, left to the data layout
    (batch axis) and the layout map."""
    _UNSHARDED[0] += 1
    try:
        yield
    finally:
        _UNSHARDED[0] -= 1


def sequence_sharding():
    """The active `SequenceParallel`'s `SequenceSharding`, or `None` (no distribution,
    another distribution, or inside `unsharded()`, e.g. a decode-cache call)."""
    if _UNSHARDED[0]:
        return None
    return _active_sequence_sharding()


def _active_sequence_sharding():
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, SequenceParallel):
        return None
    return SequenceSharding(
        distribution.device_mesh,
        distribution.batch_dim_name,
        distribution.seq_dim,
        distribution.sequence_shards,
    )


def sequence_multiple(sequence):
    """How many segments a sharded call's segment count must be a multiple of."""
    return 1 if sequence is None else sequence.size


def constrain_segments(tensor, sequence):
    """`tensor` `(batch, segments, ...)` constrained to `(batch_dim, seq_dim, None...)`
    on `sequence`'s mesh (through `keras.distribution.distribute_tensor`); unchanged when
    `sequence` is None."""
    if sequence is None:
        return tensor
    axes = [sequence.batch_dim, sequence.seq_dim] + [None] * (len(tensor.shape) - 2)
    batch = tensor.shape[0]
    mesh = sequence.device_mesh
    batch_size = int(mesh.shape[list(mesh.axis_names).index(sequence.batch_dim)])
    if batch is None or int(batch) % batch_size:
        axes[0] = None  # a batch that does not split (e.g. batch 1 in a streaming call)
    layout = keras.distribution.TensorLayout(axes, mesh)
    return keras.distribution.distribute_tensor(tensor, layout)
