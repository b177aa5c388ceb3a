"""Answer normalisation: the VQA rules, and a light one for exact match.

:func:`normalize_vqa_answer` implements the answer processing the VQA benchmark documents for its
evaluation (visualqa.org, "Evaluation"), applied to predictions and ground-truth answers alike:

1. newlines and tabs become spaces; surrounding whitespace is stripped; everything is lowercased;
2. punctuation: every mark of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` (all punctuation but
   the apostrophe, kept for possessives such as "girl's", and the colon, kept for times such as
   "2:20") is replaced by a space. As in the official evaluation script, a mark is deleted
   outright instead (no space) when that mark touches a space somewhere in the answer, or when the
   answer holds a digit-comma-digit group, so "100,978" becomes "100978";
3. a period is removed unless a digit follows it (a decimal point, "3.5" or ".5");
4. number words ``zero`` ... ``ten`` become digits, and ``none`` becomes ``0`` (as in the official
   script: "none" answers count questions);
5. the articles ``a``, ``an``, ``the`` are removed;
6. contractions written without their apostrophe get it back ("dont" -> "don't"). Words that are
   also ordinary words ("ill", "well", "shed", "were", "its", "id", "wed", "lets") are left alone;
7. words are joined by single spaces.

Steps 4-6 work on whitespace-separated words, after steps 1-3.
"""

from __future__ import annotations

import re

VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})


def _contraction_table() -> dict[str, str]:
    """Apostrophe-less spelling -> contraction, for the contractions VQA answers use.

    Built from the contractions themselves so every key is exactly the contraction minus its
    apostrophes (plus the spellings with only one of two apostrophes, e.g. "wouldnt've").
    """
    contractions = [
        "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
        "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
        "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've",
        "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd've", "should've",
        "shouldn't", "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
        "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd",
        "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas",
        "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
        "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll",
        "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've",
        "you'd", "you'd've", "you'll", "you're", "you've",
    ]
    table: dict[str, str] = {}
    for word in contractions:
        parts = word.split("'")
        bare = "".join(parts)
        table[bare] = word
        # One apostrophe of several missing: every split point kept but one.
        inner = [i for i in range(1, len(parts)) if parts[i - 1] and parts[i]]
        if len(inner) > 1:
            for skip in inner:
                spelled = parts[0]
                for i in range(1, len(parts)):
                    spelled += ("" if i == skip else "'") + parts[i]
                table.setdefault(spelled, word)
    return table


CONTRACTIONS = _contraction_table()

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        if mark not in out:
            continue
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if (delete_all or touches_space) else " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise one answer with the VQA rules listed in the module docstring."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _punctuation(text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


_TRAILING = re.compile(r"[\s.!?,;:]+$")


def normalize_text(text: str) -> str:
    """Light normalisation for exact match: lowercase, collapse whitespace, drop trailing ``.!?,;:``."""
    return _TRAILING.sub("", " ".join(str(text).lower().split()))
