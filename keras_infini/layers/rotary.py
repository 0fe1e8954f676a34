"""Rotary position embeddings: RoPE (RoFormer, arXiv 2104.09864) and YaRN (arXiv 2309.00071)."""

import math
import numbers

import keras
import numpy as np
from keras import ops

# Positions are split into base-256 digits; the angle of each digit is looked up in a
# float64-accurate table and the digits are combined with the angle-addition formulas.
# float32 `p * theta` has an absolute angle error up to ~4e-3 rad at p = 65536 (half an
# ulp of the product); the digit tables keep the rotated output within ~5e-7 of a float64
# reference for every int32 position (measured: 2.4e-7 at p = 65536, 4.8e-7 at 2^31 - 1).
_DIGIT_BASE = 256
_NUM_DIGITS = 4  # covers 0 <= p < 2^32


def _check_number(name, value, condition, allowed):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not condition(value):
        raise ValueError(f"Invalid {name}={value!r}: expected {allowed}.")


@keras.saving.register_keras_serializable(package="keras_infini")
class RoPEEmbeddings(keras.layers.Layer):
    """Rotary position embeddings with interleaved pairs (RoFormer eq. 34).

    With `d_rot = int(dim * dim_embeddings_pct)` rounded down to even, channel pairs
    `(2i, 2i + 1)` for `i < d_rot / 2` are rotated by the angle `p * theta_i`,
    `theta_i = base ** (-2i / d_rot)`; channels `>= d_rot` pass through. The layer holds no
    weights. Positions beyond `seq_len` are computed exactly (no table that clamps).

    Args:
        dim: size of the last axis of the inputs (the per-head key width).
        seq_len: the segment length the embedder is built for (kept for the API of the
            original project; positions are not limited to it).
        dim_embeddings_pct: fraction of `dim` that is rotated, in `(0, 1]`.
        base: frequency base, `> 1`.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(..., seq, dim)`.
        positions: optional integer tensor broadcastable to `inputs.shape[:-1]`; default
            `arange(seq)` along the second-to-last axis.

    Example:

    >>> import keras
    >>> from keras_infini import RoPEEmbeddings
    >>> rope = RoPEEmbeddings(dim=8, seq_len=16)
    >>> tuple(rope(keras.random.normal((2, 16, 8))).shape)
    (2, 16, 8)
    """

    def __init__(self, dim, seq_len, dim_embeddings_pct=0.5, base=10000, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("dim", dim), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"Invalid {name}={value!r}: expected a positive integer.")
        _check_number("dim_embeddings_pct", dim_embeddings_pct, lambda v: 0 < v <= 1,
                      "a number in (0, 1]")
        d_rot = int(dim * dim_embeddings_pct)
        d_rot -= d_rot % 2
        if d_rot < 2:
            raise ValueError(
                f"Invalid dim_embeddings_pct={dim_embeddings_pct!r} for dim={dim}: it leaves "
                "no channel pair to rotate (int(dim * dim_embeddings_pct) must be >= 2)."
            )
        _check_number("base", base, lambda v: v > 1, "a number greater than 1")
        self.dim = int(dim)
        self.seq_len = int(seq_len)
        self.dim_embeddings_pct = dim_embeddings_pct
        self.base = base
        self.d_rot = d_rot
        self.supports_masking = True
        self.built = True

    @property
    def inv_freq(self):
        """The rotation frequencies, float64 NumPy `(d_rot / 2,)`."""
        return self.frequencies()

    def _digit_tables(self):
        """float32 `cos`/`sin` of `digit * 256**level * theta`, `(levels, 256, d_rot/2)`."""
        if getattr(self, "_tables", None) is None:
            digits = np.arange(_DIGIT_BASE, dtype=np.float64)[:, None]
            cos_tables, sin_tables = [], []
            for level in range(_NUM_DIGITS):
                step = np.mod(float(_DIGIT_BASE**level) * self.inv_freq, 2 * math.pi)
                angle = digits * step[None, :]
                cos_tables.append(np.cos(angle))
                sin_tables.append(np.sin(angle))
            self._tables = (np.stack(cos_tables).astype("float32"),
                            np.stack(sin_tables).astype("float32"))
        return self._tables

    def frequencies(self):
        """`theta_i = base ** (-2i / d_rot)`, float64 NumPy `(d_rot / 2,)`."""
        i = np.arange(self.d_rot // 2, dtype=np.float64)
        return float(self.base) ** (-2.0 * i / self.d_rot)

    def output_scale(self):
        """Factor applied to the whole output (1 for RoPE)."""
        return 1.0

    def build(self, input_shape=None):
        self.built = True

    def _cos_sin(self, positions):
        """float32 `cos, sin` of `positions * theta`, shape `positions.shape + (d_rot/2,)`."""
        cos_tables, sin_tables = self._digit_tables()
        pos = ops.cast(positions, "int32")
        cos = sin = None
        for level in range(_NUM_DIGITS):
            digit = ops.mod(ops.floor_divide(pos, _DIGIT_BASE**level), _DIGIT_BASE)
            c = ops.take(ops.convert_to_tensor(cos_tables[level]), digit, axis=0)
            s = ops.take(ops.convert_to_tensor(sin_tables[level]), digit, axis=0)
            if cos is None:
                cos, sin = c, s
            else:
                cos, sin = cos * c - sin * s, sin * c + cos * s
        return cos, sin

    def _static_cos_sin(self, seq):
        """`cos, sin` for positions `0..seq-1` computed in float64 NumPy (static length)."""
        angle = np.arange(seq, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        return (ops.convert_to_tensor(np.cos(angle).astype("float32")),
                ops.convert_to_tensor(np.sin(angle).astype("float32")))

    def call(self, inputs, positions=None):
        if inputs.shape[-1] is not None and inputs.shape[-1] != self.dim:
            raise ValueError(
                f"Invalid inputs: last axis {inputs.shape[-1]} does not match dim={self.dim}."
            )
        dtype = inputs.dtype
        x = ops.cast(inputs, "float32")
        if positions is None:
            seq = inputs.shape[-2]
            if seq is not None:
                cos, sin = self._static_cos_sin(int(seq))
            else:
                cos, sin = self._cos_sin(ops.arange(ops.shape(inputs)[-2], dtype="int32"))
        else:
            cos, sin = self._cos_sin(positions)
        half = self.d_rot // 2
        rotated = x[..., : self.d_rot]
        lead = [ops.shape(rotated)[i] if rotated.shape[i] is None else rotated.shape[i]
                for i in range(len(rotated.shape) - 1)]
        pairs = ops.reshape(rotated, lead + [half, 2])
        even, odd = pairs[..., 0], pairs[..., 1]
        out = ops.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
        out = ops.reshape(out, ops.shape(out)[:-2] + (self.d_rot,))
        if self.d_rot < self.dim:
            out = ops.concatenate([out, x[..., self.d_rot:]], axis=-1)
        scale = self.output_scale()
        if scale != 1.0:
            out = out * scale
        return ops.cast(out, dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "dim": self.dim,
                "seq_len": self.seq_len,
                "dim_embeddings_pct": self.dim_embeddings_pct,
                "base": self.base,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_infini")
class YaRNEmbeddings(RoPEEmbeddings):
    """YaRN: RoPE with NTK-by-parts frequency interpolation and attention scaling.

    With `s = context_len_ext / context_len`, per pair the wavelength is
    `lambda_i = 2 pi / theta_i`, `r_i = context_len / lambda_i`, the ramp
    `gamma_i = clip((r_i - alpha) / (beta - alpha), 0, 1)` and the new frequency
    `theta'_i = (1 - gamma_i) theta_i / s + gamma_i theta_i` (YaRN sec. 3). The whole
    output vector is multiplied by `mscale = 0.1 ln(s) + 1` (or `len_scale`), so the
    attention logits scale by `mscale ** 2` as in the paper.

    Args:
        dim, seq_len, dim_embeddings_pct, base: as in `RoPEEmbeddings`.
        context_len: the context length the model was trained with.
        context_len_ext: the extended context length, `>= context_len`.
        alpha, beta: ramp bounds in rotations per context, `beta > alpha`.
        len_scale: optional output scale replacing `0.1 ln(s) + 1`, `> 0`.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:

    >>> import keras
    >>> from keras_infini import YaRNEmbeddings
    >>> yarn = YaRNEmbeddings(dim=8, seq_len=16, context_len=16, context_len_ext=64)
    >>> tuple(yarn(keras.random.normal((2, 16, 8))).shape)
    (2, 16, 8)
    """

    def __init__(self, dim, seq_len, context_len, context_len_ext, dim_embeddings_pct=0.5,
                 base=10000, alpha=1, beta=32, len_scale=None, **kwargs):
        super().__init__(dim, seq_len, dim_embeddings_pct=dim_embeddings_pct, base=base,
                         **kwargs)
        _check_number("context_len", context_len, lambda v: v > 0, "a positive number")
        _check_number("context_len_ext", context_len_ext, lambda v: v > 0, "a positive number")
        if context_len_ext < context_len:
            raise ValueError(
                f"Invalid context_len_ext={context_len_ext!r}: expected a value >= "
                f"context_len={context_len!r}."
            )
        _check_number("alpha", alpha, lambda v: True, "a number")
        _check_number("beta", beta, lambda v: v > alpha, f"a number greater than alpha={alpha!r}")
        if len_scale is not None:
            _check_number("len_scale", len_scale, lambda v: v > 0, "None or a number > 0")
        self.context_len = context_len
        self.context_len_ext = context_len_ext
        self.alpha = alpha
        self.beta = beta
        self.len_scale = len_scale

    def frequencies(self):
        theta = super().frequencies()
        s = self.context_len_ext / self.context_len
        ratio = self.context_len / (2 * math.pi / theta)
        gamma = np.clip((ratio - self.alpha) / (self.beta - self.alpha), 0.0, 1.0)
        return (1 - gamma) * theta / s + gamma * theta

    def output_scale(self):
        if self.len_scale is not None:
            return float(self.len_scale)
        return 0.1 * math.log(self.context_len_ext / self.context_len) + 1.0

    @property
    def mscale(self):
        return self.output_scale()

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
