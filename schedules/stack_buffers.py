"""A CPU kernel's own buffers on the stack instead of in TVM workspaces, where that is as fast.

TVM's LowerTVMBuiltin turns every "local" buffer, and every global one of 1 KiB or more, into a
TVMBackendAllocWorkspace call. The CPU schedules stage operands per parallel task (a row tile's u8
activations, the register tile's accumulators), so each task allocated its stages that way, and
their pointers then held general-purpose registers through the GEMM's loop nest: on the VNNI
register tiles LLVM spilled the activations' pointer, reloaded it in the innermost loop and
broadcast one A group from a register (a port-5 uop beside every 16 dot products). On the stack
their addresses are offsets from the stack pointer: MiniLM's VNNI GEMMs ran 4-10% faster.

TVM's LLVM code generator aligns a stack buffer to at most 16 bytes (or its element type's own
alignment, a vector's size), so a buffer stays in a workspace (64-byte aligned) where a wider
access might cross cache lines: AMX's accumulator blocks (their rows stored through pointers)
ran up to 30% slower on the stack, as often as the stack's randomized address left them misaligned.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import TensorLoad

# Per kernel. A task runs on a worker thread of TVM's pool (8 MiB stacks by default, 2 MiB where
# the stack limit is unlimited); the largest stage of the models measured is 24 KiB.
STACK_BYTES = 64 << 10
STACK_ALIGN = 16  # codegen_llvm's cap on a stack buffer's alignment
ON_STACK = "disable_lower_builtin"  # LowerTVMBuiltin's annotation for an allocation it leaves alone


def _bytes(dtype: str) -> int:
    t = tvm.DataType(dtype)
    return t.bits * t.lanes // 8


def _widest_access(func: tirx.PrimFunc) -> dict[tirx.Buffer, int] | None:
    """Per buffer, its widest load or store in bytes; a buffer whose address is taken (by
    intrinsics such as AMX's tile loads and stores) counts as unboundedly wide. None where the
    function takes a pointer this cannot tie to its buffer (`tvm_access_ptr`, which names only
    the buffer's data variable): then every buffer might be accessed through it."""
    widest: dict[tirx.Buffer, int] = {}
    untraced = []

    def access(buffer: tirx.Buffer, width: int) -> None:
        widest[buffer] = max(widest.get(buffer, 0), width)

    def call(c: tvm.ir.Call) -> None:
        name = getattr(c.op, "name", None)
        if name == "tirx.address_of":
            for arg in c.args:
                if isinstance(arg, TensorLoad):
                    access(arg.source, 1 << 62)
        elif name == "tirx.tvm_access_ptr":
            untraced.append(c)

    tvm_ffi.structural_walk(func.body, [
        (TensorLoad, lambda load: access(load.source, _bytes(str(load.ty)))),
        (tirx.BufferStore, lambda store: access(store.buffer, _bytes(str(store.value.ty)))),
        (tvm.ir.Call, call),
    ])
    return None if untraced else widest


def on_stack(func: tirx.PrimFunc, budget: int) -> tirx.PrimFunc:
    """`func` with each constant-size allocation on the stack whose accesses its alignment
    serves, as many as fit `budget`."""
    widest = _widest_access(func)
    if widest is None:
        return func
    left = budget

    def place(alloc: tirx.AllocBuffer) -> tirx.AllocBuffer:
        nonlocal left
        buf = alloc.buffer
        if not all(isinstance(d, tirx.IntImm) for d in buf.shape):
            return alloc
        size = _bytes(str(buf.dtype))
        for d in buf.shape:
            size *= int(d)
        if size > left or widest.get(buf, 0) > max(STACK_ALIGN, _bytes(str(buf.dtype))):
            return alloc
        left -= size
        return tirx.AllocBuffer(buf, {**alloc.annotations, ON_STACK: tirx.IntImm("int32", 1)})

    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.AllocBuffer, place)))


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="ibert.StackBuffers")
def stack_buffers(func: tirx.PrimFunc, _mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tirx.PrimFunc:
    return on_stack(func, STACK_BYTES)
