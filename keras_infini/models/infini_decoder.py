"""Converted keras-hub decoders: Llama (2 and 3), Mistral, Qwen (2), Qwen3 and Gemma with
Infini-attention.

One block class serves every family (`InfiniDecoderBlock`): keras-hub's own RMS norm of
the family, `CompressiveMemory` with grouped-query heads holding the source's q/k/v/o
kernels (and Qwen's q/k/v biases, Qwen3's q/k norms), the family's rotary embedding
(keras-hub's `RotaryEmbedding`, or Llama's with the Llama-3 frequency scaling) applied
inside each segment, and a gated MLP with gate/up/down kernels. Only the attention differs
from the source: it runs segment by segment and reads a compressive memory of the earlier
segments through a gate that is exactly closed at conversion (`memory_gate="tanh"`,
`gate_init=0`: `A = A_dot + tanh(g) A_mem`), so the converted model starts as the source
model, and stays trainable (`d tanh(g) / dg = 1` at 0).
"""

import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding
from keras_hub.layers import RotaryEmbedding
from keras_hub.models import Backbone
from keras_hub.src.models.gemma.rms_normalization import RMSNormalization
from keras_hub.src.models.llama.llama_layernorm import LlamaLayerNorm
from keras_hub.src.models.llama.llama_rotary_embedding import LlamaRotaryEmbedding
from keras_hub.src.models.mistral.mistral_layer_norm import MistralLayerNormalization
from keras_hub.src.models.qwen.qwen_layernorm import QwenLayerNorm
from keras_hub.src.models.qwen3.qwen3_layernorm import Qwen3LayerNorm

from keras_infini import validation
from keras_infini.layers.compressive_memory import CompressiveMemory
from keras_infini.layers.infini_transformer import InfiniTransformer
from keras_infini.models.infini_backbone import InfiniBackbone

FAMILIES = ("llama", "mistral", "qwen", "qwen3", "gemma")

# The family's own RMS norm (same math as the source model's, bit for bit).
_NORMS = {
    "llama": LlamaLayerNorm,
    "mistral": MistralLayerNormalization,
    "qwen": QwenLayerNorm,
    "qwen3": Qwen3LayerNorm,
    "gemma": RMSNormalization,  # `x / rms(x) * (1 + w)`
}
# MLP activation: SiLU computed in float32 (Llama, Mistral, Qwen), or tanh-approximated
# GELU in the compute dtype (Gemma's GeGLU).
_MLP_ACTIVATIONS = {"llama": "silu", "mistral": "silu", "qwen": "silu", "qwen3": "silu",
                    "gemma": "gelu_approximate"}


def family_norm(family, epsilon, dtype, name, head_dim=None):
    """The family's RMS norm layer (keras-hub's class)."""
    cls = _NORMS[family]
    if head_dim is not None:
        return cls(epsilon=epsilon, head_dim=head_dim, dtype=dtype, name=name)
    return cls(epsilon=epsilon, dtype=dtype, name=name)


@keras.saving.register_keras_serializable(package="keras_infini")
class HubRotaryEmbedding(keras.layers.Layer):
    """keras-hub's rotary embedding (half-split rotation, `rotate_half`) as a
    `CompressiveMemory` positional embedder: `call(x (..., S, dim), positions=)` with
    positions broadcastable to `x.shape[:-1]` (in-segment positions).

    `llama_scaling=True` uses `LlamaRotaryEmbedding` (Llama 2 and 3: the Llama-3.1
    frequency adjustment when its four `rope_*` factors are set); otherwise keras-hub's
    `RotaryEmbedding(max_wavelength, scaling_factor)` (Mistral, Qwen, Qwen3, Gemma).
    """

    keras_infini_positional_embedder = True

    def __init__(self, dim, max_wavelength=10000, scaling_factor=1.0, llama_scaling=False,
                 frequency_adjustment_factor=None, low_freq_factor=None,
                 high_freq_factor=None, pretraining_sequence_length=None, **kwargs):
        super().__init__(**kwargs)
        self.dim = validation.positive_int("dim", dim)
        if self.dim % 2:
            raise ValueError(f"Invalid dim={dim}: a rotary embedding needs an even width.")
        self.max_wavelength = validation.positive_real("max_wavelength", max_wavelength)
        self.scaling_factor = validation.positive_real("scaling_factor", scaling_factor)
        self.llama_scaling = validation.boolean("llama_scaling", llama_scaling)
        self.frequency_adjustment_factor = frequency_adjustment_factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.pretraining_sequence_length = pretraining_sequence_length
        if self.llama_scaling:
            self.rotary = LlamaRotaryEmbedding(
                max_wavelength=max_wavelength, position_scaling_factor=scaling_factor,
                frequency_adjustment_factor=frequency_adjustment_factor,
                low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
                pretraining_sequence_length=pretraining_sequence_length,
                dtype=self.dtype_policy, name="rotary",
            )
        else:
            if frequency_adjustment_factor is not None:
                raise ValueError(
                    "Invalid frequency_adjustment_factor: the Llama-3 frequency scaling "
                    "needs llama_scaling=True."
                )
            self.rotary = RotaryEmbedding(max_wavelength=max_wavelength,
                                          scaling_factor=scaling_factor,
                                          dtype=self.dtype_policy, name="rotary")

    def call(self, x, positions=None):
        shape = ops.shape(x)
        steps, dim = x.shape[-2], x.shape[-1]
        flat = ops.reshape(x, (-1, steps, dim))
        if positions is not None:
            positions = ops.cast(positions, "float32")
            if len(positions.shape) > 1:
                positions = ops.reshape(ops.broadcast_to(positions, shape[:-1]), (-1, steps))
        return ops.reshape(self.rotary(flat, positions=positions), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            name: getattr(self, name) for name in (
                "dim", "max_wavelength", "scaling_factor", "llama_scaling",
                "frequency_adjustment_factor", "low_freq_factor", "high_freq_factor",
                "pretraining_sequence_length",
            )
        })
        return config


