"""A short tiny `astrea instruct` (four alignment stages, then instruction tuning), run once as a
user runs it: no warning that astrea causes; the folders it writes carry true model cards whose
snippets run; `astrea eval --update-card` records results in the card's model-index; the
validation loss the recipe asks for is logged in every stage and drawn in loss.png."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent

RECIPE = {
    "model": {"preset": "tiny", "seed": 0},
    "data": {"source": "synthetic", "train_size": 8, "validation_size": 4, "image_size": 48, "seed": 0, "max_objects": 3},
    "optim": {"per_device_train_batch_size": 4},
    "align": {"max_steps": 1, "learning_rate": 2.0e-3, "trainable": ["projector", "bridge"]},
    "instruct": {"max_steps": 1, "learning_rate": 1.0e-3, "trainable": ["router", "adapters", "moco_head", "llm"]},
    "save_steps": 1,
    "logging_steps": 1,
    "cache": True,
    "eval_steps": 1,  # the validation loss after every step: loss.png's validation curves
}


def run_capturing_warnings(args: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / "capture_warnings_child.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("CAPTURED ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("CAPTURED "):])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    (root / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "output_dir": "run"}))
    captured = run_capturing_warnings(["instruct", "--recipe", "recipe.yaml"], cwd=root)
    return root, captured


def test_training_raises_no_warning(trained):
    """Deprecated argument names (e.g. `gradient_checkpointing`) or a false "Requested torchvision
    backend is not available" would show up here, once per stage."""
    _, captured = trained
    assert captured["rc"] == 0
    assert captured["warnings"] == []
    assert captured["logs"] == []


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


@pytest.mark.parametrize("name, phase", [("aligned", "align"), ("final", "instruct")])
def test_trained_folders_carry_a_card_of_what_trained_them(trained, name, phase):
    root, _ = trained
    card = _card(root / "run" / name)
    meta = card.data.to_dict()
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["library_name"] == "transformers"
    assert meta["datasets"] == ["astrea-synthetic-world"] and "base_model" not in meta  # a random tiny preset
    assert meta["astrea"]["image_position"] == "before"
    training = card.text.split("## Training", 1)[1].split("\n## ", 1)[0]
    assert f"Written by `astrea {phase}`" in card.text
    assert "4 stages, caption > classification > detection > segmentation; 1 steps each at learning rate 0.002" in training
    assert ("**Instruction tuning** (`astrea instruct`): 1 steps" in training) == (phase == "instruct")
    summaries = json.loads((root / "run" / "aligned" / "alignment_summary.json").read_text())
    assert f"stage 1 (caption), final training loss {summaries[0]['train_loss']:.3f}" in training
    assert "train_size: 8" in training  # the full recipe


def test_trained_card_snippet_runs_verbatim(trained):
    from test_cards import run_snippet, usage_block

    root, _ = trained
    code = usage_block((root / "run" / "final" / "README.md").read_text())
    assert 'path = "run/final"' in code
    run_snippet(code, cwd=root)


def test_eval_update_card_records_the_results(trained, tmp_path, monkeypatch, capsys):
    from astrea_vlm.cli import main

    root, _ = trained
    monkeypatch.chdir(root)
    scene = tmp_path / "scene.png"
    from PIL import Image

    Image.new("RGB", (48, 48), "white").save(scene)
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "image": str(scene), "question": "How many shapes?", "answer": "2", "metric": "exact_match", "question_type": "counting"},
        {"id": "b", "image": str(scene), "question": "Is it red?", "answer": "no", "metric": "exact_match", "question_type": "existence"},
    ]) + "\n")
    before = (root / "run" / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(["eval", "--model", "run/final", "--task", "qa", "--data", str(data), "--max-new-tokens", "3", "--update-card"]) == 0
    assert "recorded the results in run/final/README.md" in capsys.readouterr().out
    results = json.loads((root / "outputs" / "eval" / "run" / "final" / "qa" / "results.json").read_text())
    index = _card(root / "run" / "final").data.to_dict()["model-index"][0]
    recorded = {m["name"]: m["value"] for r in index["results"] for m in r["metrics"]}
    assert recorded == {"counting (exact_match)": round(results["per_type"]["counting"]["exact_match"], 4),
                        "existence (exact_match)": round(results["per_type"]["existence"]["exact_match"], 4),
                        "mean accuracy (short answers)": round(results["metrics"]["mean_accuracy"], 4)}
    assert (root / "run" / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_a_recipe_that_evaluates_logs_validation_loss_and_loss_png_draws_it(trained, tmp_path):
    from astrea_vlm.eval.report import load_log_history, training_figure

    root, _ = trained
    stages = sorted((root / "run").glob("align-*")) + [root / "run" / "instruct"]
    loaded = [entry for stage in stages for entry in load_log_history(stage)]
    for name, history in loaded:
        evals = [e for e in history if "eval_loss" in e]
        assert [e["step"] for e in evals] == [1], name  # one step per stage, evaluated after it
    fig = training_figure(stages, keys=["loss", "loss_reg", "loss_moco"])
    for ax in fig.axes:
        validation = [line for line in ax.get_lines() if line.get_label() == "validation loss"]
        assert len(validation) == 1 and list(validation[0].get_xdata()) == [1.0]
