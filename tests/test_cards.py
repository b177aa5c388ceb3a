"""The README.md card of every folder astrea writes: true metadata, a layout, a snippet that runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from astrea_vlm.card import (
    created_facts,
    default_max_new_tokens,
    eval_results_of,
    hub_repo_id,
    record_eval_results,
    render_card,
)
from astrea_vlm.cli import main
from astrea_vlm.configuration import get_preset

ROOT = Path(__file__).resolve().parents[1]
PAPER_PARTS = {
    "lmsys/vicuna-13b-v1.5",
    "google/siglip-so400m-patch14-384",
    "IDEA-Research/grounding-dino-base",
    "facebook/sam2.1-hiera-large",
    "xinyu1205/recognize-anything-plus-model",
}


def usage_block(card_text: str) -> str:
    usage = card_text.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", usage, re.S)
    assert len(blocks) == 1, "the Usage section has one Python block"
    return blocks[0]


def run_snippet(code: str, cwd: Path) -> str:
    """Run a card's snippet as a user would: a fresh interpreter, the working directory where astrea ran."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # remote code only, no astrea_vlm shims
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("created")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["create", "--preset", "tiny", "--output", "astrea-tiny"]) == 0
    finally:
        os.chdir(cwd)
    return root, root / "astrea-tiny"


