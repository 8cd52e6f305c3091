"""A runtime you can put behind a server: shared Runners under threads, fuzzed inputs, tampered
artifacts, signatures, and compiles that never destroy what they did not create."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CALIB_TEXTS, PAD, REPO, VOCAB, mean_pooled
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ibert_tvm import artifact as art
from ibert_tvm import cli, pipeline, reference
from ibert_tvm.artifact import ArtifactError
from ibert_tvm.runner import Runner

SEQ = 16


@pytest.fixture(scope="module")
def runner(artifact):
    with Runner(artifact.path) as r:
        yield r


# -- threads ----------------------------------------------------------------------------------------
def test_shared_runner_under_threads_equals_sequential(artifact, runner):
    """8 threads x 25 calls of mixed shapes on one Runner: every result equals the sequential one."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(16):
        n, s = int(rng.integers(1, 5)), int(rng.integers(1, SEQ + 1))
        ids = rng.integers(1, VOCAB, (n, s)).astype(np.int32)
        cases.append((ids, np.ones_like(ids), rng.integers(0, 2, (n, s))))
    want = [runner.run_integer(*c) for c in cases]
    for c, w in zip(cases, want):  # the sequential results are the reference's
        ref = reference.run(artifact.program, *c)
        assert all(np.array_equal(w[k], ref[k]) for k in artifact.program.outputs)
    errors, mismatches = [], []

    def work(t: int) -> None:
        try:
            for k in range(25):
                i = (t * 7 + k) % len(cases)
                got = runner.run_integer(*cases[i])
                if not all(np.array_equal(got[o], want[i][o]) for o in artifact.program.outputs):
                    mismatches.append((t, k))
        except Exception as err:  # noqa: BLE001 - collected, asserted below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors and not mismatches


def test_closed_runner_refuses_calls(artifact):
    r = Runner(artifact.path)
    assert r.on_library_thread(lambda: threading.current_thread().name).startswith("ibert-tvm-library")
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.run_integer([[5, 6]])
    with pytest.raises(RuntimeError, match="closed"):
        r.on_library_thread(lambda: None)


def test_results_outlive_their_runner(artifact):
    """Outputs are the library's own tensors, read in place: closing the Runner must not free them
    for a later Runner's calls to reuse."""
    r = Runner(artifact.path)
    out = r.run_integer([[5, 6, 7]])
    kept = {k: v.copy() for k, v in out.items() if k != "scales"}
    r.close()
    del r
    gc.collect()
    with Runner(artifact.path) as other:
        other.run_integer([[8, 9, 10, 11]])
    for k, v in kept.items():
        np.testing.assert_array_equal(out[k], v)


