"""Backend-agnostic math shared by the layers (pure `keras.ops` functions, no state)."""
