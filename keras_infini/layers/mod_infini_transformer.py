"""MoDInfiniTransformer: Mixture-of-Depths routing (arXiv 2404.02258) around an InfiniTransformer."""

import fractions
import inspect
import math
import numbers

import keras
from keras import ops

from keras.src.backend.common import stateless_scope

from keras_infini import distribution
from keras_infini import validation
from keras_infini.layers import _cache
from keras_infini.layers._cache import CachedCallMixin
from keras_infini.layers._outputs import StatefulOutputsMixin
from keras_infini.layers._weights import WeightArgsMixin
from keras_infini.layers.infini_transformer import InfiniTransformer
from keras_infini.layers.infini_transformer import named_positional_embedder
from keras_infini.ops import routing
from keras_infini.ops import segments as segment_ops
from keras_infini.layers._aliases import keras_hub_names


def segment_capacity(segment_len, sampling_factor):
    """`ceil(segment_len / sampling_factor)` computed exactly.

    The factor is read as the decimal the user wrote (`1.4` is 7/5), so
    `segment_capacity(21, 1.4) == 15`, where float division gives 16.
    """
    if isinstance(sampling_factor, numbers.Integral):
        factor = fractions.Fraction(int(sampling_factor))
    else:
        factor = fractions.Fraction(repr(float(sampling_factor)))
    return math.ceil(fractions.Fraction(segment_len) / factor)


_BLOCK_SUBLAYERS = (
    "attention",
    "attention_norm",
    "mlp_norm",
    "mlp_in",
    "mlp_activation",
    "mlp_out",
    "attention_dropout",
    "mlp_dropout",
)


BLOCK_OPTIONS = tuple(
    name
    for name in inspect.signature(InfiniTransformer.__init__).parameters
    if name not in ("self", "dim_input", "dim_hidden", "dim_key", "dim_value", "num_heads",
                    "activation", "segment_len", "return_state", "kwargs")
)
"""InfiniTransformer's options that `MoDInfiniTransformer` passes to its block unchanged."""


class _RouterLossMean(keras.metrics.Mean):
    """The router-loss running mean: a per-epoch log, not model state, so never saved."""

    def save_own_variables(self, store):
        pass

    def load_own_variables(self, store):
        pass


def _block_alias(name):
    def get(self):
        return getattr(self.block, name)

    get.__doc__ = f"`self.block.{name}` (read from the inner `InfiniTransformer`)."
    return property(get)