# -- inputs -------------------------------------------------------------------------------------------
BAD = {
    "type-5": (dict(input_ids=[[5, 6]], token_type_ids=[[0, 5]]), ValueError, r"token_type_ids outside .* \[0, 2\): \[5\]"),
    "type-negative": (dict(input_ids=[[5, 6]], token_type_ids=[[-1, 0]]), ValueError, r"\[-1\]"),
    "type-2**40": (dict(input_ids=[[5, 6]], token_type_ids=[[2**40, 0]]), ValueError, str(2**40)),
    "bool-ids": (dict(input_ids=np.array([[True, False]])), TypeError, "booleans"),
    "bool-types": (dict(input_ids=[[5, 6]], token_type_ids=np.array([[True, False]])), TypeError, "booleans"),
    "empty-batch": (dict(input_ids=np.zeros((0, 4), np.int32)), ValueError, "empty"),
    "zero-length": (dict(input_ids=np.zeros((2, 0), np.int32)), ValueError, "empty"),
    "ragged": (dict(input_ids=[[5, 6], [7]]), ValueError, "rectangular"),
    "huge-unsigned": (dict(input_ids=np.array([[2**64 - 1, 5]], np.uint64)), ValueError, str(2**64 - 1)),
    "float-ids": (dict(input_ids=[[5.0, 6.0]]), TypeError, "integers"),
    "string-ids": (dict(input_ids=[["a", "b"]]), TypeError, "integers"),
    "mask-2": (dict(input_ids=[[5, 6]], attention_mask=[[1, 2]]), ValueError, "0 or 1"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs_are_named(runner, case):
    kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        runner.run_integer(**kwargs)


def test_bool_attention_mask_is_a_mask(runner):
    ids = np.array([[5, 6, 7, PAD]])
    mask = np.array([[True, True, True, False]])
    a, b = runner.run_integer(ids, mask), runner.run_integer(ids, mask.astype(np.int32))
    assert all(np.array_equal(a[k], b[k]) for k in a if k != "scales")


DTYPES = [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint32, np.uint64, np.bool_, np.float32]


@st.composite
def run_inputs(draw):
    """ids, mask, types: half the time well-formed, otherwise any dtype, shape and value."""
    def array(shape, hi):
        dtype = draw(st.one_of(st.just(np.int32), st.just(np.int64), st.sampled_from(DTYPES)))
        n = int(np.prod(shape))
        if dtype is np.bool_:
            return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype).reshape(shape)
        info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
        lo, top = max(int(info.min), -(2**40)), min(int(info.max), 2**40)
        if draw(st.booleans()):  # in range
            values = draw(st.lists(st.integers(0, min(hi, top + 1) - 1), min_size=n, max_size=n))
        else:
            edge = st.sampled_from([lo, top, 0, 1, 2, hi - 1, hi, -1 if lo < 0 else 0])
            values = draw(st.lists(st.one_of(st.integers(0, hi - 1), st.integers(lo, top), edge), min_size=n, max_size=n))
        return np.array(values).astype(dtype).reshape(shape)

    if draw(st.booleans()):
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, SEQ)))
    else:
        ndim = draw(st.sampled_from([1, 2, 3]))
        shape = tuple(draw(st.integers(0, 3)) for _ in range(ndim - 1)) + (draw(st.integers(0 if ndim > 1 else 1, SEQ + 2)),)
    ids = array(shape, VOCAB)
    mask = types = None
    m = draw(st.sampled_from(["none", "real", "any"]))
    if m == "real" and ids.size:  # each row: ones, then zeros
        lengths = np.array(draw(st.lists(st.integers(1, shape[-1]), min_size=1, max_size=1)) * int(np.prod(shape[:-1])))
        mask = (np.arange(shape[-1]) < lengths.reshape(shape[:-1] + (1,))).astype(np.int32)
    elif m == "any":
        mask = array(shape, 2)
    if draw(st.booleans()):
        types = array(shape, 2)
    return ids, mask, types


def valid(ids, mask, types) -> bool:
    def ints(a, hi):
        return a.dtype.kind in "iu" and a.size > 0 and bool(((a >= 0) & (a < hi)).all())

    lead_ok = ids.ndim in (1, 2) and ids.shape[-1] <= SEQ and ids.size > 0
    return (lead_ok and ints(ids, VOCAB)
            and (mask is None or (mask.dtype.kind in "iub" and bool(np.isin(mask, (0, 1)).all())))
            and (types is None or ints(types, 2)))


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(run_inputs())
def test_fuzzed_inputs_run_bit_exact_or_raise(artifact, runner, inputs):
    """Every input runs bit-exact against the reference or raises ValueError/TypeError."""
    ids, mask, types = inputs
    try:
        got = runner.run_integer(ids, mask, types)
    except (ValueError, TypeError) as err:
        assert not valid(ids, mask, types), f"a valid input was refused: {err}"
        event(f"refused: {type(err).__name__}")
        return
    event("ran")
    assert valid(ids, mask, types), f"invalid input accepted: {ids!r} {mask!r} {types!r}"
    ids2 = np.atleast_2d(ids).astype(np.int64)
    ref = reference.run(artifact.program, ids2, np.ones_like(ids2) if mask is None else np.atleast_2d(mask).astype(np.int64),
                        None if types is None else np.atleast_2d(types).astype(np.int64))
    for name in artifact.program.outputs:
        np.testing.assert_array_equal(got[name], ref[name])


