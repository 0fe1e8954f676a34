"""Public Keras layers of keras_infini (one layer family per module)."""