@keras.saving.register_keras_serializable(package="keras_infini")
class MoDInfiniTransformer(CachedCallMixin, StatefulOutputsMixin, WeightArgsMixin,
                           keras.layers.Layer):
    """Mixture-of-Depths `InfiniTransformer`: only `k` tokens per segment enter the block.

    Composition: a router (`Dense(1)`, attribute `router`) and an inner `InfiniTransformer`
    (attribute `block`, segment length `k`, positional embedder for the full
    `segment_len`). A router gives each token a logit `r`. In every
    segment of `segment_len` tokens, `k = ceil(segment_len / sampling_factor)` tokens are
    selected, gathered in their original order and run through the block (attention +
    MLP) with their original in-segment positions; a selected token's output is
    `x + sigmoid(r) * (block(x_sel) - x)` and every other token passes through unchanged
    (the `sigmoid(r)` factor gives the router a gradient from the main loss, MoD sec. 3.4).
    The inner `CompressiveMemory` uses segment length `k`; the positional embedder is
    built for `segment_len`.

    - Training: the `k` real tokens with the highest `r` per segment (masked and padding
      tokens never compete). A router loss, the binary cross-entropy from logits between
      `r` and the (stop-gradient) selection, averaged over real tokens and multiplied by
      `router_loss_weight`, is added with `add_loss`, so `model.fit` trains the router
      with no custom loop, and its running mean is logged by `fit` as `router_loss` (a
      `keras.metrics.Mean`, attribute `router_loss_tracker`; `loss` still includes it). On
      JAX, Keras' stateless `fit` step does not let a layer update a metric (Keras issues
      #19402, #21639): there the tracker is left untouched inside `fit`, so `router_loss`
      reads 0 in JAX `fit` logs (the loss itself is trained as on the other backends).
      `model.evaluate` runs in inference mode and therefore reports no router loss.
    - Inference: causal, first come first served: a token is routed iff `r > 0` and fewer
      than `k` earlier tokens of its segment were routed. Unused slots are masked, so any
      batch size works with static shapes.

    Args:
        dim_input, dim_hidden, dim_key, dim_value, num_heads, activation, segment_len:
            as in `InfiniTransformer`.
        sampling_factor: number in `(1, segment_len)`: a segment keeps
            `ceil(segment_len / sampling_factor)` tokens.
        return_state: as in `InfiniTransformer`.
        router_loss_weight: non-negative weight of the router loss.
        kernel_initializer: and `bias_initializer`, `kernel_regularizer`, `bias_regularizer`,
            `kernel_constraint`, `bias_constraint`: for every projection of the block and the
            router (see `InfiniTransformer`).
        update: and `causal`, `positional_embedder`, `init_state_learnable`, `dropout`,
            `normalize_first`, `layer_norm_epsilon`, `memory_feature_map`,
            `write_strength`, `gate_init`, `gate_lr_scale`, `memory_decay`: keyword arguments (`BLOCK_OPTIONS`)
            handed to the inner `InfiniTransformer` unchanged, with its defaults and checks
            (the positional embedder is built for the full `segment_len`).
        return_router_outputs: also return `selection` (float 0/1, the routing used) and
            `logits`, both `(batch * seq_len, 1)`.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, seq_len, dim_input)`.
        mask: optional `(batch, seq_len)` Keras mask; masked tokens are never routed.
        initial_state: optional `(memory, norm)` of the inner attention, for streaming.
        training: selects top-k routing (and the router loss) or causal routing.
        return_state: optional per-call override of the constructor's `return_state`.
        cache, cache_update_index: decode with a cache from `build_cache(batch_size)`
            (causal blocks; see `CompressiveMemory`): returns `(outputs, cache)`, equal to
            one full call on the whole sequence in inference mode. The inference routing
            is causal (a token's routing depends only on earlier tokens of its segment),
            so the cache holds, besides the inner block's cache (`"attention"`, one slot
            per routed token), the number of tokens of the current segment routed so far
            (`"routed"`). The top-k routing of training looks at the whole segment, so it
            has no cached form: a cached call always routes as inference does.

    Sublayers of the inner block are also reachable under their `InfiniTransformer` names
    (`attention`, `attention_norm`, `mlp_norm`, `mlp_in`, `mlp_activation`, `mlp_out`,
    `attention_dropout`, `mlp_dropout`); Keras saves their weights under those paths, as
    before the block was a separate sublayer, so older `.keras` / `.weights.h5` files load.

    Returns:
        `outputs`; with `return_router_outputs`, `(outputs, selection, logits)`; with
        `return_state` too, `(outputs, selection, logits, memory, norm)`; with only
        `return_state`, `(outputs, memory, norm)`.

    Example:

    >>> import keras
    >>> from keras_infini import MoDInfiniTransformer
    >>> block = MoDInfiniTransformer(32, 64, 8, 8, 4, "gelu", segment_len=16,
    ...                              sampling_factor=4, causal=True,
    ...                              positional_embedder="rope")
    >>> tuple(block(keras.random.normal((2, 40, 32))).shape)
    (2, 40, 32)
    """

    @keras_hub_names
    def __init__(
        self, dim_input, dim_hidden, dim_key, dim_value, num_heads, activation, segment_len,
        sampling_factor, return_state=False, router_loss_weight=1.0,
        return_router_outputs=False, **kwargs,
    ):
        kwargs = self.set_weight_args(kwargs, with_bias=True)
        # The block's own options (update, causal, dropout, memory options, ...) go to it
        # as they are: one signature and one set of checks, InfiniTransformer's.
        block_options = {name: kwargs.pop(name) for name in BLOCK_OPTIONS if name in kwargs}
        super().__init__(**kwargs)
        segment_len = validation.positive_int("segment_len", segment_len)
        self.segment_len = segment_len
        self.sampling_factor = validation.sampling_factor(sampling_factor, segment_len)
        self.capacity = segment_capacity(segment_len, sampling_factor)
        self.router_loss_weight = float(
            validation.non_negative_real("router_loss_weight", router_loss_weight)
        )
        self.return_router_outputs = validation.boolean(
            "return_router_outputs", return_router_outputs
        )
        self.return_state = validation.boolean("return_state", return_state)
        self._embedder_arg = block_options.pop("positional_embedder", None)
        self.supports_masking = True
        # The inner block sees `capacity` tokens per segment; its positional embedder is
        # resolved here for the full segment (positions are in-segment, 0..segment_len-1).
        embedder = named_positional_embedder(self._embedder_arg, dim_key, self.segment_len)
        self.block = InfiniTransformer(
            dim_input, dim_hidden, dim_key, dim_value, num_heads, activation, self.capacity,
            positional_embedder=embedder, return_state=True, dtype=self.dtype_policy,
            name="block", **block_options, **self.weight_kwargs(),
        )
        # The block only ever gets the in-segment positions of the routed tokens.
        self.block.attention._explicit_positions_below = self.segment_len
        self.router = keras.layers.Dense(
            1, dtype=self.dtype_policy, name="router", **self.weight_kwargs()
        )
        self.router_loss_tracker = _RouterLossMean(name="router_loss")

    def __dir__(self):
        # Keras' saver walks `dir(layer)` in sorted order and stores each object under the
        # first attribute name that reaches it. Hiding `block` keeps the weights under the
        # aliases above (`attention/...`, `mlp_in/...`), the paths files were written with
        # when this class subclassed InfiniTransformer. Every block sublayer with state must
        # be in `_BLOCK_SUBLAYERS` (checked by test_mod_infini_transformer).
        return [name for name in super().__dir__() if name != "block"]

    @property
    def memory_dim(self):
        """The memory's key width (`dim_key`, or the "dpfp*" / "taylor" feature width)."""
        return self.block.memory_dim

    @property
    def num_memory_heads(self):
        """Heads of the memory state (`num_key_value_heads` or `num_heads`)."""
        return self.block.num_memory_heads

    def build(self, input_shape):
        self.block.build(input_shape)
        self.router.build((None, None, self.dim_input))
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: self.dim_input})
        self.built = True

    def call(self, inputs, mask=None, initial_state=None, training=None, return_state=None,
             cache=None, cache_update_index=None):
        if cache is not None:
            return self._cached_call(inputs, mask, cache, cache_update_index, None,
                                     initial_state, return_state)
        mask = validation.sequence_tensor("mask", mask, inputs)
        initial_state = validation.state(
            initial_state, inputs, self.num_memory_heads, self.memory_dim, self.dim_value
        )
        seg, k = self.segment_len, self.capacity
        if not keras.backend.is_float_dtype(keras.backend.standardize_dtype(inputs.dtype)):
            inputs = ops.cast(inputs, self.compute_dtype)  # integer inputs, as in attention
        length = segment_ops.static_or_dynamic_dim(inputs, 1)
        if isinstance(length, int) and length < seg:
            # One short segment: the same routing as padding it to `segment_len` (padding
            # never competes), with work bounded by the real length.
            seg, k = max(length, 1), min(k, max(length, 1))

        # Masked tokens enter nothing (router, block, gradients) whatever their value: they
        # are selected away at the source and pass through to the output unchanged.
        clean = inputs
        if mask is not None:
            keep = ops.cast(mask, "bool")[..., None]
            clean = ops.where(keep, inputs, ops.zeros_like(inputs))
        logits = self.router(clean)  # (b, L, 1)
        # Under SequenceParallel: whole segments per device (see CompressiveMemory).
        sequence = distribution.sequence_sharding()
        unit = seg * distribution.sequence_multiple(sequence)

        def segments(t):  # (b, L, ...) -> (b, n, S, ...), n % shards == 0
            t = segment_ops.pad_to_segments(t, unit)
            return distribution.constrain_segments(segment_ops.fold(t, seg), sequence)

        valid = segments(segment_ops.valid_tokens(inputs, mask, unit))  # already padded
        x = segments(clean)  # (b, n, S, D)
        r = segments(logits[..., 0])

        if training:
            indices, slot_valid = routing.top_k_selection(r, valid, k)
        else:
            indices, slot_valid = routing.causal_selection(r, valid, k)
        selected = routing.selection_mask(indices, slot_valid, seg)  # (b, n, S) float32

        x_sel = routing.gather_slots(x, indices)  # (b, n, k, D)
        r_sel = routing.gather_slots(r, indices)  # (b, n, k)
        y_sel, memory, norm = self.block(
            segment_ops.unfold(x_sel),
            mask=segment_ops.unfold(slot_valid > 0),
            positions=segment_ops.unfold(indices),
            initial_state=initial_state,
            training=training,
        )
        y_sel = segment_ops.fold(y_sel, k)
        # Unused slots may hold a masked token (any value): selected away, not multiplied.
        used = (slot_valid > 0)[..., None]
        update = ops.where(used, ops.sigmoid(r_sel)[..., None] * (y_sel - x_sel), 0.0)
        outputs = x + routing.scatter_slots(update, indices, selected)
        outputs = segment_ops.trim(segment_ops.unfold(outputs), length)
        if mask is not None:
            outputs = ops.where(keep, outputs, inputs)

        selection = segment_ops.trim(segment_ops.unfold(selected), length)  # (b, L)
        if training and self.router_loss_weight > 0:
            loss = self.router_loss(logits[..., 0], selection, mask)
            self.add_loss(loss)
            self._track_router_loss(loss)

        extras = []
        if self.return_router_outputs:
            if mask is not None:  # report the router's logit of every token, masked too
                logits = self.router(inputs)
            extras = [ops.reshape(selection, (-1, 1)), ops.reshape(logits, (-1, 1))]
        return self.pack_outputs(outputs, extras, memory, norm, return_state)

    # ------------------------------------------------------------------ decode cache
    def cache_shapes(self, batch_size):
        """`{name: shape}` of the cache `build_cache(batch_size)` returns."""
        return {"attention": self.block.cache_shapes(batch_size), "routed": (batch_size,)}

    def cache_dtypes(self):
        """`{name: dtype}` of the cache `build_cache` returns."""
        return {"attention": self.block.cache_dtypes(), "routed": "int32"}

    def build_cache(self, batch_size):
        """An empty decode cache for `batch_size` rows: the inner block's (one slot per
        routed token of the current segment) and `routed` `(b,)` int32, the number of
        tokens of the current segment routed so far."""
        batch_size = validation.positive_int("batch_size", batch_size)
        self._require_causal()
        self._ensure_built()
        return {
            "attention": self.block.build_cache(batch_size),
            "routed": ops.zeros((batch_size,), "int32"),
        }

    def _cached_call(self, inputs, mask, cache, cache_update_index, positions=None,
                     initial_state=None, return_state=None):
        index, mask, cache = self._check_cache_call(
            inputs, cache, cache_update_index, positions, initial_state, return_state, mask
        )
        # The compute dtype, as the full call (whose inputs Keras casts): float32 inputs
        # under a mixed policy too (`CachedCallMixin` turns Keras' casting off).
        inputs = ops.cast(inputs, self.compute_dtype)
        length = int(inputs.shape[1])
        if length == 0:
            return ops.cast(inputs, self.compute_dtype), cache
        consumed = _cache.consumed_tokens(inputs, mask)
        _cache.check_cache_position(index, cache["attention"]["length"], consumed[:, 0])
        x = ops.where(consumed[..., None], inputs, ops.zeros_like(inputs))
        seg = self.segment_len
        head = length if not isinstance(index, int) else min(length, (-index) % seg)
        outputs = []
        for t in range(head):
            y, cache = self._decode_step(
                x[:, t:t + 1], cache, consumed[:, t],
                _cache.position_in_segment(index, t, seg),
            )
            outputs.append(y)
        if head < length:
            y, cache = self._prefill(x[:, head:], consumed[:, head:], cache)
            outputs.append(y)
        outputs = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=1)
        # Rows that do not take a token pass it through, as masked tokens do.
        return ops.where(consumed[..., None], outputs, inputs), cache

    def _decode_step(self, x, cache, take, position):
        """One token `x` `(b, 1, D)` at in-segment `position`, routed causally: iff its
        router logit is positive and fewer than `capacity` tokens of its segment were
        routed before it (`routing.causal_selection`, one token at a time)."""
        seg, k = self.segment_len, self.capacity
        take = ops.cast(take, "bool")
        logits = self.router(x)  # (b, 1, 1)
        r = ops.cast(logits[:, 0, 0], "float32")
        routed_before = cache["routed"]
        routed = ops.logical_and(ops.logical_and(r > 0, take), routed_before < k)
        fold_now = ops.logical_and(
            ops.broadcast_to(ops.convert_to_tensor(position == seg - 1), ops.shape(take)),
            take,
        )
        y, attention = self.block._decode_step(
            x, cache["attention"], take, routed, routed_before, position, fold_now
        )
        update = ops.sigmoid(logits) * (y - x)
        outputs = x + ops.where(routed[:, None, None], update, ops.zeros_like(update))
        count = routed_before + ops.cast(routed, "int32")
        count = ops.where(fold_now, ops.zeros_like(count), count)
        return outputs, {"attention": attention, "routed": count}

    def _prefill(self, x, consumed, cache):
        """Several tokens from a segment boundary: the inference routing of `call` on
        whole segments, the inner block's `_prefill` on the routed slots."""
        seg, k = self.segment_len, self.capacity
        length = int(x.shape[1])
        n = _cache.segments_for_prefill(length, seg)
        count = ops.sum(ops.cast(consumed, "int32"), axis=1)
        stop = count // seg
        logits = self.router(x)  # (b, T, 1)
        valid = segment_ops.fold(
            ops.cast(_cache.pad_tokens(consumed, n * seg, False), "float32"), seg
        )
        xf = segment_ops.fold(_cache.pad_tokens(x, n * seg), seg)  # (b, n, S, D)
        r = segment_ops.fold(_cache.pad_tokens(logits[..., 0], n * seg), seg)
        indices, slot_valid = routing.causal_selection(r, valid, k)
        selected = routing.selection_mask(indices, slot_valid, seg)
        x_sel = routing.gather_slots(xf, indices)  # (b, n, k, D)
        r_sel = routing.gather_slots(r, indices)
        y_sel, attention = self.block._prefill(
            segment_ops.unfold(x_sel), segment_ops.unfold(slot_valid > 0),
            segment_ops.unfold(indices), stop, count, cache["attention"],
        )
        y_sel = segment_ops.fold(y_sel, k)
        used = (slot_valid > 0)[..., None]
        update = ops.where(used, ops.sigmoid(r_sel)[..., None] * (y_sel - x_sel), 0.0)
        outputs = xf + routing.scatter_slots(update, indices, selected)
        outputs = segment_ops.unfold(outputs)[:, :length]
        routed_now = ops.take_along_axis(
            ops.sum(ops.cast(slot_valid > 0, "int32"), axis=-1), stop[:, None], axis=1
        )[:, 0]
        routed = ops.where(count > 0, routed_now, cache["routed"])
        return outputs, {"attention": attention, "routed": routed}

    def _prefill_segment(self, x, consumed, cache):
        """One segment from a segment boundary (the chunked prefill's step): `x`
        `(b, S, D)`, `consumed` bool `(b, S)` (a prefix per row). The inference routing of
        `call` on the segment, the inner block's `_prefill_segment` on the routed slots;
        a row that consumes the whole segment folds it. Returns `(outputs, cache)`."""
        seg, k = self.segment_len, self.capacity
        x = ops.cast(x, self.compute_dtype)
        x = ops.where(consumed[..., None], x, ops.zeros_like(x))
        count = ops.sum(ops.cast(consumed, "int32"), axis=1)
        fold = count == seg
        logits = self.router(x)  # (b, S, 1)
        valid = ops.cast(consumed, "float32")[:, None]  # (b, 1, S)
        xf, r = x[:, None], logits[..., 0][:, None]
        indices, slot_valid = routing.causal_selection(r, valid, k)  # (b, 1, k)
        selected = routing.selection_mask(indices, slot_valid, seg)
        x_sel = routing.gather_slots(xf, indices)  # (b, 1, k, D)
        r_sel = routing.gather_slots(r, indices)
        y_sel, attention = self.block._prefill_segment(
            x_sel[:, 0], slot_valid[:, 0] > 0, cache["attention"], positions=indices[:, 0],
            count=count, fold=fold,
        )
        used = (slot_valid > 0)[..., None]
        update = ops.where(used, ops.sigmoid(r_sel)[..., None] * (y_sel[:, None] - x_sel),
                           0.0)
        outputs = (xf + routing.scatter_slots(update, indices, selected))[:, 0]
        routed_now = ops.sum(ops.cast(slot_valid[:, 0] > 0, "int32"), axis=-1)
        routed = ops.where(fold, ops.zeros_like(routed_now), routed_now)
        routed = ops.where(count > 0, routed, cache["routed"])
        outputs = ops.where(consumed[..., None], outputs, x)
        return outputs, {"attention": attention, "routed": routed}

    def _track_router_loss(self, loss):
        """Updates `router_loss_tracker` unless its state is out of reach: inside JAX's
        stateless `fit` step, Keras maps only model variables while `call` runs."""
        scope = stateless_scope.get_stateless_scope()
        if scope is not None and scope.get_current_value(self.router_loss_tracker.total) is None:
            return
        self.router_loss_tracker.update_state(loss)

    def router_loss(self, logits, selection, mask=None):
        """Mean BCE-from-logits over real tokens between `logits` and the selection."""
        logits = ops.cast(logits, "float32")
        target = ops.stop_gradient(ops.cast(selection, "float32"))
        # Stable BCE from logits: max(r, 0) - r * y + log(1 + exp(-|r|)).
        bce = ops.relu(logits) - logits * target + ops.log1p(ops.exp(-ops.abs(logits)))
        # Mean over real tokens; an empty batch (or all tokens masked) gives 0, not 0/0.
        # Masked tokens are selected away (their logit may be NaN), not multiplied by 0.
        if mask is None:
            total, count = ops.sum(bce), ops.cast(ops.size(bce), "float32")
        else:
            keep = ops.cast(mask, "bool")
            total = ops.sum(ops.where(keep, bce, ops.zeros_like(bce)))
            count = ops.sum(ops.cast(keep, "float32"))
        loss = total / ops.maximum(count, 1.0)
        return self.router_loss_weight * loss

    def extra_output_specs(self, input_shape):
        if not self.return_router_outputs:
            return []
        b, length = input_shape[0], input_shape[1]
        flat = None if b is None or length is None else b * length
        return [((flat, 1), "float32"), ((flat, 1), self.compute_dtype)]

    def get_config(self):
        config = super().get_config()
        config.update(self.weight_config())
        block = self.block.get_config()
        for key in ("dim_input", "dim_hidden", "dim_key", "dim_value", "num_heads",
                    "activation") + BLOCK_OPTIONS:
            config[key] = block[key]
        config.update(
            {
                "segment_len": self.segment_len,
                "sampling_factor": self.sampling_factor,
                "positional_embedder": self.embedder_config(),
                "return_state": self.return_state,
                "router_loss_weight": self.router_loss_weight,
                "return_router_outputs": self.return_router_outputs,
            }
        )
        return config


# The block's arguments, read back from it (one source of truth), and its sublayers under
# their InfiniTransformer names (see `__dir__`).
for _name in (
    "dim_input", "dim_hidden", "dim_key", "dim_value", "num_heads", "activation", "update",
    "causal", "init_state_learnable", "dropout", "normalize_first", "layer_norm_epsilon",
) + _BLOCK_SUBLAYERS:
    setattr(MoDInfiniTransformer, _name, _block_alias(_name))
del _name