# -- text -----------------------------------------------------------------------------------------------
def test_text_pairs_keep_their_token_types(tmp_path, artifact):
    """A BERT-style pair tokenizer: the second segment's type ids reach the library."""
    from tokenizers import Tokenizer, processors

    copy = _copy(artifact, tmp_path)
    tok = Tokenizer.from_file(str(artifact.checkpoint / art.TOKENIZER))
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1", special_tokens=[])
    r = Runner(_resealed(copy, tokenizer=tok.to_str().encode()))
    enc = r.encode([("the film", "was good")])
    assert enc["token_type_ids"][0, :5].tolist() == [0, 0, 1, 1, 0]
    embed = pipeline("sentence-embedding", r)
    got = embed([("the film", "was good")])
    want = embed(["the film was good"])  # same tokens, all type 0
    assert not np.allclose(got, want)
    out = r.run(**enc)
    np.testing.assert_allclose(got, mean_pooled(out["last_hidden_state"], enc["attention_mask"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("texts, exc, match", [
    (["good", 5], TypeError, "text 1 is int"),
    (["good", ("a", 3)], TypeError, "text 1 is tuple"),
    ([], ValueError, "no text"),
    (("good", "bad"), TypeError, "ambiguous"),
    (None, TypeError, "texts must be"),
])
def test_bad_text_items_are_named(runner, texts, exc, match):
    with pytest.raises(exc, match=match):
        runner.encode(texts)


def test_embed_works_in_chunks(runner, monkeypatch):
    """Many texts run CHUNK at a time (peak memory follows the chunk) and give the same vectors."""
    from ibert_tvm import pipelines

    texts = [CALIB_TEXTS[i % len(CALIB_TEXTS)] + " good" * (i % 5) for i in range(23)]
    embed = pipeline("sentence-embedding", runner)
    whole = embed(texts)
    seen = []
    real = Runner.run

    def spy(self, *a, **k):
        seen.append(np.asarray(a[0] if a else k["input_ids"]).shape[0])
        return real(self, *a, **k)

    monkeypatch.setattr(pipelines, "CHUNK", 5)
    monkeypatch.setattr(Runner, "run", spy)
    parts = embed(texts)
    assert seen == [5, 5, 5, 5, 3]
    np.testing.assert_allclose(parts, whole, atol=1e-6)


# -- tampering --------------------------------------------------------------------------------------------
def _copy(artifact, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact.path, tmp_path / "copy"))


def _edit(path: Path, change) -> None:
    m = json.loads((path / art.MANIFEST).read_text())
    change(m)
    (path / art.MANIFEST).write_text(json.dumps(m))


def _resealed(path: Path, tokenizer: bytes | None = None) -> Path:
    """Rewrite an artifact consistently (as a tamperer who knows the format would)."""
    if tokenizer is not None:
        (path / art.TOKENIZER).write_bytes(tokenizer)
    m = json.loads((path / art.MANIFEST).read_text())
    m["files"] = {n: art.sha256(path / n) for n in m["files"]}
    (path / art.MANIFEST).write_text(json.dumps(m))
    return path


MANIFEST_EDITS = {
    "output-scale": (lambda m: m["outputs"][0]["scale"].__setitem__(0, 1.0), "outputs[0].scale[0]"),
    "vocab-size": (lambda m: m.update(vocab_size=64), "vocab_size"),
    "param-order": (lambda m: m.update(params=[m["params"][1], m["params"][0], *m["params"][2:]]), "params[0]"),
    "cpu-flags": (lambda m: m["target"].update(cpu_flags=[]), "target.cpu_flags"),
    "type-vocab": (lambda m: m.update(type_vocab_size=1), "type_vocab_size"),
    "pad-id": (lambda m: m.update(pad_id=3), "pad_id"),
    "label-names": (lambda m: m.update(label_names=["x"]), "label_names"),
}


@pytest.mark.parametrize("case", MANIFEST_EDITS.values(), ids=MANIFEST_EDITS.keys())
def test_manifest_edit_is_named(artifact, tmp_path, case):
    change, field = case
    copy = _copy(artifact, tmp_path)
    _edit(copy, change)
    with pytest.raises(ArtifactError, match=rf"field {field.replace('[', '.').replace(']', '.')}"):
        Runner(copy)
    with pytest.raises(ArtifactError, match="edited"):
        art.read(copy)


SCHEMA = {
    "missing": (lambda m: m.pop("batches"), "field batches is missing"),
    "missing-bucket": (lambda m: m.update(batches=[1, 2]), "each compiled batch"),
    "mistyped-bool": (lambda m: m.update(pooling={"mode": "mean", "normalize": 1}), r"field pooling\.normalize must be bool"),
    "pooling-mode": (lambda m: m.update(pooling={"mode": "sum", "normalize": True}), r"field pooling\.mode must be one of"),
    "mistyped": (lambda m: m.update(seq_len="16"), "field seq_len must be int"),
    "nested-mistyped": (lambda m: m["outputs"][0].update(seq_axis="1"), r"field outputs\[0\]\.seq_axis must be int"),
    "unknown": (lambda m: m.update(extra=1), "unknown field extra"),
    "bad-digest": (lambda m: m["files"].update({art.PARAMS: "zz"}), "not a sha256"),
    "parent-path": (lambda m: m["files"].update({"../x": "0" * 64}), "not a plain file name"),
    "absolute-path": (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "not a plain file name"),
    "tokenizer-elsewhere": (lambda m: m["tokenizer"].update(file="../tokenizer.json"), "tokenizer.file"),
}


@pytest.mark.parametrize("case", SCHEMA.values(), ids=SCHEMA.keys())
def test_manifest_schema_errors_name_the_field(artifact, tmp_path, case, monkeypatch):
    change, match = case
    copy = _copy(artifact, tmp_path)
    _edit(copy, change)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    with pytest.raises(ArtifactError, match=match):
        Runner(copy)
    assert all(Path(p).parent == copy for p in opened), opened  # nothing outside the artifact


def test_symlinked_member_is_refused(artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    outside = tmp_path / "outside.json"
    shutil.copyfile(copy / art.TOKENIZER, outside)
    (copy / art.TOKENIZER).unlink()
    (copy / art.TOKENIZER).symlink_to(outside)
    with pytest.raises(ArtifactError, match="symbolic link"):
        Runner(copy)


def test_library_swapped_after_hashing_is_not_what_runs(artifact, tmp_path, monkeypatch):
    """The library file is replaced right after its bytes were verified: the verified bytes run."""
    copy = _copy(artifact, tmp_path)
    real = art.read_member

    def swap_after(folder, manifest, name):
        data = real(folder, manifest, name)
        if name == art.LIBRARY:
            (copy / art.LIBRARY).write_bytes(b"\x7fELF not a library")
        return data

    monkeypatch.setattr(art, "read_member", swap_after)
    r = Runner(copy)
    ids = np.array([[5, 6, 7]])
    ref = reference.run(artifact.program, ids, np.ones_like(ids))
    assert np.array_equal(r.run_integer(ids)["last_hidden_state"], ref["last_hidden_state"])


def test_tampered_params_header_is_caught_by_the_hash(artifact, tmp_path):
    """Edit the manifest and the sealed copy in the parameters together: the parameters' hash fails."""
    copy = _copy(artifact, tmp_path)
    _edit(copy, lambda m: m.update(pad_id=3))
    raw = (copy / art.PARAMS).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    sealed = json.loads(header["__metadata__"][art.SEAL])
    sealed["pad_id"] = 3
    header["__metadata__"][art.SEAL] = json.dumps(sealed, sort_keys=True, separators=(",", ":"))
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    (copy / art.PARAMS).write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + size :])
    with pytest.raises(ArtifactError, match=f"{art.PARAMS} does not match its sha256"):
        Runner(copy)


# -- signatures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from ibert_tvm import signing

    d = tmp_path_factory.mktemp("keys")
    for name in ("a", "b"):
        signing.generate(d / f"{name}.pem", d / f"{name}.pub.pem")
    return d


@pytest.fixture(scope="module")
def signed(artifact, keys, tmp_path_factory):
    from ibert_tvm.compile import CompileOptions, compile_program

    opt = CompileOptions(model=str(artifact.checkpoint), batches=(2,), seq_len=SEQ, progress=False,
                         out=tmp_path_factory.mktemp("signed") / "art", sign_key=keys / "a.pem")
    return compile_program(artifact.program, artifact.checkpoint, opt)


def test_signature_verifies_with_the_right_key_only(signed, keys, artifact, tmp_path):
    Runner(signed, verify_key=keys / "a.pub.pem")
    Runner(signed, verify_key=(keys / "a.pub.pem").read_bytes())
    with pytest.raises(ArtifactError, match="does not verify"):
        Runner(signed, verify_key=keys / "b.pub.pem")
    with pytest.raises(ArtifactError, match="not signed"):
        Runner(artifact.path, verify_key=keys / "a.pub.pem")
    copy = Path(shutil.copytree(signed, tmp_path / "s"))
    _edit(copy, lambda m: m["packages"].update(numpy="0"))  # resealing the rest cannot fix the signature
    with pytest.raises(ArtifactError):
        Runner(copy, verify_key=keys / "a.pub.pem")


def test_cli_keygen_sign_and_verify(artifact, tmp_path, capsys):
    key = tmp_path / "k.pem"
    assert cli.main(["keygen", "-o", str(key)]) == 0
    assert (key.stat().st_mode & 0o777) == 0o600 and (tmp_path / "k.pub.pem").is_file()
    assert cli.main(["keygen", "-o", str(key)]) == 2  # never over an existing key
    out = tmp_path / "art"
    assert cli.main(["compile", "--model", str(artifact.checkpoint), "--batch", "2", "--seq-len", str(SEQ),
                     "--calib-texts", str(_texts(tmp_path)), "-o", str(out), "--sign-key", str(key), "--no-tune"]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(out), "good film", "--verify-key", str(tmp_path / "k.pub.pem"), "--json"]) == 0
    assert cli.main(["run", str(artifact.path), "good film", "--verify-key", str(tmp_path / "k.pub.pem")]) == 2
    assert "not signed" in capsys.readouterr().err


