"""The fixed prompt templates of ``astrea eval`` (written into every results JSON).

A template is filled with :meth:`str.format` from the record (``{question}``, and ``{options}``
for multiple choice, each option on its own line as :data:`OPTION_FORMAT`), then placed after the
image in one user turn of the processor's chat template. The wording follows the LLaVA-1.5 evaluation
prompts the paper's baselines use; the grounding prompt names the box format of
:mod:`astrea_vlm.geometry`, the one the training data uses.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."

PROMPTS: dict[str, str] = {
    "vqa": SHORT_ANSWER,
    "exact_match": SHORT_ANSWER,
    "multiple_choice": "{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
    "grounding": (
        "Please provide the bounding box coordinate of the region this sentence describes: {question}\n"
        "Answer with the box as [x1, y1, x2, y2], integers on a 0-1000 grid."
    ),
    "caption": "Provide a one-sentence caption for the provided image.",
}

OPTION_FORMAT = "{letter}. {option}"

# Version of the templates above: bump it whenever one of them changes.
PROMPT_VERSION = 1


def format_options(options: list[str]) -> str:
    """``["cat", "dog"]`` -> ``"A. cat\\nB. dog"``."""
    if len(options) > len(string.ascii_uppercase):
        raise ValueError(f"at most {len(string.ascii_uppercase)} options, got {len(options)}")
    return "\n".join(OPTION_FORMAT.format(letter=string.ascii_uppercase[i], option=o) for i, o in enumerate(options))


def build_prompt(metric: str, record: Mapping) -> str:
    """The user text for one record scored with ``metric`` (a key of :data:`PROMPTS`)."""
    if metric not in PROMPTS:
        raise ValueError(f"no prompt for {metric!r}; the metrics are {', '.join(PROMPTS)}")
    fields = {"question": str(record.get("question", "")).strip()}
    if metric == "multiple_choice":
        fields["options"] = format_options(list(record["options"]))
    return PROMPTS[metric].format(**fields)
