"""`evaluate` module: multiple-choice top-1 accuracy (``load_metric("multiple_choice")``)."""

import datasets
import evaluate

from astrea_vlm.eval import metric_info
from astrea_vlm.eval.metrics import option_index, parse_choice

_DESCRIPTION = """Multiple-choice top-1 accuracy: the option a generation picks (by letter, "B", "(B)", "The answer
is B", or by the option's text; astrea_vlm.eval.metrics.parse_choice) must be the reference option."""
_INPUTS = """
Args:
    predictions (list of str): generated answers.
    references (list of str): the correct option of each sample, as a letter ("B") or the option text.
    options (list of list of str): the options of each sample, in letter order (A, B, C, ...).
Returns:
    accuracy (float): share of correct picks in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class MultipleChoice(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _INPUTS, datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}))

    def _compute(self, predictions, references, options):
        if len(options) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(options)} option lists")
        scores = [float(parse_choice(p, o) == option_index(r, o)) for p, r, o in zip(predictions, references, options)]
        return {"accuracy": sum(scores) / len(scores) if scores else 0.0}
