"""keras_infini: Infini-attention, Mixture-of-Depths, gated FFNs and RoPE/YaRN for Keras 3.

Every layer runs unchanged on TensorFlow, JAX and PyTorch (pick with `KERAS_BACKEND`).
"""

from keras_infini.layers.activations import ACTIVATIONS
from keras_infini.layers.activations import FFNGLU
from keras_infini.layers.activations import GELU
from keras_infini.layers.activations import Abs
from keras_infini.layers.activations import ActivationFunction
from keras_infini.layers.activations import FFNGeGLU
from keras_infini.layers.activations import FFNSwiGLU
from keras_infini.layers.activations import GeGLU
from keras_infini.layers.activations import ReLU
from keras_infini.layers.activations import SiLU
from keras_infini.layers.activations import SwiGLU
from keras_infini.layers.activations import Swish
from keras_infini.layers.activations import get_activation
from keras_infini.layers.compressive_memory import CompressiveMemory
from keras_infini.layers.infini_transformer import InfiniTransformer
from keras_infini.layers.mod_infini_transformer import MoDInfiniTransformer
from keras_infini.layers.rotary import RoPEEmbeddings
from keras_infini.layers.rotary import YaRNEmbeddings
from keras_infini import distribution  # noqa: F401
from keras_infini import streaming  # noqa: F401
from keras_infini.lora import enable_lora

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Abs",
    "ActivationFunction",
    "FFNGLU",
    "FFNGeGLU",
    "FFNSwiGLU",
    "GELU",
    "GeGLU",
    "ReLU",
    "SiLU",
    "SwiGLU",
    "Swish",
    "CompressiveMemory",
    "InfiniTransformer",
    "MoDInfiniTransformer",
    "RoPEEmbeddings",
    "YaRNEmbeddings",
    "enable_lora",
    "get_activation",
]
