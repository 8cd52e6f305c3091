"""No float anywhere in the integer program, the Relax module, or the scheduled kernels.

TVM 0.27 has no `tirx.stmt_functor.post_order_visit`; `tvm_ffi.structural_walk` visits every
node of an IRModule (Relax functions, PrimFuncs, buffers, expressions, types) in post order.
"""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import ALL_KINDS, CHOICES, Spec, calibrated

FLOAT_PREFIXES = ("float", "bfloat")


def is_float(dtype) -> bool:
    return str(dtype).startswith(FLOAT_PREFIXES)


def float_nodes(root) -> tuple[list[str], Counter]:
    """Every node whose dtype or type is float (FloatImm, Cast, buffers, vars, tensor types)."""
    import tvm_ffi
    from tvm import tirx

    found: list[str] = []
    kinds: Counter = Counter()

    def visit(node) -> None:
        kinds[type(node).__name__] += 1
        if isinstance(node, tirx.FloatImm):
            found.append(f"FloatImm {node}")
        for attr in ("dtype", "ty"):
            try:
                value = getattr(node, attr)
            except Exception:  # noqa: BLE001 - not every node has both
                continue
            dtype = getattr(value, "dtype", value)  # PrimType / BufferType / TensorType -> dtype
            if is_float(dtype):
                found.append(f"{type(node).__name__}.{attr} = {dtype}: {str(node)[:80]}")

    tvm_ffi.structural_walk(root, visit)
    return found, kinds


# -- the walker can fail --------------------------------------------------------------------------


def te_func(stage_dtype: str, scale=None):
    from tvm import te

    a = te.placeholder((8,), "int32", name="a")
    mid = te.compute((8,), lambda i: a[i].astype(stage_dtype) if scale is None else a[i].astype(stage_dtype) * scale, name="mid")
    out = te.compute((8,), lambda i: mid[i].astype("int32"), name="out")
    return te.create_prim_func([a, out])


@pytest.mark.parametrize(
    "func, expect",
    [
        (lambda: te_func("float32"), {"Cast", "Var"}),  # float cast and float intermediate buffer
        (lambda: te_func("int64", scale=0.5), {"FloatImm"}),
        (lambda: te_func("float16", scale=2.0), {"Cast", "Var", "FloatImm"}),
    ],
    ids=["float-cast-and-buffer", "float-immediate", "half"],
)
def test_walker_flags_float(func, expect):
    found, _ = float_nodes(func())
    assert {f.split(".")[0].split(" ")[0] for f in found} >= expect, found


def test_walker_flags_float_relax_param():
    from tvm import relax

    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        bb.emit_func_output(x)
    found, _ = float_nodes(bb.get())
    assert found, "a float32 Relax parameter went unnoticed"


def test_walker_passes_integer_func():
    found, kinds = float_nodes(te_func("int64"))
    assert found == [] and kinds["Cast"] >= 2 and kinds["PrimFunc"] == 1


# -- the real pipeline ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ALL_KINDS)
def program(request):
    return calibrated(request.param, Spec(64, 4, 2, 128))[1]


@pytest.fixture(scope="module")
def graph(program):
    from ibert_tvm.graph import build_graph

    return build_graph(program, 2, 16, choices=choices(program))


def choices(program) -> int:
    return CHOICES if program.multiple_choice else 1


def test_program_arrays_are_integers(program):
    from ibert_tvm.program import iter_arrays

    arrays = dict(iter_arrays(program))
    assert len(arrays) > 20
    # the documented floats: output scales (per class, per hidden channel), used only by the runner's last step
    floats = {name for name, a in arrays.items() if a.dtype.kind not in "iu"}
    assert floats <= {"logit_scale", "hidden_scale"}, floats


def test_graph_params_are_integers(graph):
    assert graph.params and all(a.dtype.kind in "iu" for _, a in graph.params)


def test_relax_main_signature_is_integer(graph):
    main = graph.module["main"]
    assert len(main.params) == 3 + len(graph.params)
    dtypes = {str(p.ty.dtype) for p in main.params}  # Relax vars carry a TensorType
    assert dtypes <= {"int8", "uint8", "int32", "int64"}, dtypes


@pytest.mark.parametrize("stage", ["relax", "host", "x86-avx2", "arm64-dotprod", "arm64-neon", "cuda-sm75"])
def test_module_is_float_free(program, graph, stage):
    """Before and after each target's schedules (with the GEMM operand form of that target)."""
    from tvm import tirx

    from ibert_tvm import targets
    from ibert_tvm.build import schedule_module
    from ibert_tvm.graph import build_graph

    if stage == "relax":
        mod = graph.module
    else:
        preset = targets.get(stage)
        mod = schedule_module(build_graph(program, 2, 16, preset.a_shift, choices=choices(program),
                                          fused_attention=preset.device_kind.fused_attention).module, preset)
    prim_funcs = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert len(prim_funcs) >= 8
    found, kinds = float_nodes(mod)
    assert found == [], found[:10]
    # the walk really went through every kernel body
    assert kinds["PrimFunc"] == len(prim_funcs) and kinds["Cast"] > 50 and kinds["BufferStore"] > 10
