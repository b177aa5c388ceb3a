"""`evaluate` module: grounding Acc@IoU>0.5 (``load_metric("grounding_accuracy")``)."""

import datasets
import evaluate

from astrea_vlm.eval import metric_info
from astrea_vlm.eval.metrics import grounding_iou

_DESCRIPTION = """Grounding accuracy: the first box "[x1, y1, x2, y2]" (integers on a 0-1000 grid) in each
generation must overlap the reference box with IoU > threshold (0.5). No box counts as wrong."""
_INPUTS = """
Args:
    predictions (list of str): generated text holding a box.
    references (list of list of float): reference boxes (x1, y1, x2, y2), normalised to [0, 1].
    threshold (float, default 0.5): the IoU a prediction must exceed.
Returns:
    accuracy (float): share of hits in [0, 1]; mean_iou (float): mean IoU.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class GroundingAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _INPUTS, datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("float64"))}))

    def _compute(self, predictions, references, threshold=0.5):
        ious = [grounding_iou(p, b) for p, b in zip(predictions, references)]
        n = max(1, len(ious))
        return {"accuracy": sum(iou > threshold for iou in ious) / n, "mean_iou": sum(ious) / n}
