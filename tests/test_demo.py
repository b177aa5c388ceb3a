"""`astrea demo` / `astrea ablate`: the pieces on hand-made cases, the pipeline end to end at toy size.

The full demo (the README's first command, ~10 min) is the `slow` test at the bottom: it asserts
that the trained model beats the majority baseline on every question type of the test split.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from astrea_vlm.demo import (
    DemoSettings,
    ablation_comparison_markdown,
    ablation_table,
    ablation_variants,
    majority_answers,
    reference_variant,
    run_demo,
    score_constant,
    write_eval_split,
)
from astrea_vlm.eval.runner import PRIMARY
from astrea_vlm.train import synthetic as syn
from astrea_vlm.train.recipe import load_recipe
from astrea_vlm.train.warmup import CATEGORIES, COLOURS, SHAPES, TAGS, warm_up_towers, warmup_targets


@pytest.fixture(scope="module")
def scenes():
    return syn.make_split("train", 12, seed=3, image_size=48)


def test_warmup_targets_follow_the_annotations(scenes):
    scene = scenes[0]
    caption = warmup_targets(scene, "caption", 4)
    assert caption.shape == (len(CATEGORIES),)
    assert {CATEGORIES[i] for i in caption.nonzero().flatten().tolist()} == {o.category for o in scene.objects}
    tags = warmup_targets(scene, "classification", 4)
    assert [TAGS[i] for i in tags.nonzero().flatten().tolist()] == sorted(scene.tags, key=TAGS.index)
    detection = warmup_targets(scene, "detection", 4).view(4, 4, -1)
    for obj in scene.objects:  # each object's box centre marks its cell with its shape and colour
        x1, y1, x2, y2 = obj.box
        cell = detection[min(3, int((y1 + y2) / 2 * 4)), min(3, int((x1 + x2) / 2 * 4))]
        assert cell[0] == 1 and cell[1 + SHAPES.index(obj.shape)] == 1 and cell[1 + len(SHAPES) + COLOURS.index(obj.colour)] == 1
    assert detection[..., 0].sum() <= len(scene.objects)
    segmentation = warmup_targets(scene, "segmentation", 4).view(4, 4, -1)
    union = sum(o.mask.astype(float) for o in scene.objects).clip(0, 1)
    assert float(segmentation[..., 0].mean()) == pytest.approx(float(union.mean()), abs=0.02)  # equal cells of 12 px
    with pytest.raises(ValueError, match="no warm-up task"):
        warmup_targets(scene, "ocr", 4)


def test_warm_up_trains_towers_only_and_freezes_them_again(scenes, tiny_model):
    from astrea_vlm.processing import build_processor

    torch.manual_seed(0)
    model = type(tiny_model)(tiny_model.config)
    processor = build_processor(model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = warm_up_towers(model, processor, scenes, steps=12, batch_size=8, progress=False)
    after = model.state_dict()
    for role in model.config.expert_order:
        assert report[role]["loss_last"] < report[role]["loss_first"], role
        tower_keys = [k for k in before if k.startswith(f"model.towers.{role}.") and before[k].is_floating_point()]
        assert any(not torch.equal(before[k], after[k]) for k in tower_keys), f"{role} tower did not change"
        assert not any(p.requires_grad for p in model.model.towers[role].parameters())
    for key in before:
        if ".towers." not in key:
            assert torch.equal(before[key], after[key]), key


def test_warm_up_steps_per_expert(scenes, tiny_model):
    from astrea_vlm.processing import build_processor

    torch.manual_seed(0)
    model = type(tiny_model)(tiny_model.config)
    processor = build_processor(model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = warm_up_towers(model, processor, scenes, steps={"caption": 4, "segmentation": 0}, batch_size=8, progress=False)
    assert set(report) == {"caption"}  # left out or 0: not warmed up
    after = model.state_dict()
    changed = {k.split(".")[2] for k in before if ".towers." in k and not torch.equal(before[k], after[k])}
    assert changed == {"caption"}
    with pytest.raises(ValueError, match=r"unknown expert\(s\) \['ocr'\]"):
        warm_up_towers(model, processor, scenes, steps={"ocr": 3}, progress=False)


def test_majority_answers_come_from_training_counts(scenes):
    answers = majority_answers(scenes)
    for qtype, counter in syn.answer_distribution(scenes).items():
        if qtype in ("grounding",):
            continue
        top = max(counter.values())
        assert counter[answers[qtype]] == top and answers[qtype] == min(a for a, n in counter.items() if n == top)
    boxes = [q["box"] for q in syn.qa_records(scenes, "grounding")]
    medians = [sorted(b[i] for b in boxes)[len(boxes) // 2] if len(boxes) % 2 else
               sum(sorted(b[i] for b in boxes)[len(boxes) // 2 - 1: len(boxes) // 2 + 1]) / 2 for i in range(4)]
    from astrea_vlm.train.data import format_box

    assert answers["grounding"] == format_box(medians)


def test_constant_answers_are_scored_like_astrea_eval(scenes, tmp_path):
    records = write_eval_split(scenes[:4], tmp_path)
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 4 * len(syn.question_types) and (tmp_path / lines[0]["image"]).is_file()
    truth = {r["question_type"]: r["answer"] for r in lines if r["image_id"] == scenes[0].image_id}
    scored = score_constant(records, truth)["per_type"]
    # scene 0's own answers: right on scene 0 at least, so each accuracy is >= 1/4; a wrong constant scores 0
    assert scored["existence"]["exact_match"] >= 0.25
    assert score_constant(records, {**truth, "existence": "maybe"})["per_type"]["existence"]["exact_match"] == 0.0
    assert scored["caption"]["cider_d"] > 0


def test_ablation_variants_and_table():
    recipe = load_recipe("tiny")
    topk = ablation_variants("topk", recipe)
    assert [v["config"].get("fusion_top_k") for v in topk.values()] == [1, 2, None, 4]  # top-3 is the recipe itself
    assert recipe.model.get("overrides", {}).get("fusion_top_k", 3) == 3
    residual = ablation_variants("residual", recipe)["without residual"]["recipe"]["align"]
    assert "bridge" not in residual.trainable and "projector" in residual.trainable
    demo = load_recipe("demo")
    assert "bridge" in demo.instruct.trainable  # the demo's bridges also train in instruction tuning...
    without = ablation_variants("residual", demo)["without residual"]["recipe"]
    assert "bridge" not in without["align"].trainable and "bridge" not in without["instruct"].trainable  # ...but not here
    assert without["instruct"].trainable == [g for g in demo.instruct.trainable if g != "bridge"]
    assert ablation_variants("moco", recipe)["without MoCo"]["recipe"]["instruct"].use_moco is False
    orders = ablation_variants("order", recipe)
    assert orders["cap>all"]["recipe"]["order"][1] == ["classification", "detection", "segmentation"]
    assert orders["cap>cls>det>seg"]["recipe"] == {}  # the recipe's own order: the shared baseline run
    reversed_recipe = dataclasses.replace(recipe, order=orders["seg>det>cls>cap"]["recipe"]["order"])
    assert ablation_variants("order", reversed_recipe)["cap>cls>det>seg"]["recipe"]["order"][0] == "caption"
    assert reference_variant(orders) == "cap>cls>det>seg" and reference_variant(ablation_variants("order", reversed_recipe)) == "seg>det>cls>cap"
    cap_all = dataclasses.replace(recipe, order=orders["cap>all"]["recipe"]["order"])
    assert reference_variant(ablation_variants("order", cap_all)) == "cap>all"
    assert reference_variant({"x": {"config": {"a": 1}, "recipe": {}}, "y": {"config": {"a": 2}, "recipe": {}}}) == "x"  # none unchanged
    assert reference_variant(ablation_variants("topk", recipe)) == "top-3"
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_variants("dropout", recipe)
    table = ablation_table({"a": [{"counting": 0.5, "caption": 1.0}, {"counting": 0.7, "caption": 1.2}]})
    assert "| a | 0.600 ± 0.141 | 0.600 ± 0.141 | 1.100 ± 0.141 |" in table
    comparison = ablation_comparison_markdown({"b": {"counting": {"difference": 0.1, "low": 0.02, "high": 0.2, "n": 9},
                                                     "colour": {"difference": -0.05, "low": -0.1, "high": 0.01, "n": 9}}}, "a")
    assert comparison.splitlines()[0] == "| variant - a | counting | colour |"
    assert comparison.splitlines()[2] == "| b | **+0.100 [+0.020, +0.200]** | -0.050 [-0.100, +0.010] |"  # bold: interval excludes 0


def test_demo_pipeline_end_to_end_at_toy_size(tmp_path, monkeypatch):
    recipe = load_recipe("tiny")
    settings = DemoSettings(  # astrea eval's defaults (batch size; max_new_tokens from the folder), as the demo's
        output=str(tmp_path / "demo"), test_size=3, warmup_steps=3,
        recipe_overrides={
            "data": {**recipe.data, "train_size": 8, "image_size": 48, "max_objects": 3, "image_position": "after"},
            "align": dataclasses.replace(recipe.align, max_steps=1),
            "instruct": dataclasses.replace(recipe.instruct, max_steps=2),
            "save_steps": 100,
        },
    )
    lines: list[str] = []
    summary = run_demo(settings, log=lines.append)
    out = tmp_path / "demo"
    assert set(summary["table"]) == {"majority", "untrained", "astrea"}
    assert set(summary["table"]["astrea"]) == set(syn.question_types)
    for name in ("report.md", "loss.png", "router.png", "summary.json", "untrained/config.json"):
        assert (out / name).exists(), name
    assert (out / "train" / "final" / "config.json").is_file()
    report = (out / "report.md").read_text()
    assert "| counting |" in report and "![routing](router.png)" in report
    assert "Fig. 2 reading" in report and "The router reads" in report and "tanh(gate)" in report
    routing = summary["routing"]
    assert set(routing["expert_mean"]) == set(recipe_roles := ["caption", "classification", "detection", "segmentation"])
    assert sum(routing["expert_mean"].values()) == pytest.approx(1.0) and 0.0 <= routing["tv_max"] <= 1.0
    assert set(routing["tanh_gates"]) == set(recipe_roles[1:])  # one bridge per expert after the first
    assert set(summary["versus_majority"]) == set(syn.question_types)
    for qtype, row in summary["versus_majority"].items():
        assert row["low"] <= row["difference"] <= row["high"] and row["n"] == 3, qtype
        # the table and the interval agree on the difference (captions too: corpus CIDEr-D is a mean)
        assert row["difference"] == pytest.approx(summary["table"]["astrea"][qtype] - summary["table"]["majority"][qtype])
    assert "astrea clearly better" in report
    assert summary["roundtrip"]["truth"] and isinstance(summary["roundtrip"]["answer"], str)
    assert any("pipeline('image-text-to-text'" in line for line in lines)
    # The trained folder's card records the report's test scores (and the validation split's) as its
    # model-index; the untrained baseline's card records its own.
    from huggingface_hub import ModelCard

    for folder, column in ((out / "train" / "final", "astrea"), (out / "untrained", "untrained")):
        index = ModelCard.load(folder / "README.md").data.to_dict()["model-index"][0]
        test = {m["name"].split(" (")[0]: m["value"] for r in index["results"] if "test split" in r["dataset"]["name"]
                for m in r["metrics"]}
        assert {k: v for k, v in test.items() if k in summary["table"][column]} == {
            k: round(v, 4) for k, v in summary["table"][column].items()}, folder
    final_card = ModelCard.load(out / "train" / "final" / "README.md")
    assert any("validation split" in r.dataset_name for r in final_card.data.eval_results)
    assert "Written by `astrea demo`" in (out / "untrained" / "README.md").read_text()

    # The README's command on the demo's folder, as written (no layout, batch or length flag),
    # reproduces the report exactly: every answer, so every score.
    from astrea_vlm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "demo/train/final", "--task", "qa", "--data", "demo/data/test/records.jsonl"]) == 0
    again = json.loads((tmp_path / "outputs" / "eval" / "demo" / "train" / "final" / "qa" / "results.json").read_text())
    own = json.loads((out / "eval" / "astrea" / "results.json").read_text())
    assert again["settings"]["image_position"] == own["settings"]["image_position"] == "after"
    assert [s["prediction"] for s in again["samples"]] == [s["prediction"] for s in own["samples"]]
    assert again["per_type"] == own["per_type"]
    assert {qtype: values[PRIMARY[values["metric"]]] for qtype, values in again["per_type"].items()} == summary["table"]["astrea"]


def test_ablation_runs_every_variant_and_writes_its_table(tmp_path, monkeypatch):
    from astrea_vlm.demo import run_ablation

    recipe = load_recipe("tiny")
    base = DemoSettings(
        recipe="tiny", output=str(tmp_path), test_size=2, warmup_steps=0, eval_batch_size=8, max_new_tokens=4,
        recipe_overrides={
            "data": {**recipe.data, "train_size": 4, "image_size": 48, "max_objects": 3},
            "align": dataclasses.replace(recipe.align, max_steps=1),
            "instruct": dataclasses.replace(recipe.instruct, max_steps=1),
            "save_steps": 100,
        },
    )
    result = run_ablation("moco", seeds=1, base=base, log=lambda *a: None)
    assert set(result["runs"]) == {"with MoCo", "without MoCo"}
    root = tmp_path / "ablation-moco"
    table = (root / "ablation.md").read_text()
    assert "| with MoCo |" in table and "| without MoCo |" in table and (root / "ablation.json").is_file()
    # each variant against the unchanged recipe, paired on the same questions
    assert result["reference"] == "with MoCo" and set(result["versus_reference"]) == {"without MoCo"}
    versus = result["versus_reference"]["without MoCo"]
    assert set(versus) == set(result["runs"]["with MoCo"][0])
    for qtype, row in versus.items():
        if qtype != "caption":  # the paired difference of means is the difference of the two tables' accuracies
            assert row["difference"] == pytest.approx(result["runs"]["without MoCo"][0][qtype] - result["runs"]["with MoCo"][0][qtype])
        assert row["low"] <= row["difference"] <= row["high"] and row["n"] == 2
    assert "| variant - with MoCo |" in table and result["comparison"] in table
    # the variant really changed the training: only the MoCo run logged a MoCo loss
    folders = {"with": tmp_path / "ablation-baseline" / "seed-0", "without": root / "without_MoCo" / "seed-0"}
    logs = {name: json.loads((folder / "train" / "instruct" / "stage_done.json").read_text())["log_history"]
            for name, folder in folders.items()}
    assert any("loss_moco" in e for e in logs["with"]) and not any("loss_moco" in e for e in logs["without"])

    # The unchanged recipe ("with MoCo" here, "with residual" there) is trained once per seed and shared
    baseline = folders["with"] / "summary.json"
    stamp = baseline.stat().st_mtime_ns
    lines: list[str] = []
    residual = run_ablation("residual", seeds=1, base=base, log=lines.append)
    assert baseline.stat().st_mtime_ns == stamp and any("reusing it" in line for line in lines)
    assert residual["runs"]["with residual"] == result["runs"]["with MoCo"]
    # a finished variant run is reused too: rerunning the ablation trains nothing
    variant = folders["without"] / "summary.json"
    stamp_variant = variant.stat().st_mtime_ns
    lines.clear()
    again = run_ablation("moco", seeds=1, base=base, log=lines.append)
    assert again["runs"] == result["runs"] and variant.stat().st_mtime_ns == stamp_variant
    assert sum("reusing it" in line for line in lines) == 2
    # ...but not when the settings differ: another test size is another run
    other = dataclasses.replace(base, test_size=3)
    from astrea_vlm.demo import _finished_run

    assert _finished_run(dataclasses.replace(base, output=str(folders["with"]), seed=0, skip_untrained_eval=True, roundtrip=False)) is not None
    assert _finished_run(dataclasses.replace(other, output=str(folders["with"]), seed=0, skip_untrained_eval=True, roundtrip=False)) is None

    # another thread count is another run in its own folder: it leaves the shared default runs alone
    import astrea_vlm.demo as demo_module

    trained: list[str] = []

    def record_and_stop(settings, log=print):
        trained.append(settings.output)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "run_demo", record_and_stop)
    with pytest.raises(KeyboardInterrupt):
        run_ablation("moco", seeds=1, base=dataclasses.replace(base, threads=1), log=lambda *a: None)
    assert trained == [str(tmp_path / "ablation-baseline" / "seed-0-threads-1")]
    assert baseline.stat().st_mtime_ns == stamp and _finished_run(
        dataclasses.replace(base, output=str(folders["with"]), seed=0, skip_untrained_eval=True, roundtrip=False)) is not None


@pytest.mark.slow
@pytest.mark.xfail(reason="issue E: on seed 0 every type is above the majority baseline, captions only narrowly "
                          "(README 'The demo'); another machine's float order may tip a narrow margin", strict=False)
def test_full_demo_beats_the_majority_baseline_on_every_question_type(tmp_path):
    summary = run_demo(DemoSettings(output=str(tmp_path / "demo")))
    # clearly: the 95% paired-bootstrap interval of astrea - majority lies above 0 for every type
    for qtype, row in summary["versus_majority"].items():
        assert row["low"] > 0, (qtype, row)
    assert summary["timings_s"]["total"] < 600


def test_demo_names_the_extra_when_training_packages_are_missing(monkeypatch, capsys):
    import importlib.util

    from astrea_vlm.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(ImportError, match=r'needs trl: install them with `pip install -e "\.\[demo\]"`'):
        run_demo(DemoSettings())
    assert main(["demo"]) == 2 and "needs trl" in capsys.readouterr().err
