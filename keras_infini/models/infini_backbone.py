"""InfiniBackbone: token embedding -> InfiniTransformer / MoD blocks -> layer norm."""

import keras
from keras_hub.layers import ReversibleEmbedding
from keras_hub.models import Backbone

from keras_infini import validation
from keras_infini.layers.infini_transformer import InfiniTransformer
from keras_infini.layers.mod_infini_transformer import MoDInfiniTransformer
from keras_infini.layers.rotary import YaRNEmbeddings

EMBEDDERS = (None, "rope", "yarn")
# Keyword arguments a keras-hub model passes on to `keras.Model` (and saves in its config).
MODEL_KWARGS = ("name", "trainable", "dtype")


def refuse_unknown_kwargs(owner, kwargs, allowed=MODEL_KWARGS):
    """ValueError naming every keyword argument of `owner` not in `allowed` (keras-hub's
    `Backbone` / `Task` would otherwise swallow a misspelt or unsupported option)."""
    unknown = sorted(name for name in kwargs if name not in allowed)
    if unknown:
        given = ", ".join(f"{name}={kwargs[name]!r}" for name in unknown)
        raise ValueError(
            f"Invalid keyword argument(s) for {owner}: {given}. {owner} does not take "
            f"{'it' if len(unknown) == 1 else 'them'}; beside its own arguments it allows "
            f"only {allowed}."
        )


