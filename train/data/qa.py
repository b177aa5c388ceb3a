"""Instruction-tuning rows from the synthetic world's QA records (one single-turn row per record)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .rows import make_dataset, row_features, single_turn_row


def instruct_features():
    from datasets import Value

    return row_features({"question_type": Value("string")})


def qa_to_row(qa: Mapping[str, Any], image: Any, prompts: str = "eval", image_position: str = "before") -> dict[str, Any]:
    """One synthetic QA record (``question``/``answer``/``question_type``/``image_id``) as a TRL row.

    ``prompts="eval"`` (default) words the user turn with the fixed prompt ``astrea eval`` uses
    for the record's metric (:func:`astrea_vlm.train.synthetic.eval_record`), so training and
    evaluation prompts are identical; ``prompts="native"`` keeps the record's own question text.
    """
    if prompts == "eval":
        from ...eval.prompts import build_prompt
        from ..synthetic import eval_record

        record = eval_record(dict(qa))
        prompt = build_prompt(record["metric"], record)
    elif prompts == "native":
        prompt = qa["question"]
    else:
        raise ValueError(f"prompts={prompts!r}: use 'eval' or 'native'")
    return single_turn_row(image, prompt, qa["answer"], qa["image_id"], image_position=image_position,
                           question_type=qa["question_type"])


def build_qa_dataset(scenes: Sequence[Any], question_types: Sequence[str] | None = None, prompts: str = "eval",
                     type_fractions: Mapping[str, float] | None = None, image_position: str = "before"):
    """One single-turn row per synthetic QA record (every scene's records, in scene order).

    ``type_fractions`` keeps a type's record for only that fraction of the scenes (every
    ``round(1 / f)``-th scene), e.g. ``{"caption": 0.25}``. The loss is a mean over answer
    tokens, so a 25-token caption outweighs a 1-token "yes" 25 to 1; thinning the long-answer
    types gives the short-answer ones a fair share of the gradient.
    """
    fractions = dict(type_fractions or {})
    for qtype, fraction in fractions.items():
        if not 0 < float(fraction) <= 1:
            raise ValueError(f"type_fractions[{qtype!r}]={fraction}: a fraction must lie in (0, 1]")
    every = {qtype: max(1, round(1 / float(f))) for qtype, f in fractions.items()}
    rows = []
    for index, scene in enumerate(scenes):
        for qa in scene.qa:
            qtype = qa["question_type"]
            if question_types is not None and qtype not in question_types:
                continue
            if index % every.get(qtype, 1) == 0:
                rows.append(qa_to_row(qa, scene.image, prompts, image_position))
    return make_dataset(rows, instruct_features())
