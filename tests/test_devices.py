"""Devices behind one interface: every preset's device provides all of it, nothing outside the
device modules tests a device's name, the runner's side loads without the compiler, and the
schedules of every device find a GEMM's parts by the roles its blocks carry, not by their names."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import tvm
from conftest import REPO, Spec, calibrated

from ibert_tvm import targets
from ibert_tvm.device import Device

# callable members -> how many arguments their callers pass
ARITY = {"a_shift": 1, "tvm_target": 2, "scheduler": 2, "compile": 2, "export": 3, "runtime_device": 1}
DEVICE_MODULES = set(REPO.glob("ibert_tvm/device*.py"))
SOURCES = [p for d in ("ibert_tvm", "relay_ops", "schedules", "scripts") for p in sorted((REPO / d).rglob("*.py"))]


def test_every_preset_device_provides_the_interface():
    assert {f.name for f in dataclasses.fields(Device)} == {"name", "tunable", "fused_attention", *ARITY}
    for p in [targets.host_preset(), *targets.PRESETS.values()]:
        d = p.device_kind
        assert isinstance(d, Device) and isinstance(d.name, str), p.name
        assert isinstance(d.tunable, bool) and isinstance(d.fused_attention, bool), p.name
        for member, n in ARITY.items():
            inspect.signature(getattr(d, member)).bind(*[None] * n)  # TypeError if it takes other arguments
        assert targets.DEVICE_KINDS[p.device] is d, p.name


def _names_a_device(node: ast.expr) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name.endswith("device")


def _is_text(node: ast.expr) -> bool:
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return any(isinstance(i, ast.Constant) and isinstance(i.value, str) for i in items)


def device_name_tests(text: str) -> Iterator[tuple[int, str]]:
    """`x.device == "cuda"`, `"cpu" != device`, `device in ("cpu", ...)`: (line, source)."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(map(_names_a_device, operands)) and any(map(_is_text, operands)):
                yield node.lineno, ast.get_source_segment(text, node)


def test_no_module_outside_the_devices_tests_a_device_name():
    assert DEVICE_MODULES and SOURCES
    found = [f"{path.relative_to(REPO)}:{line}: {source}" for path in SOURCES if path not in DEVICE_MODULES
             for line, source in device_name_tests(path.read_text())]
    assert found == []


def test_the_detector_sees_a_device_name_test():
    text = 'if preset.device == "cuda":\n    pass\nok = kind == "cuda" or m.target.device in ("cpu",)\n'
    found = [source for _, source in device_name_tests(text)]
    assert found == ['preset.device == "cuda"', 'm.target.device in ("cpu",)']


def test_runtime_side_loads_without_the_compiler():
    """The runner's way to a device (targets, every device module, the CPU's runtime device) with
    TVM's runtime library alone, as on a board: no schedules, kernels or TVM compiler packages."""
    probe = ("import sys; from ibert_tvm.targets import DEVICE_KINDS; DEVICE_KINDS['cpu'].runtime_device(None); "
             "print(sorted(m for m in sys.modules if m.startswith(('ibert_tvm.schedules', 'ibert_tvm.relay_ops')) "
             "or m.startswith(('tvm.relax', 'tvm.s_tir', 'ibert_tvm.build', 'ibert_tvm.graph'))))")
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["[]"]


@pytest.mark.parametrize("preset", ["x86-avx512-vnni", "arm64-dotprod", "cuda-sm75"])
def test_schedules_find_gemm_parts_by_role_not_by_name(preset, monkeypatch):
    """Every TE stage renamed: each kernel is scheduled exactly as before (structural equality
    ignores names; the old lookup by name failed on these)."""
    import tvm_ffi
    from tvm import te

    from ibert_tvm.build import schedule_module
    from ibert_tvm.graph import build_graph

    p = targets.get(preset)
    program = calibrated("IBertForSequenceClassification", Spec())[1]

    def scheduled() -> tvm.IRModule:
        return schedule_module(build_graph(program, 2, 16, p.a_shift).module, p)

    want = scheduled()
    compute = te.compute
    monkeypatch.setattr(te, "compute", lambda shape, f, name="compute", *a, **kw: compute(shape, f, f"{name}_renamed",
                                                                                          *a, **kw))
    got = scheduled()
    assert 'T.sblock("O_renamed")' in got.script()
    assert tvm_ffi.get_first_structural_mismatch(got, want) is None
