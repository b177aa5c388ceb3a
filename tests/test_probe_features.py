"""The feature probe of benchmarks/probe_features.py: it must find an answer that is in the tokens,
and must not find one that is not (otherwise its verdicts on the demo model mean nothing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import probe_features as pf  # noqa: E402

VOCAB = ["red", "blue", "green", "circle", "square", "star"]
CATEGORIES = [(c, s) for c in VOCAB[:3] for s in VOCAB[3:]]


def _existence_data(n: int, seed: int, informative: bool = True):
    """Tokens: one per object, the one-hot of its (colour, shape); the question asks about one category.

    The answer is "is that category among the tokens?" -- a conjunction, as in the demo's
    existence questions (the "no" category always shares its colour or shape with an object).
    With ``informative=False`` the tokens come from another, unrelated scene.
    """
    g = torch.Generator().manual_seed(seed)
    tokens, queries, labels = [], [], []
    for _ in range(n):
        objects = [CATEGORIES[int(i)] for i in torch.randperm(len(CATEGORIES), generator=g)[:3]]
        answer = int(torch.randint(2, (1,), generator=g))
        if answer:
            asked = objects[int(torch.randint(3, (1,), generator=g))]
        else:
            hard = [c for c in CATEGORIES if c not in objects and any(c[0] == o[0] or c[1] == o[1] for o in objects)]
            asked = hard[int(torch.randint(len(hard), (1,), generator=g))]
        shown = objects if informative else [CATEGORIES[int(i)] for i in torch.randperm(len(CATEGORIES), generator=g)[:3]]
        tokens.append(torch.stack([torch.tensor([float(w in o) for w in VOCAB]) for o in shown]))
        queries.append(pf.question_query(f"Is there a {asked[0]} {asked[1]} in the image?", VOCAB))
        labels.append(answer)
    return torch.stack(tokens), torch.stack(queries), torch.tensor(labels)


def test_question_query_marks_words_in_order_of_mention():
    query = pf.question_query("Where is the red circle relative to the blue star?", VOCAB).reshape(pf.MAX_WORDS, len(VOCAB))
    assert [VOCAB[int(row.argmax())] for row in query] == ["red", "circle", "blue", "star"]
    assert query.sum().item() == 4
    assert pf.question_query("How many shapes?", VOCAB).sum().item() == 0


def test_probe_finds_a_conjunction_that_is_in_the_tokens():
    torch.manual_seed(0)
    accuracy = pf.train_probe(_existence_data(2048, 0), _existence_data(256, 1), num_labels=2, steps=400)
    assert accuracy["val"] > 0.9


def test_probe_stays_at_chance_when_the_tokens_do_not_hold_the_answer():
    accuracy = pf.train_probe(_existence_data(2048, 0, informative=False), _existence_data(256, 1, informative=False),
                              num_labels=2, steps=400)
    assert accuracy["val"] == pytest.approx(0.5, abs=0.1)


def test_visual_path_features_ends_with_what_the_llm_receives(tiny_model):
    from astrea_vlm.processing import build_processor
    from astrea_vlm.train.synthetic import make_split

    model = tiny_model.eval()
    processor = build_processor(model.config)
    scenes = make_split("probe", 3, seed=0, image_size=32, max_objects=3)
    features = pf.visual_path_features(model, processor, [s.image for s in scenes], batch_size=2)
    n, d = model.config.num_visual_tokens, model.config.text_config.hidden_size
    assert features["fused"].shape == (3, n, d)
    assert features["projected"].shape == features["bridged"].shape == (3, 4 * n, d)
    # "fused" is exactly the block the model writes over its <image> placeholders
    batch = processor(text=[f"{processor.image_token} hi"] * 3, images=[[s.image] for s in scenes], return_tensors="pt")
    with torch.no_grad():
        embeds = model(**batch, output_hidden_states=True).hidden_states[0]
    placed = embeds[batch["input_ids"] == model.config.image_token_id].reshape(3, n, d)
    torch.testing.assert_close(features["fused"], placed)
