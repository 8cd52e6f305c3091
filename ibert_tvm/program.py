"""The integer program: every tensor and constant of an I-BERT forward pass, as integers.

This is the hand-off point of the pipeline. The importer fills it from a PyTorch model; the NumPy
reference (`reference.py`) and the Relax builder (`graph.py`) both read it. Nothing here is float
except the output scales, which only the runner's last step uses to turn integers into floats.

Rounding rule, used by every requantization here and in the kernels: ``(x * m + 2**(e-1)) >> e``
(round half up, arithmetic shift), then clamp. HF rounds half to even in float64; the two differ
only on exact ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np

from .model_classes import REGISTRY, ModelClass, Output

FORMAT_VERSION = 1
INT8 = (-128, 127)
INT16 = (-32768, 32767)
INT22 = (-(2**21), 2**21 - 1)
# Products fed to a requantization stay below 2**62 so that adding the rounding term cannot
# overflow int64; the mantissa width of each requantization is chosen from its input bound.
PRODUCT_BITS = 62
# HF IntSoftmax's constant: i-exp inputs are clamped at EXP_CONST * x0 and its output has scale 2**-EXP_CONST
EXP_CONST = 30
SMALL_INPUT_BITS = 22


@dataclass
class Requant:
    """``clamp((x * m + 2**(e-1)) >> e, lo, hi)``; m, e scalar or per output channel."""

    m: np.ndarray  # int64
    e: np.ndarray  # int64, every entry in [1, 62]
    lo: int | None = None
    hi: int | None = None
    bound: int = 2**31  # largest |x| it is applied to

    @property
    def per_channel(self) -> bool:
        return self.m.ndim == 1

    @property
    def fits_int32(self) -> bool:
        """x * m plus the rounding term stays inside int32: kernels may skip int64."""
        top = self.bound * int(np.abs(self.m).max()) + (1 << (int(self.e.max()) - 1))
        return top < 2**31

    def saturations(self) -> np.ndarray | None:
        """Per channel, the least w from which every |x| >= w clamps (None without a clamp, or
        where some m is 0), so that clamping x to [-w, w] first changes no output. For |m| at
        x = +-w: x * m + 2**(e-1) reaches hi * 2**e on one side and stays below (lo + 1) * 2**e on
        the other."""
        if self.lo is None:
            return None
        m = np.abs(self.m.astype(object))
        if not m.all():
            return None
        two_e = np.left_shift(1, self.e.astype(object))
        half = two_e // 2
        top = -((half - self.hi * two_e) // m)  # ceil((hi * 2**e - half) / |m|)
        bottom = (half - (self.lo + 1) * two_e) // m + 1
        return np.maximum(top, bottom)

    def saturation(self) -> int | None:
        """The least w from which every |x| >= w clamps every channel (`saturations`)."""
        w = self.saturations()
        return None if w is None else int(np.max(w))


def dyadic(ratio: Any, in_bound: int, clamp: tuple[int, int] | None = None, max_bits: int = 31) -> Requant:
    """Approximate ``x * ratio`` by ``x * m >> e`` for |x| <= in_bound, without int64 overflow.

    ``ratio`` may be signed (i-GELU's scale is negative). The mantissa keeps as many bits as the
    input bound allows, at most `max_bits` (31 as in HF's ``batch_frexp``); inputs of 8 bits get 22
    bits, so that the product fits int32 (relative error 2**-22, far below an int8 step).
    """
    r = np.asarray(ratio, dtype=np.float64)
    width = max(1, int(in_bound)).bit_length()
    bits = min(max_bits, SMALL_INPUT_BITS if width <= 8 else min(31, PRODUCT_BITS - 1 - width))
    if bits < 8:
        raise ValueError(f"requantization input bound {in_bound} leaves only {bits} mantissa bits")
    mant, exp = np.frexp(np.abs(r))
    m = np.floor(mant * 2.0**bits + 0.5).astype(np.int64)
    e = (bits - exp).astype(np.int64)
    # A ratio too small for 62 bits of shift rounds every input to zero; one too large is a bug.
    tiny = e > PRODUCT_BITS
    m = np.where(tiny, 0, m)
    e = np.where(tiny, 1, e)
    if (e < 1).any():
        raise ValueError(f"requantization ratio {r.max()} too large for a right shift")
    m = np.where(r < 0, -m, m)
    lo, hi = clamp if clamp else (None, None)
    return Requant(m=m.astype(np.int64), e=e.astype(np.int64), lo=lo, hi=hi, bound=int(in_bound))


@dataclass
class Linear:
    """INT8 weight [out, in] (HF's clamp to [-127, 126]) and INT32 bias at scale S_in * S_w."""

    weight: np.ndarray  # int8 [N, K]
    bias: np.ndarray  # int32 [N]

    @property
    def acc_bound(self) -> int:
        """Largest |x @ W.T + b| for int8 x."""
        k = self.weight.shape[1]
        return k * 128 * 127 + int(np.abs(self.bias.astype(np.int64)).max(initial=0))


@dataclass
class LayerNorm:
    """i-LayerNorm: mean, integer Newton sqrt, 2**31/std factor, bias folded, requant chain."""

    shift: int
    bias: np.ndarray  # int64 [C]: floor((beta / gamma) / S) with S = sqrt(C) / 2**30
    out: list[Requant]  # first per channel (scale S * gamma), then any further QuantActs

    @staticmethod
    def out_bound(channels: int) -> int:
        """|y * factor / 2| stays below this; the kernels saturate there."""
        return (math.isqrt(channels) + 2) << 30


@dataclass
class IExp:
    """i-exp on x <= 0 at scale S: x0 = floor(-ln2/S), poly (r+b)*r + c, then `out` dyadic.

    The exponential's scale (a * S**2 / 2**q) is folded with the output scale into one
    requantization whose shift grows by q, so no 2**30 multiply (int64 overflow) is needed.
    """

    x0: int
    b: int
    c: int
    out: Requant  # scalar m, e; the effective shift is e + q


@dataclass
class Softmax:
    exp: IExp  # output clamp 16 bits, HF's inner QuantAct(16)
    out_bits: int = 8  # probabilities are unsigned 8-bit, scale 1/256, clamped to 255


@dataclass
class Gelu:
    """i-GELU per output channel of the GEMM it follows (the accumulator's scale is per channel)."""

    b: np.ndarray  # int64 [C]
    c: np.ndarray  # int64 [C]
    one: np.ndarray  # int64 [C]: floor(1 / S_erf)
    out: list[Requant]  # intermediate.output_activation, then layer.pre_output_act

    ERF_SHIFT = 14  # HF's const: erf's square is shifted right 14 bits to stay small

    @staticmethod
    def multiplier_bound(b: np.ndarray, c: np.ndarray, one: np.ndarray) -> int:
        """A bound on |erf + one| over every channel and x, x's multiplier (the erf value is
        sign(x) ((min(|x|, -b) + b)**2 + c) >> ERF_SHIFT)."""
        return int(((b.astype(object) ** 2 + np.abs(c)) >> Gelu.ERF_SHIFT).max()) + 1 + int(np.abs(one).max())


@dataclass
class Tanh:
    """Integer tanh via i-exp: acc -> fixed point Q(FRAC) -> exp(-2|x|) in Q15 -> int8 / 127."""

    to_fixed: Requant  # per channel, accumulator -> Q(FRAC), clamped to +-LIMIT
    exp: IExp
    FRAC = 12
    LIMIT = 10  # tanh(10) == 1 to far below int8 resolution
    EXP_FRAC = 15
    OUT_SCALE = 127


@dataclass
class Layer:
    qkv: Linear  # query, key, value weights stacked [3H, H]
    qkv_out: Requant  # per channel -> int8 (query/key/value activations)
    softmax: Softmax
    ctx_out: Requant  # (1/256 * S_v) -> int8, attention output_activation
    attn_dense: Linear
    attn_acc: Requant  # per channel -> LN input scale (22 bit, no clamp; clamp after the sum)
    attn_res: Requant  # residual (layer input) -> LN input scale
    attn_ln: LayerNorm  # out: [-> int8 output_activation, -> int8 pre_intermediate_act]
    inter: Linear
    gelu: Gelu
    out_dense: Linear
    out_acc: Requant
    out_res: Requant
    out_ln: LayerNorm  # out: [-> int8 output_activation]


@dataclass
class Embeddings:
    word: np.ndarray  # int8 [V, H]
    position: np.ndarray  # int8 [P, H]
    token_type: np.ndarray  # int8 [T, H]
    word_rq: Requant  # -> 16-bit scale of embeddings_act1
    type_rq: Requant
    sum_rq: Requant  # the 16-bit sum re-enters the same QuantAct (identity or close to it)
    pos_rq: Requant
    ln: LayerNorm


@dataclass
class Head:
    """dense -> tanh (int8, scale 1/127) [-> out_proj: int32 logits, per-class scale] on the first
    token: the pooler, the classification head, and the multiple-choice pooler + classifier."""

    dense: Linear
    tanh: Tanh
    out_proj: Linear | None = None


@dataclass
class LMHead:
    """dense -> i-GELU (to 22 bits) -> i-LayerNorm (int8) -> decoder: int32 logits over the vocabulary.

    HF keeps this head in float and has no activation ranges for it; the GELU and LayerNorm output
    scales come from our own calibration (`ranges.head_ranges`)."""

    dense: Linear
    gelu: Gelu
    ln: LayerNorm
    decoder: Linear


@dataclass
class IntProgram:
    model_class: str
    hidden: int
    heads: int
    vocab: int
    pad_id: int
    max_positions: int
    embeddings: Embeddings
    layers: list[Layer]
    pooler: Head | None = None  # IBertModel's
    classifier: Head | None = None  # sequence classification, multiple choice (out_proj to 1)
    token_head: Linear | None = None  # token classification, question answering (start, end)
    lm_head: LMHead | None = None
    hidden_scale: float | np.ndarray = 1.0  # last_hidden_state int8 -> float: per tensor or per channel
    logit_scale: np.ndarray | None = None  # float64, per output channel of the last linear
    label_names: list[str] = field(default_factory=list)

    @property
    def cls(self) -> ModelClass:
        """The registry entry of its model class: outputs, task, heads."""
        return REGISTRY[self.model_class]

    @property
    def outputs(self) -> list[str]:
        return [o.name for o in self._outputs()]

    @property
    def type_vocab(self) -> int:
        """Token types the embedding table holds: valid token_type_ids are [0, type_vocab)."""
        return int(self.embeddings.token_type.shape[0])

    @property
    def multiple_choice(self) -> bool:
        return self.cls.choice_axis

    @property
    def hidden_scales(self) -> list[float]:
        return [float(v) for v in np.atleast_1d(self.hidden_scale)]

    @property
    def logit_scales(self) -> list[float]:
        return [float(s) for s in self.logit_scale] if self.logit_scale is not None else []

    def _outputs(self) -> list[Output]:
        return [o for o in self.cls.outputs if o.present(self)]

    def output_scales(self) -> dict[str, list[float]]:
        return {o.name: o.scale(self) for o in self._outputs()}

    def input_shape(self, batch: int, seq: int, choices: int = 1) -> list[int]:
        return [batch, choices, seq] if self.multiple_choice else [batch, seq]

    def output_specs(self, batch: int, seq: int, choices: int = 1) -> list[dict[str, Any]]:
        """Name, shape, dtype, scales and sequence axis (None: no per-token axis) of every output."""
        return [{"name": o.name, "shape": o.shape(self, batch, seq, choices), "dtype": o.dtype, "scale": o.scale(self),
                 "seq_axis": o.seq_axis} for o in self._outputs()]


def iter_arrays(obj: Any, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """Every array of the program with a dotted name (all integer but the output `logit_scale`)."""
    out: list[tuple[str, np.ndarray]] = []
    if isinstance(obj, np.ndarray):
        out.append((prefix, obj))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += iter_arrays(v, f"{prefix}.{i}")
    elif is_dataclass(obj):
        for f in fields(obj):
            out += iter_arrays(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    return out
