"""Conversion of pretrained keras-hub decoders to Infini-attention (`InfiniDecoderBackbone`).

`convert_backbone(source, segment_len, **memory_options)` reads the source backbone's
architecture, builds the `InfiniDecoderBackbone` of the same family and sizes, and copies
every weight layer by layer (each shape checked). `convert_causal_lm` does the same for a
`CausalLM` (or a local preset directory) and keeps its preprocessor (tokenizer included).
"""

import keras
import keras_hub
import numpy as np

from keras_infini import validation
from keras_infini.models.infini_decoder import FAMILIES
from keras_infini.models.infini_decoder import MEMORY_OPTIONS
from keras_infini.models.infini_decoder import InfiniDecoderBackbone

# Source classes in the order they are tried (subclasses before their bases).
_SOURCES = (
    ("Llama3Backbone", "llama"),
    ("LlamaBackbone", "llama"),
    ("MistralBackbone", "mistral"),
    ("Qwen3Backbone", "qwen3"),
    ("QwenBackbone", "qwen"),
    ("GemmaBackbone", "gemma"),
)
SUPPORTED_BACKBONES = tuple(name for name, _ in _SOURCES)


def source_family(backbone):
    """The family name of a supported keras-hub backbone; a ValueError otherwise."""
    for name, family in _SOURCES:
        cls = getattr(keras_hub.models, name, None)
        if cls is not None and isinstance(backbone, cls):
            return family
    raise ValueError(
        f"Invalid backbone of class {type(backbone).__name__}: conversion to "
        f"Infini-attention supports {', '.join(SUPPORTED_BACKBONES)} (keras-hub "
        "backbones whose decoder blocks are pre-norm RMS norm + attention + gated MLP)."
    )


def _window(backbone, family):
    """The source's sliding attention window in tokens, or None (full causal)."""
    if family == "mistral":
        return backbone.sliding_window
    if family == "qwen":
        return backbone.sliding_window_size if backbone.use_sliding_window_attention \
            else None
    if family == "qwen3":
        return backbone.sliding_window_size
    if family == "gemma":
        return backbone.sliding_window_size if backbone.use_sliding_window_attention \
            else None
    return None


def source_config(backbone, segment_len):
    """`InfiniDecoderBackbone` arguments (without memory options) for `backbone`."""
    family = source_family(backbone)
    segment_len = validation.positive_int("segment_len", segment_len)
    window = _window(backbone, family)
    if window is not None and segment_len > window:
        raise ValueError(
            f"Invalid segment_len={segment_len} for {type(backbone).__name__} with a "
            f"sliding attention window of {window} tokens: a segment's local attention "
            f"would let a token see up to segment_len tokens, which the source never did. "
            f"Use segment_len <= {window}."
        )
    first = backbone.transformer_layers[0]
    config = dict(
        family=family,
        vocabulary_size=backbone.vocabulary_size,
        num_layers=backbone.num_layers,
        hidden_dim=backbone.hidden_dim,
        intermediate_dim=backbone.intermediate_dim,
        num_heads=backbone.num_query_heads,
        num_key_value_heads=backbone.num_key_value_heads,
        layer_norm_epsilon=backbone.layer_norm_epsilon,
        tie_weights=bool(backbone.token_embedding.tie_weights),
        dropout=float(getattr(backbone, "dropout", 0.0) or 0.0),
        segment_len=segment_len,
    )
    if family == "llama":
        config["head_dim"] = backbone.hidden_dim // backbone.num_query_heads
        config["rope"] = dict(
            max_wavelength=backbone.rope_max_wavelength,
            scaling_factor=backbone.rope_position_scaling_factor,
            llama_scaling=True,
            frequency_adjustment_factor=backbone.rope_frequency_adjustment_factor,
            low_freq_factor=backbone.rope_low_freq_factor,
            high_freq_factor=backbone.rope_high_freq_factor,
            pretraining_sequence_length=backbone.rope_pretraining_sequence_length,
        )
    elif family == "gemma":
        if backbone.attention_logit_soft_cap is not None:
            raise ValueError(
                f"Invalid backbone: GemmaBackbone(attention_logit_soft_cap="
                f"{backbone.attention_logit_soft_cap}) (Gemma 2) caps the attention logits, "
                "which the converted local attention does not do; only Gemma backbones "
                "without attention_logit_soft_cap convert."
            )
        config["intermediate_dim"] = backbone.intermediate_dim // 2  # GeGLU halves
        config["head_dim"] = backbone.head_dim
        config["rope"] = dict(max_wavelength=10000.0)  # keras-hub's Gemma attention
        config["post_attention_norm"] = bool(backbone.use_post_attention_norm)
        config["post_mlp_norm"] = bool(backbone.use_post_ffw_norm)
        config["final_logit_soft_cap"] = backbone.final_logit_soft_cap
    else:
        head_dim = getattr(backbone, "head_dim", None)
        config["head_dim"] = head_dim or backbone.hidden_dim // backbone.num_query_heads
        config["rope"] = dict(max_wavelength=backbone.rope_max_wavelength,
                              scaling_factor=backbone.rope_scaling_factor)
        config["qkv_bias"] = family == "qwen"
        config["query_key_norm"] = family == "qwen3"
        if family == "qwen3":  # Qwen3Attention's own epsilon, not the backbone's
            norm = first._self_attention_layer._query_dense_layer_norm
            config["query_key_norm_epsilon"] = float(norm.epsilon)
    return config


