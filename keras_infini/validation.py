"""Argument validation shared by every keras_infini layer: one rule per argument kind.

Every check raises a `ValueError` that names the argument, repeats the value it got and
says what is allowed, and returns the value as a plain Python object (so `get_config()`
stays JSON-serialisable). Nothing is coerced silently: `"False"`, `0` or `2` are not
booleans, `nan` and `inf` are not sizes or rates.
"""

import math
import numbers

import keras
import numpy as np

# Upper bound of every size argument (widths, heads, segment lengths, vocabularies).
# Larger values are refused at construction instead of ending in a backend
# out-of-memory error: 2**20 already means a 1M-wide projection.
MAX_SIZE = 2**20


def positive_int(name, value, allow_none=False, maximum=MAX_SIZE):
    """A positive integer `<= maximum` (or `None` when `allow_none`)."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or not 0 < value <= maximum
    ):
        allowed = f"a positive integer <= {maximum}" + (" or None" if allow_none else "")
        raise ValueError(f"Invalid {name}={value!r}: expected {allowed}.")
    return int(value)


def axis(name, value):
    """An integer axis (negative counts from the end); the rank is checked at call time."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name}={value!r}: expected an integer axis.")
    return int(value)


def boolean(name, value):
    """A real boolean (`True`/`False`, NumPy booleans included), nothing truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Invalid {name}={value!r}: expected True or False.")
    return bool(value)


def real(name, value, condition=lambda v: True, allowed="a finite real number",
         allow_none=False):
    """A finite real number that satisfies `condition` (or `None` when `allow_none`)."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not condition(value)
    ):
        raise ValueError(f"Invalid {name}={value!r}: expected {allowed}.")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def positive_real(name, value):
    return real(name, value, lambda v: v > 0, "a finite number greater than 0")


def non_negative_real(name, value):
    return real(name, value, lambda v: v >= 0, "a finite number >= 0")


def rate(name, value):
    """A dropout-like rate in `[0, 1)`."""
    return real(name, value, lambda v: 0 <= v < 1, "a number in [0, 1)")


def choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"Invalid {name}={value!r}: expected one of {tuple(options)}.")
    return value


WRITE_STRENGTHS = ("sigmoid", "hard_sigmoid")


def write_strength(value):
    """`False`, `True` (= `"sigmoid"`) or `"hard_sigmoid"`; `"sigmoid"` is returned as
    `True` so both spellings save the same config."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in WRITE_STRENGTHS:
        return True if value == "sigmoid" else value
    raise ValueError(
        f"Invalid write_strength={value!r}: expected False, True, 'sigmoid' or "
        "'hard_sigmoid'."
    )


MEMORY_DECAYS = ("coupled",)


def memory_decay(value):
    """`False`, `True` or `"coupled"` (the decay scaled by the write strength)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value in MEMORY_DECAYS:
        return value
    raise ValueError(
        f"Invalid memory_decay={value!r}: expected False, True or 'coupled'."
    )


def sampling_factor(value, segment_len=None, allow_none=False):
    """MoD sampling factor: a finite number `> 1` (and `< segment_len` when given)."""
    if segment_len is None:
        return real("sampling_factor", value, lambda v: v > 1,
                    "None or a number greater than 1" if allow_none
                    else "a number greater than 1", allow_none=allow_none)
    return real("sampling_factor", value, lambda v: 1 < v < segment_len,
                f"a number in (1, segment_len={segment_len})", allow_none=allow_none)


# ---------------------------------------------------------------------- call arguments
def _shape(x):
    return tuple(x.shape)


def _dims_match(got, expected):
    """Static dimensions agree (a `None` on either side is not checked)."""
    return got is None or expected is None or int(got) == int(expected)


def sequence_tensor(name, value, inputs):
    """A `(batch, seq_len)` tensor aligned with `inputs` `(batch, seq_len, ...)`.

    Used for `mask` and `positions`: a wrong rank, batch or length is a `ValueError`
    naming the argument, never a tail silently treated as masked or position 0.
    """
    if value is None:
        return None
    shape = _shape(value)
    batch, length = inputs.shape[0], inputs.shape[1]
    if len(shape) != 2 or not (_dims_match(shape[0], batch) and _dims_match(shape[1], length)):
        raise ValueError(
            f"Invalid {name} with shape {shape}: expected (batch, seq_len) = "
            f"({batch}, {length}), matching inputs of shape {_shape(inputs)}."
        )
    return value


