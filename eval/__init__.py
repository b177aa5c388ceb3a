"""astrea_vlm.eval: metrics, ``astrea eval``, the lmms-eval adapter and the routing report.

* :mod:`.metrics`, :mod:`.caption_metrics`, :mod:`.normalize`: the metrics, in plain Python.
* :mod:`astrea_vlm.geometry`: the ``[x1, y1, x2, y2]`` (0-1000 grid) box format shared with the training data.
* :func:`load_metric`: the same metrics as ``evaluate`` modules, loaded from the scripts shipped in
  this package (``evaluate.load("<name>")`` would look on the Hub).
* :mod:`.prompts`, :mod:`.data`, :mod:`.runner`: ``astrea eval`` (batched greedy generation + scoring).
* :mod:`.report`: router-probability bars per task (paper Fig. 2) and training curves (Fig. 3).
* :mod:`.lmms_adapter`: the ``astrea`` model for lmms-eval (``pip install astrea-vlm[lmms]``).
"""

from __future__ import annotations

from pathlib import Path

from ..geometry import format_box, parse_boxes
from .caption_metrics import bleu, caption_scores, cider_d, rouge_l
from .metrics import (
    exact_match,
    grounding_accuracy,
    image_text_retrieval,
    multiple_choice_accuracy,
    parse_choice,
    retrieval_recall,
    vqa_accuracy,
    vqa_soft_accuracy,
)
from .normalize import normalize_text, normalize_vqa_answer

_HERE = Path(__file__).resolve().parent
METRIC_NAMES = ("vqa_accuracy", "exact_match", "multiple_choice", "grounding_accuracy", "caption", "retrieval_recall")


def metric_script(name: str) -> Path:
    """Path of the shipped ``evaluate`` script of metric ``name`` (one of :data:`METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; the shipped metrics are {', '.join(METRIC_NAMES)}")
    return _HERE / f"metric_{name}.py"


def metric_info(description: str, inputs: str, features):
    """The ``evaluate.MetricInfo`` of a shipped metric script (``features``: its ``datasets.Features``, or a list of them)."""
    import evaluate

    return evaluate.MetricInfo(description=description, citation="", inputs_description=inputs, features=features)


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of the shipped script for ``name`` (no Hub access); kwargs go to ``evaluate.load``.

    >>> load_metric("vqa_accuracy", keep_in_memory=True).compute(predictions=["2"], references=[["two"] * 10])
    {'vqa_accuracy': 1.0}
    """
    import evaluate

    return evaluate.load(str(metric_script(name)), **kwargs)


__all__ = [
    "METRIC_NAMES",
    "bleu",
    "caption_scores",
    "cider_d",
    "exact_match",
    "format_box",
    "grounding_accuracy",
    "image_text_retrieval",
    "load_metric",
    "metric_info",
    "metric_script",
    "multiple_choice_accuracy",
    "normalize_text",
    "normalize_vqa_answer",
    "parse_boxes",
    "parse_choice",
    "retrieval_recall",
    "rouge_l",
    "vqa_accuracy",
    "vqa_soft_accuracy",
]
