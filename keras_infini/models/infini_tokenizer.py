"""InfiniByteTokenizer: keras-hub's `ByteTokenizer` plus start/end/padding ids."""

import keras
import numpy as np
from keras_hub.src.utils.tensor_utils import get_decode_errors_name
from keras_hub.tokenizers import ByteTokenizer

from keras_infini.models.infini_backbone import InfiniBackbone

PAD_ID, START_ID, END_ID = 256, 257, 258


@keras.saving.register_keras_serializable(package="keras_infini")
class InfiniByteTokenizer(ByteTokenizer):
    """Raw UTF-8 bytes `0..255` (keras-hub's `ByteTokenizer`) and three special ids after
    them: padding 256, start 257, end 258 (vocabulary 259), the layout of
    `examples/byte_datasets.py`. `lowercase` defaults to False (keras-hub's lowercasing
    needs `tensorflow-text`). Special ids are dropped when detokenizing; byte 0 is kept
    (`[[97, 0, 98]]` -> `"a\x00b"`; keras-hub's byte tokenizer drops id 0 as padding).

    Loads from a preset directory saved by `InfiniCausalLM.save_to_preset`, as
    `InfiniByteTokenizer.from_preset(dir)` or `keras_hub.tokenizers.Tokenizer.from_preset(dir)`.
    """

    backbone_cls = InfiniBackbone

    def __init__(self, lowercase=False, **kwargs):
        super().__init__(lowercase=lowercase, **kwargs)
        self._special_token_attrs = ["pad_token", "start_token", "end_token"]
        for name, token, index in (("pad_token", "<pad>", PAD_ID),
                                   ("start_token", "<s>", START_ID),
                                   ("end_token", "</s>", END_ID)):
            setattr(self, name, token)
            setattr(self, f"{name}_id", index)

    def vocabulary_size(self):
        return 259

    def id_to_token(self, id):
        specials = {PAD_ID: "<pad>", START_ID: "<s>", END_ID: "</s>"}
        return specials.get(int(id)) or super().id_to_token(id)

    def token_to_id(self, token):
        specials = {"<pad>": PAD_ID, "<s>": START_ID, "</s>": END_ID}
        return specials[token] if token in specials else super().token_to_id(token)

    def detokenize(self, inputs):
        if hasattr(inputs, "to_list"):  # tf.RaggedTensor
            inputs = inputs.to_list()
        elif not isinstance(inputs, (list, tuple)):
            inputs = np.asarray(keras.ops.convert_to_numpy(inputs)).tolist()

        def keep_bytes(x):
            if isinstance(x, (list, tuple)):
                if x and isinstance(x[0], (list, tuple)):
                    return [keep_bytes(row) for row in x]
                return [int(t) for t in x if 0 <= int(t) < 256]
            return x

        return self._decode(keep_bytes(inputs))

    def _decode(self, inputs):
        """Bytes to strings, byte 0 included: keras-hub's `ByteTokenizer` drops id 0 as
        its padding, but padding here is id 256 and `"\x00"` is a real byte."""
        errors = get_decode_errors_name(self.errors, self.replacement_char)
        if inputs and isinstance(inputs[0], (list, tuple)):
            return [bytes(row).decode("utf-8", errors=errors) for row in inputs]
        return bytes(inputs).decode("utf-8", errors=errors)

    # keras-hub's preset saver asks every tokenizer for its assets (vocabulary files);
    # ByteTokenizer has none and lacks these hooks (keras-hub 0.32).
    def save_assets(self, dir_path):
        pass

    def load_assets(self, dir_path):
        pass

    def load_preset_assets(self, preset):
        pass
