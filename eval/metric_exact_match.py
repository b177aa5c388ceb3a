"""`evaluate` module: exact match after light normalisation (``load_metric("exact_match")``)."""

import datasets
import evaluate

from astrea_vlm.eval import metric_info
from astrea_vlm.eval.metrics import exact_match_score

_DESCRIPTION = """Exact match: 1 when the prediction equals a reference after lowercasing, collapsing whitespace
and dropping trailing .!?,;: (astrea_vlm.eval.normalize.normalize_text), else 0; averaged."""
_INPUTS = """
Args:
    predictions (list of str): generated answers.
    references (list of str, or list of list of str): the accepted answer(s) of each sample.
Returns:
    exact_match (float): share of exact matches in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION, _INPUTS,
            [
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references):
        scores = [exact_match_score(p, r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0}
