"""LoRA fine-tuning of keras_infini blocks with Keras' built-in `enable_lora`.

`enable_lora(model, rank)` finds every keras_infini block inside `model` and calls
`layer.enable_lora(rank)` on its projections (Keras `EinsumDense` / `Dense`), which freezes
the projection kernel and adds trainable low-rank factors `lora_kernel_a`, `lora_kernel_b`
(`kernel + (alpha / rank) * a @ b`, `b` starts at zero so the model is unchanged at first).
By default every other weight of `model` is frozen too, so `fit` trains only the adapters.

For the attention projections (`kernel` `(dim_input, heads, dim_key)` for `query`/`key`,
`(dim_input, heads, dim_value)` for `value`, `(heads, dim_value, dim_input)` for `output`)
Keras makes `a` of shape `kernel.shape[:-1] + (rank,)` and `b` of shape
`(rank, kernel.shape[-1])`: a rank-`rank` update per head, with `b` shared by the heads.

keras-hub: on an `InfiniCausalLM` (or its backbone) this is also what
`backbone.enable_lora(rank)` does, and either way the backbone's `save_lora_weights` /
`load_lora_weights` store and restore the adapters alone.

Saving: Keras writes a LoRA-enabled projection's kernel with the adapters merged in, so a
saved model (`.keras` or `.weights.h5`) reloads with identical outputs as a plain model
without adapters; call `enable_lora` again on the loaded model to keep fine-tuning.
"""

import numbers

import keras

from keras_infini.layers.compressive_memory import CompressiveMemory
from keras_infini.layers.infini_transformer import InfiniTransformer
from keras_infini.layers.mod_infini_transformer import MoDInfiniTransformer

TARGETS = ("attention", "mlp", "router")


def _check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"Invalid rank={rank!r}: expected a positive integer.")
    return int(rank)


def _check_targets(targets):
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(
            f"Invalid targets={targets!r}: expected a non-empty subset of {TARGETS}."
        )
    return targets


def _all_layers(model_or_layer):
    """`model_or_layer` and every layer nested in it, each once."""
    layers, seen = [], set()
    for layer in model_or_layer._flatten_layers(include_self=True, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            layers.append(layer)
    return layers


def _dense_children(layer):
    """The `Dense` / `EinsumDense` layers directly inside `layer` (not inside its other
    sublayers), in tracking order: the projections `layer` owns, whatever their names."""
    return [sub for sub in layer._flatten_layers(include_self=False, recursive=False)
            if isinstance(sub, (keras.layers.Dense, keras.layers.EinsumDense))]


def _require_built(layer):
    if not layer.built:
        raise ValueError(
            f"Layer {layer.name!r} is not built: build the model (call it on data "
            "or create it from `keras.Input`) before enabling LoRA."
        )


def projections(model_or_layer, targets=("attention", "mlp")):
    """The `EinsumDense` / `Dense` projections of the keras_infini blocks, in model order,
    found by role, not by attribute name.

    Args:
        model_or_layer: a `keras.Model` or layer containing `CompressiveMemory`,
            `InfiniTransformer` or `MoDInfiniTransformer` layers (or one of them).
        targets: any of `"attention"` (the projections of every `CompressiveMemory`:
            query, key, value, output), `"mlp"` (the `Dense` / `EinsumDense` layers a block
            owns outside its attention, e.g. `mlp_in`, `mlp_out`) and `"router"` (those a
            `MoDInfiniTransformer` owns outside its inner block: the `Dense(1)` router).
    """
    targets = _check_targets(targets)
    found, seen = [], set()

    def add(layer):
        if layer is not None and id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)

    for layer in _all_layers(model_or_layer):
        if isinstance(layer, CompressiveMemory) and "attention" in targets:
            _require_built(layer)
            for dense in _dense_children(layer):
                add(dense)
        if isinstance(layer, MoDInfiniTransformer) and "router" in targets:
            _require_built(layer)
            for dense in _dense_children(layer):
                add(dense)
        if isinstance(layer, InfiniTransformer) and "mlp" in targets:
            _require_built(layer)
            for dense in _dense_children(layer):
                add(dense)

    return found


def _record_on_backbones(model_or_layer, layers, rank):
    """Lets keras-hub's `Backbone.save_lora_weights` / `load_lora_weights` find the
    adapters: each backbone inside `model_or_layer` records the indices of the LoRA layers
    in its list of layers with weights (keras-hub's `_lora_enabled_layers`)."""
    enabled = {id(layer) for layer in layers}
    for owner in _all_layers(model_or_layer):
        if not hasattr(owner, "save_lora_weights"):  # a keras_hub Backbone
            continue
        with_weights = [lyr for lyr in owner._flatten_layers(include_self=False)
                        if lyr.weights]
        indices = [i for i, lyr in enumerate(with_weights) if id(lyr) in enabled]
        if indices:
            owner._lora_enabled_layers = indices
            owner._lora_rank = rank


def enable_lora(model_or_layer, rank, targets=("attention", "mlp"), lora_alpha=None,
                freeze_others=True):
    """Enables LoRA on the projections of every keras_infini block in `model_or_layer`.

    Calls Keras' `enable_lora(rank, lora_alpha)` on each projection selected by `targets`
    (see `projections`): the projection's kernel is frozen and trainable factors
    `lora_kernel_a`, `lora_kernel_b` are added. With `freeze_others=True` (default) every
    other weight of `model_or_layer` (embeddings, heads, norms, biases, gates, gated
    activations' kernels, learnable initial state, ...) is frozen as well, so only the
    LoRA factors train; the trainable parameter count becomes
    `sum(prod(kernel.shape[:-1]) * rank + rank * kernel.shape[-1])` over the projections.

    Call it on a built model before `compile`. The `.keras` / `.weights.h5` files of a
    LoRA model hold the merged kernels (see the module docstring).

    Args:
        model_or_layer: a built `keras.Model` or layer containing keras_infini blocks.
        rank: LoRA rank, a positive int.
        targets: which projections: a subset of `("attention", "mlp", "router")`.
        lora_alpha: LoRA scale numerator (Keras' default: `rank`, i.e. scale 1).
        freeze_others: also freeze every other weight of `model_or_layer`.

    Returns:
        The list of layers on which LoRA was enabled.

    Raises:
        ValueError: for an invalid `rank` or `targets`, an unbuilt block, no projection
            found, or a projection that already has LoRA enabled.
    """
    rank = _check_rank(rank)
    layers = projections(model_or_layer, targets)
    if not layers:
        raise ValueError(
            f"No keras_infini projection found in {model_or_layer.name!r} for "
            f"targets={tuple(targets)!r}."
        )
    for layer in layers:
        if getattr(layer, "lora_enabled", False):
            raise ValueError(f"LoRA is already enabled on layer {layer.path!r}.")
    for layer in layers:
        layer.enable_lora(rank, lora_alpha=lora_alpha)
    if freeze_others:
        adapters = {id(v) for layer in layers for v in (layer.lora_kernel_a,
                                                        layer.lora_kernel_b)}
        for variable in model_or_layer.weights:
            if id(variable) not in adapters:
                variable.trainable = False
    _record_on_backbones(model_or_layer, layers, rank)
    return layers


def lora_parameter_count(layers):
    """Number of LoRA parameters `enable_lora` added to `layers` (its return value)."""
    count = 0
    for layer in layers:
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            size = 1
            for dim in variable.shape:
                size *= int(dim)
            count += size
    return count


__all__ = ["TARGETS", "enable_lora", "lora_parameter_count", "projections"]
