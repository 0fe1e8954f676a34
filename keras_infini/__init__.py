"""keras_infini: Infini-attention, Mixture-of-Depths and rotary embeddings for Keras 3."""

__version__ = "0.1.0"
