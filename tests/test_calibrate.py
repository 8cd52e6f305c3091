"""Range estimators (ema, minmax, percentile), the float heads' ranges and `ibert-tvm calibrate`."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import CALIB_TEXTS, Spec, ibert_config, new_model, random_inputs, save_checkpoint
from transformers import IBertForMaskedLM, IBertForMultipleChoice
from transformers.activations import gelu
from transformers.models.ibert import quant_modules as qm

from ibert_tvm import checkpoint
from ibert_tvm.calibrate import CALIBRATION, calibrate, calibrate_texts, check_estimator, percentile_range
from ibert_tvm.cli import main
from ibert_tvm.ranges import HEAD_POINTS, HEAD_RANGES, head_ranges

INIT = 1e-5  # HF's "empty" range, which its first update adds to the first batch's min/max
INTERMEDIATE = "encoder.layer.0.intermediate.output_activation"  # called once per forward, no residual


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: with a second thread each op waits on a barrier, 10 ms a time on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids, mask = random_inputs(rng, 4, 24, pads=[0, 7, 0, 15])
        out.append({"input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.tensor(mask, dtype=torch.long)})
    return out


def _ranges(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (m.x_min.item(), m.x_max.item()) for n, m in model.named_modules() if isinstance(m, qm.QuantAct)}


def _calibrated(estimator: str, batches=None, **kw) -> torch.nn.Module:
    return calibrate(new_model("IBertModel", Spec()), batches or _batches(), progress=False, estimator=estimator, **kw)


def _calls_per_forward(model: torch.nn.Module) -> dict[str, int]:
    """How often each QuantAct runs in one forward (HF never calls some, and one twice)."""
    counts = {n: 0 for n in _ranges(model)}
    hooks = [m.register_forward_pre_hook(lambda *_, n=n: counts.__setitem__(n, counts[n] + 1))
             for n, m in model.named_modules() if isinstance(m, qm.QuantAct)]
    with torch.no_grad():
        model(**_batches(1)[0])
    for h in hooks:
        h.remove()
    return counts


def _inputs_of(name: str, estimator: str, batches, **kw) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A model calibrated on `batches`, and what its QuantAct `name` (called without a residual) saw."""
    model = new_model("IBertModel", Spec())
    seen = []

    def record(_m, args, kwargs):
        assert len(args) < 3 and kwargs.get("identity") is None
        seen.append(args[0].detach().clone())

    h = model.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True)
    try:
        calibrate(model, batches, progress=False, estimator=estimator, **kw)
    finally:
        h.remove()
    return model, seen


def test_minmax_is_the_running_min_max_of_the_inputs():
    batches = _batches()
    model, seen = _inputs_of(INTERMEDIATE, "minmax", batches)
    lo, hi = _ranges(model)[INTERMEDIATE]
    assert len(seen) == len(batches)
    assert lo == pytest.approx(min(x.min().item() for x in seen), abs=1.1 * INIT)
    assert hi == pytest.approx(max(x.max().item() for x in seen), abs=1.1 * INIT)
    assert model.get_submodule(INTERMEDIATE).act_range_momentum == 0.95  # HF's momentum is given back


def test_ema_is_hfs_own_update():
    batches = _batches()
    model, seen = _inputs_of(INTERMEDIATE, "ema", batches)
    lo, hi = torch.tensor([-INIT]) + seen[0].min(), torch.tensor([INIT]) + seen[0].max()
    for x in seen[1:]:
        lo, hi = lo * 0.95 + x.min() * 0.05, hi * 0.95 + x.max() * 0.05
    assert _ranges(model)[INTERMEDIATE] == pytest.approx((lo.item(), hi.item()), rel=1e-6)
    # not the running min/max: the check above tells the two apart on these batches
    assert _ranges(_calibrated("minmax", batches))[INTERMEDIATE] != pytest.approx((lo.item(), hi.item()), rel=1e-3)


def test_percentile_is_the_mean_of_each_batchs_percentiles():
    batches = _batches()
    model, seen = _inputs_of(INTERMEDIATE, "percentile", batches, percentile=99.0)  # 99.99 is the max here
    want_lo = np.mean([-np.percentile(-x.numpy(), 99.0, method="inverted_cdf") for x in seen])
    want_hi = np.mean([np.percentile(x.numpy(), 99.0, method="inverted_cdf") for x in seen])
    assert _ranges(model)[INTERMEDIATE] == pytest.approx((want_lo, want_hi), rel=1e-6)
    assert want_hi < max(x.max().item() for x in seen)


