"""InfiniCausalLM: a keras-hub CausalLM decoding with the blocks' fixed-shape cache."""

import keras
import numpy as np
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.samplers import ContrastiveSampler
from keras_hub.src.utils.tensor_utils import any_equal

from keras_infini.models.infini_backbone import MODEL_KWARGS
from keras_infini.models.infini_backbone import InfiniBackbone
from keras_infini.models.infini_backbone import refuse_unknown_kwargs
from keras_infini.models.infini_causal_lm_preprocessor import InfiniCausalLMPreprocessor
from keras_infini.ops import backend as fast_paths
from keras_infini import validation


def _consumed_lengths(cache):
    """`(batch,)` int32: tokens each row has consumed, from the first block's cache."""
    layer_cache = cache[0]
    while "length" not in layer_cache:  # a MoD block wraps its inner block's cache
        layer_cache = layer_cache["attention"]
    return layer_cache["length"]


def _loaded_vocabulary_size(tokenizer):
    """The tokenizer's vocabulary size, or None while its vocabulary assets are not loaded
    (keras-hub's `from_preset` builds the task first and loads a BPE vocabulary or a
    SentencePiece proto into the tokenizer afterwards)."""
    for assets in ("vocabulary", "proto"):
        if hasattr(tokenizer, assets) and getattr(tokenizer, assets) is None:
            return None
    return int(tokenizer.vocabulary_size())


