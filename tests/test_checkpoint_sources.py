"""Where a checkpoint comes from (a folder, a hub id in the local HuggingFace cache) and what a
sentence-transformers folder says about pooling (`modules.json`, `1_Pooling`, `2_Normalize`)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import CALIB_TEXTS, REPO, ci_setup_failed, compile_capturing, save_checkpoint
from huggingface_hub import constants
from transformers import BertConfig

from ibert_tvm import checkpoint
from ibert_tvm.manifest import POOLING_MODES, Pooling

SWITCHES = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
            "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
            "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
ST = "sentence_transformers.models."


def sentence_folder(folder: Path, modes: tuple[str, ...] = ("mean",), normalize: bool = True,
                    modules: tuple[str, ...] | None = None) -> Path:
    """The sentence-transformers files of `folder` as `SentenceTransformer.save` writes them."""
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    switches = {"word_embedding_dimension": 32, **{s: m in modes for m, s in SWITCHES.items()}, "include_prompt": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(switches))
    kinds = modules or ("Transformer", "Pooling", *(("Normalize",) if normalize else ()))
    paths = {"Transformer": "", "Pooling": "1_Pooling"}
    entries = [{"idx": i, "name": str(i), "path": paths.get(k, f"{i}_{k}"), "type": ST + k} for i, k in enumerate(kinds)]
    (folder / "modules.json").write_text(json.dumps(entries))
    return folder


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_sentence_transformers_pooling_is_read(tmp_path, mode, normalize):
    assert checkpoint.sentence_pooling(sentence_folder(tmp_path, (mode,), normalize)) == Pooling(mode, normalize)


def test_newer_package_paths_and_left_out_switches_read_as_sentence_transformers_does(tmp_path):
    sentence_folder(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32}))  # mean by default
    entries = json.loads((tmp_path / "modules.json").read_text())
    for e in entries:
        e["type"] = e["type"].replace(ST, "sentence_transformers.sentence_transformer.models.")
    (tmp_path / "modules.json").write_text(json.dumps(entries))
    assert checkpoint.sentence_pooling(tmp_path) == Pooling("mean", True)


@pytest.mark.parametrize("modes, named", [
    (("weightedmean",), "weightedmean"), (("lasttoken",), "lasttoken"), (("mean", "max"), "mean\\+max"), ((), "\\(none\\)"),
])
def test_unsupported_pooling_is_named(tmp_path, modes, named):
    sentence_folder(tmp_path, modes)
    with pytest.raises(ValueError, match=f"1_Pooling/config.json: pooling {named} is not supported; .*exactly one of "
                                         "cls, mean, max, mean_sqrt_len_tokens"):
        checkpoint.sentence_pooling(tmp_path)


def test_a_module_that_would_change_the_vectors_is_refused(tmp_path):
    sentence_folder(tmp_path, modules=("Transformer", "Pooling", "Dense", "Normalize"))
    with pytest.raises(ValueError, match=f"module {ST}Dense is not supported"):
        checkpoint.sentence_pooling(tmp_path)
    sentence_folder(tmp_path, modules=("Transformer", "Pooling", "Dropout"))  # the identity at inference
    assert checkpoint.sentence_pooling(tmp_path) == Pooling("mean", False)


@pytest.mark.parametrize("bad, error", [
    ("[{\"path\": \"\"}]", "is not a list of sentence-transformers modules"),
    ("{not json", "is not valid JSON"),
])
def test_a_broken_modules_file_is_named(tmp_path, bad, error):
    sentence_folder(tmp_path)
    (tmp_path / "modules.json").write_text(bad)
    with pytest.raises(ValueError, match=f"modules.json {error}"):
        checkpoint.sentence_pooling(tmp_path)


@pytest.mark.parametrize("config, error", [
    ({"pooling_mode_mean_tokens": "yes"}, "pooling_mode_mean_tokens is not a known pooling switch"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_future": False}, "pooling_mode_future is not a known pooling switch"),
    ([True], "is not a JSON object"),
])
def test_a_broken_pooling_config_is_named(tmp_path, config, error):
    sentence_folder(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, TypeError), match=f"1_Pooling/config.json:? {error}"):
        checkpoint.sentence_pooling(tmp_path)


def test_folders_without_modules_file(tmp_path):
    assert checkpoint.sentence_pooling(tmp_path) is None  # a plain transformers checkpoint
    sentence_folder(tmp_path, ("cls",))
    (tmp_path / "modules.json").unlink()  # 1_Pooling alone: its mode, normalised as before
    assert checkpoint.sentence_pooling(tmp_path) == Pooling("cls", True)
    sentence_folder(tmp_path, modules=("Transformer",))  # token vectors only: no sentence pooling
    assert checkpoint.sentence_pooling(tmp_path) is None


def test_default_model_pools_by_mean_and_normalises():
    try:
        folder = checkpoint.default_model_dir()
    except RuntimeError as err:
        ci_setup_failed(str(err))
    assert checkpoint.sentence_pooling(folder) == Pooling("mean", True)


def test_compiled_sentence_folder_records_its_pooling(tmp_path, monkeypatch):
    from ibert_tvm import artifact, build
    from ibert_tvm.compile import CompileOptions, compile_program

    ckpt = sentence_folder(save_checkpoint(tmp_path / "ckpt", "IBertModel"), ("max",), normalize=False)
    opt = CompileOptions(model=str(ckpt), batches=(1,), seq_len=8, out=tmp_path / "art", calib_texts=CALIB_TEXTS,
                         progress=False)
    path, program = compile_capturing(opt)
    assert artifact.read(path).pooling == Pooling("max", False)

    def no_build(*args, **kwargs):
        raise AssertionError("pooling it cannot honour must fail before the library is built")

    monkeypatch.setattr(build, "compile_graph", no_build)
    sentence_folder(ckpt, ("lasttoken",))
    with pytest.raises(ValueError, match="pooling lasttoken is not supported"):
        compile_program(program, ckpt, dataclasses.replace(opt, out=tmp_path / "art2"))


# -- hub ids ---------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str) -> Path:
    """A tiny BERT as `hf download` leaves it in a hub cache: snapshots/<commit>/ and refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.mark.parametrize("repo_id", ["org/tiny-bert", "tiny-bert"])
def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch, repo_id):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # a hub id is looked up only when it is not a folder here
    snapshot = cache_model(tmp_path / "hub", repo_id)
    assert checkpoint.resolve(repo_id) == snapshot
    assert type(checkpoint.load(repo_id, quant_mode=False)).__name__ == "IBertModel"


def test_hub_id_not_in_the_cache_says_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"org/absent is neither a folder nor a model in the local "
                                                r"HuggingFace cache \(.*hub\).*`hf download org/absent`"):
        checkpoint.resolve("org/absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):  # not a hub id: a missing folder
        checkpoint.resolve(tmp_path / "absent" / "a" / "b")


def test_hub_cache_follows_hf_home(tmp_path):
    """HF_HOME (and HF_HUB_CACHE) are read when huggingface_hub starts: a fresh process sees them."""
    snapshot = cache_model(tmp_path / "home" / "hub", "org/tiny-bert")
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    code = "from ibert_tvm.checkpoint import resolve; print(resolve('org/tiny-bert'))"
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(snapshot)
