"""`evaluate` module: retrieval Recall@K from similarity rows (``load_metric("retrieval_recall")``)."""

import datasets
import evaluate

from astrea_vlm.eval import metric_info
from astrea_vlm.eval.metrics import retrieval_recall

_DESCRIPTION = """Recall@K: the share of queries with a correct candidate among their K most similar candidates
(ties broken by the lower candidate index). Each prediction is one query's row of the similarity
matrix; its reference lists the indices of its correct candidates."""
_INPUTS = """
Args:
    predictions (list of list of float): similarity of each query (row) to every candidate.
    references (list of list of int): indices of each query's correct candidates.
    ks (list of int, default (1, 5, 10)).
Returns:
    recall@1, recall@5, recall@10 (float).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION, _INPUTS,
            datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Sequence(datasets.Value("int64"))}
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        return retrieval_recall(predictions, references, ks)
