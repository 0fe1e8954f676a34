"""Output structure shared by the stateful layers (CompressiveMemory and the blocks)."""

import keras


class StatefulOutputsMixin:
    """`outputs`, then optional extra outputs, then optional `(memory, norm)`; and the
    `positional_embedder` argument's serialisation, shared by the three stateful layers.

    `return_state` is a constructor argument and can be overridden per call
    (`layer(x, initial_state=s, return_state=True)`), which the streaming helpers use.
    Subclasses provide `dim_input`, `num_heads`, `memory_dim` (the memory's key width),
    `dim_value`, `return_state` and may override `extra_output_specs`.
    """

    def returns_state(self, return_state=None):
        return self.return_state if return_state is None else bool(return_state)

    def extra_output_specs(self, input_shape):
        """`[(shape, dtype), ...]` of outputs between the main output and the state."""
        return []

    def pack_outputs(self, outputs, extras, memory, norm, return_state=None):
        results = [outputs, *extras]
        if self.returns_state(return_state):
            results += [memory, norm]
        return results[0] if len(results) == 1 else tuple(results)

    def _output_specs(self, input_shape, return_state=None):
        dim = self.dim_input if self.dim_input is not None else input_shape[-1]
        specs = [((input_shape[0], input_shape[1], dim), self.compute_dtype)]
        specs += self.extra_output_specs(input_shape)
        if self.returns_state(return_state):
            b, h = input_shape[0], getattr(self, "num_memory_heads", self.num_heads)
            specs += [((b, h, self.memory_dim, self.dim_value), "float32"),
                      ((b, h, self.memory_dim), "float32")]
        return specs

    def compute_output_shape(self, input_shape, *args, return_state=None, **kwargs):
        shapes = [shape for shape, _ in self._output_specs(input_shape, return_state)]
        return shapes[0] if len(shapes) == 1 else tuple(shapes)

    def compute_output_spec(self, inputs, *args, return_state=None, **kwargs):
        tensors = [
            keras.KerasTensor(shape, dtype=dtype)
            for shape, dtype in self._output_specs(inputs.shape, return_state)
        ]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def compute_mask(self, inputs, mask=None):
        count = len(self._output_specs((None, None, None)))
        return mask if count == 1 else [mask] + [None] * (count - 1)

    def embedder_config(self):
        """The `positional_embedder` argument for `get_config`: `None`, `"rope"`, or the
        serialised embedder layer."""
        embedder = self._embedder_arg
        if embedder is not None and not isinstance(embedder, str):
            embedder = keras.saving.serialize_keras_object(embedder)
        return embedder

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        embedder = config.get("positional_embedder")
        if isinstance(embedder, dict):
            config["positional_embedder"] = keras.saving.deserialize_keras_object(embedder)
        return cls(**config)
