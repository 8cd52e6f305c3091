"""NumPy executor of the integer program: the oracle the compiled library must equal bit for bit.

It shares no code with the TVM kernels: every operator is written again here in plain NumPy
integer arithmetic (int64 wherever a product may exceed int32).
"""

from __future__ import annotations

import numpy as np

from .program import (
    EXP_CONST,
    INT16,
    INT22,
    PRODUCT_BITS,
    Gelu,
    IExp,
    IntProgram,
    Layer,
    LayerNorm,
    Linear,
    Requant,
    Softmax,
    Tanh,
)

I64 = np.int64


def requant(x: np.ndarray, rq: Requant) -> np.ndarray:
    y = (x.astype(I64) * rq.m + (I64(1) << (rq.e - 1))) >> rq.e
    return y if rq.lo is None else np.clip(y, rq.lo, rq.hi)


def chain(x: np.ndarray, rqs: list[Requant]) -> np.ndarray:
    for rq in rqs:
        x = requant(x, rq)
    return x


def linear(x: np.ndarray, lin: Linear) -> np.ndarray:
    """INT8 x INT8 -> INT32 accumulate, plus the INT32 bias."""
    acc = x.astype(np.int32) @ lin.weight.astype(np.int32).T
    return acc + lin.bias


def isqrt(n: np.ndarray) -> np.ndarray:
    """Integer Newton square root (paper, Algorithm 4): floor(sqrt(n)) for n >= 0."""
    zero = n == 0
    n = np.maximum(n.astype(I64), 1)  # as the kernel: no division by a zero estimate
    bits = np.array([int(v).bit_length() for v in n.ravel()], I64).reshape(n.shape)
    x = I64(1) << ((bits + 1) // 2)
    while True:
        nxt = (x + n // x) // 2
        done = nxt >= x
        if done.all():
            return np.where(zero, 0, x)
        x = np.where(done, x, nxt)


def layer_norm(x: np.ndarray, ln: LayerNorm) -> np.ndarray:
    c = x.shape[-1]
    x = x.astype(I64)
    mean = (2 * x.sum(-1, keepdims=True) + c) // (2 * c)
    y = x - mean
    var = ((y >> ln.shift) ** 2).sum(-1, keepdims=True)
    std = np.maximum(isqrt(var) << ln.shift, 1)
    factor = (I64(1) << 31) // std
    bound = LayerNorm.out_bound(c)
    out = np.clip((y * factor) >> 1, -bound, bound) + ln.bias
    return chain(out, ln.out)


def iexp(x: np.ndarray, ie: IExp) -> np.ndarray:
    """exp of x <= 0, requantized by `ie.out` with its shift grown by q (0 past PRODUCT_BITS)."""
    x = np.maximum(x.astype(I64), EXP_CONST * ie.x0)
    q = x // ie.x0
    r = x - ie.x0 * q
    z = (r + ie.b) * r + ie.c
    shift = ie.out.e + q
    top = np.minimum(shift, PRODUCT_BITS)
    y = (z * ie.out.m + (I64(1) << (top - 1))) >> top
    return np.clip(np.where(shift > PRODUCT_BITS, 0, y), ie.out.lo, ie.out.hi)


def softmax(scores: np.ndarray, mask: np.ndarray, sm: Softmax) -> np.ndarray:
    """i-softmax over the last axis; masked keys get probability 0. Returns uint8 (scale 1/256)."""
    keep = mask.astype(bool)
    scores = scores.astype(I64)  # int32 scores that span 2^31 or more would wrap in `scores - mx`
    big = np.iinfo(np.int32).min
    mx = np.where(keep, scores, big).max(-1, keepdims=True)
    e = np.where(keep, iexp(np.where(keep, scores - mx, 0), sm.exp), 0)
    total = np.maximum(e.sum(-1, keepdims=True), 1)
    factor = (I64(1) << 32) // total
    p = (e * factor) >> (32 - sm.out_bits)
    return np.minimum(p, 255).astype(np.uint8)


def gelu(acc: np.ndarray, g: Gelu) -> np.ndarray:
    x = acc.astype(I64)
    a = np.minimum(np.abs(x), -g.b)
    erf = (np.sign(x) * ((a + g.b) ** 2 + g.c)) >> g.ERF_SHIFT
    return chain(x * (erf + g.one), g.out)


def gelu_flat_from(g: Gelu, acc_bound: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the accumulators (lo, hi) beyond which the i-GELU output no longer changes, up
    to +-acc_bound: clamping x to [lo, hi] first is exact. Past +-b erf is saturated, the product
    linear in x and its requantization monotone, so each is a bisection of the reference between
    -b (or b) and the bound."""
    nb = np.minimum(-g.b.astype(np.int64), acc_bound)

    def last_change(start: np.ndarray, end: int) -> np.ndarray:
        """The x nearest `start` on its way to `end` whose output equals the output at `end`, and
        so does every x beyond it."""
        def out(x: np.ndarray) -> np.ndarray:
            return gelu(x[None], g)[0]
        near, far = start.copy(), np.full_like(start, end)
        goal = out(far)
        while (near != far).any():
            mid = (near + far) // 2 if end > 0 else -((-near - far) // 2)
            same = out(mid) == goal
            far, near = np.where(same, mid, far), np.where(same, near, mid + np.sign(end))
        return far

    return last_change(-nb, -acc_bound), last_change(nb, acc_bound)


def gelu_window_product(g: Gelu, lo: np.ndarray, hi: np.ndarray) -> int:
    """The largest |x| * |m| of the first requantization for x in the window [lo, hi]."""
    return int((np.maximum(-lo, hi) * np.abs(g.out[0].m)).max())


def tanh(acc: np.ndarray, t: Tanh) -> np.ndarray:
    x = requant(acc, t.to_fixed)
    e = iexp(-2 * np.abs(x), t.exp)
    one = I64(1) << Tanh.EXP_FRAC
    mag = (2 * Tanh.OUT_SCALE * (one - e) + (one + e)) // (2 * (one + e))
    return (np.sign(x) * mag).astype(np.int8)


def embeddings(p: IntProgram, ids: np.ndarray, types: np.ndarray) -> np.ndarray:
    e = p.embeddings
    real = (ids != p.pad_id).astype(I64)
    pos = np.cumsum(real, axis=1) * real + p.pad_id
    s = np.clip(requant(e.word[ids], e.word_rq) + requant(e.token_type[types], e.type_rq), *INT16)
    s = np.clip(requant(s, e.sum_rq) + requant(e.position[pos], e.pos_rq), *INT16)
    return layer_norm(s, e.ln)


def attention(x: np.ndarray, mask: np.ndarray, L: Layer, heads: int) -> np.ndarray:
    b, s, h = x.shape
    d = h // heads
    qkv = requant(linear(x, L.qkv), L.qkv_out).astype(np.int32)
    q, k, v = (qkv[..., i * h : (i + 1) * h].reshape(b, s, heads, d).transpose(0, 2, 1, 3) for i in range(3))
    scores = q @ k.transpose(0, 1, 3, 2)
    probs = softmax(scores, mask[:, None, None, :], L.softmax)
    ctx = probs.astype(np.int32) @ v
    return requant(ctx.transpose(0, 2, 1, 3).reshape(b, s, h), L.ctx_out)


def residual(acc: np.ndarray, res: np.ndarray, acc_rq: Requant, res_rq: Requant) -> np.ndarray:
    return np.clip(requant(acc, acc_rq) + requant(res, res_rq), *INT22)


def layer(x: np.ndarray, mask: np.ndarray, L: Layer, heads: int) -> np.ndarray:
    ctx = attention(x, mask, L, heads)
    h = layer_norm(residual(linear(ctx, L.attn_dense), x, L.attn_acc, L.attn_res), L.attn_ln)
    inter = gelu(linear(h, L.inter), L.gelu)
    return layer_norm(residual(linear(inter, L.out_dense), h, L.out_acc, L.out_res), L.out_ln)


def run(p: IntProgram, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Integer outputs keyed by transformers' names (int8 hidden states / pooler, int32 logits).
    Multiple choice takes [batch, choices, seq] inputs, like transformers."""
    types = np.zeros_like(ids) if types is None else types
    lead = ids.shape[:-1]
    ids, mask, types = (a.reshape(-1, a.shape[-1]) for a in (ids, mask, types))
    x = embeddings(p, ids, types)
    for L in p.layers:
        x = layer(x, mask, L, p.heads)
    return p.cls.head_in("reference")(p, x.astype(np.int8), lead)


# Heads, one per model class (`model_classes.ModelClass.head`): the program, the int8 hidden states
# [rows, seq, hidden] and the inputs' leading shape -> the integer outputs.


def encoder_head(p: IntProgram, x: np.ndarray, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    if p.pooler is None:
        return {"last_hidden_state": x}
    return {"last_hidden_state": x, "pooler_output": tanh(linear(x[:, 0], p.pooler.dense), p.pooler.tanh)}


def masked_lm_head(p: IntProgram, x: np.ndarray, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    lm = p.lm_head
    g = gelu(linear(x, lm.dense), lm.gelu)
    return {"logits": linear(layer_norm(g, lm.ln).astype(np.int8), lm.decoder).astype(np.int32)}


def _first_token_logits(p: IntProgram, x: np.ndarray) -> np.ndarray:
    t = tanh(linear(x[:, 0], p.classifier.dense), p.classifier.tanh)
    return linear(t, p.classifier.out_proj).astype(np.int32)


def sequence_classification_head(p: IntProgram, x: np.ndarray, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {"logits": _first_token_logits(p, x)}


def multiple_choice_head(p: IntProgram, x: np.ndarray, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {"logits": _first_token_logits(p, x).reshape(lead)}  # one logit per choice


def token_classification_head(p: IntProgram, x: np.ndarray, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {"logits": linear(x, p.token_head).astype(np.int32)}


def question_answering_head(p: IntProgram, x: np.ndarray, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    logits = linear(x, p.token_head).astype(np.int32)
    return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}