def state(value, inputs, num_heads, dim_key, dim_value, name="initial_state"):
    """`(memory (batch, heads, dim_key, dim_value), norm (batch, heads, dim_key))`;
    `dim_key` is the memory's key width (the layer's `memory_dim`)."""
    if value is None:
        return None
    batch = inputs.shape[0]
    expected = ((batch, num_heads, dim_key, dim_value), (batch, num_heads, dim_key))
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(
            f"Invalid {name}={type(value).__name__}: expected a pair (memory, norm) with "
            f"shapes {expected[0]} and {expected[1]}."
        )
    for part, tensor, shape in zip(("memory", "norm"), value, expected):
        got = _shape(tensor) if hasattr(tensor, "shape") else None
        if got is None or len(got) != len(shape) or not all(
            _dims_match(g, e) for g, e in zip(got, shape)
        ):
            raise ValueError(
                f"Invalid {name}: {part} has shape {got}, expected {shape} (batch of the "
                f"inputs {_shape(inputs)}, num_heads={num_heads}, memory key width {dim_key}, "
                f"dim_value={dim_value})."
            )
    return value


GATE_LR_SCALE_RANGE = (1e-4, 1e4)


def gate_lr_scale(value, gate_init_value):
    """`gate_lr_scale` in `[1e-4, 1e4]`, such that the stored gate `gate_init / scale` is a
    finite float32 (the gate is stored and computed in float32 under any policy)."""
    low, high = GATE_LR_SCALE_RANGE
    value = float(real("gate_lr_scale", value, lambda v: low <= v <= high,
                       f"a number in [{low:g}, {high:g}]"))
    inits = gate_init_value if isinstance(gate_init_value, list) else [gate_init_value]
    if any(abs(v) / value > 1e37 for v in inits):
        raise ValueError(
            f"Invalid gate_init={gate_init_value!r} with gate_lr_scale={value!r}: the stored "
            "gate gate_init / gate_lr_scale must stay a finite float32 (below 1e37)."
        )
    return value


def key_value_heads(value, num_heads):
    """`num_key_value_heads`: None (= `num_heads`) or a positive divisor of `num_heads`."""
    if value is None:
        return num_heads
    value = positive_int("num_key_value_heads", value)
    if num_heads % value:
        raise ValueError(
            f"Invalid num_key_value_heads={value}: it must divide num_heads={num_heads} "
            "(each key/value head serves num_heads // num_key_value_heads query heads)."
        )
    return value


