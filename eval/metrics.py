"""Answer metrics: VQA soft accuracy, exact match, multiple choice, grounding, retrieval recall.

Every function takes plain Python values (strings, lists, numbers) and returns floats, so the same
code scores ``astrea eval`` runs, the ``evaluate`` modules (:func:`astrea_vlm.eval.load_metric`)
and saved results. Captioning metrics are in :mod:`astrea_vlm.eval.caption_metrics`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from ..geometry import box_iou, parse_boxes
from .normalize import normalize_text, normalize_vqa_answer


# ------------------------------------------------------------------------------------------ VQA
def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (normally 10).

    ``min(#humans who gave the prediction / 3, 1)``, averaged over the ``n`` subsets of ``n - 1``
    answers (the 10-choose-9 subsets of the 10 VQAv2 answers), after :func:`normalize_vqa_answer`
    on the prediction and on every answer. So with 10 answers, a prediction matching ``m`` of them
    scores 0.3, 0.6, 0.9 and 1.0 for ``m`` = 1, 2, 3 and >= 4. With a single answer the score is
    its exact match (there is no subset to vote).
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    # Leaving out answer i removes one match when answer i matched.
    return sum(min(1.0, (total - left_out) / 3.0) for left_out in matches) / len(matches)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_soft_accuracy` over the samples."""
    _check_lengths(predictions, references)
    return _mean([vqa_soft_accuracy(p, r) for p, r in zip(predictions, references)])


