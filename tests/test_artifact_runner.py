"""compile_model -> artifact folder -> Runner: exactness, validation, integrity, failure hygiene, CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CALIB_TEXTS, PAD, VOCAB, WORDS, random_inputs, save_checkpoint

from ibert_tvm import artifact as art
from ibert_tvm import cli, pipeline, reference
from ibert_tvm.artifact import ArtifactError
from ibert_tvm.compile import CompileOptions, compile_model
from ibert_tvm.runner import Runner

SEQ = 16


@pytest.fixture(scope="session")
def runners(artifacts) -> dict[str, Runner]:
    return {kind: Runner(a.path) for kind, a in artifacts.items()}


@pytest.fixture
def runner(runners, any_artifact) -> Runner:
    return runners[any_artifact.kind]


def assert_same(got: dict, want: dict, names) -> None:
    for name in names:
        assert got[name].shape == want[name].shape, name
        differing = int((np.asarray(got[name]) != want[name]).sum())
        assert differing == 0, f"{name}: {differing} elements differ"


# -- exactness ------------------------------------------------------------------------------------


def test_manifest_describes_artifact(any_artifact):
    m = art.read(any_artifact.path)
    p = any_artifact.program
    assert m.model_class == any_artifact.kind == p.model_class
    assert (m.batches, m.seq_len, m.vocab_size, m.pad_id, m.type_vocab_size) == ([2], SEQ, VOCAB, PAD, 2)
    assert [(b.batch, b.seq_len, b.function) for b in m.buckets] == [(2, SEQ, f"main_b2_s{SEQ}")]
    assert [o.name for o in m.outputs] == p.outputs
    assert set(m.files) == {art.LIBRARY, art.PARAMS, art.TOKENIZER}
    assert not [f for f in any_artifact.path.parent.iterdir() if f.name.startswith(f".{any_artifact.path.name}.")]


def test_run_integer_equals_reference(runner, any_artifact):
    ids, mask = random_inputs(np.random.default_rng(1), 5, SEQ, pads=[0, 3, 8, 15, 1])
    got = runner.run_integer(ids, mask)
    program = any_artifact.program
    assert_same(got, reference.run(program, ids, mask), program.outputs)
    for name, scale in program.output_scales().items():
        np.testing.assert_allclose(got["scales"][name], scale)


def test_batch_splitting_and_padding_match_single_rows(runner, any_artifact):
    """5 rows (compiled batch 2) of 9 tokens (compiled 16): per row what one row alone gives."""
    ids, mask = random_inputs(np.random.default_rng(2), 5, 9, pads=[0, 2, 0, 5, 8])
    together = runner.run_integer(ids, mask)
    names = any_artifact.program.outputs
    for i in range(5):
        alone = runner.run_integer(ids[i : i + 1], mask[i : i + 1])
        assert_same({n: together[n][i : i + 1] for n in names}, alone, names)
    assert_same(together, reference.run(any_artifact.program, ids, mask), names)
    if "last_hidden_state" in together:
        assert together["last_hidden_state"].shape == (5, 9, any_artifact.program.hidden)


def test_results_stay_the_callers(runner, any_artifact):
    """Outputs are read where the library wrote them: a later call of the same function (other
    inputs) must leave an earlier result as it was, and writing into a result must not reach the
    next one."""
    rng = np.random.default_rng(3)
    names = any_artifact.program.outputs
    first_in, second_in = random_inputs(rng, 2, SEQ, pads=[0, 4]), random_inputs(rng, 2, SEQ, pads=[2, 0])
    first = runner.run_integer(*first_in)
    kept = {n: first[n].copy() for n in names}
    second = runner.run_integer(*second_in)
    assert any((second[n] != kept[n]).any() for n in names)
    assert_same(first, kept, names)
    again = {n: second[n].copy() for n in names}
    for n in names:
        first[n].fill(7)
        second[n].fill(7)
    assert_same(runner.run_integer(*second_in), again, names)


def test_defaults_for_missing_mask_and_types(runner, any_artifact):
    """No mask: every given token counts, the padding up to the compiled length none; no token
    types: all 0. Shorter than the compiled length and fewer rows than the compiled batch."""
    ids, _ = random_inputs(np.random.default_rng(4), 1, 9)
    ones, zeros = np.ones_like(ids), np.zeros_like(ids)
    assert_same(runner.run_integer(ids), runner.run_integer(ids, ones, zeros), any_artifact.program.outputs)
    assert_same(runner.run_integer(ids), reference.run(any_artifact.program, ids, ones), any_artifact.program.outputs)


def test_run_is_integers_times_scales(runner):
    ids, mask, _ = runner.encode(CALIB_TEXTS[:3]).values()
    ints, floats = runner.run_integer(ids, mask), runner.run(ids, mask)
    for name, scale in ints["scales"].items():
        np.testing.assert_allclose(floats[name], ints[name] * scale, rtol=1e-6)


@pytest.mark.parametrize("asked", [None, 1])
def test_runner_uses_every_cpu_by_default(artifact, asked):
    """TVM alone sizes its pool at half the logical CPUs: one thread on a 2-vCPU machine."""
    import subprocess
    import sys

    code = f"import tvm; from ibert_tvm.runner import Runner; r = Runner({str(artifact.path)!r}, threads={asked}); " \
           "print(r.threads, tvm.runtime.num_threads())"
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    want = asked or len(os.sched_getaffinity(0))
    assert res.stdout.split() == [str(want)] * 2


def test_embed_is_normalised_and_input_dependent(artifact):
    e = pipeline("sentence-embedding", artifact.path)(CALIB_TEXTS)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, rtol=1e-5)
    assert e.shape == (len(CALIB_TEXTS), artifact.program.hidden) and (e[0] @ e[1]) < 0.9999


# -- input validation -----------------------------------------------------------------------------


def test_encode_pads_and_refuses_over_long_text(runner):
    ids, mask, _ = runner.encode("the film was good").values()
    assert ids.shape == (1, SEQ) and mask[0].tolist() == [1] * 4 + [0] * (SEQ - 4)
    assert ids[0, :4].tolist() == [2 + WORDS.index(w) for w in ("the", "film", "was", "good")]
    assert (ids[0, 4:] == PAD).all()
    long = " ".join(WORDS[:SEQ + 4])
    with pytest.raises(ValueError, match="longer than the compiled length"):
        runner.encode(["short", long])
    ids, mask, _ = runner.encode(long, truncation=True).values()
    assert mask.sum() == SEQ and ids[0].tolist() == [2 + WORDS.index(w) for w in WORDS[:SEQ]]
    with pytest.raises(ValueError):
        runner.encode([])


BAD_INPUTS = {
    "id-above-vocab": (lambda ids, m: ([[1, VOCAB]], None), ValueError, "vocabulary"),
    "negative-id": (lambda ids, m: ([[-1, 2]], None), ValueError, "vocabulary"),
    "float-ids": (lambda ids, m: (ids.astype(np.float32), m), TypeError, "integers"),
    "3d-ids": (lambda ids, m: (ids[None], None), ValueError, "2-D"),
    "mask-shape": (lambda ids, m: (ids, m[:, :-1]), ValueError, "shape"),
    "mask-values": (lambda ids, m: (ids, m * 2), ValueError, "0 or 1"),
    "too-long": (lambda ids, m: (np.ones((1, SEQ + 1), np.int32), None), ValueError, str(SEQ)),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_run_integer_rejects_bad_input(runners, case):
    make, exc, match = case
    ids, mask = random_inputs(np.random.default_rng(0), 2, 8)
    with pytest.raises(exc, match=match):
        runners["IBertModel"].run_integer(*make(ids, mask))


# -- artifact integrity ---------------------------------------------------------------------------


def flip_byte(name: str):
    """Replace the file by a copy with one byte flipped: editing it in place would corrupt the
    pages of a library the untouched Runner above still has mapped (a crash at exit)."""
    def f(d: Path):
        data = bytearray((d / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / name).unlink()
        (d / name).write_bytes(bytes(data))
    return f


def edit_manifest(change):
    def f(d: Path):
        m = json.loads((d / art.MANIFEST).read_text())
        change(m)
        (d / art.MANIFEST).write_text(json.dumps(m))
    return f


TAMPERING = {
    "params-byte": (flip_byte(art.PARAMS), ArtifactError, "sha256"),
    "library-byte": (flip_byte(art.LIBRARY), ArtifactError, "sha256"),
    "tokenizer-byte": (flip_byte(art.TOKENIZER), ArtifactError, "sha256"),
    "no-manifest": (lambda d: (d / art.MANIFEST).unlink(), ArtifactError, "not an ibert-tvm artifact"),
    "no-params": (lambda d: (d / art.PARAMS).unlink(), ArtifactError, "missing"),
    "corrupt-manifest": (lambda d: (d / art.MANIFEST).write_text("{"), ArtifactError, "corrupt"),
    "format-version": (edit_manifest(lambda m: m.update(format_version=99)), ArtifactError, "format version"),
    "unlisted-library": (edit_manifest(lambda m: m["files"].pop(art.LIBRARY)), ArtifactError, art.LIBRARY),
    "other-arch": (edit_manifest(lambda m: m["target"].update(arch="aarch64")), ArtifactError, "field target.arch"),
    "cpu-flag": (edit_manifest(lambda m: m["target"]["cpu_flags"].append("amx_fp99")), ArtifactError,
                 r"field target\.cpu_flags differs"),
    "unknown-param": (edit_manifest(lambda m: m["params"].append("ghost")), ArtifactError, "field params differs"),
}


@pytest.mark.parametrize("case", TAMPERING.values(), ids=TAMPERING.keys())
def test_runner_refuses_tampered_artifact(artifact, tmp_path, case):
    tamper, exc, match = case
    copy = Path(shutil.copytree(artifact.path, tmp_path / "copy"))
    Runner(copy)  # the untouched copy loads
    tamper(copy)
    with pytest.raises(exc, match=match):
        Runner(copy)


# -- compile failures -----------------------------------------------------------------------------


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def compile_fails(tmp_path: Path, exc, match: str, **kw) -> None:
    """Compile into tmp_path/out expecting `exc`; nothing (no out, no .out.* temp dir) is left."""
    before = entries(tmp_path)
    opt = CompileOptions(**{"target": "host", "batches": (2,), "seq_len": SEQ, "out": tmp_path / "out", "progress": False, **kw})
    with pytest.raises(exc, match=match):
        compile_model(opt)
    assert entries(tmp_path) == before


@pytest.fixture(scope="session")
def uncalibrated(artifact) -> str:
    return str(artifact.checkpoint)  # saved uncalibrated; the artifact was calibrated with text


def test_unknown_target_lists_known_ones(tmp_path, uncalibrated):
    compile_fails(tmp_path, ValueError, "x86-avx512-vnni", model=uncalibrated, target="nope", calib_texts=CALIB_TEXTS)


def test_uncalibrated_without_text(tmp_path, uncalibrated):
    compile_fails(tmp_path, ValueError, "calibrat", model=uncalibrated)


def test_empty_calibration_text(tmp_path, uncalibrated):
    compile_fails(tmp_path, ValueError, "empty", model=uncalibrated, calib_texts=["", "   "])


@pytest.mark.parametrize("arch", ["gpt2", "distilbert"])
def test_unsupported_model_type(tmp_path, arch):
    import transformers

    if arch == "gpt2":
        model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    else:
        model = transformers.DistilBertModel(transformers.DistilBertConfig(n_layers=1, dim=16, n_heads=2, hidden_dim=32, vocab_size=VOCAB))
    model.save_pretrained(tmp_path / "ckpt")
    compile_fails(tmp_path, ValueError, arch, model=str(tmp_path / "ckpt"), calib_texts=CALIB_TEXTS)


def test_failure_while_writing_leaves_nothing(tmp_path, uncalibrated, monkeypatch):
    """A failure after the library is built (inside the artifact's temp folder) cleans up."""
    from ibert_tvm import compile as compile_mod

    def boom():
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(compile_mod, "versions", boom)
    compile_fails(tmp_path, RuntimeError, "simulated", model=uncalibrated, calib_texts=CALIB_TEXTS)


def test_failed_compile_creates_no_parent_dirs(tmp_path, uncalibrated):
    with pytest.raises(ValueError, match="calibrat"):
        compile_model(CompileOptions(model=uncalibrated, out=tmp_path / "new" / "sub" / "out", progress=False))
    assert entries(tmp_path) == []


def test_calibration_pads_with_the_models_pad_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ibert_tvm.calibrate import tokenizer_batches

    tok = Tokenizer(models.WordLevel({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "film": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (batch,) = tokenizer_batches(tmp_path / "tokenizer.json", ["film film film", "film"], 2, 8, pad_id=1)
    assert batch["input_ids"][1].tolist() == [4, 1, 1]


def test_existing_output_needs_force(artifact):
    before = (artifact.path / art.MANIFEST).read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        compile_model(CompileOptions(model=str(artifact.checkpoint), out=artifact.path, calib_texts=CALIB_TEXTS))
    assert (artifact.path / art.MANIFEST).read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_parent(tmp_path, uncalibrated):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        compile_fails(locked, PermissionError, "cannot write", model=uncalibrated, calib_texts=CALIB_TEXTS)
    finally:
        locked.chmod(0o700)


def test_parent_is_a_file(tmp_path, uncalibrated):
    """Unwritable even for root: the output's parent is a regular file."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="cannot write"):
        compile_model(CompileOptions(model=uncalibrated, out=tmp_path / "file" / "out", calib_texts=CALIB_TEXTS))
    assert entries(tmp_path) == ["file"]


def test_write_dir_replaces_only_with_force(tmp_path):
    def fill(text):
        return lambda d: (d / "a.txt").write_text(text)

    out = art.write_dir(tmp_path / "a", fill("one"))
    with pytest.raises(FileExistsError, match="--force"):
        art.write_dir(out, fill("two"))
    assert (out / "a.txt").read_text() == "one"
    art.write_dir(out, fill("two"), force=True)
    assert (out / "a.txt").read_text() == "two"
    assert entries(tmp_path) == ["a"]  # no staging folder, no .old


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_run_json(any_artifact, capsys):
    texts = ["the film was good", "a dull plot"]
    assert cli.main(["run", str(any_artifact.path), *texts, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["input"] for r in result] == texts
    if any_artifact.kind == "IBertForSequenceClassification":
        assert all(set(r["output"]) == {"label", "score"} for r in result)
        assert all(r["output"]["label"] in any_artifact.program.label_names for r in result)
    else:  # a bare encoder's default: sentence-embedding
        embs = np.array([r["output"] for r in result])
        assert embs.shape == (2, 32)
        np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1, atol=1e-3)
        assert not np.allclose(embs[0], embs[1])


@pytest.mark.parametrize(
    "argv, match",
    [
        (lambda a, t: ["compile", "--model", a.checkpoint, "--target", "nope", "-o", t / "x"], "x86-avx512-vnni"),
        (lambda a, t: ["run", t, "some text"], "not an ibert-tvm artifact"),
        (lambda a, t: ["run", a.path, " ".join(WORDS)], "longer than"),
        (lambda a, t: ["run", a.path, "some text", "--threads", "0"], "threads must be at least 1"),
    ],
    ids=["unknown-target", "not-an-artifact", "over-long-text", "zero-threads"],
)
def test_cli_user_errors(artifact, tmp_path, capsys, argv, match):
    assert cli.main([str(x) for x in argv(artifact, tmp_path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ibert-tvm: error:")]
    assert len(errors) == 1 and match in err  # info lines may come before the one error line
    assert not (tmp_path / "x").exists()


def test_save_checkpoint_helper_sanity(tmp_path):
    """The fixture's checkpoint really is an uncalibrated IBert with a matching tokenizer."""
    from ibert_tvm import checkpoint

    path = save_checkpoint(tmp_path / "c", "IBertModel")
    model = checkpoint.load(path)
    assert type(model).__name__ == "IBertModel" and not checkpoint.is_calibrated(model)
    assert model.config.pad_token_id == PAD and model.config.vocab_size == VOCAB


def test_reuse_rebuilds_what_this_version_cannot_read(artifact, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(artifact.path, copy)
    built = []
    assert art.reuse(copy, lambda: built.append(1) or copy) == copy and not built
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert art.reuse(copy, lambda: built.append(1) or copy) == copy and built == [1]
