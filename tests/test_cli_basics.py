"""What a user types first: the version, the top-level import, output piped into `head`; help with
defaults and choices, log levels, the compile summary, and compiling offline."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import CALIB_TEXTS, REPO, save_checkpoint

import ibert_tvm
from ibert_tvm import cli, targets


def test_version_and_top_level_runner(capsys):
    from importlib import metadata

    assert ibert_tvm.__version__ == metadata.version("ibert-tvm")
    try:
        cli.main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert capsys.readouterr().out.strip() == f"ibert-tvm {ibert_tvm.__version__}"
    from ibert_tvm import Runner
    from ibert_tvm.runner import Runner as Direct

    assert Runner is Direct


def test_top_level_import_is_light():
    code = "import sys, ibert_tvm; print(sorted(m for m in ('tvm', 'torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_closed_pipe_is_not_an_error():
    """`ibert-tvm targets --json | head -0`: the reader is gone before anything is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run([sys.executable, "-m", "ibert_tvm.cli", "targets", "--json"], check=False, stdout=write,
                             stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
    finally:
        os.close(write)
    assert res.returncode == 0 and res.stderr == "", res.stderr


# -- conventions: help, choices, logging, the compile summary ---------------------------------------

def _commands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("name", list(_commands()))
def test_help_shows_every_default_and_choice(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: nothing wrapped inside a default
    command = _commands()[name]
    text = command.format_help()
    for action in command._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in (action.help or ""):
            assert f"(default: {action.default})" in text, (name, action.dest)
        for choice in action.choices or ():
            assert str(choice) in text, (name, action.dest, choice)


@pytest.mark.parametrize("argv", [
    ["calibrate", "--model", "m", "--texts", "t.txt", "-o", "out"],
    ["finetune", "--model", "m", "--train", "sentiment", "-o", "out"],
    ["eval", "--model", "m"],
], ids=lambda argv: argv[0])
def test_estimator_takes_only_its_choices(argv, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--estimator", "median"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "--estimator: invalid choice: 'median'" in err, err


def test_downloading_commands_say_so_in_their_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")
    commands = _commands()
    assert "downloaded from PyPI on first use" in commands["eval"].format_help()
    assert "downloaded from PyPI on first use" in commands["finetune"].format_help()


def test_quiet_hides_progress_messages(tmp_path, capsys):
    src = save_checkpoint(tmp_path / "src", "IBertModel")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(CALIB_TEXTS))
    argv = ["calibrate", "--model", str(src), "--texts", str(texts), "--seq-len", "16"]
    assert cli.main([*argv, "-o", str(tmp_path / "a")]) == 0
    told = capsys.readouterr()
    assert f"calibrating activation ranges (ema) on {len(CALIB_TEXTS)} sentences" in told.err
    assert f"wrote {tmp_path / 'a'}" in told.out
    assert cli.main([*argv, "-o", str(tmp_path / "b"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and f"wrote {tmp_path / 'b'}" in quiet.out  # no messages, no progress bar


def test_other_libraries_speak_only_when_verbose(capsys):
    """Their log records and Python warnings (torch's, TVM's) are hidden unless --verbose; ours show."""
    import transformers  # noqa: F401  (imported already, as in a compile: its level is set directly)

    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as shown:
            cli.configure_logging(verbose=verbose)
            logging.getLogger("tvm.meta_schedule").warning("tvm speaks")
            warnings.warn_explicit("torch warns", UserWarning, "torch/nn/modules/x.py", 1, module="torch.nn.modules.x")
            warnings.warn_explicit("we warn", UserWarning, "ibert_tvm/threads.py", 1, module="ibert_tvm.threads")
            logging.getLogger("ibert_tvm.compile").info("our progress")
            logging.getLogger("ibert_tvm.compile").debug("our details")
            transformers_level = logging.getLogger("transformers").getEffectiveLevel()
        err, warned = capsys.readouterr().err, {str(w.message) for w in shown}
        assert ("tvm speaks" in err) == ("torch warns" in warned) == ("our details" in err) == verbose, (err, warned)
        assert "we warn" in warned and "our progress" in err, (err, warned)
        assert transformers_level == (logging.WARNING if verbose else logging.ERROR)
    cli.configure_logging()  # the default, for the tests that follow in this process


@pytest.fixture
def summary_args(artifact, tmp_path, monkeypatch):
    """`compile`'s arguments for the session artifact, with no shipped records and an empty --records folder."""
    from ibert_tvm.schedules import tuning

    monkeypatch.setattr(tuning, "RECORDS", tmp_path / "shipped")
    (tmp_path / "rec").mkdir()
    cli.configure_logging()
    return argparse.Namespace(model=str(artifact.checkpoint), target="host", records=str(tmp_path / "rec"))


def test_compile_summary_names_target_tiles_size_and_time(artifact, summary_args, capsys):
    from ibert_tvm.schedules import tuning

    mcpu = targets.get("host").target["mcpu"]
    folder = Path(summary_args.records)
    tuning.record_file(mcpu, folder).write_text('{"qkv:2x16x96x32": [2, 1], "inter:2x16x64x32": [1, 2]}')
    lines = cli._compile_summary(summary_args, artifact.path, 12.34)
    assert lines[0] == f"wrote {artifact.path}"
    text = "\n".join(lines)
    assert "target   host: llvm -" in text and f" -mcpu={mcpu}" in text and f"ISA {targets.get('host').isa}" in text
    assert "shapes   IBertModel, batch 2 x length 16" in text
    assert f"tiles    tuned where {mcpu}'s records hold the shape (2 shapes: {folder / (mcpu + '.json')})" in text
    assert re.search(r"library  model\.so \d+\.\d MiB, params\.safetensors \d+\.\d MiB", text), text
    assert "time     12.3 s" in text
    assert capsys.readouterr().err == ""


def test_compile_summary_warns_without_records_and_says_how_to_tune(artifact, summary_args, capsys):
    mcpu = targets.get("host").target["mcpu"]
    text = "\n".join(cli._compile_summary(summary_args, artifact.path, 1.0))
    assert f"tiles    default sizes: no tuning records for {mcpu}" in text
    err = capsys.readouterr().err
    assert err.startswith(f"ibert-tvm: warning: no tuning records for {mcpu}"), err
    assert (f"`ibert-tvm tune --model {artifact.checkpoint} --target host --batch 2 --seq-len 16 "
            f"--records {summary_args.records}`") in err


# -- offline by default ---------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """No sockets, no subprocesses (pip download) in this test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to reach out: {args[:1]}")

    for module, name in ((socket, "socket"), (socket, "create_connection"), (subprocess, "run"),
                         (subprocess, "Popen")):
        monkeypatch.setattr(module, name, refuse)


def test_default_calibration_sentences_ship_in_the_package(offline):
    from ibert_tvm.compile import default_calibration_texts

    texts = default_calibration_texts()
    assert len(texts) == len(set(texts)) == 256
    assert all(1 <= len(t.split()) <= 60 for t in texts) and sum(len(t.split()) > 30 for t in texts) >= 20
    sample = default_calibration_texts(64)
    assert len(sample) == 64 and set(sample) < set(texts)


def test_the_default_model_calibrates_offline(offline, tmp_path, monkeypatch):
    """compile's calibration of `--model default` (a tiny stand-in here) reads the shipped sentences."""
    from ibert_tvm import calibrate, checkpoint
    from ibert_tvm.compile import CompileOptions, default_calibration_texts, load_calibrated

    stand_in = save_checkpoint(tmp_path / "default", "IBertModel")
    monkeypatch.setattr(checkpoint, "resolve", lambda model: stand_in)
    seen = []
    real = calibrate.calibrate_texts
    monkeypatch.setattr(calibrate, "calibrate_texts", lambda model, texts, *a, **k: seen.append(texts) or
                        real(model, texts, *a, **k))
    model, path = load_calibrated(CompileOptions(model="default", seq_len=16, progress=False))
    assert path == stand_in and seen == [default_calibration_texts()] and checkpoint.is_calibrated(model)


def test_evaluation_data_offline_is_a_clear_error(tmp_path, monkeypatch):
    """The sentiment data is the one download: offline, the error says what is missing and where it goes."""
    from ibert_tvm.evaluation import data

    monkeypatch.setenv("IBERT_TVM_CACHE", str(tmp_path))
    no_network = "ERROR: Could not find a version that satisfies the requirement vaderSentiment==3.3.2"
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", no_network))
    with pytest.raises(RuntimeError, match=r"could not be downloaded from PyPI \(offline\?\)") as failed:
        data.movie_sentences()
    assert f"put vadersentiment-3.3.2.tar.gz into {tmp_path / 'sdist'}" in str(failed.value)
    assert no_network in str(failed.value)
