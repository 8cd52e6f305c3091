"""PyTorch I-BERT -> integer program: one converter per transformers module type, one head per
model class (`model_classes.REGISTRY`).

Scales are computed with HF's own quantization functions (so weights, biases and activation
scales are exactly HF's), then every float ratio between scales becomes a dyadic `Requant` and
every nonlinear constant an integer. Nothing float survives into the program but output scales.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.models.ibert import modeling_ibert as hf
from transformers.models.ibert import quant_modules as qm

from . import reference
from .model_classes import REGISTRY
from .program import (
    EXP_CONST,
    INT8,
    INT16,
    INT22,
    Embeddings,
    Gelu,
    Head,
    IExp,
    IntProgram,
    Layer,
    LayerNorm,
    Linear,
    LMHead,
    Softmax,
    Tanh,
    dyadic,
)
from .ranges import UNCALIBRATED, channel_ranges, head_ranges

# i-exp and i-GELU constants, as in HF's IntSoftmax / IntGELU.
EXP_X0 = -0.6931
EXP_COEF = (0.35815147, 0.96963238 / 0.35815147, 1.0 / 0.35815147)
GELU_K = 1.4142
GELU_COEF = (-0.2888, -1.769, 1.0 / -0.2888)


class NotCalibratedError(ValueError):
    pass


def act_scale(act: qm.QuantAct) -> float:
    """HF's activation scale from the calibrated range (float32, as HF computes it)."""
    lim = max(abs(act.x_min.item()), abs(act.x_max.item()))
    if lim <= UNCALIBRATED:
        raise NotCalibratedError(
            "the model's activation ranges are not calibrated: pass calibration text "
            "(ibert_tvm.calibrate or --calib-texts)"
        )
    s = qm.symmetric_linear_quantization_params(act.activation_bit, act.x_min, act.x_max)
    return float(s.view(-1)[0])


Scale = float | np.ndarray  # one activation scale, or one per channel
# A channel's scale is at least this fraction of the largest: dead channels would otherwise give
# requantization ratios too large for a right shift
MIN_CHANNEL_FRACTION = 2.0**-12


def scales_of(model: nn.Module, per_channel: bool = True) -> Callable[[qm.QuantAct], Scale]:
    """Each QuantAct's scale: HF's per-tensor one, or per channel where our calibration recorded
    per-channel ranges (`ranges.CHANNEL_ACTS`) and `per_channel`."""
    recorded = channel_ranges(model) if per_channel else {}
    acts = {m: recorded[n.removeprefix("ibert.")] for n, m in model.named_modules() if n.removeprefix("ibert.") in recorded}

    def scale(act: qm.QuantAct) -> Scale:
        if act not in acts:
            return act_scale(act)
        peak = np.asarray(acts[act], np.float64)
        if peak.max() <= UNCALIBRATED:
            raise NotCalibratedError("a per-channel activation range is empty: recalibrate the model")
        return np.maximum(peak, peak.max() * MIN_CHANNEL_FRACTION) / (2 ** (act.activation_bit - 1) - 1)

    return scale


def f32(x: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(x, dtype=torch.float32).detach().cpu().numpy(), np.float64)


def quantize_linear(dense: nn.Module, in_scale: Scale) -> tuple[Linear, np.ndarray]:
    """HF QuantLinear's per-channel weight and 32-bit bias quantization; returns the acc scale.

    Per-channel input scales are folded into the weights (W[n, k] * S_k), which are then quantized
    per output row as usual: the integer product needs no per-channel step at run time."""
    w = dense.weight.detach().float()
    folded = np.ndim(in_scale) == 1
    if folded:
        w = w * torch.tensor(in_scale, dtype=torch.float32)[None, :]
    sw = qm.symmetric_linear_quantization_params(8, w.min(dim=1).values, w.max(dim=1).values, True)
    w_int = qm.SymmetricQuantFunction.apply(w, 8, False, sw)
    s_acc = sw if folded else sw * torch.tensor([in_scale], dtype=torch.float32)
    bias = dense.bias.detach().float() if dense.bias is not None else torch.zeros(w.shape[0])
    b_int = qm.SymmetricQuantFunction.apply(bias, 32, False, s_acc)
    lin = Linear(weight=w_int.numpy().astype(np.int8), bias=b_int.numpy().astype(np.int32))
    return lin, f32(s_acc)


def iexp(scale: float, ratio: float, clamp: tuple[int, int]) -> IExp:
    """i-exp constants for inputs at `scale`; `ratio` turns the polynomial z (at q = 0) into output."""
    x0 = math.floor(EXP_X0 / scale)
    b = math.floor(EXP_COEF[1] / scale)
    c = math.floor(EXP_COEF[2] / scale**2)
    out = dyadic(ratio, in_bound=c, clamp=clamp)
    return IExp(x0=x0, b=b, c=c, out=out)


