"""A GEMM kernel's stages, found by the role each block carries (`relay_ops.gemm.Part`).

Every device's schedule asks the kernel through `gemm_parts` rather than guessing from block
names or from the shape of the arithmetic: the TE stages of `relay_ops` say what they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from ibert_tvm.relay_ops.gemm import PART_KEY, Part


@dataclass(frozen=True)
class GemmParts:
    """Block handles of one GEMM kernel, taken before any schedule primitive moves them."""

    activation: SBlockRV  # the staged A operand, [.., m, k]
    accumulator: SBlockRV  # C[.., m, n] += A * B over k
    epilogue: SBlockRV  # the only consumer of the accumulator
    weight: SBlockRV | None  # B packed at run time (attention); None: B is a parameter
    weight_sums: SBlockRV | None  # B's sums over k, for the activation shift's compensation
    others: tuple[SBlockRV, ...]  # any block of the kernel that plays no GEMM role


def _part_of(sch: s_tir.Schedule, block: SBlockRV, key: str) -> Part | None:
    role = sch.get(block).annotations.get(key)
    return None if role is None else Part(str(role))


def gemm_parts(sch: s_tir.Schedule, key: str = PART_KEY) -> GemmParts | None:
    """The parts of the kernel being scheduled, or None if it is no GEMM (has no accumulator);
    with FIRST_PART_KEY, those of a kernel's first GEMM (whose blocks are `others` to the second)."""
    found: dict[Part | None, list[SBlockRV]] = {}
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        found.setdefault(_part_of(sch, block, key), []).append(block)
    if Part.ACCUMULATOR not in found:
        return None
    repeated = [role for role, blocks in found.items() if role is not None and len(blocks) > 1]
    if repeated:
        raise ValueError(f"a GEMM kernel has one block per role; {', '.join(repeated)} repeat")
    one = {role: blocks[0] for role, blocks in found.items()}
    return GemmParts(one[Part.ACTIVATION], one[Part.ACCUMULATOR], one[Part.EPILOGUE], one.get(Part.WEIGHT),
                     one.get(Part.WEIGHT_SUMS), tuple(found.get(None, ())))


def epilogue_loops(sch: s_tir.Schedule, parts: GemmParts) -> list[LoopRV]:
    """The epilogue's loops in the order of the accumulator's axes (batch.., rows, columns), which
    every schedule tiles: reordered first where the epilogue lays its output out in another order
    (`relay_ops.gemm.int8_matmul`'s `out_axes`)."""
    loops = sch.get_loops(parts.epilogue)
    block = sch.get(parts.epilogue)
    acc = sch.get(parts.accumulator).writes[0].source
    read = next(r for r in block.reads if r.source.same_as(acc))
    axes = [next(i for i, iv in enumerate(block.iter_vars) if iv.var.same_as(r.min)) for r in read.region]
    if axes != sorted(axes):
        sch.reorder(*[loops[i] for i in axes])
    return [loops[i] for i in axes]
