"""model_card.md: Hub metadata in the YAML front matter and the sections and choices the card must state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

CARD = Path(__file__).resolve().parents[1] / "model_card.md"

BASE_MODELS = {
    "lmsys/vicuna-13b-v1.5",
    "google/siglip-so400m-patch14-384",
    "IDEA-Research/grounding-dino-base",
    "facebook/sam2.1-hiera-large",
    "xinyu1205/recognize-anything-plus-model",
}


def _split():
    text = CARD.read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, "the card must start with a YAML front matter block between '---' lines"
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def metadata():
    return _split()[0]


@pytest.fixture(scope="module")
def body():
    return _split()[1]


def _section(body: str, title: str) -> str:
    match = re.search(rf"^##+ {re.escape(title)}.*?$(.*?)(?=^## |\Z)", body, re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def test_front_matter_has_the_hub_metadata(metadata):
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["license"] == "apache-2.0"
    assert {"vision-language", "mixture-of-experts", "multimodal", "astrea", "custom_code"} <= set(metadata["tags"])
    assert isinstance(metadata["base_model"], list)
    assert set(metadata["base_model"]) == BASE_MODELS


@pytest.mark.parametrize(
    "title",
    [
        "Summary",
        "Usage",
        "Architecture",
        "Training procedure",
        "Interpretations where the paper is ambiguous",
        "Limitations",
        "Citation",
    ],
)
def test_card_has_the_section(body, title):
    assert re.search(rf"^## {re.escape(title)}\s*$", body, re.M), title


def test_usage_shows_remote_code_auto_classes_and_the_pipeline(body):
    usage = _section(body, "Usage")
    assert "AutoProcessor.from_pretrained" in usage
    assert "AutoModelForImageTextToText.from_pretrained" in usage
    assert usage.count("trust_remote_code=True") >= 3  # processor, model, pipeline
    assert 'pipeline("image-text-to-text"' in usage
    assert "apply_chat_template(" in usage and "add_generation_prompt=True" in usage
    assert '{"type": "image", "image": image}' in usage
    # The Python blocks are at least valid syntax.
    for block in re.findall(r"```python\n(.*?)```", usage, re.S):
        compile(block, "model_card.md", "exec")


def test_architecture_states_the_expert_grids_at_paper_scale(body):
    arch = _section(body, "Architecture")
    for grid in ("27x27x1152", "12x12x1536", "50x50x256", "64x64x256", "24x24", "576"):
        assert grid in arch, grid
    for px in ("384 px", "800 px", "1024 px"):
        assert px in arch, px
    assert "top 3" in body or "top-3" in body


def test_training_procedure_lists_stages_loss_and_optimiser(body):
    training = _section(body, "Training procedure")
    stages = [training.index(s) for s in ("caption", "classification", "detection", "segmentation")]
    assert stages == sorted(stages), "stages must be listed coarse to fine"
    for term in ("L_total = L_reg + mu * L_moco", "AdamW", "(0.9, 0.98)", "0.05", "cosine", "15%", "1e-4", "LLaVA-NeXT", "cache", "frozen"):
        assert term in training, term


@pytest.mark.parametrize(
    "keyword",
    [
        "gate",
        "tanh",
        "zero",
        "Bernoulli",
        "expectation",
        "C_i is the projector output",
        "do not chain",
        "per image",
        "pooled",
        "top-k",
        "top-3",
        "softmax",
        "576",
        "area pooling",
        "bilinear",
        "before the projector",
        "encoder memory",
        '"object ."',
        "Grounding-DINO 1.5",
        "stride-16",
        "no_mem_embed",
        "final Swin stage",
        "penultimate",
        "answer tokens",
        "<image>",
        "assistant_only_loss",
        "load-balancing",
        "off by default",
        "weights_only",
    ],
)
def test_interpretations_section_mentions(body, keyword):
    assert keyword in _section(body, "Interpretations where the paper is ambiguous"), keyword


def test_moco_choice_is_documented_with_its_reason(body):
    interpretations = _section(body, "Interpretations where the paper is ambiguous")
    moco = interpretations.split("### Momentum contrast", 1)[1].split("\n### ", 1)[0]
    assert "not yet implemented" not in moco.lower()
    for term in ("MoE-fused visual embedding", "momentum copy", "Reason:", "moco_queue_size", "moco_state.safetensors"):
        assert term in moco, term
    assert "### Adapters start at the identity" in interpretations


def test_limitations_say_there_are_no_released_weights(body):
    limitations = _section(body, "Limitations")
    for term in ("No released Astrea weights", "astrea create", "tiny", "random", "Grounding-DINO 1.5"):
        assert term in limitations, term


def test_citation_is_bibtex_for_the_paper(body):
    citation = _section(body, "Citation")
    bib = re.search(r"```bibtex\n(.*?)```", citation, re.S)
    assert bib, "a ```bibtex block is needed"
    entry = bib.group(1)
    assert re.match(r"@\w+\{\w+,", entry.strip())
    assert "Astrea" in entry and "Progressive Alignment" in entry
    assert re.search(r"year\s*=\s*\{2025\}", entry)
    assert entry.count("{") == entry.count("}")
