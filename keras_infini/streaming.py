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

import contextlib
import math

import keras

from keras_infini.layers.compressive_memory import CompressiveMemory
from keras_infini.layers.infini_transformer import InfiniTransformer
from keras_infini.layers.mod_infini_transformer import MoDInfiniTransformer

STATEFUL_LAYERS = (CompressiveMemory, InfiniTransformer, MoDInfiniTransformer)


def _is_stateful(layer):
    return isinstance(layer, STATEFUL_LAYERS)


def _chain_layers(model_or_layers):
    """The layers of a Sequential model, a chain-shaped functional model, or a list."""
    if isinstance(model_or_layers, (list, tuple)):
        return list(model_or_layers)
    if not isinstance(model_or_layers, keras.Model):
        raise ValueError(
            f"Invalid model_or_layers={model_or_layers!r}: expected a keras.Model whose "
            "layers form a chain, or a list of layers."
        )
    layers = [
        layer for layer in model_or_layers.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    if not isinstance(model_or_layers, keras.Sequential):
        previous = model_or_layers.inputs[0] if len(model_or_layers.inputs) == 1 else None
        for layer in layers:
            if previous is None or layer.input is not previous:
                raise ValueError(
                    "Streaming needs a model whose layers form a single chain (each layer "
                    f"consumes the previous layer's output); layer {layer.name!r} does not."
                )
            previous = layer.output
            if isinstance(previous, (list, tuple)):
                raise ValueError(
                    f"Layer {layer.name!r} returns several outputs; build the model with "
                    "return_state=False and return_router_outputs=False to stream it."
                )
    return layers


class Streamer:
    """Runs a stack of layers over chunks, carrying each stateful layer's `(memory, norm)`.

    Args:
        model_or_layers: a `keras.Sequential`, a functional `keras.Model` whose layers form
            a chain (e.g. `Embedding -> blocks -> Dense`), or a list of layers. Layers that
            are `CompressiveMemory`, `InfiniTransformer` or `MoDInfiniTransformer` carry
            state; the others are applied per chunk.

    Call `streamer(chunk)` for each chunk in order; `reset()` starts a new stream. For
    outputs identical to one call on the whole input, every chunk but the last must be a
    multiple of `segment_len` (the least common multiple of the stateful layers' segment
    lengths). Memory use does not depend on how many chunks have been seen.
    """

    def __init__(self, model_or_layers):
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
        x = chunk
        new_states = []
        states = list(states) if states is not None else None
        index = 0
        for layer in self.layers:
            if _is_stateful(layer):
                state = None if states is None else states[index]
                x, memory, norm = layer(
                    x, initial_state=state, return_state=True, training=training
                )
                new_states.append((memory, norm))
                index += 1
            else:
                x = layer(x, training=training)
        return x, new_states

    def __call__(self, chunk, training=False):
        if training:
            outputs, self.states = self.run(chunk, self.states, training=True)
        else:
            with _no_grad():
                outputs, self.states = self.run(chunk, self.states)
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


def _no_grad():
    """Torch fast path: no autograd graph during inference (`contextlib.nullcontext` else).

    Without it every streamed chunk under `KERAS_BACKEND=torch` would record the autograd
    graph of the whole step and keep its activations alive until the outputs are dropped.
    """
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def compile_step(streamer):
    """`step(chunk, states) -> (outputs, new_states)`: `streamer.run`, compiled once per shape.

    Backend fast paths (inference only, weights read as they are when traced on JAX):
    `jax.jit` on JAX, `tf.function` on TensorFlow, eager under `torch.no_grad()` on torch;
    any other backend runs `streamer.run` eagerly. `states=None` (the first step) is a
    second trace.
    """
    def step(chunk, states):
        return streamer.run(chunk, states, training=False)

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(step)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(step, reduce_retracing=True)
    return _eager_step(streamer)


def _eager_step(streamer):
    """`streamer.run` for inference, eagerly (no torch autograd graph)."""
    def step(chunk, states):
        with _no_grad():
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

    if temperature == 0:
        return logits.argmax(-1).astype("int32")
    logits = logits / temperature
    if top_k is not None:
        cutoff = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype="int32")
