"""The compile command: checkpoint -> integer program -> Relax -> scheduled library -> artifact."""

from __future__ import annotations

import logging
import platform
import shutil
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import numpy as np

from . import artifact, targets
from .manifest import Bucket, Manifest, Output, Target, Tensor, TokenizerInfo
from .names import function_name
from .program import IntProgram

log = logging.getLogger(__name__)
# One text runs on the batch-1 function and bulk work in batches of 8 (default model, 1x128: per
# row 8 costs ~7.5x what 1 does); more sizes cost compile time and library size.
DEFAULT_BATCHES = (1, 8)
# `compile`'s tuning budget for shapes without tile records: the default model's 14 GEMM shapes at
# batch 1 and 8 (178 tile candidates, every shape on register tiles: AVX-512 VNNI) took 42 s on 2 cores
DEFAULT_TUNE_SECONDS = 120.0


@dataclass
class CompileOptions:
    model: str
    target: str = "host"
    batches: tuple[int, ...] = DEFAULT_BATCHES  # compiled batch sizes; the runner covers any count of rows with them
    seq_len: int = 128  # the longest compiled length
    buckets: tuple[int, ...] = ()  # shorter lengths compiled too; the runner picks the smallest that fits
    out: Path = Path("artifacts/model")
    calib_texts: list[str] | None = None
    calib_batch: int = 32
    force: bool = False
    progress: bool = True
    records: Path | None = None  # tile records folder over the shipped ones (default: the user's cache)
    choices: int | None = None  # multiple choice: most choices per question (default 4)
    sign_key: Path | None = None  # Ed25519 private key (PEM): the artifact's manifest is signed with it
    # for `host`: GEMM shapes without tile records are measured first, for at most this long (0: never)
    tune_seconds: float = 0.0

    def choices_for(self, program: IntProgram) -> int:
        if not program.multiple_choice:
            if self.choices not in (None, 1):
                raise ValueError(f"--choices is for multiple-choice models; this one is {program.model_class}")
            return 1
        if self.choices is not None and self.choices < 1:
            raise ValueError(f"choices must be at least 1, got {self.choices}")
        return self.choices or 4


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("ibert-tvm", "apache-tvm", "apache-tvm-ffi", "torch", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def default_calibration_texts(n: int = 256) -> list[str]:
    """An even sample of `n` of the default model's calibration sentences, which ship inside the
    package (ibert_tvm/data/calibration.txt, written for this project): no download, no network."""
    from .calibrate import text_lines

    rows = text_lines(resources.files(__package__).joinpath("data", "calibration.txt").read_text(encoding="utf-8"))
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def _preflight(opt: CompileOptions) -> targets.Preset:
    """Checks that need no model: run before loading one, so bad options fail in milliseconds."""
    if not opt.batches or min(opt.batches) < 1 or opt.seq_len < 1:
        raise ValueError(f"batch sizes and seq_len must be positive, got {list(opt.batches)} x {opt.seq_len}")
    bad = [b for b in opt.buckets if not 1 <= b <= opt.seq_len]
    if bad:
        raise ValueError(f"sequence-length buckets must lie in [1, seq_len={opt.seq_len}], got {bad}")
    if opt.tune_seconds < 0:
        raise ValueError(f"tuning time must be 0 (no tuning) or more seconds, got {opt.tune_seconds}")
    preset = targets.get(opt.target)
    preset.cross_compiler()  # a missing cross-compiler fails here, before any model is loaded
    return preset


def load_calibrated(opt: CompileOptions) -> tuple["torch.nn.Module", Path]:  # noqa: F821
    """Checkpoint -> IBert (quant_mode=True) with calibrated ranges; returns it and its folder."""
    from . import checkpoint
    from .calibrate import calibrate_texts

    path = checkpoint.resolve(opt.model)
    tok_file = path / artifact.TOKENIZER
    model = checkpoint.load(path)
    texts = opt.calib_texts
    if texts is None and opt.model == checkpoint.DEFAULT_MODEL:
        texts = default_calibration_texts()
    if texts is not None:
        if not tok_file.exists():
            raise FileNotFoundError(f"{path} has no tokenizer.json to tokenize calibration text with")
        calibrate_texts(model, texts, tok_file, opt.seq_len, opt.calib_batch, progress=opt.progress)
    elif not checkpoint.is_calibrated(model):
        raise ValueError(f"{path} is not calibrated (no activation ranges): give calibration text (--calib-texts FILE)")
    return model, path


def compile_model(opt: CompileOptions) -> Path:
    """Compile `opt.model` for `opt.target`; returns the artifact folder. The output is claimed
    (checked, locked) before the model is loaded: a second compile to it fails at once."""
    from .importer import convert

    preset = _preflight(opt)
    with artifact.Staging(Path(opt.out), opt.force) as stage:
        model, path = load_calibrated(opt)
        return _compile_into(stage, preset, convert(model), path, opt)


def compile_program(program: IntProgram, checkpoint_dir: Path, opt: CompileOptions) -> Path:
    """Integer program -> scheduled library -> artifact (tokenizer taken from `checkpoint_dir`)."""
    preset = _preflight(opt)
    with artifact.Staging(Path(opt.out), opt.force) as stage:
        return _compile_into(stage, preset, program, checkpoint_dir, opt)


def _compile_into(stage: artifact.Staging, preset: targets.Preset, program: IntProgram, checkpoint_dir: Path,
                  opt: CompileOptions) -> Path:
    from .build import compile_graph, tune_graph
    from .checkpoint import sentence_pooling
    from .graph import INPUTS, build_graphs

    pooling = sentence_pooling(checkpoint_dir)  # before the long build: pooling it cannot honour fails at once
    tok_file = checkpoint_dir / artifact.TOKENIZER
    seq_lens = sorted({*opt.buckets, opt.seq_len})
    choices = opt.choices_for(program)
    batches = sorted(set(opt.batches))
    graph = build_graphs(program, batches, seq_lens, preset.a_shift, choices, preset.device_kind.fused_attention)
    if opt.tune_seconds and preset.name == "host" and preset.device_kind.tunable:
        # the library runs on this CPU: measure its tiles here rather than guess them. A failed
        # measurement costs speed, not the artifact: compile goes on with what was recorded.
        try:
            tune_graph(graph, preset, records=opt.records, progress=opt.progress, seconds=opt.tune_seconds)
        except Exception as err:  # noqa: BLE001 - any failure of the tuner, reported
            log.warning("tuning the GEMM tiles failed (%s: %s); compiling with the records there are and default "
                        "sizes elsewhere", type(err).__name__, err)
    executable = compile_graph(graph, preset, records=opt.records)
    manifest = Manifest(
        model_class=program.model_class,
        source=str(opt.model),
        target=Target(preset=preset.name, tvm=dict(preset.target), arch=preset.arch,
                      cpu_flags=list(preset.cpu_flags), device=preset.device, built_on=platform.machine()),
        batches=batches,
        seq_len=opt.seq_len,
        buckets=[Bucket(b, n, function_name(b, n)) for b in batches for n in seq_lens],
        vocab_size=program.vocab,
        type_vocab_size=program.type_vocab,
        pad_id=program.pad_id,
        choices=choices if program.multiple_choice else None,
        # shapes of the largest bucket
        inputs=[Tensor(n, program.input_shape(batches[-1], opt.seq_len, choices), "int32") for n in INPUTS],
        outputs=[Output(**o) for o in program.output_specs(batches[-1], opt.seq_len, choices)],
        label_names=list(program.label_names),
        tokenizer=TokenizerInfo(artifact.TOKENIZER if tok_file.exists() else None, opt.seq_len, program.pad_id),
        params=[name for name, _ in graph.params],
        packages=versions(),
        pooling=pooling,
    )

    def fill(tmp: Path) -> Manifest:
        from safetensors.numpy import save_file

        preset.device_kind.export(executable, tmp / artifact.LIBRARY, preset)
        save_file({name: np.ascontiguousarray(a) for name, a in graph.params}, str(tmp / artifact.PARAMS),
                  metadata=artifact.seal_params(manifest))
        if tok_file.exists():
            shutil.copyfile(tok_file, tmp / artifact.TOKENIZER)
        return manifest

    return artifact.write(stage, fill, opt.sign_key)


def tune_model(opt: CompileOptions, trials: int | None = None, tracker: str | None = None,
               key: str | None = None) -> dict[str, list[int]]:
    """Tune the GEMM tiles of `opt.model` at each compiled batch and seq_len, here or on a
    tracker's `key` device; returns the records."""
    from .build import tune_graph
    from .graph import build_graphs
    from .importer import convert

    preset = _preflight(opt)
    model, _ = load_calibrated(opt)
    program = convert(model)
    graph = build_graphs(program, list(opt.batches), [opt.seq_len], preset.a_shift, opt.choices_for(program),
                         preset.device_kind.fused_attention)
    return tune_graph(graph, preset, trials, tracker, key, opt.records, opt.progress)
