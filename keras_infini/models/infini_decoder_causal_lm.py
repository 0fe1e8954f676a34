"""InfiniDecoderCausalLM: a converted keras-hub decoder (`InfiniDecoderBackbone`) as a
keras-hub `CausalLM`, with the source model's preprocessor and `InfiniCausalLM`'s
fixed-shape decode cache."""

import keras
from keras_hub.models import CausalLMPreprocessor

from keras_infini.models.infini_causal_lm import InfiniCausalLM
from keras_infini.models.infini_decoder import InfiniDecoderBackbone


@keras.saving.register_keras_serializable(package="keras_infini")
class InfiniDecoderCausalLM(InfiniCausalLM):
    """Next-token model on an `InfiniDecoderBackbone` (a converted Llama, Mistral, Qwen,
    Qwen3 or Gemma). Made by `InfiniCausalLM.from_causal_lm(source, segment_len=...)`;
    `generate`, samplers, presets and the decode cache are `InfiniCausalLM`'s. The
    preprocessor is the source's (any keras-hub `CausalLMPreprocessor`), so the
    tokenizer and its preset assets travel with the model.

    Args:
        backbone: an `InfiniDecoderBackbone`.
        preprocessor: a keras-hub `CausalLMPreprocessor` or None.
    """

    backbone_cls = InfiniDecoderBackbone
    preprocessor_cls = CausalLMPreprocessor

    def freeze_pretrained(self, trainable_layers=()):
        """Freezes the source model's weights (see
        `InfiniDecoderBackbone.freeze_pretrained`): only the memory's gates, write
        strengths and decays stay trainable. Call before `compile`."""
        return self.backbone.freeze_pretrained(trainable_layers)

    def memory_optimizer(self, learning_rate=1e-3, weight_decay=0.0, **kwargs):
        """An AdamW for fine-tuning a converted model: the gates are excluded from weight
        decay (their learning rate is scaled by the layers' `gate_lr_scale`, a
        reparametrisation that Adam turns into a per-parameter learning-rate scale)."""
        optimizer = keras.optimizers.AdamW(learning_rate=learning_rate,
                                           weight_decay=weight_decay, **kwargs)
        optimizer.exclude_from_weight_decay(var_names=["gate"])
        return optimizer
