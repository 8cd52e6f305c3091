"""The IBert classes ibert-tvm compiles, one registry entry each: the only list of them.

An entry says what its class returns (transformers' output names, in the order the compiled
function returns them, with dtype, sequence axis, shape and scale), which pipeline task serves it,
whether its inputs carry a choice axis, and the name of its head function. Each compiler stage
(`importer.py`: torch module -> program head fields, `reference.py`: NumPy, `graph.py`: Relax)
defines a function of that name; a new class is one entry here plus those three functions.

Standard library only: the runtime (runner, pipelines, the CLI's parser) reads this table without
NumPy, torch or TVM. Heads are therefore named, not imported, and resolved when a stage calls one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .program import IntProgram

Stage = Literal["importer", "reference", "graph"]
BASE = "IBertModel"  # the bare encoder: every other class is it plus a head
Shape = Callable[["IntProgram", int, int, int], list[int]]  # (program, batch, seq, choices) -> shape


def _always(p: IntProgram) -> bool:
    return True


@dataclass(frozen=True)
class Output:
    name: str  # transformers' name
    dtype: str
    seq_axis: int | None  # the axis the runner cuts back to the text's length; None: no per-token axis
    shape: Shape
    scale: Callable[[IntProgram], list[float]]  # integers -> floats: one scale, or one per channel
    present: Callable[[IntProgram], bool] = _always  # an IBertModel saved without a pooler has no pooler_output


@dataclass(frozen=True)
class ModelClass:
    name: str  # transformers' class name
    task: str  # transformers' pipeline task that serves it (pipelines.py, `ibert-tvm run --task`)
    outputs: tuple[Output, ...]  # in the order the compiled function returns them
    head: str  # the name of its head function in importer.py, reference.py and graph.py
    choice_axis: bool = False  # inputs are [batch, choices, seq], not [batch, seq]

    @property
    def auto_class(self) -> str:
        """transformers' Auto class that loads this task from a BERT/RoBERTa checkpoint (by its naming)."""
        return "AutoModel" + self.name.removeprefix(BASE).removeprefix("IBert")

    @property
    def has_base_prefix(self) -> bool:
        """Heads hold the encoder as `ibert.`; the bare encoder holds its tensors at the top."""
        return self.name != BASE

    def head_in(self, stage: Stage) -> Callable[..., Any]:
        """`stage`'s head function for this class (importing the stage, which the runtime never does)."""
        return getattr(import_module(f"{__package__}.{stage}"), self.head)


def _logits(shape: Shape, seq_axis: int | None = None) -> Output:
    return Output("logits", "int32", seq_axis, shape, lambda p: p.logit_scales)


LAST_HIDDEN_STATE = Output("last_hidden_state", "int8", 1, lambda p, b, s, c: [b, s, p.hidden],
                           lambda p: p.hidden_scales)
POOLER_OUTPUT = Output("pooler_output", "int8", None, lambda p, b, s, c: [b, p.hidden],
                       lambda p: [1 / p.pooler.tanh.OUT_SCALE], present=lambda p: p.pooler is not None)
# QA's head is one linear with two output channels: start's scale, then end's
START_LOGITS = Output("start_logits", "int32", 1, lambda p, b, s, c: [b, s], lambda p: p.logit_scales[:1])
END_LOGITS = Output("end_logits", "int32", 1, lambda p, b, s, c: [b, s], lambda p: p.logit_scales[1:])

REGISTRY: dict[str, ModelClass] = {c.name: c for c in (
    ModelClass("IBertModel", "feature-extraction", (LAST_HIDDEN_STATE, POOLER_OUTPUT), "encoder_head"),
    ModelClass("IBertForMaskedLM", "fill-mask", (_logits(lambda p, b, s, c: [b, s, p.vocab], seq_axis=1),),
               "masked_lm_head"),
    ModelClass("IBertForSequenceClassification", "text-classification",
               (_logits(lambda p, b, s, c: [b, len(p.label_names)]),), "sequence_classification_head"),
    ModelClass("IBertForMultipleChoice", "multiple-choice", (_logits(lambda p, b, s, c: [b, c]),), "multiple_choice_head",
               choice_axis=True),
    ModelClass("IBertForTokenClassification", "token-classification",
               (_logits(lambda p, b, s, c: [b, s, len(p.label_names)], seq_axis=1),), "token_classification_head"),
    ModelClass("IBertForQuestionAnswering", "question-answering", (START_LOGITS, END_LOGITS), "question_answering_head"),
)}
TASKS: dict[str, str] = {c.task: c.name for c in REGISTRY.values()}  # task -> the class it needs
