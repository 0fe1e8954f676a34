"""Rotary position embeddings: RoPE (RoFormer, arXiv 2104.09864) and YaRN (arXiv 2309.00071).

Both layers rotate interleaved channel pairs `(2i, 2i + 1)` of their input by the angle
`p * theta_i` of the token position `p` (RoFormer eq. 34). They hold no weights: the
frequencies are float64 NumPy constants computed once in `__init__`.

Angle accuracy. A float32 product `p * theta` is off by up to half an ulp of the product,
~4e-3 rad at `p = 65536` (~2e-2 rad at `p = 2**18`), which would make long-context rotations
visibly wrong. Here an integer position is split into base-256 digits,
`p = d0 + 256 d1 + 256**2 d2 + 256**3 d3` (`d3` signed, so every int32 works, negatives too),
the `cos`/`sin` of `d * 256**k * theta_i` are looked up in small tables computed in float64
(with `fmod(256**k * theta_i, 2 pi)`, exact) and rounded once to float32, and the digit
rotations are combined in float32 with the angle-addition formulas. A fractional part of a
float position (`|frac * theta| < 1`) is rotated directly in float32. Measured max abs error
of the rotated output of a unit vector against a float64 NumPy reference (dim 16, 8192
positions, CPU, same on JAX/TF/torch): 1.3e-7 for positions up to 65536 and 2.4e-7 for
random int32 positions, against 1.1e-3 (65536) and 2.0 (int32) for the naive float32
product. The lookup costs one gather per digit and 3 complex products on a tensor of shape
`positions.shape + (d_rot / 2,)`, no transcendental function on device; the default
positions `0..seq-1` of a static length use only the digits they need (one for
`seq <= 256`). Float positions are split into `floor` (table path) and fraction in their
own dtype, so a float32 position is only as exact as float32 (integers up to 2**24).
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_infini import validation

_DIGIT_BASE = 256
_NUM_DIGITS = 4  # three unsigned base-256 digits and a signed top digit: every int32


def _levels_for(max_position):
    """Digit levels of positions in `[0, max_position)` (all of them for None), after
    checking the argument."""
    if max_position is None:
        return _NUM_DIGITS
    if (isinstance(max_position, bool) or not isinstance(max_position, numbers.Integral)
            or max_position < 1):
        raise ValueError(
            f"Invalid max_position={max_position!r}: expected None or a positive Python int "
            "(a static bound of the positions)."
        )
    return _digits_below(max_position)


def _digits_below(bound):
    """Base-256 digit levels that non-negative positions below `bound` use (at least one)."""
    levels = 1
    while _DIGIT_BASE**levels < bound and levels < _NUM_DIGITS:
        levels += 1
    return levels


@keras.saving.register_keras_serializable(package="keras_infini")
class RoPEEmbeddings(keras.layers.Layer):
    """Rotary position embeddings with interleaved pairs (RoFormer eq. 34).

    With `d_rot = int(dim * dim_embeddings_pct)` rounded down to even, the channel pairs
    `(2i, 2i + 1)`, `i < d_rot / 2`, are rotated by the angle `p * theta_i` with
    `theta_i = base ** (-2i / d_rot)`:
    `out[2i] = x[2i] cos - x[2i+1] sin`, `out[2i+1] = x[2i] sin + x[2i+1] cos`.
    Channels `>= d_rot` pass through unchanged. `dim` may be odd.

    The layer holds no weights. Angles are exact to float32 rounding for every int32
    position (digit tables, see the module docstring), so any position is fine. `cos`/`sin` and the rotation are computed in float32 whatever the input dtype, and
    the result is cast back to the input dtype: the layer does not autocast its inputs to
    the dtype policy (`autocast=False` by default), a bfloat16 input gives a bfloat16 output.

    Axes (keras-hub `RotaryEmbedding` semantics). Without explicit `positions`, token `j`
    along `sequence_axis` gets position `start_index + j`, and the channels are read along
    `feature_axis`. The defaults `sequence_axis=1`, `feature_axis=-1` are keras-hub's, so
    `(batch, seq, dim)` and `(batch, seq, heads, dim)` inputs are rotated along the sequence.
    **Changed default:** before `sequence_axis` existed, default positions ran along axis
    `-2`; for rank-3 inputs that is the same axis, but a `(batch, heads, seq, dim)` input
    called without `positions` was rotated along `seq` and is now rotated along `heads`
    (and a rank-2 `(seq, dim)` input now raises). Pass `sequence_axis=-2` (or explicit
    `positions`) to keep the old behaviour.

    Args:
        dim: int, the size of the feature axis of the inputs (e.g. the per-head key width).
        seq_len: deprecated and ignored. Positions were never limited by it; it is accepted
            (when given, it must still be a positive int) so old code and saved configs load,
            and it is no longer written by `get_config()`.
        dim_embeddings_pct: float in `(0, 1]`, the fraction of `dim` that is rotated. Must
            leave at least one pair (`int(dim * dim_embeddings_pct) >= 2`).
        base: float `> 1`, the frequency base.
        sequence_axis: int, the axis of the default positions (default 1, as in keras-hub).
            Unused when `positions` is passed.
        feature_axis: int, the channel axis (default -1, as in keras-hub). Must differ from
            `sequence_axis`.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor with `dim` channels on `feature_axis`, e.g.
            `(batch, seq, dim)` or `(batch, seq, heads, dim)`.
        positions: optional integer (or float) tensor broadcastable to the input shape
            without its feature axis, e.g. `(batch, seq, 1)` for inputs
            `(batch, seq, heads, dim)`. Integer positions must fit in int32. Defaults to
            `start_index + (0..seq-1)` along `sequence_axis`.
        start_index: int or scalar tensor (integer or float), default 0, added to the
            positions (keras-hub's argument, for decoding with a cache).
        max_position: optional positive int, a promise of the caller that every explicit
            position (after `start_index`) lies in `[0, max_position)`. The angle lookup
            then uses only the base-256 digits such positions have (one for
            `max_position <= 256`): a smaller compiled program, same values. A position
            outside the range is rotated by a wrong angle, so only pass it for positions
            built by the caller (e.g. in-segment positions of a layer with a known segment
            length). Ignored without `positions` (default positions already use the digits
            they need).

    Attributes:
        d_rot: the number of rotated channels.
        theta: float64 NumPy `(d_rot / 2,)`, the RoPE frequencies `base ** (-2i / d_rot)`.
        inv_freq: float64 NumPy `(d_rot / 2,)`, the frequencies actually used (equal to
            `theta` here, interpolated in `YaRNEmbeddings`).

    Example:

    >>> import numpy as np
    >>> from keras_infini import RoPEEmbeddings
    >>> rope = RoPEEmbeddings(dim=8)
    >>> q = np.random.normal(size=(2, 16, 4, 8)).astype("float32")  # (batch, seq, heads, dim)
    >>> tuple(rope(q).shape)  # default positions 0..15 along sequence_axis=1
    (2, 16, 4, 8)
    >>> np.allclose(rope(q, start_index=1000), rope(q, positions=1000 + np.arange(16)[:, None]))
    True
    >>> x = np.random.normal(size=(2, 4, 16, 8)).astype("float32")  # (batch, heads, seq, dim)
    >>> tuple(RoPEEmbeddings(dim=8, sequence_axis=2)(x).shape)
    (2, 4, 16, 8)
    """

    def __init__(
        self,
        dim,
        seq_len=None,
        dim_embeddings_pct=0.5,
        base=10000,
        sequence_axis=1,
        feature_axis=-1,
        **kwargs,
    ):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        dim = validation.positive_int("dim", dim)
        if seq_len is not None:  # deprecated, ignored; still validated when given
            seq_len = validation.positive_int("seq_len", seq_len)
        sequence_axis = validation.axis("sequence_axis", sequence_axis)
        feature_axis = validation.axis("feature_axis", feature_axis)
        if sequence_axis == feature_axis:
            raise ValueError(
                f"Invalid sequence_axis={sequence_axis} and feature_axis={feature_axis}: "
                "they must be different axes."
            )
        dim_embeddings_pct = validation.real(
            "dim_embeddings_pct", dim_embeddings_pct, lambda v: 0 < v <= 1, "a number in (0, 1]"
        )
        d_rot = int(dim * dim_embeddings_pct)
        d_rot -= d_rot % 2
        if d_rot < 2:
            raise ValueError(
                f"Invalid dim_embeddings_pct={dim_embeddings_pct!r} for dim={dim}: it leaves no "
                "channel pair to rotate; int(dim * dim_embeddings_pct) must be >= 2."
            )
        base = validation.real("base", base, lambda v: v > 1, "a number greater than 1")
        self.dim = dim
        self.seq_len = seq_len
        self.dim_embeddings_pct = dim_embeddings_pct
        self.base = base
        self.sequence_axis = sequence_axis
        self.feature_axis = feature_axis
        self.d_rot = d_rot
        self.theta = float(base) ** (-2.0 * np.arange(d_rot // 2, dtype=np.float64) / d_rot)
        self.supports_masking = True
        self._set_frequencies(self.theta, 1.0)

    def _set_frequencies(self, inv_freq, scale):
        """Sets the rotation frequencies (float64) and output scale; builds the digit tables."""
        self.inv_freq = np.asarray(inv_freq, dtype=np.float64)
        self._scale = float(scale)
        self._inv_freq32 = self.inv_freq.astype(np.float32)
        half = self.d_rot // 2
        sign = np.tile(np.array([-1.0, 1.0], dtype=np.float32), half)
        self._sin_sign = sign  # out[2i] gets -sin, out[2i+1] gets +sin
        swap = np.arange(self.dim, dtype=np.int32)
        swap[: self.d_rot] ^= 1  # (1, 0, 3, 2, ...), identity on the pass-through channels
        self._swap = swap
        # Level k: cos/sin of d * 256**k * theta_i for d in 0..255 (the top level for the
        # signed digit d - 128). 256**k * theta_i is exact in float64 (a power of 2 times
        # theta_i), and so is its fmod by 2 pi; d * step < 256 * 2 pi keeps ~1e-13 rad.
        digits = np.arange(_DIGIT_BASE, dtype=np.float64)
        cos_tables, sin_tables = [], []
        for level in range(_NUM_DIGITS):
            step = np.fmod(float(_DIGIT_BASE**level) * self.inv_freq, 2.0 * math.pi)
            d = digits - _DIGIT_BASE // 2 if level == _NUM_DIGITS - 1 else digits
            angle = d[:, None] * step[None, :]
            cos_tables.append(np.cos(angle).astype(np.float32))
            sin_tables.append(np.sin(angle).astype(np.float32))
        self._cos_tables = tuple(cos_tables)
        self._sin_tables = tuple(sin_tables)

    # ------------------------------------------------------------------ angles
    def _cos_sin(self, positions, num_levels=_NUM_DIGITS):
        """float32 `cos, sin` of `positions * inv_freq`, shape `positions.shape + (d_rot/2,)`.

        `num_levels < _NUM_DIGITS` only for positions known to lie in `[0, 256**num_levels)`.
        """
        frac = None
        if keras.backend.is_float_dtype(keras.backend.standardize_dtype(positions.dtype)):
            whole = ops.floor(positions)  # in the positions' own dtype (float64 stays exact)
            frac = ops.cast(positions - whole, "float32")
            positions = whole
        p = ops.cast(positions, "int32")
        cos = sin = None
        for level in range(num_levels):
            if level == _NUM_DIGITS - 1:  # signed top digit in [-128, 127]
                digit = ops.floor_divide(p, _DIGIT_BASE**level) + _DIGIT_BASE // 2
            elif level == 0:
                digit = ops.mod(p, _DIGIT_BASE)
            else:
                digit = ops.mod(ops.floor_divide(p, _DIGIT_BASE**level), _DIGIT_BASE)
            c = ops.take(ops.convert_to_tensor(self._cos_tables[level]), digit, axis=0)
            s = ops.take(ops.convert_to_tensor(self._sin_tables[level]), digit, axis=0)
            cos, sin = (c, s) if cos is None else (cos * c - sin * s, sin * c + cos * s)
        if frac is not None:  # |frac * theta| < 1: plain float32 is accurate to ~1e-7
            angle = frac[..., None] * ops.convert_to_tensor(self._inv_freq32)
            c, s = ops.cos(angle), ops.sin(angle)
            cos, sin = cos * c - sin * s, sin * c + cos * s
        return cos, sin

    # ------------------------------------------------------------------ call
    def _axes(self, shape, default_positions):
        """`(feature_axis, sequence_axis)` as non-negative ints for inputs of `shape`
        (`sequence_axis` is None with explicit positions); validates the shape."""
        rank = len(shape)

        def normalize(name, axis):
            if not -rank <= axis < rank:
                raise ValueError(
                    f"Invalid inputs of shape {tuple(shape)} for {name}={axis}: the inputs "
                    f"have rank {rank}."
                )
            return axis % rank

        feature = normalize("feature_axis", self.feature_axis)
        if shape[feature] is not None and shape[feature] != self.dim:
            raise ValueError(
                f"Invalid inputs of shape {tuple(shape)}: axis {self.feature_axis} "
                f"(feature_axis) must equal dim={self.dim}."
            )
        if not default_positions:
            return feature, None
        sequence = normalize("sequence_axis", self.sequence_axis)
        if sequence == feature:
            raise ValueError(
                f"Invalid inputs of shape {tuple(shape)}: sequence_axis={self.sequence_axis} "
                f"and feature_axis={self.feature_axis} name the same axis; default positions "
                "need a separate sequence axis (or pass positions explicitly)."
            )
        return feature, sequence

    def _default_positions(self, x, seq_axis, start_index):
        """`start_index + arange(seq)` shaped to broadcast along `seq_axis` of `x` (whose
        last axis is the feature axis), and the number of digit levels it needs."""
        seq = x.shape[seq_axis]
        levels = _NUM_DIGITS
        if isinstance(start_index, numbers.Integral) and not isinstance(start_index, bool):
            start = int(start_index)
            p = ops.arange(ops.shape(x)[seq_axis] if seq is None else int(seq), dtype="int32")
            if start:
                p = p + start
            if seq is not None and start >= 0:
                levels = _digits_below(start + seq)
        else:
            start = ops.convert_to_tensor(start_index)
            length = ops.shape(x)[seq_axis] if seq is None else int(seq)
            if keras.backend.is_float_dtype(keras.backend.standardize_dtype(start.dtype)):
                p = ops.cast(ops.arange(length, dtype="int32"), start.dtype) + start
            else:
                p = ops.arange(length, dtype="int32") + ops.cast(start, "int32")
        rank = len(x.shape)
        shape = [1] * (rank - 1)
        shape[seq_axis] = -1
        return ops.reshape(p, shape), levels

    def call(self, inputs, positions=None, start_index=0, max_position=None):
        levels = _levels_for(max_position)
        inputs = ops.convert_to_tensor(inputs)
        feature, sequence = self._axes(inputs.shape, positions is None)
        rank = len(inputs.shape)
        x = ops.cast(inputs, "float32")
        if feature != rank - 1:
            x = ops.moveaxis(x, feature, -1)
        if positions is None:
            seq_axis = sequence if sequence < feature else sequence - 1
            p, levels = self._default_positions(x, seq_axis, start_index)
            cos, sin = self._cos_sin(p, levels)
        else:
            p = ops.convert_to_tensor(positions)
            if not (isinstance(start_index, numbers.Integral) and start_index == 0):
                p = ops.add(p, start_index)
            cos, sin = self._cos_sin(p, levels)

        # Per channel: out = x * C + swap_pairs(x) * S, with C = (cos_0, cos_0, cos_1, ...),
        # S = (-sin_0, sin_0, -sin_1, ...), and C = 1, S = 0 on the pass-through channels.
        c = ops.repeat(cos, 2, axis=-1)
        s = ops.repeat(sin, 2, axis=-1) * ops.convert_to_tensor(self._sin_sign)
        if self.d_rot < self.dim:
            # Concatenation, not `ops.pad`: Keras' eager `pad` builds an `Operation`
            # (a new auto-named object per call), which makes `torch.compile` recompile.
            rest = ops.zeros_like(c[..., :1]) + ops.zeros((self.dim - self.d_rot,), c.dtype)
            c = ops.concatenate([c, rest + 1.0], axis=-1)
            s = ops.concatenate([s, rest], axis=-1)
        if self._scale != 1.0:
            c = c * self._scale
            s = s * self._scale
        out = x * c + ops.take(x, ops.convert_to_tensor(self._swap), axis=-1) * s
        if feature != rank - 1:
            out = ops.moveaxis(out, -1, feature)
        return ops.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_output_spec(self, inputs, positions=None, start_index=0, max_position=None):
        # The output keeps the input dtype (no autocast), not the policy's compute dtype.
        _levels_for(max_position)
        self._axes(inputs.shape, positions is None)
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "dim": self.dim,
                "dim_embeddings_pct": self.dim_embeddings_pct,
                "base": self.base,
                "sequence_axis": self.sequence_axis,
                "feature_axis": self.feature_axis,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_infini")
class YaRNEmbeddings(RoPEEmbeddings):
    """YaRN: RoPE with "NTK-by-parts" frequency interpolation and attention scaling.

    YaRN (arXiv 2309.00071, sec. 3) extends a model trained on `context_len` tokens to
    `context_len_ext`. With `s = context_len_ext / context_len`, each pair's wavelength
    `lambda_i = 2 pi / theta_i` gives `r_i = context_len / lambda_i` rotations per context
    and the ramp `gamma_i = clip((r_i - alpha) / (beta - alpha), 0, 1)`; the frequency
    becomes `theta'_i = (1 - gamma_i) theta_i / s + gamma_i theta_i` (high frequencies kept,
    low frequencies interpolated by `s`). The pairs are rotated by `p * theta'_i` exactly as
    in `RoPEEmbeddings`, then the whole output vector (pass-through channels included) is
    multiplied by `mscale = 0.1 ln(s) + 1` (or by `len_scale` when given), so that the
    attention logits `q . k` scale by `mscale ** 2` as in the paper.

    Args:
        dim: int, the size of the last axis of the inputs.
        seq_len: deprecated and ignored (see `RoPEEmbeddings`); not written by `get_config()`.
        context_len: number `> 0`, the context length the model was trained with.
        context_len_ext: number `>= context_len`, the extended context length.
        dim_embeddings_pct: float in `(0, 1]`, the fraction of `dim` that is rotated.
        base: float `> 1`, the frequency base.
        alpha: number, the ramp's lower bound in rotations per context (below it the
            frequency is interpolated by `s`).
        beta: number `> alpha`, the ramp's upper bound (above it the frequency is kept).
        len_scale: optional number `> 0` replacing `mscale = 0.1 ln(s) + 1`.
        sequence_axis, feature_axis: as in `RoPEEmbeddings` (defaults 1 and -1).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments: as in `RoPEEmbeddings` (`inputs`, `positions`, `start_index`,
    `max_position`).

    Attributes (besides those of `RoPEEmbeddings`):
        inv_freq: float64 NumPy `(d_rot / 2,)`, the interpolated frequencies `theta'_i`.
        ramp: float64 NumPy `(d_rot / 2,)`, `gamma_i`.
        mscale: float, the factor applied to the output.

    Example:

    >>> import numpy as np
    >>> from keras_infini import YaRNEmbeddings
    >>> yarn = YaRNEmbeddings(dim=8, context_len=16, context_len_ext=64)
    >>> round(yarn.mscale, 4)  # 0.1 * ln(4) + 1
    1.1386
    >>> x = np.random.normal(size=(2, 16, 8)).astype("float32")
    >>> tuple(yarn(x, positions=np.arange(48, 64)).shape)
    (2, 16, 8)
    """

    def __init__(
        self,
        dim,
        seq_len=None,
        context_len=None,
        context_len_ext=None,
        dim_embeddings_pct=0.5,
        base=10000,
        alpha=1,
        beta=32,
        len_scale=None,
        sequence_axis=1,
        feature_axis=-1,
        **kwargs,
    ):
        # `context_len` and `context_len_ext` are required; they keep their positions after
        # the deprecated `seq_len` so `YaRNEmbeddings(dim, seq_len, context_len, ...)` works.
        super().__init__(
            dim,
            seq_len,
            dim_embeddings_pct=dim_embeddings_pct,
            base=base,
            sequence_axis=sequence_axis,
            feature_axis=feature_axis,
            **kwargs,
        )
        context_len = validation.real("context_len", context_len, lambda v: v > 0, "a positive number")
        context_len_ext = validation.real(
            "context_len_ext",
            context_len_ext,
            lambda v: v >= context_len,
            f"a number >= context_len={context_len!r}",
        )
        alpha = validation.real("alpha", alpha)
        beta = validation.real(
            "beta", beta, lambda v: v > alpha, f"a number greater than alpha={alpha!r}"
        )
        len_scale = validation.real(
            "len_scale", len_scale, lambda v: v > 0, "None or a number > 0", allow_none=True
        )
        self.context_len, self.context_len_ext = context_len, context_len_ext
        self.alpha, self.beta, self.len_scale = alpha, beta, len_scale

        s = context_len_ext / context_len
        ratio = context_len / (2.0 * math.pi / self.theta)
        self.ramp = np.clip((ratio - alpha) / (beta - alpha), 0.0, 1.0)
        inv_freq = (1.0 - self.ramp) * self.theta / s + self.ramp * self.theta
        self.mscale = float(len_scale) if len_scale is not None else 0.1 * math.log(s) + 1.0
        self._set_frequencies(inv_freq, self.mscale)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "context_len": self.context_len,
                "context_len_ext": self.context_len_ext,
                "alpha": self.alpha,
                "beta": self.beta,
                "len_scale": self.len_scale,
            }
        )
        return config