def test_percentile_range_is_inside_minmax_and_reaches_it_at_100():
    batches = _batches()
    minmax, pct = _ranges(_calibrated("minmax", batches)), _ranges(_calibrated("percentile", batches, percentile=99.0))
    assert pct.keys() == minmax.keys()
    for name, (lo, hi) in pct.items():
        assert minmax[name][0] <= lo <= hi <= minmax[name][1], name
    assert any(pct[n][1] < minmax[n][1] - 1e-3 for n in pct)  # 99 cuts some tail
    # One batch, p = 100: each call's min/max, so minmax's range wherever a QuantAct runs once per
    # forward; the residual QuantActs (ln_input_act) range `identity + x`, as HF quantizes it.
    one = batches[:1]
    minmax, full = _ranges(_calibrated("minmax", one)), _ranges(_calibrated("percentile", one, percentile=100))
    once = [n for n, c in _calls_per_forward(new_model("IBertModel", Spec())).items() if c == 1]
    assert any("ln_input_act" in n for n in once)
    for name in once:
        assert full[name] == pytest.approx(minmax[name], abs=1.1 * INIT), name


def test_percentile_range_matches_numpy_nearest_rank():
    x = torch.from_numpy(np.random.default_rng(3).standard_normal(12345).astype(np.float32))
    for p in (50.5, 99.0, 99.99, 100.0):
        lo, hi = percentile_range(x, p)
        assert hi == np.percentile(x.numpy(), p, method="inverted_cdf")
        assert lo == -np.percentile(-x.numpy(), p, method="inverted_cdf")


@pytest.mark.parametrize("estimator", ["ema", "minmax", "percentile"])
def test_calibrated_model_keeps_its_outputs_mode_and_dropout(estimator):
    model = new_model("IBertForSequenceClassification", Spec())
    batch = _batches(1, seed=9)[0]
    with torch.no_grad():
        before = model(**batch)
    dropouts = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert any(p > 0 for p in dropouts.values())
    calibrate(model, _batches(), progress=False, estimator=estimator)
    assert not model.training
    assert {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)} == dropouts
    with torch.no_grad():
        after = model(**batch)
    assert after.keys() == before.keys() and after.logits.shape == before.logits.shape
    assert torch.isfinite(after.logits).all()
    called = [n for n, c in _calls_per_forward(model).items() if c]
    assert all(max(map(abs, _ranges(model)[n])) > 1.1 * INIT for n in called)


def _mlm() -> IBertForMaskedLM:
    torch.manual_seed(0)
    return IBertForMaskedLM(ibert_config(Spec())).eval()


def test_head_ranges_recorded_for_masked_lm_and_saved(tmp_path):
    model = _mlm()
    seen: dict[str, list[torch.Tensor]] = {"lm_head.gelu": [], "lm_head.layer_norm": []}
    # independent of the LayerNorm-input tap calibrate uses: gelu applied to the dense output
    hooks = [model.lm_head.dense.register_forward_hook(lambda _m, _a, y: seen["lm_head.gelu"].append(gelu(y))),
             model.lm_head.layer_norm.register_forward_hook(lambda _m, _a, y: seen["lm_head.layer_norm"].append(y))]
    calibrate(model, _batches(), progress=False, estimator="minmax")
    for h in hooks:
        h.remove()
    ranges = head_ranges(model)
    assert ranges.keys() == HEAD_POINTS.keys()
    for name, xs in seen.items():
        want = (min(x.min().item() for x in xs), max(x.max().item() for x in xs))
        assert ranges[name] == pytest.approx(want, abs=1.1 * INIT), name
    assert ranges["lm_head.gelu"][0] > -0.171  # gelu's minimum is about -0.170
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[HEAD_RANGES] == {k: list(v) for k, v in ranges.items()}
    assert head_ranges(IBertForMaskedLM.from_pretrained(tmp_path)) == ranges


def test_head_ranges_follow_the_estimator():
    ema, minmax = (calibrate(_mlm(), _batches(), progress=False, estimator=e) for e in ("ema", "minmax"))
    for name, (lo, hi) in head_ranges(ema).items():
        assert head_ranges(minmax)[name][0] <= lo < hi <= head_ranges(minmax)[name][1]
    assert head_ranges(ema) != head_ranges(minmax)


def test_no_head_ranges_without_a_head():
    model = new_model("IBertModel", Spec())
    assert head_ranges(model) == {}
    setattr(model.config, HEAD_RANGES, {"lm_head.gelu": [-1.0, 1.0]})  # e.g. from an MLM checkpoint
    calibrate(model, _batches(), progress=False)
    assert head_ranges(model) == {} and not hasattr(model.config, HEAD_RANGES)