def tanh_of(acc_scale: np.ndarray, acc_bound: int) -> Tanh:
    lim = Tanh.LIMIT << Tanh.FRAC
    to_fixed = dyadic(acc_scale * 2.0**Tanh.FRAC, acc_bound, clamp=(-lim, lim))
    s = 2.0**-Tanh.FRAC
    exp = iexp(s, EXP_COEF[0] * s**2 * 2.0**Tanh.EXP_FRAC, clamp=(0, 1 << Tanh.EXP_FRAC))
    return Tanh(to_fixed=to_fixed, exp=exp)


def layer_norm(ln: nn.Module, out_scales: list[Scale], out_clamp: tuple[int, int] = INT8) -> LayerNorm:
    """i-LayerNorm of HF's IntLayerNorm or a float nn.LayerNorm (the LM head's); `out_scales` are
    the QuantActs that follow, the first one per channel."""
    c = ln.normalized_shape if isinstance(ln.normalized_shape, int) else ln.normalized_shape[0]
    s = float(torch.sqrt(torch.tensor(float(c))) / 2**30)
    gamma = f32(ln.weight)
    if (gamma == 0).any():
        raise ValueError("a LayerNorm weight is exactly 0: I-BERT folds beta/gamma, cannot map it")
    bias = np.floor(f32(ln.bias) / gamma / s).astype(np.int64)
    bound = LayerNorm.out_bound(c) + int(np.abs(bias).max(initial=0))
    chain = [dyadic(s * gamma / out_scales[0], bound, clamp=out_clamp)]
    chain += [dyadic(a / b, 128, clamp=INT8) for a, b in zip(out_scales, out_scales[1:])]
    # An nn.LayerNorm has no overflow shift: its 22-bit input squares well inside int64.
    shift = int(ln.shift.item()) if hasattr(ln, "shift") else 0
    return LayerNorm(shift=shift, bias=bias, out=chain)


def convert_embeddings(m: hf.IBertEmbeddings, act_scale: Callable[[qm.QuantAct], Scale]) -> tuple[Embeddings, Scale]:
    def table(e: qm.QuantEmbedding) -> tuple[np.ndarray, float]:
        w = e.weight.detach().float()
        s = qm.symmetric_linear_quantization_params(8, w.min().expand(1), w.max().expand(1))
        return qm.SymmetricQuantFunction.apply(w, 8, False, s).numpy().astype(np.int8), float(s)

    word, s_w = table(m.word_embeddings)
    pos, s_p = table(m.position_embeddings)
    typ, s_t = table(m.token_type_embeddings)
    s_e = act_scale(m.embeddings_act1)
    s_out = act_scale(m.output_activation)
    emb = Embeddings(
        word=word,
        position=pos,
        token_type=typ,
        word_rq=dyadic(s_w / s_e, 128),
        type_rq=dyadic(s_t / s_e, 128),
        sum_rq=dyadic(s_e / s_e, 1 << 15),
        pos_rq=dyadic(s_p / s_e, 128),
        ln=layer_norm(m.LayerNorm, [s_out]),
    )
    return emb, s_out


def convert_layer(m: hf.IBertLayer, s_in: Scale, act_scale: Callable[[qm.QuantAct], Scale]) -> tuple[Layer, Scale]:
    att, so = m.attention.self, m.attention.output
    d = att.attention_head_size
    lins = [quantize_linear(x, s_in) for x in (att.query, att.key, att.value)]
    qkv = Linear(
        weight=np.concatenate([lin.weight for lin, _ in lins]),
        bias=np.concatenate([lin.bias for lin, _ in lins]),
    )
    s_q, s_k, s_v = (act_scale(a) for a in (att.query_activation, att.key_activation, att.value_activation))
    ratios = np.concatenate([sa / s for (_, sa), s in zip(lins, (s_q, s_k, s_v))])
    s_scores = float(torch.tensor([s_q], dtype=torch.float32) * s_k / math.sqrt(d))
    s_ctx = act_scale(att.output_activation)
    # HF calibrates IntSoftmax's inner QuantAct(16) on the integers exp_int = z * 2**(30 - q), not
    # on real values: its output is round(exp_int / s16), hence the ratio 2**30 / s16.
    softmax = Softmax(exp=iexp(s_scores, 2.0**EXP_CONST / act_scale(att.softmax.act), clamp=INT16))
    # Probabilities sum to at most 256 (scale 1/256), so |P @ V| <= 256 * 128.
    ctx_out = dyadic(s_v / 256 / s_ctx, 256 * 128, clamp=INT8)

    attn_dense, s_ad = quantize_linear(so.dense, s_ctx)
    s_22a = act_scale(so.ln_input_act)
    s_ao, s_pi = act_scale(so.output_activation), act_scale(m.pre_intermediate_act)

    inter, s_i = quantize_linear(m.intermediate.dense, s_pi)
    s_io, s_po = act_scale(m.intermediate.output_activation), act_scale(m.pre_output_act)
    gelu = gelu_of(inter, s_i, [s_io, s_po])

    out_dense, s_od = quantize_linear(m.output.dense, s_po)
    s_22b = act_scale(m.output.ln_input_act)
    s_out = act_scale(m.output.output_activation)
    layer = Layer(
        qkv=qkv,
        qkv_out=dyadic(ratios, qkv.acc_bound, clamp=INT8),
        softmax=softmax,
        ctx_out=ctx_out,
        attn_dense=attn_dense,
        attn_acc=dyadic(s_ad / s_22a, attn_dense.acc_bound),
        attn_res=dyadic(s_in / s_22a, 128),
        attn_ln=layer_norm(so.LayerNorm, [s_ao, s_pi]),
        inter=inter,
        gelu=gelu,
        out_dense=out_dense,
        out_acc=dyadic(s_od / s_22b, out_dense.acc_bound),
        out_res=dyadic(s_pi / s_22b, 128),
        out_ln=layer_norm(m.output.LayerNorm, [s_out]),
    )
    return layer, s_out


