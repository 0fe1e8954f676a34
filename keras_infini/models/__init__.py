"""keras-hub models built from keras_infini blocks (optional: needs `keras_infini[hub]`).

- `InfiniBackbone`: token embedding, a stack of `InfiniTransformer` blocks (every
  `mod_every`-th one a `MoDInfiniTransformer`), final layer norm.
- `InfiniCausalLM`: a `keras_hub.models.CausalLM` (`generate`, keras-hub samplers through
  `compile(sampler=...)`, presets) decoding with the blocks' fixed-shape cache.
- `InfiniCausalLMPreprocessor` and `InfiniByteTokenizer` (keras-hub's `ByteTokenizer`
  with start, end and padding ids after the 256 bytes); `document_windows` (also
  `InfiniCausalLMPreprocessor.windows`) cuts documents longer than `sequence_length` into
  consecutive training windows instead of truncating them.
- Converted pretrained decoders: `InfiniBackbone.from_backbone(llama_backbone,
  segment_len=...)` / `InfiniCausalLM.from_causal_lm(causal_lm_or_preset_dir, ...)` give
  an `InfiniDecoderBackbone` / `InfiniDecoderCausalLM` (Llama 2/3, Mistral, Qwen, Qwen3,
  Gemma) with the source's weights and a memory that starts closed.
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
from keras_infini.models.infini_decoder import HubRotaryEmbedding
from keras_infini.models.infini_decoder import InfiniDecoderBackbone
from keras_infini.models.infini_decoder import InfiniDecoderBlock
from keras_infini.models.infini_decoder_causal_lm import InfiniDecoderCausalLM
from keras_infini.models.convert import convert_backbone
from keras_infini.models.convert import convert_causal_lm

__all__ = [
    "InfiniBackbone",
    "InfiniByteTokenizer",
    "InfiniCausalLM",
    "InfiniCausalLMPreprocessor",
    "InfiniDecoderBackbone",
    "InfiniDecoderBlock",
    "InfiniDecoderCausalLM",
    "HubRotaryEmbedding",
    "convert_backbone",
    "convert_causal_lm",
    "document_windows",
]
