"""Captioning metrics in pure Python: BLEU-1..4, ROUGE-L and CIDEr-D, as the COCO caption toolkit
(``pycocoevalcap``) computes them, without Java. Their definitions: ``docs/caption_metrics.md``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# Tokens the COCO toolkit removes after PTB tokenisation (its brackets, -lrb- etc., are kept).
_DROPPED = frozenset({"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_WORD = r"[a-z0-9]+(?:[-./&][a-z0-9]+)*"  # "double-decker", "3.5", "and/or" stay whole, as in PTB
_TOKEN = re.compile(
    rf"\.\.\.|--|n't|o'clock|'[a-z]+|(?:[a-z]\.){{2,}}|\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?|{_WORD}(?=n't)|{_WORD}|[^\sa-z0-9]"
)


def tokenize(caption: str) -> list[str]:
    """Lowercase and tokenise PTB-style, then drop the punctuation tokens the COCO toolkit drops.

    ``"don't"`` -> ``do n't``, ``"dog's"`` -> ``dog 's``, ``"cannot"`` -> ``can not``, ``"p.m."``,
    ``"100,000"`` and ``"double-decker"`` stay whole, brackets become ``-lrb-`` / ``-rrb-`` ...
    Equal to the toolkit's Java PTB tokeniser on ordinary captions (checked on the test captions).
    """
    tokens = []
    for token in _TOKEN.findall(caption.lower().replace("cannot", "can not")):
        token = _BRACKETS.get(token, token)
        if token not in _DROPPED:
            tokens.append(token)
    return tokens


def _prepare(predictions, references, do_tokenize: bool) -> tuple[list[list[str]], list[list[list[str]]]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} captions but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every image needs at least one reference caption")
    split = tokenize if do_tokenize else (lambda s: s.split())
    return [split(p) for p in predictions], [[split(r) for r in refs] for refs in references]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------------------------------- BLEU
def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, tokenize: bool = True) -> list[float]:
    """Corpus BLEU-1..``max_n`` (module docstring); returns ``[bleu_1, ..., bleu_max_n]``."""
    cands, refs = _prepare(predictions, references, tokenize)
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, cand_refs in zip(cands, refs):
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in cand_refs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(cand, n)
            max_ref = Counter()
            for r in cand_refs:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(cand) - n + 1)
    ratio = (cand_len + 1e-15) / (ref_len + 1e-9)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (matches[n] + 1e-15) / (totals[n] + 1e-9)
        scores.append(brevity * product ** (1 / (n + 1)))
    return scores


# ------------------------------------------------------------------------------------- ROUGE-L
def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_sentence(candidate: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """ROUGE-L F-score of one tokenised candidate against its tokenised references."""
    if not candidate:
        return 0.0
    lcs = [_lcs(candidate, r) for r in references]
    precision = max(common / len(candidate) for common in lcs)
    recall = max(common / len(r) if r else 0.0 for common, r in zip(lcs, references))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: bool = True) -> float:
    """Mean sentence ROUGE-L (module docstring)."""
    cands, refs = _prepare(predictions, references, tokenize)
    return sum(rouge_l_sentence(c, r) for c, r in zip(cands, refs)) / len(cands) if cands else 0.0


# ------------------------------------------------------------------------------------- CIDEr-D
def cider_d_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: bool = True, sigma: float = 6.0, max_n: int = 4
) -> list[float]:
    """CIDEr-D of each image (module docstring); :func:`cider_d` is their mean."""
    cands, refs = _prepare(predictions, references, tokenize)
    doc_freq: Counter = Counter()
    for cand_refs in refs:
        doc_freq.update({g for r in cand_refs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_images = math.log(float(len(cands))) if cands else 0.0

    def vector(tokens):
        vec, norms = [], []
        for n in range(1, max_n + 1):
            weights = {g: c * (log_images - math.log(max(1.0, doc_freq[g]))) for g, c in _ngrams(tokens, n).items()}
            vec.append(weights)
            norms.append(math.sqrt(sum(w * w for w in weights.values())))
        return vec, norms, len(tokens)

    scores = []
    for cand, cand_refs in zip(cands, refs):
        c_vec, c_norm, c_len = vector(cand)
        total = 0.0
        for ref in cand_refs:
            r_vec, r_norm, r_len = vector(ref)
            penalty = math.exp(-((c_len - r_len) ** 2) / (2 * sigma**2))
            per_n = []
            for n in range(max_n):
                dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in c_vec[n].items())
                if c_norm[n] != 0 and r_norm[n] != 0:
                    dot /= c_norm[n] * r_norm[n]
                per_n.append(dot * penalty)
            total += sum(per_n) / max_n
        scores.append(10.0 * total / len(cand_refs))
    return scores


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: bool = True) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_scores`."""
    scores = cider_d_scores(predictions, references, tokenize=tokenize)
    return sum(scores) / len(scores) if scores else 0.0


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: bool = True) -> dict[str, float]:
    """``bleu_1`` .. ``bleu_4``, ``rouge_l`` and ``cider_d`` of a corpus of captions."""
    out = {f"bleu_{n}": v for n, v in enumerate(bleu(predictions, references, tokenize=tokenize), start=1)}
    out["rouge_l"] = rouge_l(predictions, references, tokenize=tokenize)
    out["cider_d"] = cider_d(predictions, references, tokenize=tokenize)
    return out