# ---------------------------------------------------------------------------------- exact match
def exact_match_score(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when ``prediction`` equals one of ``references`` after :func:`normalize_text`, else 0.0."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(r) for r in refs))


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean :func:`exact_match_score` over the samples."""
    _check_lengths(predictions, references)
    return _mean([exact_match_score(p, r) for p, r in zip(predictions, references)])


# ------------------------------------------------------------------------------ multiple choice
OPTION_LETTERS = string.ascii_uppercase

_LETTER_PATTERNS = (
    # "B", "B.", "(B)", "B)", "B: text", "[B]" at the very start ("A cat" is not a letter answer).
    re.compile(r"^\s*[(\[]?([A-Z])(?:[)\].:,]|\s*$)"),
    # "The answer is B", "Answer: (B)", "option B", "choice: B".
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*[(\[]?([A-Z])\b[)\]]?", re.IGNORECASE),
)


def option_index(answer: str | int, options: Sequence[str]) -> int:
    """The index of a reference answer given as an index, a letter (``"B"``) or an option's text."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise ValueError(f"answer index {answer} is out of range for {len(options)} options")
        return answer
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in OPTION_LETTERS[: len(options)]:
        return OPTION_LETTERS.index(text.upper())
    normalised = [normalize_text(o) for o in options]
    if normalize_text(text) in normalised:
        return normalised.index(normalize_text(text))
    raise ValueError(f"answer {answer!r} is neither an option letter nor one of the options {list(options)}")


def parse_choice(prediction: str, options: Sequence[str]) -> int | None:
    """The option a generated answer picks, or ``None`` when it picks none (scored wrong).

    In order: (0) a lone option letter in any case (``"c"``); (1) an option letter alone or followed by ``) ] . : ,`` at the start (``"B"``,
    ``"B."``, ``"(B)"``, ``"B) cat"``; not ``"A cat"``, whose "A" is an article) or
    after "answer"/"option"/"choice" (``"The answer is B"``), among the letters of the options;
    (2) the whole answer equal to one option's text (:func:`normalize_text`); (3) exactly one
    option's text contained in the answer (whole words, case-insensitive).
    """
    letters = OPTION_LETTERS[: len(options)]
    bare = normalize_text(prediction).strip("()[]")
    if len(bare) == 1 and bare.upper() in letters:  # a lone letter, any case: "c", "(b)"
        return letters.index(bare.upper())
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(prediction)
        if match and match.group(1).upper() in letters and (pattern is _LETTER_PATTERNS[0] or match.group(1).isupper()):
            return letters.index(match.group(1).upper())
    pred = normalize_text(prediction)
    normalised = [normalize_text(o) for o in options]
    if pred in normalised:
        return normalised.index(pred)
    contained = [i for i, o in enumerate(normalised) if o and re.search(r"(?<!\w)" + re.escape(o) + r"(?!\w)", pred)]
    return contained[0] if len(contained) == 1 else None


def multiple_choice_accuracy(
    predictions: Sequence[str], references: Sequence[str | int], options: Sequence[Sequence[str]]
) -> float:
    """Top-1 accuracy: the share of samples whose :func:`parse_choice` equals the reference option."""
    _check_lengths(predictions, references)
    _check_lengths(predictions, options)
    return _mean([float(parse_choice(p, o) == option_index(r, o)) for p, r, o in zip(predictions, references, options)])


# ---------------------------------------------------------------------------------- grounding
def grounding_iou(prediction: str, box: Sequence[float]) -> float:
    """IoU of the first box in the generated text (:func:`parse_boxes`) with ``box``; 0 without one."""
    boxes = parse_boxes(prediction)
    return box_iou(boxes[0], box) if boxes else 0.0


def grounding_accuracy(predictions: Sequence[str], references: Sequence[Sequence[float]], threshold: float = 0.5) -> float:
    """Acc@IoU>threshold: the share of samples whose first predicted box has IoU > ``threshold``.

    ``references`` are normalised ``(x1, y1, x2, y2)`` boxes (see :mod:`astrea_vlm.geometry`).
    """
    _check_lengths(predictions, references)
    return _mean([float(grounding_iou(p, b) > threshold) for p, b in zip(predictions, references)])


# ---------------------------------------------------------------------------------- retrieval
def retrieval_ranks(similarity: Sequence[Sequence[float]], positives: Sequence[int | Sequence[int]] | None = None) -> list[int]:
    """Rank (1-based) of the best-ranked positive candidate for each query (row).

    Candidates are ordered by decreasing similarity; ties keep the lower candidate index first.
    ``positives[i]`` is the index (or indices) of query ``i``'s correct candidates; the default is
    the diagonal (query ``i`` matches candidate ``i``).
    """
    rows = [[float(v) for v in row] for row in similarity]
    if positives is None:
        positives = list(range(len(rows)))
    if len(positives) != len(rows):
        raise ValueError(f"{len(rows)} queries but {len(positives)} positive sets")
    ranks = []
    for i, (row, pos) in enumerate(zip(rows, positives)):
        pos = [pos] if isinstance(pos, int) else list(pos)
        if not pos or any(not 0 <= p < len(row) for p in pos):
            raise ValueError(f"query {i}: positives {pos} must be non-empty indices into {len(row)} candidates")
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        ranks.append(1 + min(order.index(p) for p in pos))
    return ranks


def retrieval_recall(
    similarity: Sequence[Sequence[float]], positives: Sequence[int | Sequence[int]] | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K: the share of queries with a positive among their top-K candidates, for each K.

    Returns ``{"recall@1": ..., "recall@5": ..., "recall@10": ...}`` (for ``ks=(1, 5, 10)``).
    """
    ranks = retrieval_ranks(similarity, positives)
    return {f"recall@{k}": _mean([float(r <= k) for r in ranks]) for k in ks}


def image_text_retrieval(
    similarity: Sequence[Sequence[float]], text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Both directions of image-text retrieval from an ``(n_images, n_texts)`` similarity matrix.

    ``text_to_image[t]`` is the image that text ``t`` describes (COCO/Flickr have 5 per image).
    Image-to-text queries are rows (any of the image's texts counts); text-to-image queries are
    columns. Keys: ``i2t_recall@K``, ``t2i_recall@K``.
    """
    rows = [[float(v) for v in row] for row in similarity]
    n_images = len(rows)
    texts_of = [[t for t, img in enumerate(text_to_image) if img == i] for i in range(n_images)]
    columns = [[rows[i][t] for i in range(n_images)] for t in range(len(text_to_image))]
    out = {f"i2t_{k}": v for k, v in retrieval_recall(rows, texts_of, ks).items()}
    out.update({f"t2i_{k}": v for k, v in retrieval_recall(columns, list(text_to_image), ks).items()})
    return out


# ---------------------------------------------------------------------------------- helpers
def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _check_lengths(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
