"""Which of a lowered kernel's buffers `schedules.stack_buffers` puts on the stack."""

from __future__ import annotations

import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

from ibert_tvm.schedules.stack_buffers import ON_STACK, on_stack


def placed(func: tirx.PrimFunc, budget: int = 1 << 16) -> dict[str, bool]:
    """Each allocation of `func` after the pass: whether it is on the stack."""
    out = {}
    tvm_ffi.structural_walk(on_stack(func, budget).body,
                            [(tirx.AllocBuffer, lambda a: out.__setitem__(str(a.buffer.name), ON_STACK in a.annotations))])
    return out


@T.prim_func
def staged(x: T.Buffer((64,), "int8"), out: T.Buffer((64,), "int32")):
    a = T.alloc_buffer((64,), "uint8")  # written and read 16 bytes at a time
    c = T.alloc_buffer((64,), "int32")  # 64 bytes at a time: wider than a stack buffer's alignment
    for i in range(4):
        a[T.Ramp(i * 16, 1, 16)] = T.Cast("uint8x16", x[T.Ramp(i * 16, 1, 16)])
    for i in range(4):
        c[T.Ramp(i * 16, 1, 16)] = T.Cast("int32x16", a[T.Ramp(i * 16, 1, 16)])
    for i in range(64):
        out[i] = c[i]


@T.prim_func
def addressed(out: T.Buffer((1,), "int32")):
    a = T.alloc_buffer((64,), "uint8")
    for i in range(64):
        a[i] = T.uint8(1)
    out[0] = T.call_extern("int32", "consume", T.address_of(a[0]))


@T.prim_func
def untraced(out: T.Buffer((1,), "int32")):
    a = T.alloc_buffer((64,), "uint8")
    for i in range(64):
        a[i] = T.uint8(1)
    out[0] = T.call_extern("int32", "consume", a.access_ptr("r"))


def test_narrow_accesses_go_on_the_stack_wide_ones_stay_workspaces():
    assert placed(staged) == {"a": True, "c": False}


def test_the_budget_bounds_what_goes_on_the_stack():
    assert placed(staged, budget=63) == {"a": False, "c": False}


def test_a_buffer_whose_address_is_taken_stays_a_workspace():
    assert placed(addressed) == {"a": False}
    assert placed(untraced) == {"a": False}  # a pointer the pass cannot tie to its buffer: nothing moves
