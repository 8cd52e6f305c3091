"""Integer program -> Relax module: one `call_tir` per integer kernel, weights as parameters.

The module's `main(input_ids, attention_mask, token_type_ids, *params)` takes int32 [B, S]
inputs and returns a tuple of integer outputs in `IntProgram.outputs` order. Parameters (INT8
weights, INT32 biases, dyadic multipliers) are listed with their names for the artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ibert_tvm.relay_ops.attention import attention_kernel, context_kernel, scores_kernel, softmax_kernel
from ibert_tvm.relay_ops.common import Kernel
from ibert_tvm.relay_ops.embedding import embedding_kernel
from ibert_tvm.relay_ops.gemm import U8_SHIFT, Shift
from ibert_tvm.relay_ops.layernorm import layer_norm_kernel
from ibert_tvm.relay_ops.linear import (
    gelu_epilogue,
    linear_kernel,
    raw_epilogue,
    requant_epilogue,
    residual_epilogue,
    tanh_epilogue,
)

from .names import bucket_symbol, function_name, layer_kernel
from .program import INT22, IntProgram, Linear

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
RESIDUAL_BOUND = -INT22[0]  # the residual sums are clamped to 22 bits (`residual_epilogue`)


@dataclass
class Graph:
    module: tvm.IRModule
    params: list[tuple[str, np.ndarray]]


class _Emitter:
    """Adds kernels as `names.bucket_symbol(*bucket, name)` (unique across the functions of one
    module; `bucket` None: the plain name) and their constants as parameters named without it (the
    same arrays for every bucket)."""

    def __init__(self, bb: relax.BlockBuilder, bucket: tuple[int, int] | None):
        self.bb, self.bucket = bb, bucket
        self.params: list[tuple[str, np.ndarray]] = []
        self.param_vars: list[relax.Var] = []

    def call(self, k: Kernel, *args: relax.Expr) -> relax.Var:
        symbol = k.name if self.bucket is None else bucket_symbol(*self.bucket, k.name)
        gv = self.bb.add_func(k.func.with_attr("global_symbol", symbol), symbol)
        consts = []
        for i, arr in enumerate(k.consts):
            name = f"{k.name}.{i}"
            v = relax.Var(name, relax.TensorType(arr.shape, str(arr.dtype)))
            self.params.append((name, arr))
            self.param_vars.append(v)
            consts.append(v)
        return self.bb.emit(relax.call_tir(gv, [*args, *consts], relax.TensorType(k.out_shape, k.out_dtype)))

    def reshape(self, x: relax.Expr, shape: tuple[int, ...]) -> relax.Var:
        return self.bb.emit(relax.op.reshape(x, shape))


@dataclass
class Encoded:
    """What a head reads: the encoder's int8 output, and the shapes around it."""

    em: _Emitter
    p: IntProgram
    linear: Callable[..., Kernel]  # linear_kernel for the target's activations
    x: relax.Var  # [rows, hidden], rows = batch * choices * seq
    hidden: relax.Var  # x as [batch * choices, seq, hidden]
    batch: int  # of the function's inputs
    choices: int
    seq: int

    @property
    def flat(self) -> int:
        """Sequences the encoder ran on: every choice is one."""
        return self.batch * self.choices

    @property
    def rows(self) -> int:
        return self.flat * self.seq

    def first_token(self) -> dict[str, Any]:
        """linear_kernel arguments that read each sequence's first token from `hidden`."""
        return dict(x_shape=(self.flat, self.seq, self.p.hidden), read=lambda t, r, k: t[r, 0, k])


def build_graphs(p: IntProgram, batches: list[int], seqs: list[int], a_shift: Shift = U8_SHIFT,
                 choices: int = 1, fused_attention: bool = False) -> Graph:
    """One module with a function per compiled (batch, length) bucket (`function_name`), their
    kernels named by `names.bucket_symbol`, all taking the same parameters: weights stored once."""
    module, params = tvm.IRModule(), None
    for batch in sorted(set(batches)):
        for seq in sorted(set(seqs)):
            g = build_graph(p, batch, seq, a_shift, function_name(batch, seq), True, choices, fused_attention)
            if params is not None and [n for n, _ in g.params] != [n for n, _ in params]:
                raise AssertionError("buckets disagree on their parameters")
            params = g.params
            module.update(g.module)
    return Graph(module, params or [])


