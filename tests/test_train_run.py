"""`astrea align` / `astrea instruct` end to end on the tiny recipe: stages, feature cache, resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from astrea_vlm.train.recipe import load_recipe
from astrea_vlm.train.run import run_align, run_instruct
from astrea_vlm.train.stages import cache_plan, configure_stage

ROLES = ["caption", "classification", "detection", "segmentation"]


def _recipe(tmp_path, **extra):
    body = {
        "model": {"preset": "tiny", "seed": 0},
        "data": {"source": "synthetic", "train_size": 8, "image_size": 48, "seed": 0, "max_objects": 3},
        "optim": {"per_device_train_batch_size": 4},
        "align": {"max_steps": 2, "learning_rate": 2.0e-3, "trainable": ["projector", "bridge"]},
        "instruct": {"max_steps": 2, "learning_rate": 1.0e-3, "trainable": ["router", "adapters", "moco_head", "llm"]},
        "output_dir": str(tmp_path / "out"),
        "save_steps": 1,
        "logging_steps": 1,
        "cache": True,
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_recipe(path)


def test_cache_plan_reads_frozen_experts_from_the_cache():
    from astrea_vlm.modeling import AstreaForConditionalGeneration

    model = AstreaForConditionalGeneration(recipe_model_config())
    model.model.set_alignment_stage("detection")
    configure_stage(model, ["projector", "bridge"], ["detection"])
    # stage 3: the earlier experts' projectors are frozen -> their C_i; detection's projector trains -> tower tokens
    assert cache_plan(model) == {"tower": ["detection"], "projected": ["caption", "classification"]}
    model.model.set_alignment_stage(None)
    configure_stage(model, ["router", "adapters", "llm"], ROLES)
    assert cache_plan(model) == {"tower": [], "projected": ROLES}
    model.model.towers["caption"].requires_grad_(True)  # a tower that trains is never cached
    assert cache_plan(model)["projected"] == ROLES[1:]


def test_instruct_without_alignment_aligns_first_then_resume_skips_done_stages(tmp_path):
    from astrea_vlm.modeling import AstreaForConditionalGeneration

    recipe = _recipe(tmp_path)
    lines: list[str] = []
    final = run_instruct(recipe, log=lines.append)
    out = tmp_path / "out"
    assert any("running the alignment stages first" in line for line in lines)
    stages = sorted(p.name for p in out.glob("align-*"))
    assert stages == ["align-1-caption", "align-2-classification", "align-3-detection", "align-4-segmentation"]
    # every stage logged its cache use; stage 4 read three projected experts and one tower from it
    assert any("feature cache (projected: caption, classification, detection)" in line for line in lines)
    assert any("feature cache (tower: segmentation)" in line for line in lines)
    assert (out / "feature_cache").is_dir()

    # stage k's projector changed in stage k only; towers never changed
    start = AstreaForConditionalGeneration(recipe_model_config()).state_dict()
    weights = [load_file(str(out / name / "weights.safetensors")) for name in stages]
    for k, role in enumerate(ROLES):
        key = f"model.projectors.{role}.layers.0.weight"
        before = start[key] if k == 0 else weights[k - 1][key]
        assert not torch.equal(weights[k][key], before), f"stage {k + 1} did not train the {role} projector"
        for later in weights[k + 1:]:
            assert torch.equal(later[key], weights[k][key]), f"the {role} projector changed after its stage"
    for key in start:
        if ".towers." in key:
            assert torch.equal(weights[-1][key], start[key]), key

    final_model = AstreaForConditionalGeneration.from_pretrained(final)
    summary = json.loads((final / "instruct_summary.json").read_text())
    assert summary["stage"] == "instruct" and any("loss_moco" in entry for entry in summary["log_history"])
    for key, value in final_model.state_dict().items():
        if ".towers." in key and key in start:
            assert torch.equal(value, start[key]), key

    again: list[str] = []
    aligned = run_align(recipe, resume=True, log=again.append)
    assert sum("done earlier" in line for line in again) == 4
    reloaded = AstreaForConditionalGeneration.from_pretrained(aligned).state_dict()
    for key, value in weights[-1].items():
        assert torch.equal(reloaded[key], value), key
    # Another recipe into the same folder: a finished stage is never silently reused for it.
    other = _recipe(tmp_path, align={"max_steps": 2, "learning_rate": 1.0e-3, "trainable": ["projector", "bridge"]})
    with pytest.raises(ValueError, match="other settings than this run's; use a new output folder"):
        run_align(other, log=lambda *a: None)
    assert json.loads((out / "align-1-caption" / "stage_done.json").read_text())["fingerprint"]


def recipe_model_config():
    from astrea_vlm.configuration import get_preset

    torch.manual_seed(0)
    return get_preset("tiny")


def test_instruct_with_a_missing_aligned_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `astrea align"):
        run_instruct(_recipe(tmp_path), init_from=tmp_path / "nowhere")


@pytest.mark.parametrize("order, stages", [
    ("reverse", [["segmentation"], ["detection"], ["classification"], ["caption"]]),
    (["caption", "all"], [["caption"], ["classification", "detection", "segmentation"]]),
])
def test_astrea_align_trains_the_orders_the_ablations_use(tmp_path, order, stages):
    """One order grammar for recipes and ablations: `order: reverse` and `[caption, all]` train through `astrea align`."""
    from astrea_vlm.cli import main

    _recipe(tmp_path, order=order, cache=False, data={"source": "synthetic", "train_size": 4, "image_size": 48, "max_objects": 3},
            align={"max_steps": 1, "learning_rate": 2.0e-3, "trainable": ["projector", "bridge"]})
    out = tmp_path / "run"
    assert main(["align", "--recipe", str(tmp_path / "recipe.yaml"), "--output", str(out)]) == 0
    summaries = json.loads((out / "aligned" / "alignment_summary.json").read_text())
    assert [s["roles"] for s in summaries] == stages
    assert [s["stage"] for s in summaries] == [f"align-{k + 1}-{'+'.join(roles)}" for k, roles in enumerate(stages)]
    # stage 1 trained the first expert of the order: its projector moved, the last expert's did not yet
    first, last = stages[0][0], stages[-1][-1]
    start = _initial_state()
    stage_one = load_file(str(out / summaries[0]["stage"] / "weights.safetensors"))
    assert not torch.equal(stage_one[f"model.projectors.{first}.layers.0.weight"], start[f"model.projectors.{first}.layers.0.weight"])
    assert torch.equal(stage_one[f"model.projectors.{last}.layers.0.weight"], start[f"model.projectors.{last}.layers.0.weight"])


def _initial_state():
    from astrea_vlm.modeling import AstreaForConditionalGeneration

    return AstreaForConditionalGeneration(recipe_model_config()).state_dict()