def optional_layer(name, value):
    """None, a Keras layer, or a serialised Keras layer (a dict from `get_config`)."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = keras.saving.deserialize_keras_object(value)
    if not isinstance(value, keras.layers.Layer):
        raise ValueError(
            f"Invalid {name}={value!r}: expected None or a Keras layer (e.g. an RMS norm "
            "over the head width)."
        )
    return value


def gate_init(value, num_heads):
    """An initial gate logit: a finite number, or a list of `num_heads` finite numbers."""
    allowed = (f"a finite number or a list of num_heads={num_heads} finite numbers "
               "(gate logits, sigmoid(0) = 0.5)")
    if isinstance(value, (list, tuple)):
        if len(value) != num_heads:
            raise ValueError(f"Invalid gate_init={value!r}: expected {allowed}.")
        return [float(real("gate_init", v, allowed=allowed)) for v in value]
    return float(real("gate_init", value, allowed=allowed))


# ---------------------------------------------------------------------- decode caches
def cache(value, expected, owner, batch, dtypes=None):
    """A decode cache with exactly the structure, static shapes and dtypes of `expected`.

    `expected` is what `owner.build_cache(batch)` would return, as a dict of name ->
    shape tuple (nested dicts for sublayers); `dtypes` the same structure of dtype names
    (`None`: not checked); `owner` names the layer in the message. A cache built for
    another layer (other widths, heads, segment length, structure, dtype policy) or
    another batch size, or an entry cast to another dtype (a float64 memory, a float
    `length`), is refused by name. Only static properties are read: no value, so the
    check costs nothing inside `jax.jit` / `tf.function`.
    """

    def fail(detail):
        raise ValueError(
            f"Invalid cache for layer {owner!r}: {detail}. A cache works only with the "
            f"layer and batch size it was built for: use {owner}.build_cache("
            f"batch_size={batch}) for inputs of batch {batch}."
        )

    def check(got, exp, dtype, path):
        if isinstance(exp, dict):
            if not isinstance(got, dict) or set(got) != set(exp):
                keys = sorted(got) if isinstance(got, dict) else type(got).__name__
                fail(f"{'/'.join(path) or 'the cache'} has entries {keys}, expected "
                     f"{sorted(exp)}")
            for key in exp:
                check(got[key], exp[key], None if dtype is None else dtype[key],
                      path + (key,))
            return
        shape = _shape(got) if hasattr(got, "shape") else None
        if shape is None or len(shape) != len(exp) or not all(
            _dims_match(g, e) for g, e in zip(shape, exp)
        ):
            fail(f"{'/'.join(path)} has shape {shape}, expected {tuple(exp)}")
        if dtype is not None:
            got_dtype = _dtype_name(got)
            if got_dtype != dtype:
                fail(f"{'/'.join(path)} has dtype {got_dtype}, expected {dtype}")

    check(value, expected, dtypes, ())
    return value


def _dtype_name(tensor):
    import keras

    try:
        return keras.backend.standardize_dtype(tensor.dtype)
    except (AttributeError, ValueError, TypeError):
        return str(getattr(tensor, "dtype", None))


def prefix_mask(mask, owner):
    """Eager check of a cached call's `mask` `(batch, T)` (a NumPy bool array): every
    row is a prefix of True then False (a right-padded prompt)."""
    mask = np.asarray(mask).astype(bool)
    after_gap = np.logical_and(mask[:, 1:], np.logical_not(mask[:, :-1]))
    rows = np.nonzero(after_gap.any(axis=1))[0]
    if rows.size:
        row = int(rows[0])
        raise ValueError(
            f"Invalid mask for a call of layer {owner!r} with cache: row {row} is "
            f"{mask[row].astype(int).tolist()}, expected a prefix (True for the tokens "
            "the row takes, then False: a right-padded prompt). A decode cache consumes "
            "tokens in order and cannot skip one; drop the masked tokens instead (or "
            "call with the tokens of each row up to its first masked one)."
        )


def cache_update_index(value, num_tokens):
    """The position of the first new token of a cached call: an int >= 0, or a scalar
    integer tensor (then for one new token only: the layout of several tokens depends on
    the position within the segment, which must be known when the call is traced)."""
    allowed = ("an int >= 0 (the number of tokens already in the cache), or a scalar "
               "integer tensor for a one-token call")
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(
        value.dtype, np.integer
    ):
        value = int(value)
    if value is None or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Invalid cache_update_index={value!r}: expected {allowed}.")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"Invalid cache_update_index={value!r}: expected {allowed}.")
        return int(value)
    shape = getattr(value, "shape", None)
    dtype = str(getattr(value, "dtype", ""))
    if shape is None or len(tuple(shape)) != 0 or "int" not in dtype:
        raise ValueError(
            f"Invalid cache_update_index with shape {shape} and dtype {dtype or None}: "
            f"expected {allowed}."
        )
    if num_tokens != 1:
        raise ValueError(
            f"Invalid cache_update_index: a tensor is accepted for one new token only, got "
            f"{num_tokens} tokens; pass a Python int for several (a prompt), or call one "
            "token at a time."
        )
    return value


def cache_position(index, lengths, takes_token):
    """Eager check: every row that takes a new token holds exactly `index` tokens.

    `lengths` (int array `(batch,)`) is the cache's token count per row, `takes_token`
    (bool array) which rows consume the first new token. A recurrent cache continues
    where it stopped: the memory cannot be rewound or skip positions.
    """
    index = int(index)
    wrong = [int(n) for n, take in zip(lengths, takes_token) if take and int(n) != index]
    if wrong:
        raise ValueError(
            f"Invalid cache_update_index={index}: outside the cache, which holds "
            f"{sorted(set(int(n) for n in lengths))} tokens per row. A recurrent cache can "
            "only continue where it stopped: cache_update_index must equal the number of "
            "tokens already in the cache (for every row that takes the new token)."
        )
