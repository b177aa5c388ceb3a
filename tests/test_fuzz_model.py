"""Property-based fuzzing of AstreaForConditionalGeneration's inputs (hypothesis, bounded time).

Valid inputs are mutated one or more ways (pixel dtype, rank, channels, size, image count, NaN/inf;
token ids out of the vocabulary, of a float dtype, 1-D, empty, with missing or extra <image>
tokens; attention masks and labels of the wrong shape or values). The forward pass must either
give correct outputs -- logits of shape (batch, seq, vocab), finite, equal to the clean input's
when the mutation is harmless (another float dtype) -- or raise a ValueError / TypeError naming
the input; never an IndexError or RuntimeError from inside torch.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import AstreaModelTester

FUZZ = settings(
    max_examples=int(os.environ.get("ASTREA_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,
    derandomize=os.environ.get("ASTREA_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

TESTER = AstreaModelTester()
MODEL = TESTER.model()
CONFIG = TESTER.config
VOCAB = CONFIG.text_config.vocab_size
ROLES = list(CONFIG.expert_order)
NAMES = ("input_ids", "inputs_embeds", "attention_mask", "labels", "pixel_values", "expert_features", "tower_features", "vocabulary", "image tokens", "<image>")


def _clean(n_images: int, seed: int):
    ids = TESTER.prompt(n_text=3, n_images=n_images, seed=seed)
    ids = torch.cat([ids, torch.tensor([[11, 12, 13]])], dim=1)  # text tokens (loss targets) even without images
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if n_images:
        inputs.update(TESTER.pixels(n_images, seed=seed))
    return inputs


MUTATIONS = [
    "none", "pixels_f64", "pixels_f16", "pixels_bf16", "pixels_uint8", "pixels_bool", "pixels_3d", "pixels_5d",
    "pixels_channels", "pixels_size", "pixels_count", "pixels_nan", "pixels_inf", "pixels_list", "pixels_missing",
    "ids_oov", "ids_negative", "ids_float", "ids_1d", "ids_empty", "ids_extra_image_token", "ids_missing_image_token",
    "mask_shape", "labels", "labels_shape", "labels_oov", "labels_float",
]
HARMLESS = {"none", "pixels_f64", "pixels_f16", "pixels_bf16", "labels"}


def _mutate(inputs: dict, mutation: str, role: str, rng: torch.Generator) -> dict:
    inputs = dict(inputs)
    key = f"pixel_values_{role}"
    pixels = inputs.get(key)
    ids = inputs["input_ids"]
    if mutation.startswith("pixels_") and pixels is None:
        return inputs
    if not mutation.startswith("pixels_") and not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > 0 and not ids.is_floating_point()):
        return inputs  # an earlier mutation already broke the ids
    if mutation == "pixels_f64":
        inputs[key] = pixels.double()
    elif mutation == "pixels_f16":
        inputs[key] = pixels.half()
    elif mutation == "pixels_bf16":
        inputs[key] = pixels.bfloat16()
    elif mutation == "pixels_uint8":
        inputs[key] = (pixels.clamp(-1, 1) * 127 + 128).to(torch.uint8)
    elif mutation == "pixels_bool":
        inputs[key] = pixels > 0
    elif mutation == "pixels_3d":
        inputs[key] = pixels[0]
    elif mutation == "pixels_5d":
        inputs[key] = pixels[None]
    elif mutation == "pixels_channels":
        inputs[key] = torch.cat([pixels, pixels[:, :1]], dim=1) if torch.rand(1, generator=rng) < 0.5 else pixels[:, :1]
    elif mutation == "pixels_size":
        side = int(torch.randint(1, 70, (1,), generator=rng))
        inputs[key] = torch.randn(pixels.shape[0], 3, side, side, generator=rng)
    elif mutation == "pixels_count":
        inputs[key] = torch.cat([pixels, pixels], dim=0)
    elif mutation in ("pixels_nan", "pixels_inf"):
        bad = pixels.clone()
        bad.view(-1)[int(torch.randint(0, bad.numel(), (1,), generator=rng))] = float("nan") if mutation == "pixels_nan" else float("-inf")
        inputs[key] = bad
    elif mutation == "pixels_list":
        inputs[key] = pixels.tolist()
    elif mutation == "pixels_missing":
        inputs.pop(key)
    elif mutation == "ids_oov":
        inputs["input_ids"] = ids.clone().index_fill_(1, torch.tensor([ids.shape[1] - 1]), VOCAB + int(torch.randint(0, 10**6, (1,), generator=rng)))
    elif mutation == "ids_negative":
        inputs["input_ids"] = ids.clone().index_fill_(1, torch.tensor([ids.shape[1] - 1]), -1)
    elif mutation == "ids_float":
        inputs["input_ids"] = ids.float()
    elif mutation == "ids_1d":
        inputs["input_ids"] = ids[0]
    elif mutation == "ids_empty":
        inputs["input_ids"] = ids[:, :0]
        inputs["attention_mask"] = inputs["attention_mask"][:, :0]
    elif mutation == "ids_extra_image_token":
        inputs["input_ids"] = torch.cat([ids, torch.tensor([[CONFIG.image_token_id]])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    elif mutation == "ids_missing_image_token":
        image_positions = (ids[0] == CONFIG.image_token_id).nonzero()
        if len(image_positions):
            ids = ids.clone()
            ids[0, image_positions[0, 0]] = 10
            inputs["input_ids"] = ids
    elif mutation == "mask_shape":
        inputs["attention_mask"] = torch.ones(1, ids.shape[1] + int(torch.randint(1, 5, (1,), generator=rng)), dtype=torch.long)
    elif mutation == "labels":
        inputs["labels"] = ids.clone()
    elif mutation == "labels_shape":
        inputs["labels"] = ids[:, :-1].clone()
    elif mutation == "labels_oov":
        inputs["labels"] = ids.clone().fill_(VOCAB + 5)
    elif mutation == "labels_float":
        inputs["labels"] = ids.float()
    return inputs


def _run(inputs):
    with torch.no_grad():
        return MODEL(**inputs)


@FUZZ
@given(
    n_images=st.integers(0, 2),
    mutations=st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=2),
    role=st.sampled_from(ROLES),
    seed=st.integers(0, 1000),
)
def test_model_inputs_work_or_are_refused_by_name(n_images, mutations, role, seed):
    clean = _clean(n_images, seed)
    rng = torch.Generator().manual_seed(seed)
    inputs = clean
    for mutation in mutations:
        inputs = _mutate(inputs, mutation, role, rng)
    # Without images, pixel mutations (and removing an <image> token) change nothing.
    effective = {m for m in mutations if not (n_images == 0 and (m.startswith("pixels_") or m == "ids_missing_image_token"))}
    try:
        out = _run(inputs)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(name in message for name in NAMES), f"{mutations}: the message names no input: {message}"
        assert not effective <= HARMLESS, f"{mutations} refused: {message}"
        return
    # Accepted: only well-formed inputs may be, and the outputs are right.
    assert effective <= HARMLESS, f"{mutations} accepted"
    ids = inputs["input_ids"]
    assert out.logits.shape == (ids.shape[0], ids.shape[1], VOCAB)
    assert torch.isfinite(out.logits).all()
    if n_images:
        assert out.image_hidden_states.shape == (n_images, CONFIG.num_visual_tokens, CONFIG.hidden_size)
    if "labels" in inputs:
        assert out.loss is not None and torch.isfinite(out.loss)
    reference = _run(clean)
    tolerance = 0.05 if {"pixels_f16", "pixels_bf16"} & effective else 1e-4
    torch.testing.assert_close(out.logits, reference.logits, atol=tolerance, rtol=tolerance)


def test_each_refusal_names_the_input():
    clean = _clean(1, 0)
    rng = torch.Generator().manual_seed(0)
    expected = {
        "pixels_uint8": (TypeError, "normalised floats"),
        "pixels_nan": (ValueError, "NaN or infinite"),
        "pixels_3d": (ValueError, "must be (n_images, 3, height, width)"),
        "pixels_size": (ValueError, "expects pixel_values of shape"),
        "ids_oov": (ValueError, "outside the vocabulary"),
        "ids_float": (TypeError, "integer tensor"),
        "ids_empty": (ValueError, "seq_len >= 1"),
        "mask_shape": (ValueError, "attention_mask"),
        "labels_shape": (ValueError, "labels"),
        "ids_extra_image_token": (ValueError, "<image> tokens"),
    }
    for mutation, (kind, text) in expected.items():
        with pytest.raises(kind, match=text.replace("(", r"\(").replace(")", r"\)")):
            _run(_mutate(clean, mutation, ROLES[0], rng))


def test_expert_and_tower_features_are_checked():
    inputs = _clean(1, 0)
    ids = inputs["input_ids"]
    with pytest.raises(ValueError, match=r"expert_features\['caption'\]"):
        MODEL(input_ids=ids, expert_features={role: torch.randn(1, 4, 7) for role in ROLES})
    with pytest.raises(ValueError, match=r"tower_features\['caption'\]"):
        MODEL(input_ids=ids, tower_features={role: torch.randn(1, 4, 7) for role in ROLES})
