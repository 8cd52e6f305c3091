"""A deployed artifact runs with the base install alone: no torch, no transformers.

A virtualenv with only `[project].dependencies` of pyproject.toml plus the project (--no-deps) is
cached under ~/.cache/ibert-tvm/ (tests/venvs.py, keyed by that list; the project is reinstalled
whenever its sources change). When pip cannot reach a package index the tests fail under CI=true
and are skipped elsewhere, with a warning (conftest.ci_setup_failed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, random_inputs
from venvs import cached_venv, clean_env, digest, pip

PACKAGES = ("ibert_tvm", "relay_ops", "schedules")  # the folders installed as ibert_tvm.*

pytestmark = pytest.mark.slow

PROBE = r'''
import importlib, json, sys
import numpy as np
for name in ("torch", "transformers"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        sys.exit(f"{name} is importable in the runtime-only environment")
import ibert_tvm
from ibert_tvm import pipeline
from ibert_tvm.runner import Runner
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert not leaked, leaked
artifact, inputs, out = sys.argv[1:4]
d = np.load(inputs)
r = Runner(artifact)
res = r.run_integer(d["ids"], d["mask"])
if "last_hidden_state" in res:
    res["embed"] = pipeline("sentence-embedding", r)(["the film was good", "a dull plot"])
np.savez(out, **{k: v for k, v in res.items() if k != "scales"})
print(json.dumps({"package": ibert_tvm.__file__}))
'''


def file_digest(paths: list[Path]) -> str:
    return digest(part for p in sorted(paths) for part in (str(p.relative_to(REPO)).encode(), p.read_bytes()))


@pytest.fixture(scope="session")
def runtime_python(tmp_path_factory) -> Path:
    pyproject = REPO / "pyproject.toml"
    python = cached_venv("runtime-venv", tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    venv = python.parents[1]
    sources = [pyproject, *(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*") if p.is_file() and "__pycache__" not in p.parts)]
    stamp = venv / f".project-{file_digest(sources)}"
    if not stamp.exists():
        # install from a copy so that building the wheel writes nothing into the repository
        src = tmp_path_factory.mktemp("project-src")
        for p in sources:
            (src / p.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, src / p.relative_to(REPO))
        if (REPO / "README.md").exists():
            shutil.copyfile(REPO / "README.md", src / "README.md")
        pip(python, "--no-deps", "--force-reinstall", str(src))
        for old in venv.glob(".project-*"):
            old.unlink()
        stamp.touch()
    return python


def test_runner_without_torch_matches_full_env(runtime_python, artifacts, tmp_path):
    for kind, a in artifacts.items():
        ids, mask = random_inputs(np.random.default_rng(3), 3, 11, pads=[0, 4, 10])
        np.savez(tmp_path / "in.npz", ids=ids, mask=mask)
        (tmp_path / "probe.py").write_text(PROBE)
        res = subprocess.run(
            [str(runtime_python), str(tmp_path / "probe.py"), str(a.path), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
            capture_output=True, text=True, cwd=tmp_path, env=clean_env(),
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert not Path(json.loads(res.stdout.splitlines()[-1])["package"]).is_relative_to(REPO)
        isolated = np.load(tmp_path / "out.npz")
        from ibert_tvm import pipeline
        from ibert_tvm.runner import Runner

        here = Runner(a.path).run_integer(ids, mask)
        for name in a.program.outputs:
            assert isolated[name].dtype == here[name].dtype
            np.testing.assert_array_equal(isolated[name], here[name], err_msg=f"{kind} {name}")
        if kind == "IBertModel":
            here_embed = pipeline("sentence-embedding", a.path)(["the film was good", "a dull plot"])
            np.testing.assert_array_equal(isolated["embed"], here_embed)


def test_cli_entry_point_runs_without_torch(runtime_python, artifact, capsys):
    from ibert_tvm import cli

    exe = runtime_python.parent / "ibert-tvm"
    res = subprocess.run([str(exe), "run", str(artifact.path), "the film was good", "--json"],
                         capture_output=True, text=True, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert cli.main(["run", str(artifact.path), "the film was good", "--json"]) == 0
    assert json.loads(res.stdout) == json.loads(capsys.readouterr().out)


def test_compiler_command_in_a_runtime_install_says_what_to_install(runtime_python, artifact):
    exe = runtime_python.parent / "ibert-tvm"
    res = subprocess.run([str(exe), "compile", "--model", str(artifact.checkpoint), "-o", "unused"],
                         capture_output=True, text=True, env=clean_env())
    assert res.returncode == 2 and 'pip install "ibert-tvm[compile]"' in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