def _source_parts(block, family):
    """`{role: variable}` of one source decoder block."""
    if family == "gemma":
        attention = block.attention
        parts = {
            "attention_norm": block.pre_attention_norm.scale,
            "query": attention.query_dense.kernel,  # (h, D, hd)
            "key": attention.key_dense.kernel,
            "value": attention.value_dense.kernel,
            "output": attention.output_dense.kernel,  # (h, hd, D)
            "mlp_norm": block.pre_ffw_norm.scale,
            "mlp_gate": block.gating_ffw.kernel,
            "mlp_up": block.gating_ffw_2.kernel,
            "mlp_down": block.ffw_linear.kernel,
        }
        if block.use_post_attention_norm:
            parts["post_attention_norm"] = block.post_attention_norm.scale
        if block.use_post_ffw_norm:
            parts["post_mlp_norm"] = block.post_ffw_norm.scale
        return parts
    attention = block._self_attention_layer
    parts = {
        "attention_norm": block._self_attention_layernorm.scale,
        "query": attention._query_dense.kernel,  # (D, h, hd)
        "key": attention._key_dense.kernel,
        "value": attention._value_dense.kernel,
        "output": attention._output_dense.kernel,  # (h, hd, D)
        "mlp_norm": block._feedforward_layernorm.scale,
        "mlp_gate": block._feedforward_gate_dense.kernel,
        "mlp_up": block._feedforward_intermediate_dense.kernel,
        "mlp_down": block._feedforward_output_dense.kernel,
    }
    if family == "qwen":
        parts["query_bias"] = attention._query_dense.bias
        parts["key_bias"] = attention._key_dense.bias
        parts["value_bias"] = attention._value_dense.bias
    if family == "qwen3":
        parts["query_norm"] = attention._query_dense_layer_norm.scale
        parts["key_norm"] = attention._key_dense_layer_norm.scale
    return parts


def _target_parts(block):
    attention = block.attention
    parts = {
        "attention_norm": block.attention_norm.scale,
        "query": attention.query_dense.kernel,  # (D, h, hd)
        "key": attention.key_dense.kernel,
        "value": attention.value_dense.kernel,
        "output": attention.output_dense.kernel,
        "mlp_norm": block.mlp_norm.scale,
        "mlp_gate": block.mlp_gate.kernel,
        "mlp_up": block.mlp_up.kernel,
        "mlp_down": block.mlp_down.kernel,
    }
    if block.post_attention_norm is not None:
        parts["post_attention_norm"] = block.post_attention_norm.scale
    if block.post_mlp_norm is not None:
        parts["post_mlp_norm"] = block.post_mlp_norm.scale
    if attention.qkv_bias:
        parts["query_bias"] = attention.query_dense.bias
        parts["key_bias"] = attention.key_dense.bias
        parts["value_bias"] = attention.value_dense.bias
    if attention.query_norm is not None:
        parts["query_norm"] = attention.query_norm.scale
        parts["key_norm"] = attention.key_norm.scale
    return parts


