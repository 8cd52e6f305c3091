"""Integer program -> Relax module: one `call_tir` per integer kernel, weights as parameters.

The module's `main(input_ids, attention_mask, token_type_ids, *params)` takes int32 [B, S]
inputs and returns a tuple of integer outputs in `IntProgram.outputs` order. Parameters (INT8
weights, INT32 biases, dyadic multipliers) are listed with their names for the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import tvm
from tvm import relax

from relay_ops.attention import context_kernel, scores_kernel, softmax_kernel
from relay_ops.common import Kernel
from relay_ops.embedding import embedding_kernel
from relay_ops.gemm import U8_SHIFT
from relay_ops.layernorm import layer_norm_kernel
from relay_ops.linear import gelu_epilogue, linear_kernel, raw_epilogue, requant_epilogue, residual_epilogue, tanh_epilogue

from .program import IntProgram, Linear

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Graph:
    module: tvm.IRModule
    params: list[tuple[str, np.ndarray]]


class _Emitter:
    """Adds kernels as `prefix + name` (unique across the functions of one module) and their
    constants as parameters named without the prefix (the same arrays for every length)."""

    def __init__(self, bb: relax.BlockBuilder, prefix: str):
        self.bb, self.prefix = bb, prefix
        self.params: list[tuple[str, np.ndarray]] = []
        self.param_vars: list[relax.Var] = []

    def call(self, k: Kernel, *args: relax.Expr) -> relax.Var:
        symbol = self.prefix + k.name
        gv = self.bb.add_func(k.func.with_attr("global_symbol", symbol), symbol)
        consts = []
        for i, arr in enumerate(k.consts):
            name = f"{k.name}.{i}"
            v = relax.Var(name, relax.TensorType(arr.shape, str(arr.dtype)))
            self.params.append((name, arr))
            self.param_vars.append(v)
            consts.append(v)
        return self.bb.emit(relax.call_tir(gv, [*args, *consts], relax.TensorType(k.out_shape, k.out_dtype)))


def function_name(seq: int) -> str:
    return f"main_s{seq}"


def build_graphs(p: IntProgram, batch: int, seqs: list[int], a_shift: int = U8_SHIFT, choices: int = 1) -> Graph:
    """One module with a function per compiled sequence length (`function_name`), their kernels
    prefixed `s{S}_`, all taking the same parameters."""
    module, params = tvm.IRModule(), None
    for seq in sorted(set(seqs)):
        g = build_graph(p, batch, seq, a_shift, function_name(seq), f"s{seq}_", choices)
        if params is not None and [n for n, _ in g.params] != [n for n, _ in params]:
            raise AssertionError("sequence-length buckets disagree on their parameters")
        params = g.params
        module.update(g.module)
    return Graph(module, params or [])


def build_graph(p: IntProgram, batch: int, seq: int, a_shift: int = U8_SHIFT, name: str = "main",
                prefix: str = "", choices: int = 1) -> Graph:
    """`a_shift`: how the target's GEMMs take activations (relay_ops.gemm); outputs never change.
    Multiple choice takes [batch, choices, seq] inputs and runs the encoder on batch * choices rows."""
    if seq > p.max_positions - p.pad_id - 1:
        raise ValueError(f"seq_len {seq} exceeds the model's {p.max_positions - p.pad_id - 1} positions")
    if choices < 1 or (choices > 1 and not p.multiple_choice):
        raise ValueError(f"choices={choices}: only a multiple-choice model takes more than one choice")
    flat = batch * choices
    h, heads, rows = p.hidden, p.heads, flat * seq
    d = h // heads
    linear = partial(linear_kernel, a_shift=a_shift)
    bb = relax.BlockBuilder()
    ins = [relax.Var(n, relax.TensorType(p.input_shape(batch, seq, choices), "int32")) for n in INPUTS]
    em = _Emitter(bb, prefix)
    # Parameters are only known once the body is emitted: build the body in a dataflow block of a
    # function whose parameter list is completed afterwards.
    with bb.function(name):
        with bb.dataflow():
            ids, mask, types = (bb.emit(relax.op.reshape(v, (flat, seq))) if choices > 1 else v for v in ins)
            batch, out_batch = flat, batch
            x16 = em.call(embedding_kernel("embed", p.embeddings, p.pad_id, batch, seq), ids, types)
            x = em.call(layer_norm_kernel("embed_ln", p.embeddings.ln, rows, h), x16)
            for i, L in enumerate(p.layers):
                n = f"l{i}_"
                qkv = em.call(linear(n + "qkv", L.qkv, rows, requant_epilogue([L.qkv_out]), "int8"), x)
                scores = em.call(scores_kernel(n + "scores", batch, seq, h, heads, a_shift), qkv)
                probs = em.call(softmax_kernel(n + "softmax", L.softmax, batch, heads, seq), scores, mask)
                ctx = em.call(context_kernel(n + "context", L, batch, seq, h, heads, a_shift), probs, qkv)
                attn = em.call(
                    linear(
                        n + "attn_out", L.attn_dense, rows, residual_epilogue(L.attn_acc, L.attn_res), "int32",
                        extra_inputs=(((rows, h), "int8"),), x_shape=(batch, heads, seq, d),
                        read=lambda t, r, k: t[r // seq, k // d, r % seq, k % d],
                    ),
                    ctx, x,
                )
                hmid = em.call(layer_norm_kernel(n + "attn_ln", L.attn_ln, rows, h), attn)
                inter = em.call(linear(n + "inter", L.inter, rows, gelu_epilogue(L.gelu), "int8"), hmid)
                res = em.call(
                    linear(
                        n + "ffn_out", L.out_dense, rows, residual_epilogue(L.out_acc, L.out_res), "int32",
                        extra_inputs=(((rows, h), "int8"),),
                    ),
                    inter, hmid,
                )
                x = em.call(layer_norm_kernel(n + "ffn_ln", L.out_ln, rows, h), res)
            hidden = bb.emit(relax.op.reshape(x, (batch, seq, h)))
            outs = []
            cls = dict(x_shape=(batch, seq, h), read=lambda t, r, k: t[r, 0, k])
            if p.classifier is not None:
                c = p.classifier
                t = em.call(linear("cls_dense", c.dense, batch, tanh_epilogue(c.tanh), "int8", **cls), hidden)
                logits = em.call(linear("cls_out", c.out_proj, batch, raw_epilogue(), "int32"), t)
                outs.append(bb.emit(relax.op.reshape(logits, (out_batch, choices))) if p.multiple_choice else logits)
            elif p.model_class == "IBertForQuestionAnswering":
                # start and end as two one-column products: no split kernel between them
                for j, which in enumerate(("start", "end")):
                    lin = Linear(p.token_head.weight[j : j + 1], p.token_head.bias[j : j + 1])
                    logits = em.call(linear(f"qa_{which}", lin, rows, raw_epilogue(), "int32"), x)
                    outs.append(bb.emit(relax.op.reshape(logits, (batch, seq))))
            elif p.token_head is not None:
                logits = em.call(linear("tok_out", p.token_head, rows, raw_epilogue(), "int32"), x)
                outs.append(bb.emit(relax.op.reshape(logits, (batch, seq, len(p.label_names)))))
            elif p.lm_head is not None:
                lm = p.lm_head
                g = em.call(linear("lm_dense", lm.dense, rows, gelu_epilogue(lm.gelu), "int32"), x)
                t = em.call(layer_norm_kernel("lm_ln", lm.ln, rows, h), g)
                logits = em.call(linear("lm_decoder", lm.decoder, rows, raw_epilogue(), "int32"), t)
                outs.append(bb.emit(relax.op.reshape(logits, (batch, seq, p.vocab))))
            else:
                outs.append(hidden)
                if p.pooler is not None:
                    pl = p.pooler
                    outs.append(em.call(linear("pooler", pl.dense, batch, tanh_epilogue(pl.tanh), "int8", **cls), hidden))
            result = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(result, params=[*ins, *em.param_vars])
    return Graph(bb.get(), em.params)
