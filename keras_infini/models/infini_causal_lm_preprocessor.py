"""InfiniCausalLMPreprocessor: keras-hub's CausalLMPreprocessor with the byte tokenizer."""

import keras
import numpy as np
from keras_hub.models import CausalLMPreprocessor

from keras_infini.models.infini_backbone import InfiniBackbone
from keras_infini.models.infini_tokenizer import InfiniByteTokenizer
from keras_infini.ops import backend as fast_paths


@keras.saving.register_keras_serializable(package="keras_infini")
class InfiniCausalLMPreprocessor(CausalLMPreprocessor):
    """Strings -> `{"token_ids", "padding_mask"}` (start token, bytes, end token, padding
    to `sequence_length`), labels and sample weights for `fit`; for `generate`, the
    prompt right-padded to `max_length`. A prompt longer than `max_length` is refused
    (keras-hub would cut it silently).

    Example: `InfiniCausalLMPreprocessor(InfiniByteTokenizer(), sequence_length=256)`.
    """

    backbone_cls = InfiniBackbone
    tokenizer_cls = InfiniByteTokenizer

    def generate_preprocess(self, x, sequence_length=None):
        limit = sequence_length or self.sequence_length
        tokens = self.tokenizer(x)
        lengths = None
        if hasattr(tokens, "row_lengths") and not fast_paths.is_traced(tokens):
            try:
                lengths = np.asarray(tokens.row_lengths())
            except (AttributeError, TypeError, ValueError):
                lengths = None
        elif isinstance(tokens, (list, tuple)):
            rows = tokens if tokens and isinstance(tokens[0], (list, tuple)) else [tokens]
            lengths = np.array([len(row) for row in rows])
        elif hasattr(tokens, "shape") and len(tokens.shape) in (1, 2):
            lengths = np.array([tokens.shape[-1]])
        if lengths is not None and lengths.size and int(lengths.max()) + 1 > limit:
            raise ValueError(
                f"Invalid prompt of {int(lengths.max())} tokens (plus the start token) for "
                f"max_length={limit}: the prompt must fit in max_length; pass a larger "
                "max_length or a shorter prompt."
            )
        return super().generate_preprocess(x, sequence_length=sequence_length)
