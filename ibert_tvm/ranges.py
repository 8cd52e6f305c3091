"""Where calibrated ranges live in a checkpoint's config, and when a range counts as set.

Calibration writes these, checkpoints read them back, the importer turns them into scales: the
schema sits here so that none of those modules has to import another for it.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

# how calibration estimates a range (calibrate.py); here so that the CLI's parser needs no torch
Estimator = Literal["ema", "minmax", "percentile"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)

# HF's QuantAct starts its range at 0 and a quantization scale of a zero range is clamped to
# 1e-5 / 127; a range no larger than this never saw data
UNCALIBRATED = 1.1e-5

HEAD_RANGES = "ibert_tvm_head_ranges"  # config attribute: point name -> [min, max]
# Float head activations the compiler quantizes: name -> (module, whether the tensor is its input or
# output). A model without the module records nothing for that point.
HEAD_POINTS: dict[str, tuple[str, Literal["input", "output"]]] = {
    "lm_head.gelu": ("lm_head.layer_norm", "input"),  # HF's lm_head applies gelu(dense(x)) as a function
    "lm_head.layer_norm": ("lm_head.layer_norm", "output"),
}

CHANNEL_RANGES = "ibert_tvm_channel_ranges"  # config attribute: QuantAct name -> per-channel max |x|
# The QuantActs after LayerNorms and GELUs, whose int8 outputs feed GEMMs. Their channels differ by
# orders of magnitude (outlier features), so one scale per tensor rounds most channels to a few
# levels; the importer gives each channel its own scale and folds it into the next GEMM's weights.
CHANNEL_ACTS = ("embeddings.output_activation", "attention.output.output_activation", "pre_intermediate_act",
                "intermediate.output_activation", "pre_output_act", "output.output_activation")


def head_ranges(model: Any) -> dict[str, tuple[float, float]]:
    """The float heads' calibrated ranges (`HEAD_POINTS` names -> (min, max)); empty if none."""
    stored = getattr(model.config, HEAD_RANGES, None) or {}
    return {name: (float(lo), float(hi)) for name, (lo, hi) in stored.items()}


def channel_ranges(model: Any) -> dict[str, list[float]]:
    """Per-channel max |x| of the `CHANNEL_ACTS` QuantActs (names without the "ibert." prefix)."""
    return dict(getattr(model.config, CHANNEL_RANGES, None) or {})