@pytest.mark.parametrize("estimator, percentile", [("bogus", 99.99), ("percentile", 50.0), ("percentile", 100.01),
                                                   ("ema", float("nan"))])
def test_bad_estimator_or_percentile(estimator, percentile):
    with pytest.raises(ValueError, match="estimator|percentile"):
        check_estimator(estimator, percentile)
    model = new_model("IBertModel", Spec())
    with pytest.raises(ValueError, match="estimator|percentile"):
        calibrate(model, _batches(1), progress=False, estimator=estimator, percentile=percentile)
    assert _ranges(model) == _ranges(new_model("IBertModel", Spec()))  # rejected before touching the model


def test_calibrate_texts_rejects_lengths_past_the_position_table(tmp_path):
    src = save_checkpoint(tmp_path / "src", "IBertModel")
    model = new_model("IBertModel", Spec())
    with pytest.raises(ValueError, match="positions"):
        calibrate_texts(model, CALIB_TEXTS, src / "tokenizer.json", seq_len=model.config.max_position_embeddings)


def test_calibrate_texts_gives_multiple_choice_models_a_choice_axis(tmp_path):
    src = save_checkpoint(tmp_path / "src", "IBertModel")
    torch.manual_seed(0)
    model = IBertForMultipleChoice(ibert_config(Spec())).eval()
    calibrate_texts(model, CALIB_TEXTS, src / "tokenizer.json", 16, 4, progress=False)
    called = [n for n, c in _calls_per_forward(model.ibert).items() if c]
    assert all(max(map(abs, _ranges(model.ibert)[n])) > 1.1 * INIT for n in called)


@pytest.fixture
def source(tmp_path):
    src = save_checkpoint(tmp_path / "src", "IBertModel")
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n")  # tokenizer files beside tokenizer.json travel too
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(CALIB_TEXTS) + "\n   \n")
    return src, texts


def _cli(src, texts, out, *extra: str) -> int:
    return main(["calibrate", "--model", str(src), "--texts", str(texts), "-o", str(out), "--batch-size", "4",
                 "--seq-len", "16", *extra])


def test_cli_round_trip(tmp_path, source, capsys):
    src, texts = source
    out = tmp_path / "out"
    assert _cli(src, texts, out, "--estimator", "percentile", "--percentile", "99.5") == 0
    assert str(out) in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", CALIBRATION):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "texts.txt"]  # no temp folder left
    record = json.loads((out / CALIBRATION).read_text())
    assert record == {"source": str(src), "estimator": "percentile", "percentile": 99.5, "texts": len(CALIB_TEXTS),
                      "texts_sha256": hashlib.sha256(texts.read_bytes()).hexdigest(), "seq_len": 16, "batch_size": 4}
    want = calibrate_texts(checkpoint.load(src), CALIB_TEXTS, src / "tokenizer.json", 16, 4, progress=False,
                           estimator="percentile", percentile=99.5)
    assert _ranges(checkpoint.load(out)) == _ranges(want)
    assert _ranges(want) != _ranges(checkpoint.load(src))


def test_cli_max_texts_and_force(tmp_path, source, capsys):
    src, texts = source
    out = tmp_path / "out"
    assert _cli(src, texts, out, "--max-texts", "2") == 0
    assert json.loads((out / CALIBRATION).read_text())["texts"] == 2
    assert _cli(src, texts, out) == 2
    assert "exists" in capsys.readouterr().err
    assert json.loads((out / CALIBRATION).read_text())["texts"] == 2  # left as it was
    assert _cli(src, texts, out, "--force") == 0
    assert json.loads((out / CALIBRATION).read_text())["texts"] == len(CALIB_TEXTS)


def test_cli_output_passes_the_compile_calibration_check(tmp_path, source):
    src, texts = source
    assert _cli(src, texts, tmp_path / "out") == 0
    # the check `compile --model` applies without --calib-texts (compile.load_calibrated), minus TVM's import
    assert checkpoint.is_calibrated(checkpoint.load(tmp_path / "out"))


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no non-empty lines"),
    ("percentile", "percentile must lie"),
    ("max-texts", "max-texts"),
])
def test_cli_bad_input(tmp_path, source, capsys, case, message):
    src, texts = source
    extra: list[str] = []
    if case == "missing":
        texts = tmp_path / "nope.txt"
    elif case == "empty":
        texts.write_text("\n  \n\n")
    elif case == "percentile":
        extra = ["--estimator", "percentile", "--percentile", "40"]
    else:
        extra = ["--max-texts", "0"]
    assert _cli(src, texts, tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