def gelu_of(lin: Linear, s_acc: np.ndarray, out_scales: list[Scale], out_clamp: tuple[int, int] = INT8) -> Gelu:
    """i-GELU on the per-channel accumulator of `lin`, then requantization to each of `out_scales`.

    Two choices of ours (README, Integer semantics), each well below the output's resolution:
    - `one` is minus erf's saturated value for x < 0, not HF's floor(1 / S_erf), which differs by
      a unit or two in 2**21: 1 + erf is then exactly 0 in the negative tail, the output stops
      changing at x = b there, and the window over which it changes stays near [b, -b].
    - The first requantization's mantissa is narrowed, down to 4 bits more than the output has, until
      x * m fits int32 over that window (`gelu_narrow_bits`): the kernels then form x * m * (erf +
      one) from 32-bit products.
    """
    sp = s_acc / GELU_K
    b = np.floor(GELU_COEF[1] / sp).astype(np.int64)
    c = np.floor(GELU_COEF[2] / sp**2).astype(np.int64)
    s_erf = sp**2 * GELU_COEF[0] * 2.0**Gelu.ERF_SHIFT
    one = -((-c) >> Gelu.ERF_SHIFT)
    g_bound = lin.acc_bound * Gelu.multiplier_bound(b, c, one)
    ratio = s_acc * s_erf / 2 / out_scales[0]
    rest = [dyadic(s0 / s1, 128, clamp=INT8) for s0, s1 in zip(out_scales, out_scales[1:])]

    def with_bits(bits: int) -> Gelu:
        return Gelu(b=b, c=c, one=one, out=[dyadic(ratio, g_bound, out_clamp, bits), *rest])

    return with_bits(gelu_narrow_bits(with_bits, lin.acc_bound, out_clamp))


def gelu_narrow_bits(with_bits: Callable[[int], Gelu], acc_bound: int, out_clamp: tuple[int, int]) -> int:
    """The widest mantissa (of the first requantization) for which |x| * |m| < 2**31 over the
    window where the output changes (`reference.gelu_flat_from`), if it keeps 4 bits more than the
    output's; else 31, the most `dyadic` allows (the kernels then multiply in int64). The window
    shrinks a little as m narrows, so each try measures it again."""
    least = int(out_clamp[1]).bit_length() + 5
    g = with_bits(31)
    for _ in range(4):
        bits = int(np.abs(g.out[0].m).max() - 1).bit_length()  # a mantissa may round up to 2**bits
        lo, hi = reference.gelu_flat_from(g, acc_bound)
        excess = reference.gelu_window_product(g, lo, hi).bit_length() - 31
        if excess <= 0:
            return bits
        if bits - excess < least:
            break
        g = with_bits(bits - excess)
    return 31


def convert_head(dense: nn.Linear, out_proj: nn.Linear | None, s_in: Scale) -> tuple[Head, np.ndarray | None]:
    lin, s_acc = quantize_linear(dense, s_in)
    head = Head(dense=lin, tanh=tanh_of(s_acc, lin.acc_bound))
    if out_proj is None:
        return head, None
    head.out_proj, s_logit = quantize_linear(out_proj, 1.0 / Tanh.OUT_SCALE)
    return head, s_logit


