"""Integer embeddings: word + token type + RoBERTa-style position, each requantized to 16 bits."""

from __future__ import annotations

import tvm.ir.expr
from tvm import te, tirx

from ibert_tvm.program import INT16, Embeddings

from .common import Consts, Kernel, clamp, make_kernel, requant


def embedding_kernel(name: str, emb: Embeddings, pad_id: int, batch: int, seq: int) -> Kernel:
    """ids, token types [B, S] int32 -> the 16-bit embedding sum [B*S, H] int32 (LayerNorm input).

    Positions are cumsum(ids != pad) * (ids != pad) + pad, as IBert computes them. Indices are
    clamped into the tables: the runner rejects bad ids before they get here, and a kernel never
    reads outside its buffers.
    """
    consts = Consts(name)
    hidden = emb.word.shape[1]
    word, pos, typ = (consts.add(t, n) for t, n in ((emb.word, "word"), (emb.position, "pos"), (emb.token_type, "type")))
    ids = te.placeholder((batch, seq), "int32", name="ids")
    types = te.placeholder((batch, seq), "int32", name="types")
    j = te.reduce_axis((0, seq), name="j")
    real = lambda b, s: tirx.Select(ids[b, s] != pad_id, 1, 0)  # noqa: E731
    count = te.compute((batch, seq), lambda b, s: te.sum(tirx.Select(j <= s, real(b, j), 0), axis=j), name="count")
    position = te.compute((batch, seq), lambda b, s: count[b, s] * real(b, s) + pad_id, name="position")

    def index(table: te.Tensor, i: tvm.ir.expr.Expr) -> tvm.ir.expr.Expr:
        return tirx.max(tirx.min(i, int(table.shape[0]) - 1), 0)

    def emb_sum(r, c):
        b, s = r // seq, r % seq
        w = requant(word[index(word, ids[b, s]), c], emb.word_rq, consts)
        t = requant(typ[index(typ, types[b, s]), c], emb.type_rq, consts)
        p = requant(pos[index(pos, position[b, s]), c], emb.pos_rq, consts)
        first = clamp(w + t, *INT16)
        return clamp(requant(first, emb.sum_rq, consts) + p, *INT16).astype("int32")

    out = te.compute((batch * seq, hidden), emb_sum, name="O")
    return make_kernel(name, "rowwise", [ids, types], out, consts)
