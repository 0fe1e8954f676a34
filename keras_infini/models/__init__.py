"""keras-hub models built from keras_infini blocks (optional: needs `keras_infini[hub]`).

- `InfiniBackbone`: token embedding, a stack of `InfiniTransformer` blocks (every
  `mod_every`-th one a `MoDInfiniTransformer`), final layer norm.
- `InfiniCausalLM`: a `keras_hub.models.CausalLM` (`generate`, keras-hub samplers through
  `compile(sampler=...)`, presets) decoding with the blocks' fixed-shape cache.
- `InfiniCausalLMPreprocessor` and `InfiniByteTokenizer` (keras-hub's `ByteTokenizer`
  with start, end and padding ids after the 256 bytes); `document_windows` (also
  `InfiniCausalLMPreprocessor.windows`) cuts documents longer than `sequence_length` into
  consecutive training windows instead of truncating them.
"""

try:
    import keras_hub  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "keras_infini.models needs keras-hub, which is optional: install the extra with "
        "`pip install 'keras_infini[hub]'` (see the README for an install that keeps a "
        "single TensorFlow next to tensorflow-cpu)."
    ) from error

from keras_infini.models.infini_backbone import InfiniBackbone
from keras_infini.models.infini_causal_lm import InfiniCausalLM
from keras_infini.models.infini_causal_lm_preprocessor import InfiniCausalLMPreprocessor
from keras_infini.models.infini_causal_lm_preprocessor import document_windows
from keras_infini.models.infini_tokenizer import InfiniByteTokenizer

__all__ = [
    "InfiniBackbone",
    "InfiniByteTokenizer",
    "InfiniCausalLM",
    "InfiniCausalLMPreprocessor",
    "document_windows",
]
