"""`evaluate` module: VQA soft accuracy (load with ``astrea_vlm.eval.load_metric("vqa_accuracy")``)."""

import datasets
import evaluate

from astrea_vlm.eval import metric_info
from astrea_vlm.eval.metrics import vqa_soft_accuracy

_DESCRIPTION = """VQAv2 accuracy: min(#humans who gave the answer / 3, 1), averaged over the 10-choose-9 subsets
of the human answers, after the official VQA answer normalisation (punctuation, articles, number
words, contractions). See astrea_vlm.eval.metrics.vqa_soft_accuracy."""
_INPUTS = """
Args:
    predictions (list of str): generated answers.
    references (list of list of str): the human answers of each question (10 for VQAv2).
Returns:
    vqa_accuracy (float): mean soft accuracy in [0, 1].
Example:
    >>> load_metric("vqa_accuracy").compute(predictions=["two"], references=[["2"] * 3 + ["3"] * 7])
    {'vqa_accuracy': 0.9}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _INPUTS, datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references):
        scores = [vqa_soft_accuracy(p, r) for p, r in zip(predictions, references)]
        return {"vqa_accuracy": sum(scores) / len(scores) if scores else 0.0}