@keras.saving.register_keras_serializable(package="keras_infini")
class InfiniCausalLM(CausalLM):
    """Next-token model on an `InfiniBackbone`, with keras-hub's `generate`.

    `fit` trains on `{"token_ids", "padding_mask"}` (or on strings, through the
    preprocessor). `generate("def ", max_length=256)` samples with the sampler given to
    `compile(sampler=...)` (`"greedy"`, `"top_k"`, `"top_p"`, `"beam"`, `"random"`, ...,
    or a `keras_hub.samplers.Sampler`), compiled end to end (`jax.jit`; on TensorFlow a
    `tf.function` with XLA, see below; on torch, keras-hub runs the loop eagerly and
    each decode step is one compiled graph, see below).

    TensorFlow: keras-hub compiles `generate` with the model's `jit_compile`, and Keras
    resolves the default `"auto"` to no XLA on a CPU. The decode loop has static shapes,
    so here it is compiled with XLA unless `compile(jit_compile=False)` was asked for
    explicitly: 358 -> about 1,700 new tokens/s for the example's model size (README,
    "Generation speed"). Training keeps Keras' resolution of `jit_compile`.

    torch: keras-hub's loop runs eagerly, and an eager step of Keras ops costs ~22 ms of
    Python dispatch for the example's model. The decode step (`call_with_cache` of one
    token) is traced once per batch shape to a graph of aten ops and compiled with
    `torch.compile` (`keras_infini.ops.backend.compile_static_inference`): ~0.9 ms per
    step, after a one-time compilation of ~35 s on a 2-core CPU (~5 s when Inductor's
    on-disk cache holds it). `compile(jit_compile=False)` keeps every step eager.

    Generation uses each block's decode cache (`build_cache`): the prompt is prefilled
    one segment at a time (each segment in parallel) with its padding mask, so every
    row keeps exactly its own tokens, and each new token costs `O(segment_len)` whatever
    the prompt length (finished segments live only in the `(memory, norm)` state).
    Logits equal those of one full call on the whole sequence (tests/test_models.py).

    Args:
        backbone: an `InfiniBackbone` (causal).
        preprocessor: an `InfiniCausalLMPreprocessor` or None.
    """

    backbone_cls = InfiniBackbone
    preprocessor_cls = InfiniCausalLMPreprocessor

    def compile(self, *args, jit_compile="auto", prefill="segments", **kwargs):
        """keras-hub's `compile`, plus `prefill`: how `generate` takes the prompt.
        `"segments"` (default): the prompt one segment at a time, each segment parallel
        (`_chunked_prefill`), fastest for long prompts; `"steps"`: through the decode
        loop, one position per step, so nothing but the step is compiled (example size,
        one core: compile JAX 7.7 s -> 3.7 s, TF 10.8 s -> 5.0 s; the prompt costs
        ~0.2-0.45 ms a token instead of ~0.02 ms; docs/guides/generation.md,
        "Compile time")."""
        if prefill not in ("segments", "steps"):
            raise ValueError(
                f"Invalid prefill={prefill!r}: expected 'segments' or 'steps'."
            )
        self._generate_prefill = prefill
        self._generate_jit_compile = jit_compile
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def make_generate_function(self):
        """keras-hub's generate function; on TensorFlow compiled with XLA, on torch with
        a compiled decode step, unless `compile(jit_compile=False)` was passed (see the
        class docstring)."""
        explicit = getattr(self, "_generate_jit_compile", "auto")
        if self.generate_function is not None:
            return self.generate_function
        refused = explicit is False or self.run_eagerly
        self._decode_step = self._generation_step
        if keras.backend.backend() == "torch" and not refused:
            self._decode_step = fast_paths.compile_static_inference(
                self._generation_step, self.variables
            )
        if keras.backend.backend() != "tensorflow" or refused:
            return super().make_generate_function()
        resolved = self.jit_compile
        self.jit_compile = True
        try:
            return super().make_generate_function()
        finally:
            self.jit_compile = resolved

    def __init__(self, backbone, preprocessor=None, **kwargs):
        refuse_unknown_kwargs(type(self).__name__, kwargs, MODEL_KWARGS + ("compile",))
        tokenizer = getattr(preprocessor, "tokenizer", None)
        size = _loaded_vocabulary_size(tokenizer) if tokenizer is not None else None
        if size is not None and hasattr(backbone, "vocabulary_size"):
            if size > backbone.vocabulary_size:
                raise ValueError(
                    f"Invalid preprocessor: its tokenizer has vocabulary_size={size} (ids up "
                    f"to {size - 1}) but the backbone has vocabulary_size="
                    f"{backbone.vocabulary_size}; build the backbone with vocabulary_size >= "
                    f"{size}."
                )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    @classmethod
    def from_causal_lm(cls, causal_lm, segment_len, **options):
        """Converts a pretrained keras-hub `CausalLM` (Llama, Llama 3, Mistral, Qwen, Qwen3,
        Gemma), or the path of a local preset directory of one, to Infini-attention: an
        `InfiniDecoderCausalLM` with the same weights and preprocessor, whose memory
        starts closed (see `keras_infini.models.convert.convert_causal_lm`)."""
        from keras_infini.models.convert import convert_causal_lm

        return convert_causal_lm(causal_lm, segment_len, **options)

    def fit(self, x=None, y=None, *args, **kwargs):
        """keras-hub's `fit`; token ids given as arrays are checked against the vocabulary
        first (an out-of-range id would be a silent garbage gather on JAX)."""
        self._check_token_ids(x, y)
        return super().fit(x, y, *args, **kwargs)

    def _check_token_ids(self, x, y=None):
        """ValueError by name for a concrete id outside `[0, vocabulary_size)` in
        `x["token_ids"]` or in the labels `y` (of token-id inputs); datasets, strings and
        traced tensors are not read."""
        vocabulary_size = self.backbone.vocabulary_size
        named = []
        if isinstance(x, dict) and "token_ids" in x:
            named.append(("x['token_ids']", x["token_ids"]))
            if y is not None:
                named.append(("y", y))
        for name, ids in named:
            if isinstance(ids, (list, tuple)):
                ids = np.asarray(ids)
            if not isinstance(ids, np.ndarray):
                if not hasattr(ids, "shape") or hasattr(ids, "element_spec") \
                        or fast_paths.is_traced(ids):
                    continue
                try:
                    ids = np.asarray(ops.convert_to_numpy(ids))
                except Exception:  # not concrete (symbolic, dataset, ...): not checked
                    continue
            if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                continue
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocabulary_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"Invalid {name}: it holds the id {bad}, outside [0, vocabulary_size="
                    f"{vocabulary_size}) of the backbone; every token id must be >= 0 and "
                    f"< {vocabulary_size}."
                )

    def _check_causal(self):
        if not getattr(self.backbone, "causal", True):
            raise ValueError(
                f"Invalid model {self.name!r} for generation: its backbone has causal=False "
                "(a token would see later tokens). Build the backbone with causal=True."
            )

    def build_cache(self, batch_size):
        """One decode cache per block (a list of the blocks' `build_cache`)."""
        self._check_causal()
        return [layer.build_cache(batch_size) for layer in self.backbone.transformer_layers]

    def _blocks_with_cache(self, token_ids, cache, cache_update_index, padding_mask=None):
        x = self.backbone.embed_tokens(token_ids)
        updated = []
        for layer, layer_cache in zip(self.backbone.transformer_layers, cache):
            x, layer_cache = layer(x, cache=layer_cache,
                                   cache_update_index=cache_update_index, mask=padding_mask)
            updated.append(layer_cache)
        return self.backbone.layer_norm(x), updated

    def call_with_cache(self, token_ids, cache, cache_update_index, padding_mask=None):
        """Forward pass of new tokens against the cache.

        Args:
            token_ids: int `(batch, new_tokens)`, at positions `cache_update_index, ...`.
            cache: from `build_cache` (or the previous call).
            cache_update_index: tokens already in the cache (an int, or a scalar int
                tensor for one token).
            padding_mask: optional `(batch, new_tokens)`: the tokens each row takes (a
                prefix; rows that take nothing keep their cache).

        Returns:
            `(logits, hidden_states, cache)`.
        """
        hidden_states, cache = self._blocks_with_cache(
            token_ids, cache, cache_update_index, padding_mask
        )
        logits = self.backbone.token_embedding(hidden_states, reverse=True)
        return logits, hidden_states, cache

    def _generation_step(self, token, cache, cache_update_index, row_lengths=None):
        """One step of `generate`: the token at `cache_update_index` `(batch, 1)` against
        the cache; a row takes it once its prompt is in its cache, i.e. when the row
        has consumed `cache_update_index` tokens (the prefill leaves `row_length - 1`).
        A row whose prompt is prefilled past that position returns the prefill's hidden
        state there (`cache["prompt_hidden_states"]`), so every row gets the logits and
        hidden state of that position as the full model gives them: samplers read them
        at prompt positions too (beam scores, contrastive similarities).
        The rows' state lives in the cache only, so samplers that expand or reorder the
        batch (beam, contrastive) carry it along (`row_lengths` is ignored).
        Returns `(logits, hidden_states, cache)` for that position."""
        prompt_hidden_states = None
        if isinstance(cache, dict):
            prompt_hidden_states = cache["prompt_hidden_states"]
            blocks = cache["blocks"]
        else:
            blocks = cache
        takes = (_consumed_lengths(blocks) <= cache_update_index)[:, None]
        hidden_states, blocks = self._blocks_with_cache(
            token, blocks, cache_update_index, takes
        )
        if prompt_hidden_states is not None:
            # A gather of one position (static shape `(batch, 1, hidden)`; reading the
            # whole buffer every step, e.g. a masked sum, costs ~1 ms a step at 1K).
            at = ops.reshape(ops.cast(cache_update_index, "int32"), (1,))
            known = ops.take(prompt_hidden_states, at, axis=1)
            hidden_states = ops.where(takes[..., None], hidden_states,
                                      ops.cast(known, hidden_states.dtype))
            cache = {"blocks": blocks, "prompt_hidden_states": prompt_hidden_states}
        else:
            cache = blocks
        logits = self.backbone.token_embedding(hidden_states, reverse=True)
        return ops.squeeze(logits, axis=1), ops.squeeze(hidden_states, axis=1), cache

    def _build_cache(self, token_ids, padding_mask):
        """An empty cache, prefilled (`_chunked_prefill`) with every row's prompt but its
        last token, which the first generation step runs to get the next logits."""
        batch_size = token_ids.shape[0]
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        positions = ops.arange(ops.shape(token_ids)[1], dtype="int32")[None, :]
        prefill_mask = positions < (row_lengths - 1)[:, None]
        return self._chunked_prefill(token_ids, prefill_mask, self.build_cache(batch_size))

    def _chunked_prefill(self, token_ids, padding_mask, cache):
        """`(hidden_states, cache)` after the tokens `padding_mask` selects (a prefix per
        row) of `token_ids` `(b, T)` enter an empty `cache`, one segment at a time: a
        loop over the `ceil(T / segment_len)` segments whose step runs every block's
        `_prefill_segment` (a segment from a boundary). The compiled program holds one
        segment's step, not the whole-sequence call (the segment-parallel prefill of
        `call_with_cache`), with the same values; the memory is sequential over
        segments anyway."""
        layers = self.backbone.transformer_layers
        seg = layers[0].segment_len
        batch, length = int(token_ids.shape[0]), int(token_ids.shape[1])
        n = -(-length // seg)
        pad = n * seg - length
        ids, mask = token_ids, ops.cast(padding_mask, "bool")
        if pad:
            ids = ops.pad(ids, [[0, 0], [0, pad]])
            mask = ops.pad(mask, [[0, 0], [0, pad]], constant_values=False)
        ids = ops.reshape(ids, (batch, n, seg))
        mask = ops.reshape(mask, (batch, n, seg))
        dim = self.backbone.hidden_dim

        # A loop whose carry holds the outputs (`fori_loop`), not a scan with outputs:
        # the TensorFlow scan traces its first step outside the loop (to learn the
        # outputs' structure), which would compile the step twice.
        def step(i, carry):
            cache, hidden = carry
            chunk_ids = ops.squeeze(ops.slice(ids, [0, i, 0], [batch, 1, seg]), 1)
            consumed = ops.squeeze(ops.slice(mask, [0, i, 0], [batch, 1, seg]), 1)
            x = self.backbone.embed_tokens(chunk_ids)
            updated = []
            for layer, layer_cache in zip(layers, cache):
                x, layer_cache = layer._prefill_segment(x, consumed, layer_cache)
                updated.append(layer_cache)
            x = ops.cast(self.backbone.layer_norm(x), hidden.dtype)
            return updated, ops.slice_update(hidden, [0, i, 0, 0], x[:, None])

        hidden = ops.zeros((batch, n, seg, dim), self.compute_dtype)
        cache, hidden = ops.fori_loop(0, n, step, (cache, hidden))
        hidden = ops.reshape(hidden, (batch, n * seg, dim))
        return (hidden[:, :length] if pad else hidden), cache

    def _prefill_in_loop(self, token_ids):
        return getattr(self, "_generate_prefill", "segments") == "steps"

    def _sample(self, inputs, stop_token_ids=None):
        """The sampler's raw output for `generate_step` (a `BeamSampler` with
        `return_all_beams=True` gives `(beams, log_probs)`)."""
        self._check_causal()
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        if self._prefill_in_loop(token_ids):
            # Prompts enter through the decode loop, one position per step: nothing but
            # the step is compiled (see `prefill`).
            cache = self.build_cache(token_ids.shape[0])
            hidden_states = ops.zeros(
                tuple(token_ids.shape) + (self.backbone.hidden_dim,), self.compute_dtype
            )
            index = ops.convert_to_tensor(1, "int32")
        else:
            hidden_states, cache = self._build_cache(token_ids, padding_mask)
            # The prefill's hidden states travel with the cache (expanded and reordered
            # with it): the steps inside a row's prefilled prompt return them.
            cache = {"blocks": cache, "prompt_hidden_states": hidden_states}
            index = ops.maximum(ops.min(row_lengths), 1)
        if isinstance(self.sampler, ContrastiveSampler):
            # The contrastive sampler compares new hidden states with the prompt's, up to
            # the last prompt token, which the prefill leaves to the first step: take
            # them from one full call instead (only this sampler reads them).
            hidden_states = self.backbone(inputs)

        decode_step = getattr(self, "_decode_step", None) or self._generation_step

        def next_logits(prompt, cache, index):  # not `next`: autograph reads builtins
            cache_update_index = index - 1
            batch_size = ops.shape(prompt)[0]
            token = ops.slice(prompt, [0, cache_update_index], [batch_size, 1])
            return decode_step(token, cache, cache_update_index)

        return self.sampler(
            next=next_logits, prompt=token_ids, cache=cache, index=index, mask=padding_mask,
            stop_token_ids=stop_token_ids, hidden_states=hidden_states, model=self,
        )

    def generate_step(self, inputs, stop_token_ids=None):
        """A compilable generation function for one batch of right-padded prompts
        (`{"token_ids", "padding_mask"}`), as keras-hub's GPT-2: the sampler runs one
        position at a time from the shortest prompt on; a row takes the token at a
        position once its prompt is in its cache (before that, the position holds its own
        prompt token, which the sampler keeps, and the step returns the prefill's logits
        and hidden state there)."""
        padding_mask = inputs["padding_mask"]
        token_ids = self._sample(inputs, stop_token_ids)
        if stop_token_ids is not None:
            end_locations = any_equal(
                token_ids, stop_token_ids, ops.logical_not(padding_mask)
            )
            end_locations = ops.cast(end_locations, "int32")
            cumsum = ops.cast(ops.cumsum(end_locations, axis=-1), "int32")
            overflow = cumsum - end_locations
            padding_mask = ops.logical_not(ops.cast(overflow, "bool"))
        else:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """keras-hub's `CausalLM.generate`, with its arguments checked first.

        `max_length`: `None` (the preprocessor's `sequence_length`) or a positive int;
        `0`, a negative number or a float is a `ValueError` naming it (keras-hub would
        read `0` as "the default"). A `bytes` prompt (`b"\xffab"`) is one prompt of
        raw bytes, as a `str` is (keras-hub treated it as a batch). Without a
        preprocessor, `inputs` is `{"token_ids", "padding_mask"}`: token ids outside
        `[0, vocabulary_size)` and a `padding_mask` that is not a prefix per row
        (`[1, 0, 1, 0]`) are refused by name (checked on the values, so for NumPy or
        eager tensors; a `tf.data.Dataset` is not read ahead).
        """
        self._check_causal()
        if max_length is not None:
            validation.positive_int("max_length", max_length)
        if self.preprocessor is None:
            self._check_token_inputs(inputs)
        one_bytes_prompt = isinstance(inputs, bytes)
        if one_bytes_prompt and self.preprocessor is not None:
            inputs = [inputs]
        outputs = super().generate(inputs, max_length=max_length,
                                   stop_token_ids=stop_token_ids, strip_prompt=strip_prompt)
        if one_bytes_prompt and self.preprocessor is not None:
            outputs = outputs[0]
        return outputs

    def _check_token_inputs(self, inputs):
        """Token ids in the vocabulary and prefix padding masks, by name (values that can
        be read now only)."""
        if not isinstance(inputs, dict):
            return
        vocabulary = self.backbone.vocabulary_size
        token_ids = inputs.get("token_ids")
        if token_ids is not None and not fast_paths.is_traced(token_ids):
            ids = np.asarray(ops.convert_to_numpy(token_ids))
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(
                    f"Invalid token_ids of dtype {ids.dtype}: expected integer token ids "
                    f"in [0, {vocabulary})."
                )
            if ids.size and (ids.min() < 0 or ids.max() >= vocabulary):
                bad = ids[(ids < 0) | (ids >= vocabulary)]
                raise ValueError(
                    f"Invalid token_ids: {sorted(set(bad.tolist()))[:8]} outside the "
                    f"vocabulary; expected ids in [0, {vocabulary}) (the backbone's "
                    "vocabulary_size)."
                )
        mask = inputs.get("padding_mask")
        if mask is not None and not fast_paths.is_traced(mask):
            mask = np.asarray(ops.convert_to_numpy(mask))
            if mask.ndim == 1:
                mask = mask[None]
            if mask.ndim == 2 and mask.shape[1] > 1:
                mask = mask.astype(bool)
                gaps = np.logical_and(mask[:, 1:], np.logical_not(mask[:, :-1])).any(axis=1)
                if gaps.any():
                    row = int(np.nonzero(gaps)[0][0])
                    raise ValueError(
                        f"Invalid padding_mask: row {row} is "
                        f"{mask[row].astype(int).tolist()}, expected a prefix per row "
                        "(True for the prompt's tokens, then False: a right-padded "
                        "prompt)."
                    )
