"""Is model A better than model B on the same questions? A paired bootstrap per question type.

With 64 questions of a type, one question is 0.016 of accuracy and the standard error of an
accuracy near 0.5 is about 0.06, so a difference in a results table says little on its own.
:func:`paired_bootstrap` pairs the two results' samples by ``id`` (the same record, answered by
both), takes each sample's score -- the primary metric's per-sample value; for captions the
per-image CIDEr-D, with the document frequencies of the whole reference set, which both models
share -- and resamples the *pairs* with replacement. It reports the observed difference of the
means (A - B) and the 2.5th and 97.5th percentiles of the resampled differences: a 95% interval.
"A beats B clearly" is then a claim one can check: the interval's lower end is above 0.

For captions the observed difference is the difference of corpus CIDEr-D as ``astrea eval``
reports it (the mean of the per-image scores), so the table and the interval agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .caption_metrics import cider_d_scores


def _sample_scores(samples: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """``question_type -> {id: score}`` with each sample's primary per-sample score."""
    from .runner import PRIMARY

    by_type: dict[str, dict[str, float]] = {}
    captions: dict[str, list[Mapping]] = {}
    for sample in samples:
        if "id" not in sample:
            raise ValueError("a sample has no 'id'; paired comparison needs the record id of every sample "
                             "(astrea eval writes it into results.json)")
        if sample["metric"] == "caption":
            captions.setdefault(sample["question_type"], []).append(sample)
            continue
        key = PRIMARY[sample["metric"]]
        by_type.setdefault(sample["question_type"], {})[str(sample["id"])] = float(sample["score"][key])
    for qtype, group in captions.items():
        scores = cider_d_scores([s["prediction"] for s in group], [s["references"]["captions"] for s in group])
        by_type[qtype] = {str(s["id"]): score for s, score in zip(group, scores)}
    return by_type


def paired_bootstrap(samples_a: Sequence[Mapping], samples_b: Sequence[Mapping], n_resamples: int = 2000,
                     seed: int = 0, confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Per question type: ``{"difference", "low", "high", "n"}`` of mean score A - B (see module docstring).

    Both sample lists must hold the same records (the same ``id`` set per question type); a
    mismatch is an error, since unpaired samples would compare different questions.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    scores_a, scores_b = _sample_scores(samples_a), _sample_scores(samples_b)
    if set(scores_a) != set(scores_b):
        raise ValueError(f"the two results have different question types: {sorted(scores_a)} vs {sorted(scores_b)}")
    rng = np.random.default_rng(seed)
    tail = (1 - confidence) / 2
    out = {}
    for qtype in scores_a:
        ids = sorted(scores_a[qtype])
        if set(ids) != set(scores_b[qtype]):
            missing = sorted(set(ids) ^ set(scores_b[qtype]))[:3]
            raise ValueError(f"question type {qtype!r}: the two results answer different records (e.g. {missing}); "
                             "evaluate both models on the same data file")
        diff = np.array([scores_a[qtype][i] - scores_b[qtype][i] for i in ids])
        draws = rng.integers(0, len(diff), size=(n_resamples, len(diff)))
        means = diff[draws].mean(axis=1)
        out[qtype] = {"difference": float(diff.mean()), "low": float(np.quantile(means, tail)),
                      "high": float(np.quantile(means, 1 - tail)), "n": len(ids)}
    return out


def comparison_markdown(comparison: Mapping[str, Mapping[str, float]], name_a: str = "A", name_b: str = "B") -> str:
    """One row per question type: the difference, its interval, and whether the interval is above 0."""
    lines = [f"| question type | {name_a} - {name_b} | 95% interval | n | {name_a} clearly better |", "|---|---:|---:|---:|:---:|"]
    for qtype, row in comparison.items():
        lines.append(f"| {qtype} | {row['difference']:+.3f} | [{row['low']:+.3f}, {row['high']:+.3f}] | {row['n']} | "
                     f"{'yes' if row['low'] > 0 else 'no'} |")
    return "\n".join(lines)


__all__ = ["comparison_markdown", "paired_bootstrap"]
