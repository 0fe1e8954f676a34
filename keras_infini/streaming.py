"""Streaming a stack of keras_infini layers over input that arrives in chunks.

Infini-attention keeps a fixed-size state per layer (`memory`, `norm`), so a model can
read an unbounded input chunk by chunk with constant memory: run each chunk through the
layers, passing every stateful layer the state it returned for the previous chunk.
When every chunk but the last is a multiple of the segment length, the outputs equal one
call on the whole input.

Example:

>>> import keras, numpy as np
>>> from keras_infini import InfiniTransformer
>>> from keras_infini.streaming import Streamer
>>> model = keras.Sequential([keras.Input((None, 16)),
...                           InfiniTransformer(16, 32, 8, 8, 2, "gelu", 8, causal=True)])
>>> streamer = Streamer(model)
>>> x = np.random.rand(1, 40, 16).astype("float32")
>>> parts = [streamer(x[:, i:i + 16]) for i in range(0, 40, 16)]
>>> np.allclose(np.concatenate([keras.ops.convert_to_numpy(p) for p in parts], 1),
...             keras.ops.convert_to_numpy(model(x)), atol=1e-5)
True
"""

import math

import keras

from keras_infini import validation
from keras_infini.ops import backend as fast_paths

from keras_infini.layers.compressive_memory import CompressiveMemory
from keras_infini.layers.infini_transformer import InfiniTransformer
from keras_infini.layers.mod_infini_transformer import MoDInfiniTransformer

STATEFUL_LAYERS = (CompressiveMemory, InfiniTransformer, MoDInfiniTransformer)


def _is_stateful(layer):
    return isinstance(layer, STATEFUL_LAYERS)


def _nested_stateful(layer):
    """The stateful layers inside a non-stateful `layer` (a wrapper, a nested model)."""
    return [sub for sub in layer._flatten_layers(include_self=False, recursive=True)
            if _is_stateful(sub)]


def _primary_input(layer, model):
    """The tensor `layer` consumes first in `model` (its Keras mask, if any, aside)."""
    for node in layer._inbound_nodes:
        if node.arguments.args and (not hasattr(model, "_operations")
                                    or layer in model._operations):
            return node.arguments.args[0]
    return None


def _chain_layers(model_or_layers):
    """The layers of a Sequential model, a chain-shaped functional model, or a list, with
    nested chain-shaped models expanded in place."""
    if isinstance(model_or_layers, (list, tuple)):
        layers = list(model_or_layers)
    elif not isinstance(model_or_layers, keras.Model):
        raise ValueError(
            f"Invalid model_or_layers={model_or_layers!r}: expected a keras.Model whose "
            "layers form a chain, or a list of layers."
        )
    else:
        model = model_or_layers
        layers = [
            layer for layer in model.layers
            if not isinstance(layer, keras.layers.InputLayer)
        ]
        if not isinstance(model, keras.Sequential):
            previous = model.inputs[0] if len(model.inputs) == 1 else None
            for layer in layers:
                if previous is None or _primary_input(layer, model) is not previous:
                    raise ValueError(
                        "Streaming needs a model whose layers form a single chain (each "
                        f"layer consumes the previous layer's output); layer {layer.name!r}"
                        " does not."
                    )
                previous = layer.output
                if isinstance(previous, (list, tuple)):
                    raise ValueError(
                        f"Layer {layer.name!r} returns several outputs; build the model "
                        "with return_state=False and return_router_outputs=False to "
                        "stream it."
                    )
    flat = []
    for layer in layers:
        if _is_stateful(layer):
            flat.append(layer)
        elif isinstance(layer, keras.Model):
            flat.extend(_chain_layers(layer))  # a nested Sequential / functional chain
        elif _nested_stateful(layer):
            inner = ", ".join(repr(sub.name) for sub in _nested_stateful(layer))
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) holds the stateful layers "
                f"{inner} inside it; the Streamer cannot carry their state. Put them in the "
                "model directly (or in a nested Sequential / functional chain)."
            )
        else:
            flat.append(layer)
    return flat