def test_random_tiny_card_claims_no_pretrained_parts(tiny_folder):
    _, folder = tiny_folder
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert {"astrea", "custom_code", "random-weights"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta and "model-index" not in meta
    text = card.text.lower()
    assert "vicuna" not in text and "13b" not in text.replace("astrea-13b", "")  # nothing of the 13B card
    assert "every weight is random" in text and "not trained" in text
    assert meta["astrea"]["image_position"] == "before"


def test_card_states_the_prompt_layout_its_processor_renders(tiny_folder):
    from astrea_vlm.processing import AstreaProcessor

    _, folder = tiny_folder
    text = (folder / "README.md").read_text()
    processor = AstreaProcessor.from_pretrained(folder)
    content = [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    layout = text.split("## Prompt layout", 1)[1].split("\n## ", 1)[0]
    assert "`image_position: before`" in layout and f"```text\n{rendered}\n```" in layout
    assert f"expands to {processor.num_visual_tokens} visual tokens" in layout


def test_generation_config_has_a_sensible_max_new_tokens(tiny_folder):
    _, folder = tiny_folder
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 128 == default_max_new_tokens(get_preset("tiny"))  # 512-token context / 4
    assert default_max_new_tokens(get_preset("astrea-13b")) == 256


def test_created_card_snippet_runs_verbatim(tiny_folder):
    root, folder = tiny_folder
    code = usage_block((folder / "README.md").read_text())
    assert 'path = "astrea-tiny"' in code
    out = run_snippet(code, cwd=root)
    assert len(out.strip().splitlines()) >= 1  # generate's answer, then the pipeline's


def test_paper_preset_card_names_its_real_parts_as_base_model():
    from astrea_vlm.create import _parts
    from astrea_vlm.processing import build_processor

    config = get_preset("astrea-13b")
    towers = {role: expert.pretrained for role, expert in config.expert_configs.items()}
    facts = created_facts("astrea-13b", _parts(config, "lmsys/vicuna-13b-v1.5", None, towers), "astrea create --preset astrea-13b")
    assert set(facts.base_model) == PAPER_PARTS
    # (the 13B tokenizer is a download away; the tiny processor renders the same chat template)
    card = render_card(facts, config, build_processor(get_preset("tiny")), n_parameters=None)
    meta = card.data.to_dict()
    assert set(meta["base_model"]) == PAPER_PARTS and "random-weights" not in meta["tags"]
    architecture = card.text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    for fact in ("384 px", "800 px", "1024 px", "24x24", "576 visual tokens", "top 3 of 4", "40 layers, width 5120"):
        assert fact in architecture, fact
    # A part given as a local path is listed, but it is no Hub id for base_model.
    local = created_facts("x", _parts(config, "./vicuna-13b-v1.5", None, towers), "astrea create --preset astrea-13b")
    assert "lmsys/vicuna-13b-v1.5" not in local.base_model and local.parts["language model"] == "./vicuna-13b-v1.5"


def test_card_documents_each_experts_preprocessing(tiny_folder):
    from astrea_vlm.card import _preprocessing_section
    from astrea_vlm.processing import AstreaProcessor

    paper = _preprocessing_section(get_preset("astrea-13b"), None)
    rows = {line.split(" | ")[0].strip("| "): line for line in paper.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["caption"].startswith("| caption | siglip | 384x384 | squashed | bicubic | the 8-bit image (PIL) | none | [0.5, 0.5, 0.5]")
    assert rows["classification"].startswith("| classification | ram_plus | 384x384 | squashed | bilinear | the 8-bit image (PIL) | none | [0.485")
    assert rows["detection"].startswith(
        "| detection | grounding_dino | shortest side 800, longest at most 1333 | kept | bilinear | the 8-bit image (PIL) | "
        "zeros at the bottom and right, `pixel_mask_detection` | [0.485"
    )
    assert rows["segmentation"].startswith("| segmentation | sam2 | 1024x1024 | squashed | bilinear, antialiased | the [0, 1] float image (torch) | none")
    # A written folder's card shows what its own processor computes (its processor_config.json).
    _, folder = tiny_folder
    card = (folder / "README.md").read_text()
    section = card.split("### Preprocessing\n", 1)[1].split("\n## ", 1)[0]
    config = get_preset("tiny")
    processor = AstreaProcessor.from_pretrained(folder)
    assert _preprocessing_section(config, processor) in section
    assert _preprocessing_section(config, None) == _preprocessing_section(config, processor)
    assert "| detection | grounding_dino | shortest side 32, longest at most 53 | kept |" in section


@pytest.mark.parametrize("source, repo", [
    ("lmsys/vicuna-13b-v1.5", "lmsys/vicuna-13b-v1.5"),
    ("facebook/sam2.1-hiera-large/sam2.1_hiera_large.pt", "facebook/sam2.1-hiera-large"),
    ("./vicuna-13b-v1.5", None), ("/abs/model", None), ("random", None), (None, None),
])
def test_hub_repo_id(source, repo):
    assert hub_repo_id(source) == repo


def _results(task="qa", counting=0.5, mean=0.4, data="test.jsonl"):
    return {"task": task, "data": data, "metrics": {"n": 4, "mean_accuracy": mean},
            "per_type": {"counting": {"metric": "exact_match", "exact_match": counting, "n": 2},
                         "caption": {"metric": "caption", "cider_d": 0.25, "bleu_4": 0.1, "n": 2}}}


def test_recorded_eval_results_become_the_model_index(tiny_folder, tmp_path):
    import shutil

    _, folder = tiny_folder
    card_only = tmp_path / "copy"
    card_only.mkdir()
    shutil.copy(folder / "README.md", card_only / "README.md")
    record_eval_results(card_only, _results(), dataset_name="toy test")
    record_eval_results(card_only, _results(counting=0.75), dataset_name="toy test")  # replaces, never duplicates
    record_eval_results(card_only, _results(counting=0.25, data="val.jsonl"))
    card = ModelCard.load(card_only / "README.md")
    index = card.data.to_dict()["model-index"][0]
    assert index["name"] == "astrea-tiny"
    values = {(r["dataset"]["name"], m["name"]): m["value"] for r in index["results"] for m in r["metrics"]}
    assert values == {("toy test", "counting (exact_match)"): 0.75, ("toy test", "caption (cider_d)"): 0.25,
                      ("toy test", "mean accuracy (short answers)"): 0.4,
                      ("val.jsonl", "counting (exact_match)"): 0.25, ("val.jsonl", "caption (cider_d)"): 0.25,
                      ("val.jsonl", "mean accuracy (short answers)"): 0.4}
    evaluation = card.text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert "| toy test | astrea eval --task qa | counting (exact_match) | 0.750 |" in evaluation
    assert card.text.count("## Evaluation") == 1 and "## Architecture" in card.text
    assert [(r.metric_type, r.task_type) for r in eval_results_of(_results())] == [
        ("cider", "image-to-text"), ("accuracy", "visual-question-answering"), ("accuracy", "visual-question-answering")]


def test_shipped_world_llm_card_and_snippet():
    folder = ROOT / "train" / "world_llm"
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    pretrain = json.loads((folder / "pretrain.json").read_text())
    for qtype, value in pretrain["symbolic_accuracy"].items():
        assert f"{qtype} {value:.3f}" in card.text
    code = usage_block(card.text)
    assert 'path = "train/world_llm"' in code
    run_snippet(code, cwd=ROOT)
