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

    def windows(self, documents):
        """Documents -> `fit` data of windows of `sequence_length` tokens, nothing cut:
        `document_windows(documents, self.sequence_length, self.tokenizer)`. Calling the
        preprocessor itself keeps keras-hub's behaviour (one window per string, the rest
        of a longer one dropped)."""
        return document_windows(documents, self.sequence_length, self.tokenizer)

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


def document_windows(documents, sequence_length, tokenizer=None):
    """Splits documents into consecutive windows for next-token training, nothing dropped.

    Each document becomes `[start] + tokens + [end]` (ids of `tokenizer`, by default an
    `InfiniByteTokenizer`: its UTF-8 bytes), cut into windows of `sequence_length` input
    tokens: window `i` of a document holds its tokens `i * L ... i * L + L - 1` as
    `token_ids` and the tokens one later as labels (the label of a window's last position
    is the next window's first token), so every token is the input of exactly one window,
    in order. A document's last window is right-padded (`padding_mask` False, label the
    padding id, sample weight 0); windows never mix documents.

    Args:
        documents: a string or a list of strings (or lists of token ids).
        sequence_length: tokens per window, a positive int.
        tokenizer: maps a string to token ids and has `start_token_id`, `end_token_id`,
            `pad_token_id` (default: `InfiniByteTokenizer()`).

    Returns:
        `(x, y, sample_weight)` NumPy arrays for `keras.Model.fit`: `x` a dict of
        `token_ids` int32 and `padding_mask` bool `(windows, sequence_length)`, `y` int32
        and `sample_weight` float32 of the same shape.
    """
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, (int, np.integer)) \
            or sequence_length < 1:
        raise ValueError(
            f"Invalid sequence_length={sequence_length!r}: expected a positive integer."
        )
    tokenizer = tokenizer or InfiniByteTokenizer()
    if isinstance(documents, (str, bytes)):
        documents = [documents]
    start, end = tokenizer.start_token_id, tokenizer.end_token_id
    pad = tokenizer.pad_token_id
    ids, labels, weights = [], [], []
    for document in documents:
        tokens = tokenizer(document) if isinstance(document, (str, bytes)) else document
        tokens = np.asarray(keras.ops.convert_to_numpy(tokens)).reshape(-1).astype("int64")
        stream = np.concatenate([[start], tokens, [end]]).astype("int32")
        inputs, targets = stream[:-1], stream[1:]
        count = -(-len(inputs) // sequence_length)
        size = count * sequence_length
        padded_inputs = np.full(size, pad, "int32")
        padded_inputs[:len(inputs)] = inputs
        padded_targets = np.full(size, pad, "int32")
        padded_targets[:len(targets)] = targets
        weight = (np.arange(size) < len(inputs)).astype("float32")
        ids.append(padded_inputs.reshape(count, sequence_length))
        labels.append(padded_targets.reshape(count, sequence_length))
        weights.append(weight.reshape(count, sequence_length))
    if not ids:
        raise ValueError("Invalid documents: expected at least one document.")
    token_ids, weights = np.concatenate(ids), np.concatenate(weights)
    x = {"token_ids": token_ids, "padding_mask": weights > 0}
    return x, np.concatenate(labels), weights