# Memory options of a converted model: the recommended memory (README, "Memory options")
# behind a gate that is exactly closed at conversion.
MEMORY_DEFAULTS = dict(
    update="delta", memory_feature_map="l2", write_strength="hard_sigmoid",
    memory_decay="coupled", gate_init=0.0, gate_lr_scale=10.0, memory_gate="tanh",
    memory_heads="key_value", init_state_learnable=False,
)
MEMORY_OPTIONS = tuple(MEMORY_DEFAULTS)


@keras.saving.register_keras_serializable(package="keras_infini")
class InfiniDecoderBlock(InfiniTransformer):
    """A pretrained decoder block of a keras-hub family with Infini-attention.

    `x + attention(norm(x))` then `h + mlp(norm(h))` (pre-norm; Gemma-2-style post norms
    on the attention and MLP outputs when asked), where `attention` is a causal
    `CompressiveMemory` (grouped-query heads, the family's rotary embedding inside each
    segment) and `mlp(x) = down(act(gate(x)) * up(x))`. The decode cache, streaming
    (`initial_state`, `return_state`), masks and Keras' `fit` work as for
    `InfiniTransformer`, whose machinery this block reuses; only its parts differ.

    Args:
        family: one of `FAMILIES` (the norm class and MLP activation).
        hidden_dim, intermediate_dim, num_heads, num_key_value_heads, head_dim: sizes.
        segment_len: tokens per memory segment.
        layer_norm_epsilon: of every norm.
        rope: dict of `HubRotaryEmbedding` arguments (without `dim`).
        qkv_bias: biases on the query/key/value projections (Qwen 2).
        query_key_norm: per-head RMS norms of queries and keys (Qwen3), with epsilon
            `query_key_norm_epsilon` (default `layer_norm_epsilon`).
        post_attention_norm, post_mlp_norm: norms on the attention / MLP outputs (Gemma 2).
        dropout: after the attention and after the MLP.
        update, memory_feature_map, write_strength, memory_decay, gate_init, gate_lr_scale,
            memory_gate, memory_heads, init_state_learnable: memory options (see
            `CompressiveMemory`; defaults `MEMORY_DEFAULTS`: closed at conversion).
    """

    def __init__(
        self, family, hidden_dim, intermediate_dim, num_heads, num_key_value_heads,
        head_dim, segment_len, layer_norm_epsilon=1e-6, rope=None, qkv_bias=False,
        query_key_norm=False, post_attention_norm=False, post_mlp_norm=False, dropout=0.0,
        return_state=False, query_key_norm_epsilon=None, **kwargs,
    ):
        memory = {name: kwargs.pop(name, default) for name, default in MEMORY_DEFAULTS.items()}
        kwargs = self.set_weight_args(kwargs, with_bias=False)
        keras.layers.Layer.__init__(self, **kwargs)
        self.family = validation.choice("family", family, FAMILIES)
        self.dim_input = validation.positive_int("hidden_dim", hidden_dim)
        self.dim_hidden = validation.positive_int("intermediate_dim", intermediate_dim)
        self.num_heads = validation.positive_int("num_heads", num_heads)
        self.dim_key = self.dim_value = validation.positive_int("head_dim", head_dim)
        self.segment_len = validation.positive_int("segment_len", segment_len)
        self.layer_norm_epsilon = float(
            validation.positive_real("layer_norm_epsilon", layer_norm_epsilon)
        )
        self.rope = dict(rope or {})
        self.query_key_norm = validation.boolean("query_key_norm", query_key_norm)
        self.query_key_norm_epsilon = None if query_key_norm_epsilon is None else float(
            validation.positive_real("query_key_norm_epsilon", query_key_norm_epsilon))
        self.use_post_attention_norm = validation.boolean("post_attention_norm",
                                                          post_attention_norm)
        self.use_post_mlp_norm = validation.boolean("post_mlp_norm", post_mlp_norm)
        self.dropout = float(validation.rate("dropout", dropout))
        self.return_state = validation.boolean("return_state", return_state)
        self.causal = True
        self.normalize_first = True
        self.activation = _MLP_ACTIVATIONS[self.family]
        self._embedder_arg = None
        self.supports_masking = True

        dtype, eps = self.dtype_policy, self.layer_norm_epsilon
        qk_norms = {}
        if self.query_key_norm:
            qk_eps = eps if self.query_key_norm_epsilon is None else self.query_key_norm_epsilon
            qk_norms = {
                "query_norm": family_norm(self.family, qk_eps, dtype, "query_norm", head_dim),
                "key_norm": family_norm(self.family, qk_eps, dtype, "key_norm", head_dim),
            }
        self.attention = CompressiveMemory(
            self.dim_input, self.dim_key, self.dim_value, self.num_heads, self.segment_len,
            causal=True, return_state=True, num_key_value_heads=num_key_value_heads,
            qkv_bias=validation.boolean("qkv_bias", qkv_bias),
            positional_embedder=HubRotaryEmbedding(self.dim_key, **self.rope, dtype=dtype,
                                                   name="positional_embedder"),
            dtype=dtype, name="attention", **qk_norms, **memory,
            **self.weight_kwargs(bias=False),
        )
        self.attention_norm = family_norm(self.family, eps, dtype, "attention_norm")
        self.mlp_norm = family_norm(self.family, eps, dtype, "mlp_norm")
        self.post_attention_norm = family_norm(
            self.family, eps, dtype, "post_attention_norm"
        ) if self.use_post_attention_norm else None
        self.post_mlp_norm = family_norm(
            self.family, eps, dtype, "post_mlp_norm"
        ) if self.use_post_mlp_norm else None

        def dense(units, name):
            return keras.layers.Dense(units, use_bias=False, dtype=dtype, name=name,
                                      **self.weight_kwargs(bias=False))

        self.mlp_gate = dense(self.dim_hidden, "mlp_gate")
        self.mlp_up = dense(self.dim_hidden, "mlp_up")
        self.mlp_down = dense(self.dim_input, "mlp_down")
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=dtype,
                                                      name="attention_dropout")
        self.mlp_dropout = keras.layers.Dropout(self.dropout, dtype=dtype, name="mlp_dropout")

    @property
    def num_key_value_heads(self):
        return self.attention.num_key_value_heads

    @property
    def update(self):
        return self.attention.update

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                f"InfiniDecoderBlock expects inputs of rank 3 (batch, seq_len, hidden_dim); "
                f"received inputs with shape {tuple(input_shape)}."
            )
        if input_shape[-1] is not None and int(input_shape[-1]) != self.dim_input:
            raise ValueError(
                f"Invalid inputs: last axis {input_shape[-1]} does not match "
                f"hidden_dim={self.dim_input}."
            )
        shape = (None, None, self.dim_input)
        for layer in (self.attention, self.attention_norm, self.mlp_norm, self.mlp_gate,
                      self.mlp_up, self.post_attention_norm, self.post_mlp_norm):
            if layer is not None:
                layer.build(shape)
        self.mlp_down.build((None, None, self.dim_hidden))
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: self.dim_input})
        self.built = True

    def mlp(self, x):
        gate = self.mlp_gate(x)
        if self.activation == "silu":  # float32, as keras-hub's Llama-family decoders
            gate = ops.cast(ops.silu(ops.cast(gate, "float32")), self.compute_dtype)
        else:
            gate = keras.activations.gelu(gate, approximate=True)
        return self.mlp_down(self.mlp_up(x) * gate)

    def _residual(self, x, attend, training=None):
        attended, extra = attend(self.attention_norm(x))
        if self.post_attention_norm is not None:
            attended = self.post_attention_norm(attended)
        h = x + self.attention_dropout(attended, training=training)
        y = self.mlp(self.mlp_norm(h))
        if self.post_mlp_norm is not None:
            y = self.post_mlp_norm(y)
        return h + self.mlp_dropout(y, training=training), extra

    def get_config(self):
        config = keras.layers.Layer.get_config(self)
        config.update(self.weight_config())
        config.update({
            "family": self.family,
            "hidden_dim": self.dim_input,
            "intermediate_dim": self.dim_hidden,
            "num_heads": self.num_heads,
            "num_key_value_heads": self.attention.num_key_value_heads,
            "head_dim": self.dim_key,
            "segment_len": self.segment_len,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "rope": self.rope,
            "qkv_bias": self.attention.qkv_bias,
            "query_key_norm": self.query_key_norm,
            "query_key_norm_epsilon": self.query_key_norm_epsilon,
            "post_attention_norm": self.use_post_attention_norm,
            "post_mlp_norm": self.use_post_mlp_norm,
            "dropout": self.dropout,
            "return_state": self.return_state,
            **{name: getattr(self.attention, name) for name in MEMORY_OPTIONS},
        })
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_infini")
class InfiniDecoderBackbone(InfiniBackbone):
    """A keras-hub decoder family (Llama 2/3, Mistral, Qwen 2, Qwen3, Gemma) with
    Infini-attention: `token_ids` -> the family's embedding (`ReversibleEmbedding`, times
    `sqrt(hidden_dim)` for Gemma) -> `num_layers` `InfiniDecoderBlock`s -> the family's
    final RMS norm. Usually made by `InfiniBackbone.from_backbone(source, segment_len)`,
    which copies a keras-hub backbone's weights; the constructor builds one from scratch.

    Args:
        family: one of `FAMILIES`.
        vocabulary_size, num_layers, hidden_dim, intermediate_dim, num_heads,
            num_key_value_heads, head_dim: sizes (`num_heads` query heads; keys and values
            have `num_key_value_heads`, a divisor of `num_heads`).
        segment_len: tokens per memory segment (the source's context, typically).
        layer_norm_epsilon, rope, qkv_bias, query_key_norm, query_key_norm_epsilon,
            post_attention_norm,
            post_mlp_norm, dropout: see `InfiniDecoderBlock`.
        tie_weights: share the embedding with the output projection.
        final_logit_soft_cap: Gemma 2's `cap * tanh(logits / cap)` (None: none).
        update, memory_feature_map, write_strength, memory_decay, gate_init,
            gate_lr_scale, memory_gate, memory_heads, init_state_learnable: memory options
            (`MEMORY_DEFAULTS`: the recommended memory behind a gate closed at 0).
        dtype: dtype policy of every layer.
    """

    def __init__(
        self, family, vocabulary_size, num_layers, hidden_dim, intermediate_dim, num_heads,
        num_key_value_heads, head_dim, segment_len, layer_norm_epsilon=1e-6, rope=None,
        qkv_bias=False, query_key_norm=False, post_attention_norm=False,
        post_mlp_norm=False, tie_weights=False, final_logit_soft_cap=None, dropout=0.0,
        query_key_norm_epsilon=None, dtype=None, **kwargs,
    ):
        memory = {name: kwargs.pop(name, default) for name, default in MEMORY_DEFAULTS.items()}
        family = validation.choice("family", family, FAMILIES)
        vocabulary_size = validation.positive_int("vocabulary_size", vocabulary_size)
        num_layers = validation.positive_int("num_layers", num_layers)
        hidden_dim = validation.positive_int("hidden_dim", hidden_dim)
        if final_logit_soft_cap is not None:
            final_logit_soft_cap = validation.positive_real("final_logit_soft_cap",
                                                            final_logit_soft_cap)
        tie_weights = validation.boolean("tie_weights", tie_weights)

        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size, output_dim=hidden_dim, tie_weights=tie_weights,
            logit_soft_cap=final_logit_soft_cap, dtype=dtype, name="token_embedding",
        )
        self.transformer_layers = [
            InfiniDecoderBlock(
                family, hidden_dim, intermediate_dim, num_heads, num_key_value_heads,
                head_dim, segment_len, layer_norm_epsilon=layer_norm_epsilon, rope=rope,
                qkv_bias=qkv_bias, query_key_norm=query_key_norm,
                query_key_norm_epsilon=query_key_norm_epsilon,
                post_attention_norm=post_attention_norm, post_mlp_norm=post_mlp_norm,
                dropout=dropout, dtype=dtype, name=f"block_{i}", **memory,
            )
            for i in range(num_layers)
        ]
        self.layer_norm = family_norm(family, layer_norm_epsilon, dtype, "final_norm")
        # The padding mask reaches the blocks explicitly; the final norm (per token) takes
        # the blocks' Keras mask and passes none on (the reverse embedding takes none).
        self.layer_norm.supports_masking = True
        self.layer_norm.compute_mask = lambda inputs, mask=None: None
        self.scale_embeddings = family == "gemma"

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.embed_tokens(token_ids)
        for layer in self.transformer_layers:
            x = layer(x, mask=padding_mask)
        outputs = self.layer_norm(x)
        Backbone.__init__(
            self, inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs, dtype=dtype, **kwargs,
        )

        # === Config ===
        block = self.transformer_layers[0]
        self.family = family
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.intermediate_dim = block.dim_hidden
        self.num_heads = block.num_heads
        self.num_key_value_heads = block.num_key_value_heads
        self.head_dim = block.dim_key
        self.segment_len = block.segment_len
        self.layer_norm_epsilon = block.layer_norm_epsilon
        self.rope = block.rope
        self.qkv_bias = block.attention.qkv_bias
        self.query_key_norm = block.query_key_norm
        self.query_key_norm_epsilon = block.query_key_norm_epsilon
        self.post_attention_norm = block.use_post_attention_norm
        self.post_mlp_norm = block.use_post_mlp_norm
        self.tie_weights = tie_weights
        self.final_logit_soft_cap = final_logit_soft_cap
        self.dropout = block.dropout
        for name in MEMORY_OPTIONS:
            setattr(self, name, getattr(block.attention, name))
        self.causal = True

    def embed_tokens(self, token_ids):
        """Token embeddings as the blocks see them (Gemma: times `sqrt(hidden_dim)`)."""
        x = self.token_embedding(token_ids)
        if self.scale_embeddings:
            hidden_dim = self.token_embedding.output_dim
            x = x * ops.cast(ops.sqrt(hidden_dim), x.dtype)
        return x

    def get_config(self):
        config = Backbone.get_config(self)
        config.update({
            name: getattr(self, name) for name in (
                "family", "vocabulary_size", "num_layers", "hidden_dim", "intermediate_dim",
                "num_heads", "num_key_value_heads", "head_dim", "segment_len",
                "layer_norm_epsilon", "rope", "qkv_bias", "query_key_norm",
                "query_key_norm_epsilon", "post_attention_norm", "post_mlp_norm", "tie_weights",
                "final_logit_soft_cap", "dropout",
            ) + MEMORY_OPTIONS
        })
        return config

    def memory_variables(self):
        """The variables the conversion added (gates, write strengths, decays, learned
        initial states): what `freeze_pretrained()` leaves trainable."""
        found = []
        for block in self.transformer_layers:
            attention = block.attention
            found.append(attention.gate)
            for name in ("beta_dense", "decay_dense"):
                if hasattr(attention, name):
                    found.extend(getattr(attention, name).weights)
            for name in ("decay_log_rate", "decay_bias", "initial_memory", "initial_norm"):
                if hasattr(attention, name):
                    found.append(getattr(attention, name))
        return found

    def freeze_pretrained(self, trainable_layers=()):
        """Freezes the source model's weights: only the memory's new parameters (gates,
        write strengths, decays, learned initial states), the LoRA factors of an
        `enable_lora` made before this call, and the variables of the layers named in
        `trainable_layers` (e.g. `("final_norm",)`) stay trainable. Returns the trainable
        variables. Call it after `enable_lora` (keras-hub's `enable_lora` freezes every
        other layer, memory included) and before `compile`."""
        keep = {id(v) for v in self.memory_variables()}
        names = set(trainable_layers)
        for layer in self._flatten_layers(include_self=True, recursive=True):
            layer.trainable = True  # variable flags decide below, not layer flags
        for variable in self.weights:
            path = f"/{variable.path}/"
            variable.trainable = (
                id(variable) in keep
                or variable.name.startswith("lora_kernel")
                or any(f"/{name}/" in path for name in names)
            )
        return self.trainable_variables

    @staticmethod
    def get_layout_map(device_mesh, model_parallel_dim_name="model",
                       data_parallel_dim_name="batch"):
        """`keras_infini.distribution.get_layout_map` (the MLP's `mlp_gate`, `mlp_up`,
        `mlp_down` and the attention projections on heads: `num_key_value_heads` must
        divide by the model axis)."""
        return InfiniBackbone.get_layout_map(device_mesh, model_parallel_dim_name,
                                             data_parallel_dim_name)