def _takes_mask(layer):
    return "mask" in layer.call_signature_parameters


class Streamer:
    """Runs a stack of layers over chunks, carrying each stateful layer's `(memory, norm)`.

    Args:
        model_or_layers: a `keras.Sequential`, a functional `keras.Model` whose layers form
            a chain (e.g. `Embedding -> blocks -> Dense`), or a list of layers. Layers that
            are `CompressiveMemory`, `InfiniTransformer` or `MoDInfiniTransformer` carry
            state; the others are applied per chunk.
        compiled: run inference chunks through a step compiled once per chunk shape
            (default; `jax.jit` reading the current weights at every call on JAX,
            `tf.function` on TensorFlow, eager without autograd on torch). `False` runs
            eagerly, for debugging. Training chunks (`training=True`) always run eagerly.

    Call `streamer(chunk)` for each chunk in order; `reset()` starts a new stream. For
    outputs identical to one call on the whole input, every chunk but the last must be a
    multiple of `segment_len` (the least common multiple of the stateful layers' segment
    lengths). Memory use does not depend on how many chunks have been seen.
    """

    def __init__(self, model_or_layers, compiled=True):
        self.compiled = validation.boolean("compiled", compiled)
        self._step = None
        self.layers = _chain_layers(model_or_layers)
        stateful = [layer for layer in self.layers if _is_stateful(layer)]
        if not stateful:
            raise ValueError(
                "Invalid model_or_layers: it contains no CompressiveMemory, "
                "InfiniTransformer or MoDInfiniTransformer layer to stream."
            )
        self.segment_len = math.lcm(*[layer.segment_len for layer in stateful])
        self.states = None

    def reset(self):
        """Forgets the carried state: the next chunk starts a new stream."""
        self.states = None

    def run(self, chunk, states=None, training=False):
        """Pure step: `(outputs, new_states)` for `chunk` given `states` (None: initial)."""
        x, mask = chunk, None
        new_states = []
        states = self._check_states(states)
        index = 0
        for layer in self.layers:
            # Keras masks travel along the chain as in a functional model: passed to the
            # layers that take one, and recomputed by the layers that support masking.
            kwargs = {"mask": mask} if mask is not None and _takes_mask(layer) else {}
            if _is_stateful(layer):
                state = None if states is None else states[index]
                y, memory, norm = layer(
                    x, initial_state=state, return_state=True, training=training, **kwargs
                )
                new_states.append((memory, norm))
                index += 1
            else:
                y = layer(x, training=training, **kwargs)
            mask = layer.compute_mask(x, mask) if layer.supports_masking else None
            if isinstance(mask, (list, tuple)):
                mask = mask[0]
            x = y
        return x, new_states

    def _check_states(self, states):
        """`None` or one `(memory, norm)` per stateful layer, as a list (by name)."""
        if states is None:
            return None
        stateful = [layer.name for layer in self.layers if _is_stateful(layer)]
        if not isinstance(states, (list, tuple)) or len(states) != len(stateful):
            got = (f"{len(states)} entries" if isinstance(states, (list, tuple))
                   else type(states).__name__)
            raise ValueError(
                f"Invalid states: {got}, expected None or a list of {len(stateful)} "
                f"(memory, norm) pairs, one per stateful layer {stateful} in order (what "
                "the previous chunk left in `streamer.states`)."
            )
        return list(states)

    @property
    def variables(self):
        """Every variable of the streamed layers (what a compiled step reads)."""
        seen, variables = set(), []
        for layer in self.layers:
            for variable in layer.variables:
                if id(variable) not in seen:
                    seen.add(id(variable))
                    variables.append(variable)
        return variables

    def __call__(self, chunk, training=False):
        self.states = self._check_states(self.states)  # before any trace (TF, JAX)
        if training:
            outputs, self.states = self.run(chunk, self.states, training=True)
            return outputs
        if self._step is None:
            self._step = compile_step(self) if self.compiled else _eager_step(self)
        outputs, self.states = self._step(chunk, self.states)
        return outputs


