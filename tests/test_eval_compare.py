"""The paired bootstrap behind "beats the majority baseline clearly" (eval/compare.py)."""

import numpy as np
import pytest

from astrea_vlm.eval.caption_metrics import cider_d
from astrea_vlm.eval.compare import comparison_markdown, paired_bootstrap


def _qa(ids, correct, qtype="counting"):
    return [{"id": i, "question_type": qtype, "metric": "exact_match", "prediction": "x", "references": {"answers": ["x"]},
             "score": {"exact_match": float(c)}} for i, c in zip(ids, correct)]


def _captions(ids, predictions, references):
    return [{"id": i, "question_type": "caption", "metric": "caption", "prediction": p, "references": {"captions": [r]}, "score": {}}
            for i, p, r in zip(ids, predictions, references)]


def test_interval_matches_the_normal_approximation_of_a_paired_difference():
    rng = np.random.default_rng(0)
    n = 400
    a, b = rng.random(n) < 0.7, rng.random(n) < 0.5
    result = paired_bootstrap(_qa(range(n), a), _qa(range(n), b), n_resamples=4000)["counting"]
    diff = a.astype(float) - b.astype(float)
    assert result["difference"] == pytest.approx(diff.mean())
    half = 1.96 * diff.std() / np.sqrt(n)
    assert result["low"] == pytest.approx(diff.mean() - half, abs=0.015)
    assert result["high"] == pytest.approx(diff.mean() + half, abs=0.015)
    assert result["n"] == n and result["low"] > 0


def test_pairs_by_id_not_by_position():
    ids = list(range(50))
    a = _qa(ids, [1] * 25 + [0] * 25)
    b = list(reversed(_qa(ids, [1] * 25 + [0] * 25)))  # same answers, listed in another order
    result = paired_bootstrap(a, b)["counting"]
    assert result["difference"] == 0 and result["low"] == 0 and result["high"] == 0


def test_a_small_gain_on_few_questions_is_not_clear():
    ids = list(range(20))
    # 6 questions only A gets right, 4 only B: +0.1 on 20 questions
    a = [1] * 6 + [0] * 4 + [1] * 5 + [0] * 5
    b = [0] * 6 + [1] * 4 + [1] * 5 + [0] * 5
    result = paired_bootstrap(_qa(ids, a), _qa(ids, b))["counting"]
    assert result["difference"] == pytest.approx(0.1) and result["low"] < 0 < result["high"]
    assert "| counting | +0.100 |" in comparison_markdown({"counting": result}) and "| no |" in comparison_markdown({"counting": result})


def test_caption_difference_is_the_corpus_cider_d_difference():
    refs = ["a red circle on a grey background", "two blue squares", "a green star and a red cross", "a white triangle"] * 3
    good = list(refs)
    constant = ["a red circle"] * len(refs)
    ids = [f"img-{i}" for i in range(len(refs))]
    result = paired_bootstrap(_captions(ids, good, refs), _captions(ids, constant, refs))["caption"]
    expected = cider_d(good, [[r] for r in refs]) - cider_d(constant, [[r] for r in refs])
    assert result["difference"] == pytest.approx(expected) and result["low"] > 0


def test_mismatched_results_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="different records.*same data file"):
        paired_bootstrap(_qa([1, 2, 3], [1, 1, 1]), _qa([1, 2, 4], [1, 1, 1]))
    with pytest.raises(ValueError, match="different question types"):
        paired_bootstrap(_qa([1], [1]), _qa([1], [1], qtype="colour"))
    no_id = [{k: v for k, v in s.items() if k != "id"} for s in _qa([1], [1])]
    with pytest.raises(ValueError, match="no 'id'"):
        paired_bootstrap(no_id, no_id)
