"""Recipes: parsing, validation, the shipped recipes, freezing groups and the parameter audit."""

from __future__ import annotations

import pytest
import yaml

from astrea_vlm.configuration import get_preset
from astrea_vlm.modeling import AstreaForConditionalGeneration
from astrea_vlm.train.recipe import PAPER_OPTIM, load_recipe
from astrea_vlm.train.stages import STAGES, configure_stage, format_audit, normalise_order, parameter_audit


def _write(tmp_path, body):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("name", ["tiny", "astrea-13b"])
def test_shipped_recipes_parse_with_paper_optimiser_defaults(name):
    recipe = load_recipe(name)
    assert recipe.stages == [["caption"], ["classification"], ["detection"], ["segmentation"]]
    for key in ("weight_decay", "adam_beta1", "adam_beta2", "lr_scheduler_type", "warmup_ratio"):
        assert recipe.optim[key] == PAPER_OPTIM[key]
    # the paper aligns against a pretrained frozen LLM; the tiny recipe's LLM starts random, so it learns too
    assert recipe.align.trainable == (["projector", "bridge", "llm"] if name == "tiny" else ["projector", "bridge"])
    assert set(recipe.instruct.trainable) >= {"router", "adapters", "moco_head"}


def test_stage_orders_of_table_6(tmp_path):
    reverse = load_recipe(_write(tmp_path, {"order": ["segmentation", "detection", "classification", "caption"]}))
    assert reverse.stages[0] == ["segmentation"]
    joint = load_recipe(_write(tmp_path, {"order": ["caption", ["classification", "detection", "segmentation"]]}))
    assert joint.stages == [["caption"], ["classification", "detection", "segmentation"]]


CAP, CLS, DET, SEG = STAGES


@pytest.mark.parametrize("order, stages", [
    ("default", [[CAP], [CLS], [DET], [SEG]]),
    ("reverse", [[SEG], [DET], [CLS], [CAP]]),
    ("cap_all", [[CAP], [CLS, DET, SEG]]),
    ("all", [[CAP, CLS, DET, SEG]]),
    (["caption", "all"], [[CAP], [CLS, DET, SEG]]),
    ([SEG, [CAP, DET], CLS], [[SEG], [CAP, DET], [CLS]]),
])
def test_recipes_read_orders_with_the_grammar_of_the_stages(tmp_path, order, stages):
    """A recipe's `order` means what it means to the stage datasets and the ablations (one grammar)."""
    recipe = load_recipe(_write(tmp_path, {"order": order}))
    assert recipe.order == order  # kept as written (the demo records the recipe's content)
    assert recipe.stages == stages
    assert [list(stage) for stage in normalise_order(order)] == stages


@pytest.mark.parametrize(
    "body, message",
    [
        ({"order": ["caption", "caption"]}, "each expert role once"),
        ({"order": ["caption", "depth"]}, "each expert role once"),
        ({"order": "sideways"}, "unknown order 'sideways'"),
        ({"order": ["caption", "classification", "detection"]}, "each expert role once"),
        ({"align": {"trainable": ["towers"]}}, "align.trainable has unknown group"),
        ({"learning_rate": 1}, "unknown field"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(_write(tmp_path, body))


def test_missing_recipe_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_recipe("no-such-recipe")


def test_configure_stage_and_audit():
    model = AstreaForConditionalGeneration(get_preset("tiny"))
    configure_stage(model, ["projector", "bridge"], ["detection"])
    rows = {name: (trainable, total) for name, trainable, total in parameter_audit(model)}
    assert rows["projector:detection"][0] == rows["projector:detection"][1] > 0
    assert rows["bridge:detection"][0] == rows["bridge:detection"][1] > 0
    for name, (trainable, _) in rows.items():
        if name not in ("projector:detection", "bridge:detection"):
            assert trainable == 0, name
    assert sum(t for t, _ in rows.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = format_audit("stage", parameter_audit(model))
    assert "projector:detection" in text and "<- trains" in text

    configure_stage(model, ["router", "adapters", "moco_head", "llm"], list(model.config.expert_order))
    rows = {name: trainable for name, trainable, _ in parameter_audit(model)}
    assert rows["llm"] > 0 and rows["router"] > 0 and rows["projector:caption"] == 0
    assert all(rows[f"tower:{r}"] == 0 for r in model.config.expert_order)