def _assign(target, value, where):
    value = np.asarray(value)
    if tuple(target.shape) != value.shape:
        raise ValueError(
            f"Cannot convert {where}: the source weight has shape {value.shape}, the "
            f"converted model expects {tuple(target.shape)}."
        )
    target.assign(value.astype(keras.backend.standardize_dtype(target.dtype)))


def copy_weights(source, target):
    """Copies every weight of keras-hub `source` into `InfiniDecoderBackbone` `target`."""
    family = source_family(source)
    _assign(target.token_embedding.embeddings,
            keras.ops.convert_to_numpy(source.token_embedding.embeddings),
            "token_embedding/embeddings")
    if not source.token_embedding.tie_weights:
        _assign(target.token_embedding.reverse_embeddings,
                keras.ops.convert_to_numpy(source.token_embedding.reverse_embeddings),
                "token_embedding/reverse_embeddings")
    _assign(target.layer_norm.scale, keras.ops.convert_to_numpy(source.layer_norm.scale),
            "final norm")
    for i, (src, dst) in enumerate(zip(source.transformer_layers, target.transformer_layers)):
        src_parts, dst_parts = _source_parts(src, family), _target_parts(dst)
        if set(src_parts) != set(dst_parts):
            raise ValueError(
                f"Cannot convert block {i}: source weights {sorted(src_parts)} do not match "
                f"the converted block's {sorted(dst_parts)}."
            )
        for role, variable in src_parts.items():
            value = keras.ops.convert_to_numpy(variable)
            if family == "gemma" and role in ("query", "key", "value"):
                value = np.transpose(value, (1, 0, 2))  # (h, D, hd) -> (D, h, hd)
            _assign(dst_parts[role], value, f"block {i} {role}")


def _memory_options(options):
    unknown = sorted(set(options) - set(MEMORY_OPTIONS) - {"dtype", "name"})
    if unknown:
        raise ValueError(
            f"Invalid argument(s) {unknown} for a conversion: expected segment_len and "
            f"memory options among {MEMORY_OPTIONS} (and dtype, name)."
        )
    return options


def convert_backbone(backbone, segment_len, **options):
    """An `InfiniDecoderBackbone` with `backbone`'s architecture and weights.

    Args:
        backbone: a keras-hub `LlamaBackbone`, `Llama3Backbone`, `MistralBackbone`,
            `QwenBackbone`, `Qwen3Backbone` or `GemmaBackbone`.
        segment_len: tokens per memory segment (the source's context is a natural
            choice; at most its sliding window, if it has one).
        **options: memory options (see `MEMORY_DEFAULTS`: the recommended memory behind
            a gate exactly closed at 0), `dtype` (default the source's), `name`.
    """
    if not isinstance(backbone, keras_hub.models.Backbone):
        raise ValueError(
            f"Invalid backbone={backbone!r}: expected a keras-hub Backbone instance, one of "
            f"{', '.join(SUPPORTED_BACKBONES)}."
        )
    options = _memory_options(dict(options))
    config = source_config(backbone, segment_len)
    options.setdefault("dtype", backbone.dtype_policy)
    target = InfiniDecoderBackbone(**config, **options)
    copy_weights(backbone, target)
    return target


def convert_causal_lm(causal_lm, segment_len, **options):
    """An `InfiniDecoderCausalLM` from a keras-hub `CausalLM` of a supported family, or
    from a local preset directory of one (loaded with `keras_hub.models.CausalLM.
    from_preset`), keeping the source's preprocessor (tokenizer included)."""
    from keras_infini.models.infini_decoder_causal_lm import InfiniDecoderCausalLM

    if isinstance(causal_lm, str):
        causal_lm = keras_hub.models.CausalLM.from_preset(causal_lm)
    if not isinstance(causal_lm, keras_hub.models.CausalLM):
        raise ValueError(
            f"Invalid causal_lm={causal_lm!r}: expected a keras-hub CausalLM (Llama, "
            "Llama 3, Mistral, Qwen, Qwen3 or Gemma) or the path of a local preset "
            "directory of one."
        )
    backbone = convert_backbone(causal_lm.backbone, segment_len, **options)
    return InfiniDecoderCausalLM(backbone=backbone, preprocessor=causal_lm.preprocessor)


__all__ = ["FAMILIES", "SUPPORTED_BACKBONES", "convert_backbone", "convert_causal_lm"]