def build_graph(p: IntProgram, batch: int, seq: int, a_shift: Shift = U8_SHIFT, name: str = "main",
                bucketed: bool = False, choices: int = 1, fused_attention: bool = False) -> Graph:
    """`a_shift`: how the target's GEMMs take activations (relay_ops.gemm); `fused_attention`:
    scores, softmax and context as one kernel rather than three. Outputs never change.
    Multiple choice takes [batch, choices, seq] inputs and runs the encoder on batch * choices rows."""
    if seq > p.max_positions - p.pad_id - 1:
        raise ValueError(f"seq_len {seq} exceeds the model's {p.max_positions - p.pad_id - 1} positions")
    if choices < 1 or (choices > 1 and not p.multiple_choice):
        raise ValueError(f"choices={choices}: only a multiple-choice model takes more than one choice")
    flat = batch * choices
    h, heads, rows = p.hidden, p.heads, flat * seq
    linear = partial(linear_kernel, a_shift=a_shift)
    bb = relax.BlockBuilder()
    ins = [relax.Var(n, relax.TensorType(p.input_shape(batch, seq, choices), "int32")) for n in INPUTS]
    em = _Emitter(bb, (batch, seq) if bucketed else None)
    # Parameters are only known once the body is emitted: build the body in a dataflow block of a
    # function whose parameter list is completed afterwards.
    with bb.function(name):
        with bb.dataflow():
            ids, mask, types = (em.reshape(v, (flat, seq)) if choices > 1 else v for v in ins)
            x16 = em.call(embedding_kernel("embed", p.embeddings, p.pad_id, flat, seq), ids, types)
            x = em.call(layer_norm_kernel("embed_ln", p.embeddings.ln, rows, h), x16)
            for i, L in enumerate(p.layers):
                n = partial(layer_kernel, i)
                qkv = em.call(linear(n("qkv"), L.qkv, rows, requant_epilogue([L.qkv_out]), "int8"), x)
                if fused_attention:
                    ctx = em.call(attention_kernel(n("attention"), L, flat, seq, h, heads, a_shift), qkv, mask)
                else:
                    scores = em.call(scores_kernel(n("scores"), flat, seq, h, heads, a_shift), qkv)
                    probs = em.call(softmax_kernel(n("softmax"), L.softmax, flat, heads, seq), scores, mask)
                    ctx = em.call(context_kernel(n("context"), L, flat, seq, h, heads, a_shift), probs, qkv)
                attn = em.call(
                    linear(
                        n("attn_out"), L.attn_dense, rows, residual_epilogue(L.attn_acc, L.attn_res), "int32",
                        extra_inputs=(((rows, h), "int8"),),
                    ),
                    em.reshape(ctx, (rows, h)), x,
                )
                hmid = em.call(layer_norm_kernel(n("attn_ln"), L.attn_ln, rows, h, RESIDUAL_BOUND), attn)
                inter = em.call(linear(n("inter"), L.inter, rows, gelu_epilogue(L.gelu, L.inter.acc_bound), "int8"), hmid)
                res = em.call(
                    linear(
                        n("ffn_out"), L.out_dense, rows, residual_epilogue(L.out_acc, L.out_res), "int32",
                        extra_inputs=(((rows, h), "int8"),),
                    ),
                    inter, hmid,
                )
                x = em.call(layer_norm_kernel(n("ffn_ln"), L.out_ln, rows, h, RESIDUAL_BOUND), res)
            hidden = em.reshape(x, (flat, seq, h))
            outs = p.cls.head_in("graph")(Encoded(em, p, linear, x, hidden, batch, choices, seq))
            result = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(result, params=[*ins, *em.param_vars])
    module = bb.get()
    # Relax checks every parameter's dtype, rank and shape on every call (two VM builtins each: 0.1
    # ms of MiniLM's 2.4 ms forward at 1x128); with `num_input` only the inputs are checked, the
    # weights only where their shapes are dynamic (never). They are the artifact's hash-checked
    # tensors, placed by the runner in the manifest's order.
    module[name] = module[name].with_attr("num_input", len(ins))
    return Graph(module, em.params)


# Heads, one per model class (`model_classes.ModelClass.head`): the encoded input -> the function's
# outputs, in the class's output order.


def encoder_head(e: Encoded) -> list[relax.Expr]:
    if e.p.pooler is None:
        return [e.hidden]
    pl = e.p.pooler
    pooled = e.em.call(e.linear("pooler", pl.dense, e.flat, tanh_epilogue(pl.tanh), "int8", **e.first_token()), e.hidden)
    return [e.hidden, pooled]


def masked_lm_head(e: Encoded) -> list[relax.Expr]:
    lm = e.p.lm_head
    g = e.em.call(e.linear("lm_dense", lm.dense, e.rows, gelu_epilogue(lm.gelu, lm.dense.acc_bound), "int32"), e.x)
    t = e.em.call(layer_norm_kernel("lm_ln", lm.ln, e.rows, e.p.hidden), g)
    logits = e.em.call(e.linear("lm_decoder", lm.decoder, e.rows, raw_epilogue(), "int32"), t)
    return [e.em.reshape(logits, (e.flat, e.seq, e.p.vocab))]


def _first_token_logits(e: Encoded) -> relax.Var:
    c = e.p.classifier
    t = e.em.call(e.linear("cls_dense", c.dense, e.flat, tanh_epilogue(c.tanh), "int8", **e.first_token()), e.hidden)
    return e.em.call(e.linear("cls_out", c.out_proj, e.flat, raw_epilogue(), "int32"), t)


def sequence_classification_head(e: Encoded) -> list[relax.Expr]:
    return [_first_token_logits(e)]


def multiple_choice_head(e: Encoded) -> list[relax.Expr]:
    return [e.em.reshape(_first_token_logits(e), (e.batch, e.choices))]  # one logit per choice


def token_classification_head(e: Encoded) -> list[relax.Expr]:
    logits = e.em.call(e.linear("tok_out", e.p.token_head, e.rows, raw_epilogue(), "int32"), e.x)
    return [e.em.reshape(logits, (e.flat, e.seq, len(e.p.label_names)))]


def question_answering_head(e: Encoded) -> list[relax.Expr]:
    outs = []
    # start and end as two one-column products: no split kernel between them
    for j, which in enumerate(("start", "end")):
        lin = Linear(e.p.token_head.weight[j : j + 1], e.p.token_head.bias[j : j + 1])
        logits = e.em.call(e.linear(f"qa_{which}", lin, e.rows, raw_epilogue(), "int32"), e.x)
        outs.append(e.em.reshape(logits, (e.flat, e.seq)))
    return outs
