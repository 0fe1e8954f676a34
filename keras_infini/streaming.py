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
        states = list(states) if states is not None else None
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

    Uses the model's compressive memory the way Infini-attention intends: finished segments
    live only in each layer's `(memory, norm)` state, and each new token re-runs just the
    current, unfinished segment (at most `segment_len` tokens) from the state at its start.
    The cost per token is therefore bounded by the segment length, not the prefix length.

    The current segment is padded with `pad_id` to `segment_len`, so every step has the
    same shape and is traced once (`compile_step`); the model must be causal (causal
    attention; MoD blocks route causally at inference), so padding after the last real
    token cannot change its logits, and the state of a padded run is never kept (a
    segment's state is committed only once the segment is full). Without padding each new
    length would recompile every op on JAX (seconds per token on 2 CPU cores).

    Args:
        model: a chain-shaped model mapping `(batch, seq)` int tokens to
            `(batch, seq, vocab)` logits, built from causal layers.
        prompt: int array `(batch, prompt_len)`, `prompt_len >= 1`.
        steps: number of tokens to generate.
        temperature: softmax temperature; `0` picks the most likely token.
        top_k: optional: sample only among the `top_k` most likely tokens.
        seed: optional int seed of the NumPy sampler.
        pad_id: token id that fills the unfinished segment (any id works for a causal
            model; use the padding id of your vocabulary).
        compiled: `False` runs the layers eagerly on the unpadded segment instead
            (slower, for debugging).

    Returns:
        int32 NumPy array `(batch, prompt_len + steps)`.
    """
    import numpy as np

    prompt = np.asarray(prompt, dtype="int32")
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(
            f"Invalid prompt with shape {prompt.shape}: expected (batch, prompt_len >= 1)."
        )
    if temperature < 0:
        raise ValueError(f"Invalid temperature={temperature!r}: expected a number >= 0.")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"Invalid top_k={top_k!r}: expected None or an integer >= 1.")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"Invalid steps={steps!r}: expected an integer >= 0.")
    rng = np.random.default_rng(seed)
    streamer = Streamer(model)
    non_causal = [layer.name for layer in streamer.layers
                  if _is_stateful(layer) and not layer.causal]
    if non_causal:
        raise ValueError(
            f"Invalid model: generate needs causal layers, but {non_causal} have "
            "causal=False (the padded segment would be visible to them). Build the model "
            "with causal=True."
        )
    embedding = next((layer for layer in streamer.layers
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
    seg = streamer.segment_len
    batch = prompt.shape[0]
    step = compile_step(streamer) if compiled else _eager_step(streamer)

    # Commit every whole segment of the prompt but keep >= 1 token pending for the logits.
    committed = ((prompt.shape[1] - 1) // seg) * seg
    states = None
    for start in range(0, committed, seg):
        _, states = step(prompt[:, start:start + seg], states)
    pending = prompt[:, committed:]
    generated = [prompt]
    for _ in range(int(steps)):
        length = pending.shape[1]
        if compiled:
            chunk = np.full((batch, seg), pad_id, dtype="int32")
            chunk[:, :length] = pending
        else:
            chunk = pending
        logits, new_states = step(chunk, states)
        last = np.asarray(
            keras.ops.convert_to_numpy(logits[:, length - 1]), dtype="float64"
        )
        token = _sample(last, temperature, top_k, rng)
        generated.append(token[:, None])
        if length == seg:  # the segment is finished (unpadded): keep only its state
            states, pending = new_states, token[:, None]
        else:
            pending = np.concatenate([pending, token[:, None]], axis=1)
    return np.concatenate(generated, axis=1)


def _sample(logits, temperature, top_k, rng):
    import numpy as np

    if top_k is not None and top_k > logits.shape[-1]:
        raise ValueError(
            f"Invalid top_k={top_k!r}: expected at most the vocabulary size "
            f"{logits.shape[-1]}."
        )
    if temperature == 0:
        return logits.argmax(-1).astype("int32")
    logits = logits / temperature
    if top_k is not None:
        cutoff = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype="int32")
