"""Layers point one way: no import cycles among the project's modules, and the runtime (runner,
artifact, manifest, pipelines, remote) imports and runs without the compiler or torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# installed name -> folder (pyproject's package-dir keeps the design's folders at the root)
PACKAGES = {"ibert_tvm": "ibert_tvm", "ibert_tvm.relay_ops": "relay_ops", "ibert_tvm.schedules": "schedules"}
RUNTIME = ("ibert_tvm.runner", "ibert_tvm.pipelines", "ibert_tvm.artifact", "ibert_tvm.manifest", "ibert_tvm.remote",
           "ibert_tvm.signing", "ibert_tvm.files", "ibert_tvm.threads")
# what a deployed runner must never load: our compiler's modules, TVM's Relax compiler, torch
# (`import tvm` itself loads tvm.te and tvm.tirx; TVM_USE_RUNTIME_LIB=1 keeps Relax out)
COMPILER = ("torch", "transformers", "ibert_tvm.importer", "ibert_tvm.graph", "ibert_tvm.build", "ibert_tvm.compile",
            "ibert_tvm.calibrate", "ibert_tvm.checkpoint", "ibert_tvm.program", "ibert_tvm.reference",
            "ibert_tvm.relay_ops", "ibert_tvm.schedules", "ibert_tvm.evaluation", "tvm.relax")


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted((REPO / folder).rglob("*.py")):
            parts = (*pkg.split("."), *f.relative_to(REPO / folder).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file (function-local imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}  # annotations only: never executed
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not an edge
                out.add(t)
    return out


def test_no_import_cycles():
    mods = modules()
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


BLOCKED_RUN = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
import numpy as np
for m in {runtime!r}:
    __import__(m)
from ibert_tvm.runner import Runner
r = Runner({artifact!r})
print(int(r.run_integer(np.array([[5, 6, 7]]))["last_hidden_state"].sum()))
loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
assert not loaded, loaded
"""


def test_runtime_runs_without_the_compiler(artifact):
    from ibert_tvm import reference

    code = BLOCKED_RUN.format(blocked=COMPILER, runtime=RUNTIME, artifact=str(artifact.path))
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ids = [[5, 6, 7]]
    want = int(reference.run(artifact.program, __import__("numpy").array(ids), __import__("numpy").ones((1, 3), int))
               ["last_hidden_state"].sum())
    assert int(res.stdout.split()[-1]) == want