@keras.saving.register_keras_serializable(package="keras_infini")
class InfiniBackbone(Backbone):
    """A decoder of Infini-attention blocks, as a keras-hub `Backbone`.

    `token_ids (batch, seq)` -> `ReversibleEmbedding` -> `num_layers` causal blocks
    (`InfiniTransformer`; with `mod_every=k`, blocks `k-1, 2k-1, ...` are
    `MoDInfiniTransformer`s keeping `ceil(segment_len / sampling_factor)` tokens per
    segment) -> `LayerNormalization` -> `(batch, seq, hidden_dim)`. `padding_mask` masks
    padding tokens (never attended, never written to memory).

    Args:
        vocabulary_size: number of token ids.
        num_layers: number of blocks.
        hidden_dim: model width.
        intermediate_dim: MLP hidden width.
        num_heads: attention heads; `hidden_dim // num_heads` per head for keys and values
            unless `key_dim` / `value_dim` say otherwise.
        segment_len: tokens per memory segment.
        activation: MLP activation (see `keras_infini.ACTIVATIONS`).
        update: `"linear"` or `"delta"` memory update.
        positional_embedder: `None`, `"rope"` or `"yarn"` (YaRN for a context
            `yarn_scale` times the segment).
        yarn_scale: with `"yarn"`: `context_len_ext / context_len`.
        mod_every: 0 (no MoD) or `k >= 1`: every `k`-th block is a MoD block.
        sampling_factor, router_loss_weight: of the MoD blocks.
        dropout, normalize_first, layer_norm_epsilon: of every block
            (`layer_norm_epsilon` also of the final norm).
        memory_feature_map, write_strength, gate_init, gate_lr_scale, memory_decay: memory
            options of every block (see `CompressiveMemory`).
        tie_weights: share the input embedding with the output projection.
        causal: causal blocks (required to generate).
        dtype: dtype policy of every layer.
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        hidden_dim,
        intermediate_dim,
        num_heads,
        segment_len,
        key_dim=None,
        value_dim=None,
        activation="gelu",
        update="linear",
        positional_embedder="rope",
        yarn_scale=4.0,
        mod_every=0,
        sampling_factor=2.0,
        router_loss_weight=0.1,
        dropout=0.0,
        normalize_first=True,
        layer_norm_epsilon=1e-5,
        memory_feature_map="elu1",
        write_strength=False,
        gate_init=0.0,
        gate_lr_scale=1.0,
        memory_decay=False,
        tie_weights=False,
        causal=True,
        dtype=None,
        **kwargs,
    ):
        refuse_unknown_kwargs(type(self).__name__, kwargs)
        vocabulary_size = validation.positive_int("vocabulary_size", vocabulary_size)
        num_layers = validation.positive_int("num_layers", num_layers)
        hidden_dim = validation.positive_int("hidden_dim", hidden_dim)
        num_heads = validation.positive_int("num_heads", num_heads)
        if key_dim is None or value_dim is None:
            if hidden_dim % num_heads:
                raise ValueError(
                    f"Invalid hidden_dim={hidden_dim} for num_heads={num_heads}: without "
                    "key_dim and value_dim, hidden_dim must be a multiple of num_heads."
                )
        key_dim = hidden_dim // num_heads if key_dim is None else key_dim
        value_dim = hidden_dim // num_heads if value_dim is None else value_dim
        if positional_embedder not in EMBEDDERS:
            raise ValueError(
                f"Invalid positional_embedder={positional_embedder!r}: expected one of "
                f"{EMBEDDERS}."
            )
        mod_every = int(validation.real(
            "mod_every", mod_every, lambda v: v >= 0 and int(v) == v, "an integer >= 0"
        ))
        yarn_scale = validation.real("yarn_scale", yarn_scale, lambda v: v >= 1,
                                     "a number >= 1")

        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size, output_dim=hidden_dim, tie_weights=tie_weights,
            dtype=dtype, name="token_embedding",
        )

        def embedder():
            if positional_embedder == "yarn":
                return YaRNEmbeddings(dim=key_dim, seq_len=segment_len,
                                      context_len=segment_len,
                                      context_len_ext=yarn_scale * segment_len)
            return positional_embedder

        common = dict(
            dim_input=hidden_dim, dim_hidden=intermediate_dim, dim_key=key_dim,
            dim_value=value_dim, num_heads=num_heads, activation=activation,
            segment_len=segment_len, update=update, causal=causal, dropout=dropout,
            normalize_first=normalize_first, layer_norm_epsilon=layer_norm_epsilon,
            memory_feature_map=memory_feature_map, write_strength=write_strength,
            gate_init=gate_init, gate_lr_scale=gate_lr_scale, memory_decay=memory_decay,
            dtype=dtype,
        )
        self.transformer_layers = []
        for i in range(num_layers):
            if mod_every and i % mod_every == mod_every - 1:
                layer = MoDInfiniTransformer(
                    sampling_factor=sampling_factor, router_loss_weight=router_loss_weight,
                    positional_embedder=embedder(), name=f"mod_block_{i}", **common,
                )
            else:
                layer = InfiniTransformer(positional_embedder=embedder(), name=f"block_{i}",
                                          **common)
            self.transformer_layers.append(layer)
        self.layer_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_norm"
        )
        # The padding mask reaches the blocks explicitly; the hidden states carry no Keras
        # mask (the CausalLM's reverse embedding takes none and would warn).
        self.layer_norm.compute_mask = lambda inputs, mask=None: None

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.token_embedding(token_ids)
        for layer in self.transformer_layers:
            x = layer(x, mask=padding_mask)
        outputs = self.layer_norm(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs, dtype=dtype, **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.segment_len = segment_len
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.activation = activation
        self.update = update
        self.positional_embedder = positional_embedder
        self.yarn_scale = yarn_scale
        self.mod_every = mod_every
        self.sampling_factor = sampling_factor
        self.router_loss_weight = router_loss_weight
        self.dropout = dropout
        self.normalize_first = normalize_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.memory_feature_map = memory_feature_map
        self.write_strength = write_strength
        self.gate_init = gate_init
        self.gate_lr_scale = gate_lr_scale
        self.memory_decay = memory_decay
        self.tie_weights = tie_weights
        self.causal = causal

    def embed_tokens(self, token_ids):
        """Token embeddings as the blocks see them."""
        return self.token_embedding(token_ids)

    @classmethod
    def from_backbone(cls, backbone, segment_len, **options):
        """Converts a pretrained keras-hub backbone (`LlamaBackbone`, `Llama3Backbone`,
        `MistralBackbone`, `QwenBackbone`, `Qwen3Backbone`, `GemmaBackbone`) to
        Infini-attention: an `InfiniDecoderBackbone` with the same weights whose memory
        starts closed (see `keras_infini.models.convert.convert_backbone`)."""
        from keras_infini.models.convert import convert_backbone

        return convert_backbone(backbone, segment_len, **options)

    def enable_lora(self, rank, target_layer_names=None):
        """keras-hub's `Backbone.enable_lora`, by role: with `target_layer_names=None`,
        `keras_infini.enable_lora(self, rank)` (LoRA on every block's attention and MLP
        projections, every other weight frozen); with names, keras-hub's name matching.
        Either way `save_lora_weights` / `load_lora_weights` then work."""
        if target_layer_names is not None:
            return super().enable_lora(rank, target_layer_names=target_layer_names)
        from keras_infini import lora

        lora.enable_lora(self, rank)

    @staticmethod
    def get_layout_map(device_mesh, model_parallel_dim_name="model",
                       data_parallel_dim_name="batch"):
        """A `keras.distribution.LayoutMap` for `ModelParallel`, in keras-hub's naming:
        `keras_infini.distribution.get_layout_map(device_mesh, model_dim=...,
        batch_dim=...)` (attention projections on heads, MLP on its hidden axis, token
        embeddings on the width, gates, states, norms and routers replicated)."""
        from keras_infini import distribution

        return distribution.get_layout_map(
            device_mesh, model_dim=model_parallel_dim_name, batch_dim=data_parallel_dim_name
        )

    def get_config(self):
        config = super().get_config()
        config.update({
            name: getattr(self, name)
            for name in (
                "vocabulary_size", "num_layers", "hidden_dim", "intermediate_dim",
                "num_heads", "segment_len", "key_dim", "value_dim", "activation", "update",
                "positional_embedder", "yarn_scale", "mod_every", "sampling_factor",
                "router_loss_weight", "dropout", "normalize_first", "layer_norm_epsilon",
                "memory_feature_map", "write_strength", "gate_init", "gate_lr_scale",
                "memory_decay", "tie_weights", "causal",
            )
        })
        return config