def _texts(tmp_path: Path) -> Path:
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(CALIB_TEXTS))
    return f


# -- compile never destroys -----------------------------------------------------------------------------------
def _compile(artifact, tmp_path, out, *extra) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "ibert_tvm.cli", "compile", "--model", str(artifact.checkpoint),
                          "--batch", "2", "--seq-len", str(SEQ), "--calib-texts", str(_texts(tmp_path)),
                          "-o", str(out), "--no-tune", *extra], capture_output=True, text=True, timeout=600, cwd=REPO)
    return res.returncode, res.stderr


def test_force_onto_a_user_folder_deletes_nothing(artifact, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    assert cli.main(["compile", "--model", str(artifact.checkpoint), "--calib-texts", str(_texts(tmp_path)),
                     "-o", str(user), "--force"]) == 2
    assert (user / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in user.iterdir()) == ["thesis.tex"]


def test_force_onto_a_file_or_an_artifact_with_user_files(artifact, tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(FileExistsError, match="not a folder ibert-tvm wrote"):
        art.Staging(f, force=True).__enter__()
    copy = _copy(artifact, tmp_path)
    (copy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        art.Staging(copy, force=True).__enter__()
    assert f.read_text() == "mine" and (copy / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "file"]  # no .old, no staging


def test_force_replaces_an_older_artifact(artifact, tmp_path):
    """An artifact of an earlier format (no OWNED list) is recognised by its manifest and replaced."""
    copy = _copy(artifact, tmp_path)
    (copy / art.OWNED).unlink()
    _edit(copy, lambda m: m.update(format_version=3))
    art.write_dir(copy, lambda d: (d / "x").write_text("new"), force=True)
    assert sorted(p.name for p in copy.iterdir()) == [art.OWNED, "x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


HOLD = """
import sys, time
from ibert_tvm.artifact import Staging
s = Staging(sys.argv[1]).__enter__()
(s.dir / "half").write_text("x")
print("ready", flush=True)
time.sleep(60)
"""


def _holder(out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_concurrent_writer_fails_at_once_and_killed_writer_is_cleaned(artifact, tmp_path):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        start = time.monotonic()
        rc, err = _compile(artifact, tmp_path, out)
        assert rc == 2 and f"(pid {holder.pid}) is writing" in err, err
        assert time.monotonic() - start < 60 and not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    staging = tmp_path / ".out.ibert-tvm-staging"
    assert (staging / "new" / "half").exists()  # what the killed writer left
    rc, err = _compile(artifact, tmp_path, out)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out"]
    Runner(out)


def test_two_compiles_to_one_output_exactly_one_wins(artifact, tmp_path):
    out = tmp_path / "out"
    texts = _texts(tmp_path)
    cmd = [sys.executable, "-m", "ibert_tvm.cli", "compile", "--model", str(artifact.checkpoint), "--batch", "2",
           "--seq-len", str(SEQ), "--calib-texts", str(texts), "-o", str(out), "--no-tune"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "is writing" in loser or "exists" in loser or "appeared" in loser
    Runner(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out"]


def test_unwritable_output_fails_before_compiling(artifact, tmp_path, monkeypatch):
    from ibert_tvm import compile as compile_mod

    loaded = []
    monkeypatch.setattr(compile_mod, "load_calibrated", lambda opt: loaded.append(1))
    (tmp_path / "file").write_text("x")  # unwritable even for root: the parent is a file
    with pytest.raises(PermissionError, match="cannot write"):
        compile_mod.compile_model(compile_mod.CompileOptions(model=str(artifact.checkpoint), out=tmp_path / "file" / "x"))
    assert not loaded


# -- memory -----------------------------------------------------------------------------------------------------
def test_runner_cycles_do_not_grow_memory(artifact):
    """Constructing and closing Runners many times: resident memory levels off."""
    code = f"""
import resource, sys
from ibert_tvm.runner import Runner
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
for _ in range(10):
    Runner({str(artifact.path)!r}).close()
base = rss()
for _ in range(150):
    r = Runner({str(artifact.path)!r}); r.run_integer([[5, 6, 7]]); r.close()
print(rss() - base)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    growth = float(res.stdout.split()[-1])
    print(f"RSS growth over 150 construct/run/close cycles: {growth:.1f} MiB")
    assert growth < 10


def test_artifact_files_are_readable_like_plain_files(artifact):
    """A deployment user other than the builder can read the artifact (mkstemp and safetensors
    create owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in artifact.path.iterdir() if p.name != art.OWNED}
    assert modes == {n: (0o777 if n == art.LIBRARY else 0o666) & ~umask for n in modes}