def range_scale(lo_hi: tuple[float, float], bits: int) -> float:
    """Symmetric scale of a calibrated (min, max) range at `bits` bits, as HF's QuantAct."""
    lim = max(abs(lo_hi[0]), abs(lo_hi[1]))
    if lim <= UNCALIBRATED:
        raise NotCalibratedError("a head activation range is empty: recalibrate the model")
    return lim / (2 ** (bits - 1) - 1)


def convert_lm_head(m: hf.IBertLMHead, s_in: Scale, ranges: dict[str, tuple[float, float]]) -> tuple[LMHead, np.ndarray]:
    """The float LM head, integer: i-GELU into 22 bits, i-LayerNorm into int8, INT8 decoder."""
    need = ("lm_head.gelu", "lm_head.layer_norm")
    if any(k not in ranges for k in need):
        raise NotCalibratedError(
            "the masked-LM head has no calibrated ranges (HF keeps it in float): calibrate with "
            "ibert-tvm (`ibert-tvm calibrate` or compile --calib-texts)"
        )
    s_gelu, s_ln = range_scale(ranges["lm_head.gelu"], 22), range_scale(ranges["lm_head.layer_norm"], 8)
    dense, s_acc = quantize_linear(m.dense, s_in)
    decoder, s_logit = quantize_linear(m.decoder, s_ln)
    head = LMHead(
        dense=dense,
        gelu=gelu_of(dense, s_acc, [s_gelu], out_clamp=INT22),
        ln=layer_norm(m.layer_norm, [s_ln]),
        decoder=decoder,
    )
    return head, s_logit


def _labels(cfg: Any) -> list[str]:
    return [cfg.id2label[i] for i in range(cfg.num_labels)]


# Heads, one per model class (`model_classes.ModelClass.head`): the model and the scale of its int8
# hidden states -> the IntProgram fields of the head.


def encoder_head(model: hf.IBertModel, scale: Scale) -> dict[str, Any]:
    return {} if model.pooler is None else {"pooler": convert_head(model.pooler.dense, None, scale)[0]}


def masked_lm_head(model: hf.IBertForMaskedLM, scale: Scale) -> dict[str, Any]:
    lm_head, logit_scale = convert_lm_head(model.lm_head, scale, head_ranges(model))
    return {"lm_head": lm_head, "logit_scale": logit_scale}


def sequence_classification_head(model: hf.IBertForSequenceClassification, scale: Scale) -> dict[str, Any]:
    head, logit_scale = convert_head(model.classifier.dense, model.classifier.out_proj, scale)
    return {"classifier": head, "logit_scale": logit_scale, "label_names": _labels(model.config)}


def multiple_choice_head(model: hf.IBertForMultipleChoice, scale: Scale) -> dict[str, Any]:
    head, logit_scale = convert_head(model.ibert.pooler.dense, model.classifier, scale)
    return {"classifier": head, "logit_scale": logit_scale}


def token_classification_head(model: hf.IBertForTokenClassification, scale: Scale) -> dict[str, Any]:
    lin, logit_scale = quantize_linear(model.classifier, scale)
    return {"token_head": lin, "logit_scale": logit_scale, "label_names": _labels(model.config)}


def question_answering_head(model: hf.IBertForQuestionAnswering, scale: Scale) -> dict[str, Any]:
    if model.qa_outputs.out_features != 2:
        raise ValueError(f"a question-answering head has 2 outputs (start, end), this one {model.qa_outputs.out_features}")
    lin, logit_scale = quantize_linear(model.qa_outputs, scale)
    return {"token_head": lin, "logit_scale": logit_scale, "label_names": ["start", "end"]}


def convert(model: nn.Module, per_channel: bool = True) -> IntProgram:
    """Extract the integer program of any registered IBert class (heads included).

    `per_channel`: LayerNorm and GELU outputs get a scale per channel where our calibration recorded
    their ranges (HF's simulation has one per tensor)."""
    from .checkpoint import check_finite

    kind = type(model).__name__
    if kind not in REGISTRY or not isinstance(model, hf.IBertPreTrainedModel):
        raise TypeError(f"cannot compile {kind}: supported are {', '.join(REGISTRY)}")
    # checkpoint.load checked the weights; calibration since (or a model never saved) may have set
    # non-finite ranges, which would quantize into finite, wrong integers
    check_finite(model)
    base = model.base_model
    cfg = model.config
    scale_of = scales_of(model, per_channel)
    emb, scale = convert_embeddings(base.embeddings, scale_of)
    layers = []
    for layer in base.encoder.layer:
        converted, scale = convert_layer(layer, scale, scale_of)
        layers.append(converted)
    return IntProgram(
        model_class=kind,
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        vocab=cfg.vocab_size,
        pad_id=cfg.pad_token_id,
        max_positions=cfg.max_position_embeddings,
        embeddings=emb,
        layers=layers,
        hidden_scale=scale,
        **REGISTRY[kind].head_in("importer")(model, scale),
    )
