"""`evaluate` module: BLEU-1..4, ROUGE-L, CIDEr-D (``load_metric("caption")``), pure Python."""

import datasets
import evaluate

from astrea_vlm.eval import metric_info
from astrea_vlm.eval.caption_metrics import caption_scores

_DESCRIPTION = """COCO caption metrics as pycocoevalcap computes them (corpus BLEU-1..4, ROUGE-L with beta 1.2,
CIDEr-D with sigma 6 and IDF from the corpus references), in pure Python: no Java needed.
See astrea_vlm.eval.caption_metrics."""
_INPUTS = """
Args:
    predictions (list of str): one generated caption per image.
    references (list of list of str): the reference captions of each image.
    tokenize (bool, default True): PTB-style tokenisation first; False for already tokenised text.
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4, rouge_l, cider_d (float).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Caption(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _INPUTS, datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references, tokenize=True):
        return caption_scores(predictions, references, tokenize=tokenize)