def stream(model_or_layers, chunks, training=False):
    """Yields the outputs for each chunk of `chunks` (an iterable), carrying state.

    A generator version of `Streamer` for one pass over an input:

        for logits in stream(model, token_chunks):
            ...
    """
    streamer = Streamer(model_or_layers)
    for chunk in chunks:
        yield streamer(chunk, training=training)


def compile_step(streamer):
    """`step(chunk, states) -> (outputs, new_states)`: `streamer.run` for inference,
    compiled once per chunk shape (`keras_infini.ops.backend.compile_inference`: `jax.jit`
    reading the current weights at every call, `tf.function`, eager under
    `torch.no_grad()` on torch). `states=None` (the first step) is a second trace."""
    def step(chunk, states):
        return streamer.run(chunk, states, training=False)

    return fast_paths.compile_inference(step, streamer.variables)


def _eager_step(streamer):
    """`streamer.run` for inference, eagerly (no torch autograd graph)."""
    def step(chunk, states):
        with fast_paths.no_grad():
            return streamer.run(chunk, states, training=False)

    return step


def generate(model, prompt, steps, temperature=1.0, top_k=None, seed=None, pad_id=0,
             compiled=True):
    """Samples `steps` tokens after `prompt` from a causal token model (tokens -> logits).

    A thin wrapper over the layers' decode cache (`build_cache`, `call(cache=...)`) and
    keras-hub's samplers, the path of `keras_infini.models.InfiniCausalLM.generate`: the
    prompt is prefilled segment-parallel, then each new token runs once through every
    layer against the fixed-shape cache (finished segments live only in the
    `(memory, norm)` state), so a token costs `O(segment_len)` whatever the prompt length.
    For string prompts, presets and any keras-hub sampler, use `InfiniCausalLM`. Needs
    keras-hub (`pip install 'keras_infini[hub]'`).

    Args:
        model: a chain-shaped model mapping `(batch, seq)` int tokens to
            `(batch, seq, vocab)` logits, built from causal layers (per-token layers such
            as `Embedding`, `Dense`, `LayerNormalization` between the keras_infini
            blocks). Keras masks (`Embedding(mask_zero=True)`) are not applied while
            generating: every token is real.
        prompt: int array `(batch, prompt_len)`, `prompt_len >= 1`.
        steps: number of tokens to generate.
        temperature: softmax temperature; `0` picks the most likely token
            (`keras_hub.samplers.GreedySampler`).
        top_k: optional: sample only among the `top_k` most likely tokens (`TopKSampler`;
            otherwise `RandomSampler`).
        seed: optional int seed of the sampler.
        pad_id: id of the positions still to generate (any id in the vocabulary).
        compiled: compile the whole generation once (`jax.jit` / `tf.function`; eager
            under `torch.no_grad()` on PyTorch). `False` runs eagerly, for debugging.

    Returns:
        int32 NumPy array `(batch, prompt_len + steps)`.
    """
    import numpy as np
    from keras import ops

    prompt = np.asarray(ops.convert_to_numpy(prompt) if ops.is_tensor(prompt) else prompt)
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"Invalid prompt of dtype {prompt.dtype}: expected integer token ids (a float "
            "prompt is not truncated to ints)."
        )
    prompt = prompt.astype("int32")
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(
            f"Invalid prompt with shape {prompt.shape}: expected (batch, prompt_len >= 1)."
        )
    validation.real("temperature", temperature, lambda t: t >= 0, "a finite number >= 0")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"Invalid top_k={top_k!r}: expected None or an integer >= 1.")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"Invalid steps={steps!r}: expected an integer >= 0.")
    layers = _chain_layers(model)
    stateful = [layer for layer in layers if _is_stateful(layer)]
    if not stateful:
        raise ValueError(
            "Invalid model: it contains no CompressiveMemory, InfiniTransformer or "
            "MoDInfiniTransformer layer."
        )
    non_causal = [layer.name for layer in stateful if not layer.causal]
    if non_causal:
        raise ValueError(
            f"Invalid model: generate needs causal layers, but {non_causal} have "
            "causal=False (a token would see later tokens). Build the model with "
            "causal=True."
        )
    embedding = next((layer for layer in layers
                      if isinstance(layer, keras.layers.Embedding)), None)
    if embedding is not None:
        vocab_in = embedding.input_dim
        if isinstance(pad_id, bool) or int(pad_id) != pad_id or not 0 <= pad_id < vocab_in:
            raise ValueError(
                f"Invalid pad_id={pad_id!r}: expected an integer in [0, {vocab_in}) (the "
                f"input_dim of {embedding.name!r})."
            )
        if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab_in):
            raise ValueError(
                f"Invalid prompt: token ids must lie in [0, {vocab_in}) (the input_dim of "
                f"{embedding.name!r}); got ids from {prompt.min()} to {prompt.max()}."
            )
    vocab_out = None
    if isinstance(model, keras.Model):
        try:
            vocab_out = model.output_shape[-1]
        except (AttributeError, ValueError):
            vocab_out = None
    if top_k is not None and vocab_out is not None and top_k > vocab_out:
        raise ValueError(
            f"Invalid top_k={top_k!r}: expected at most the vocabulary size {vocab_out}."
        )
    sampler = _sampler(temperature, top_k, seed)
    batch, prompt_len = prompt.shape
    if steps == 0:
        return prompt

    def forward(tokens, caches, index):
        x, updated, i = tokens, [], 0
        for layer in layers:
            if _is_stateful(layer):
                x, cache = layer(x, cache=caches[i], cache_update_index=index)
                updated.append(cache)
                i += 1
            else:
                x = layer(x)
        return x, updated

    def run(token_ids, padding_mask):
        caches = [layer.build_cache(batch) for layer in stateful]
        if prompt_len > 1:  # all but the last prompt token; the loop runs the last one
            _, caches = forward(token_ids[:, :prompt_len - 1], caches, 0)

        def next(tokens, caches, index):
            token = ops.slice(tokens, [0, index - 1], [batch, 1])
            logits, caches = forward(token, caches, index - 1)
            return logits[:, 0], None, caches

        return sampler(next=next, prompt=token_ids, cache=caches, index=prompt_len,
                       mask=padding_mask)

    token_ids = np.concatenate(
        [prompt, np.full((batch, int(steps)), pad_id, dtype="int32")], axis=1
    )
    padding_mask = np.arange(token_ids.shape[1])[None] < prompt_len
    padding_mask = np.broadcast_to(padding_mask, token_ids.shape)
    variables = [v for layer in layers for v in layer.variables]
    if compiled:
        step = fast_paths.compile_inference(run, variables)
    else:
        step = _eager_run(run)
    out = step(ops.convert_to_tensor(token_ids), ops.convert_to_tensor(padding_mask))
    return np.asarray(keras.ops.convert_to_numpy(out), dtype="int32")


def _eager_run(fn):
    def run(*args):
        with fast_paths.no_grad():
            return fn(*args)

    return run


def _sampler(temperature, top_k, seed):
    """The keras-hub sampler for `generate`'s arguments (one sampler implementation)."""
    try:
        from keras_hub import samplers
    except ImportError as error:
        raise ImportError(
            "keras_infini.streaming.generate samples with keras-hub's samplers: install "
            "the extra with `pip install 'keras_infini[hub]'`."
        ) from error
    if temperature == 0:
        return samplers.GreedySampler()
    if top_k is not None:
        return samplers.TopKSampler(k=int(top_k), seed=seed, temperature=temperature)
    return samplers.RandomSampler(seed=seed, temperature=temperature)
