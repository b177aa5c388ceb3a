"""``astrea eval`` end to end on a tiny random folder, the routing / training-curve report, and the
lmms-eval adapter (against the real lmms-eval when it is installed, else its local stand-in)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from astrea_vlm.cli import main
from astrea_vlm.configuration import get_preset
from astrea_vlm.create import write_folder
from astrea_vlm.eval.caption_metrics import caption_scores
from astrea_vlm.eval.data import load_records
from astrea_vlm.eval.lmms_adapter import HAS_LMMS_EVAL, AstreaLmms
from astrea_vlm.eval.metrics import exact_match, grounding_accuracy, multiple_choice_accuracy, vqa_accuracy
from astrea_vlm.eval.prompts import OPTION_FORMAT, PROMPTS, build_prompt
from astrea_vlm.eval.report import (
    describe_router,
    load_log_history,
    plot_training_curves,
    router_markdown,
    router_table,
    routing_summary,
    stage_curves,
    write_router_report,
)
from astrea_vlm.eval.report import main as report_main
from astrea_vlm.eval.runner import generate_batch, load_model, run_eval, score_samples

EXPERTS = ["caption", "classification", "detection", "segmentation"]


def _png(path, seed, size=(40, 32)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_folder(get_preset("tiny"), root / "model")
    (root / "data" / "images").mkdir(parents=True)
    for i in range(4):
        _png(root / "data" / "images" / f"{i}.png", i, size=(40 + 8 * i, 32))
    qa = [
        {"id": "v0", "image": "images/0.png", "question": "How many dogs?", "answers": ["2"] * 3 + ["3"] * 7,
         "metric": "vqa", "question_type": "counting"},
        {"id": "v1", "image": "images/1.png", "question": "How many cats?", "answers": ["1"] * 10,
         "metric": "vqa", "question_type": "counting"},
        {"id": "m0", "image": "images/2.png", "question": "Which animal?", "options": ["cat", "dog", "bird"], "answer": "B",
         "metric": "multiple_choice", "question_type": "animal"},
        {"id": "g0", "image": "images/3.png", "question": "the left half", "box": [0.0, 0.0, 0.5, 1.0],
         "metric": "grounding", "question_type": "referring"},
        {"id": "c0", "image": "images/0.png", "captions": ["a noisy picture", "random coloured pixels"],
         "metric": "caption", "question_type": "caption"},
        {"id": "e0", "images": ["images/1.png", "images/2.png"], "question": "Are they the same?", "answer": "no",
         "metric": "exact_match", "question_type": "yes/no"},
    ]
    (root / "data" / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa) + "\n")
    vqa = [{"id": f"q{i}", "image": f"images/{i}.png", "question": f"What is shown {i}?", "answers": ["noise"] * 10} for i in range(4)]
    (root / "data" / "vqa.json").write_text(json.dumps({"questions": vqa}))
    return root


@pytest.fixture(scope="module")
def loaded(workdir):
    return load_model(workdir / "model", device="cpu")


# ------------------------------------------------------------------------------- astrea eval
def test_astrea_eval_cli_end_to_end(workdir, loaded, capsys):
    out = workdir / "out-qa"
    rc = main(["eval", "--model", str(workdir / "model"), "--task", "qa", "--data", str(workdir / "data" / "qa.jsonl"),
               "--batch-size", "4", "--output", str(out), "--max-new-tokens", "6"])
    assert rc == 0
    assert "astrea eval qa:" in capsys.readouterr().out
    for name in ("results.json", "results.md", "router.md", "router.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())

    # Reproducibility: the templates and every sample's exact prompt are recorded.
    assert results["prompts"]["templates"] == PROMPTS and results["prompts"]["option_format"] == OPTION_FORMAT
    records, _ = load_records(workdir / "data" / "qa.jsonl")
    samples = results["samples"]
    assert [s["id"] for s in samples] == [r["id"] for r in records]
    for sample, record in zip(samples, records):
        assert sample["prompt"] == build_prompt(record["metric"], record)
    assert samples[2]["prompt"] == "Which animal?\nA. cat\nB. dog\nC. bird\nAnswer with the option's letter from the given choices directly."
    assert results["settings"]["max_new_tokens"] == 6 and results["settings"]["do_sample"] is False

    # The metrics are those recomputed from the saved predictions, by the runner and by hand.
    assert score_samples("qa", samples) == (results["metrics"], results["per_type"])
    per_type = results["per_type"]
    by_type = {t: [s for s in samples if s["question_type"] == t] for t in per_type}
    assert per_type["counting"]["vqa_accuracy"] == pytest.approx(
        vqa_accuracy([s["prediction"] for s in by_type["counting"]], [r["answers"] for r in records[:2]]))
    assert per_type["animal"]["mc_accuracy"] == multiple_choice_accuracy([samples[2]["prediction"]], ["B"], [records[2]["options"]])
    assert per_type["referring"]["grounding_accuracy"] == grounding_accuracy([samples[3]["prediction"]], [records[3]["box"]])
    assert per_type["yes/no"]["exact_match"] == exact_match([samples[5]["prediction"]], ["no"])
    caption = caption_scores([samples[4]["prediction"]], [records[4]["captions"]])
    assert {k: per_type["caption"][k] for k in caption} == pytest.approx(caption)
    accuracies = [per_type[t][k] for t, k in [("counting", "vqa_accuracy"), ("animal", "mc_accuracy"),
                                               ("referring", "grounding_accuracy"), ("yes/no", "exact_match")]]
    assert results["metrics"]["mean_accuracy"] == pytest.approx(sum(accuracies) / 4)
    assert "| counting | vqa | 2 |" in (out / "results.md").read_text()

    # Router probabilities: one row per image (2 for the two-image sample), in expert_order, equal
    # to what a plain forward pass of the model returns for that sample.
    assert results["expert_order"] == EXPERTS
    config = loaded[0].config
    assert results["router"] == {"input": config.fusion_router_input, "routing": config.fusion_routing, "top_k": config.fusion_top_k,
                                 "text_scale": config.fusion_router_text_scale, "text_selects": config.fusion_router_text_selects}
    assert [len(s["router_probs"]) for s in samples] == [1, 1, 1, 1, 1, 2]
    for sample in samples:
        for row in sample["router_probs"]:
            assert sum(row) == pytest.approx(1.0, abs=1e-5) and sum(p == 0 for p in row) == 1  # top-3 of 4
    model, processor = loaded
    image = Image.open(workdir / "data" / "images" / "3.png").convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": samples[3]["prompt"]}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        expected = model(**processor(images=[image], text=[text], return_tensors="pt")).router_probs
    np.testing.assert_allclose(samples[3]["router_probs"], expected.numpy(), atol=1e-5)


def test_astrea_eval_writes_outside_the_model_folder_by_default(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in (workdir / "model").iterdir())
    rc = main(["eval", "--model", str(workdir / "model"), "--task", "vqa", "--data", str(workdir / "data" / "vqa.json"),
               "--limit", "1", "--max-new-tokens", "2"])
    assert rc == 0
    out = Path("outputs") / "eval" / "model" / "vqa"
    assert (tmp_path / out / "results.json").is_file()
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out}/results.json and results.md"
    assert sorted(p.name for p in (workdir / "model").iterdir()) == before


def test_batching_changes_nothing(workdir, loaded):
    model, processor = loaded
    data = workdir / "data" / "vqa.json"
    one = run_eval(workdir / "model", "vqa", data, output=workdir / "b1", batch_size=1, max_new_tokens=5,
                   model=model, processor=processor, progress=False)
    three = run_eval(workdir / "model", "vqa", data, output=workdir / "b3", batch_size=3, max_new_tokens=5,
                     model=model, processor=processor, progress=False)
    assert [s["prediction"] for s in one["samples"]] == [s["prediction"] for s in three["samples"]]
    for a, b in zip(one["samples"], three["samples"]):
        np.testing.assert_allclose(a["router_probs"], b["router_probs"], atol=1e-5)
    assert len(one["samples"]) == 4 and one["metrics"]["n"] == 4
    limited = run_eval(workdir / "model", "vqa", data, output=workdir / "lim", batch_size=2, max_new_tokens=5, limit=2,
                       model=model, processor=processor, progress=False)
    assert [s["id"] for s in limited["samples"]] == ["q0", "q1"]
    assert limited["samples"][0]["prediction"] == one["samples"][0]["prediction"]


def test_datasets_folder_embedded_images_and_pixel_boxes(workdir, loaded, tmp_path):
    import datasets

    model, processor = loaded
    images = [Image.open(workdir / "data" / "images" / f"{i}.png").convert("RGB") for i in range(2)]
    folder = tmp_path / "caption_ds"
    ds = datasets.Dataset.from_dict({"image": images, "captions": [["a picture"], ["noise", "static"]]})
    ds = ds.cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(folder))
    results = run_eval("m", "caption", folder, output=tmp_path / "cap", batch_size=2, max_new_tokens=4,
                       model=model, processor=processor, progress=False)
    assert results["samples"][0]["prompt"] == PROMPTS["caption"]
    assert set(results["metrics"]) >= {"bleu_4", "rouge_l", "cider_d"}

    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")  # 40 x 32
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    (tmp_path / "g.json").write_text(json.dumps([{"image": uri, "question": "x", "box_pixels": [0, 0, 20, 32]}]))
    grounding = run_eval("m", "grounding", tmp_path / "g.json", output=tmp_path / "g", max_new_tokens=4,
                         model=model, processor=processor, progress=False)
    assert grounding["samples"][0]["references"]["box"] == [0.0, 0.0, 0.5, 1.0]


def test_scoring_of_known_predictions():
    def sample(kind, prediction, references, question_type):
        return {"metric": kind, "prediction": prediction, "references": references, "question_type": question_type}

    answers = {"answers": ["2"] * 3 + ["3"] * 7}
    samples = [
        sample("vqa", "two", answers, "count"),  # 0.9
        sample("vqa", "3", answers, "count"),  # 1.0
        sample("multiple_choice", "(B)", {"options": ["x", "y"], "answer_index": 1}, "mc"),  # 1
        sample("multiple_choice", "x", {"options": ["x", "y"], "answer_index": 1}, "mc"),  # 0
        sample("grounding", "[0, 0, 1000, 600]", {"box": [0, 0, 1, 1]}, "ground"),  # IoU 0.6
        sample("exact_match", "No.", {"answers": ["no"]}, "yn"),  # 1
        sample("caption", "a dog", {"captions": ["a dog"]}, "cap"),
    ]
    metrics, per_type = score_samples("qa", samples)
    assert per_type["count"]["vqa_accuracy"] == pytest.approx(0.95)
    assert per_type["mc"]["mc_accuracy"] == 0.5
    assert per_type["ground"]["grounding_accuracy"] == 1.0 and per_type["ground"]["mean_iou"] == pytest.approx(0.6)
    assert per_type["yn"]["exact_match"] == 1.0
    assert metrics == {"n": 7, "n_types": 5, "mean_accuracy": pytest.approx((0.95 + 0.5 + 1.0 + 1.0) / 4)}
    with pytest.raises(ValueError, match="mixes metrics"):
        score_samples("qa", [sample("vqa", "2", answers, "t"), sample("exact_match", "2", {"answers": ["2"]}, "t")])


def test_bad_inputs_fail_clearly(workdir, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "images/none.png", "question": "q"}]))
    with pytest.raises(ValueError, match="needs 'answers'"):
        run_eval(workdir / "model", "vqa", tmp_path / "bad.json", output=tmp_path / "o", progress=False,
                 model=object(), processor=object())
    with pytest.raises(ValueError, match="unknown task"):
        run_eval(workdir / "model", "ocr", workdir / "data" / "vqa.json", progress=False)
    with pytest.raises(SystemExit):
        main(["eval", "--model", "m", "--task", "ocr", "--data", "d"])
    (tmp_path / "url.json").write_text(json.dumps([{"image": "https://example.com/a.png", "question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="URLs are not fetched"):
        run_eval("m", "exact_match", tmp_path / "url.json", model=object(), processor=object(), progress=False)


# ------------------------------------------------------------------------------------ report
def _results(task, samples):
    return {"task": task, "expert_order": ["a", "b", "c"], "samples": samples}


def test_router_table_means_by_type_and_by_task(tmp_path):
    first = _results("vqa", [
        {"question_type": "count", "router_probs": [[0.5, 0.5, 0.0]]},
        {"question_type": "count", "router_probs": [[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]},  # two images
        {"question_type": "color", "router_probs": [[0.0, 1.0, 0.0]]},
    ])
    second = _results("caption", [{"question_type": "caption", "router_probs": [[0.2, 0.2, 0.6]]},
                                  {"question_type": "caption", "router_probs": None}])
    path = tmp_path / "second.json"
    path.write_text(json.dumps(second))
    table, order, counts = router_table([first, path])
    assert order == ["a", "b", "c"] and counts == {"count": 3, "color": 1, "caption": 1}
    assert table["count"] == pytest.approx({"a": 0.3, "b": 1.0 / 3, "c": 1.1 / 3})  # (0.5+0.1+0.3)/3, ...
    assert table["color"] == {"a": 0.0, "b": 1.0, "c": 0.0}
    by_task, _, task_counts = router_table([first, path], group_by="task")
    assert by_task["vqa"]["b"] == pytest.approx((0.5 + 0.2 + 0.3 + 1.0) / 4) and task_counts == {"vqa": 4, "caption": 1}
    markdown = router_markdown(table, order, counts)
    assert "| count | 3 | 0.3000 | 0.3333 | 0.3667 |" in markdown
    md, png = write_router_report([first, path], tmp_path / "report")
    assert "| color | 1 | 0.0000 | 1.0000 | 0.0000 |" in md.read_text()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    with pytest.raises(ValueError, match="different expert orders"):
        router_table([first, {**second, "expert_order": ["x", "y", "z"]}])


def test_routing_summary_and_the_report_say_how_far_routing_follows_the_task(tmp_path):
    table = {"count": {"a": 0.6, "b": 0.4, "c": 0.0}, "color": {"a": 0.1, "b": 0.4, "c": 0.5}, "box": {"a": 0.5, "b": 0.5, "c": 0.0}}
    counts = {"count": 2, "color": 1, "box": 1}
    summary = routing_summary(table, ["a", "b", "c"], counts)
    assert summary["tv_max"] == pytest.approx(0.5) and summary["tv_pair"] == ["box", "color"]  # 0.5*(0.4+0.1+0.5); count-color also 0.5
    assert summary["expert_mean"] == pytest.approx({"a": (1.2 + 0.1 + 0.5) / 4, "b": (0.8 + 0.4 + 0.5) / 4, "c": 0.5 / 4})
    markdown = router_markdown(table, ["a", "b", "c"], counts, expected={"color": ["c"], "box": ["b", "c"]})
    assert "| color | 1 | 0.1000 | 0.4000 | 0.5000 | c | c | yes |" in markdown
    assert "| box | 1 | 0.5000 | 0.5000 | 0.0000 | a | b / c | no |" in markdown  # a tie goes to the first expert
    assert "| count | 2 | 0.6000 | 0.4000 | 0.0000 | a | - | - |" in markdown
    assert describe_router({"input": "visual+text", "routing": "image", "top_k": 3}, "after") == (
        "The router reads the experts' projected tokens and the mean embedding of the text before the image "
        "(the prompt comes first: this is the question); it routes each image to its top-3 experts.")
    assert "each visual token" in describe_router({"input": "visual", "routing": "token", "top_k": 2})
    assert describe_router({"input": "visual+text", "routing": "image", "top_k": 3, "text_scale": 0.1, "text_selects": False}) == (
        "The router reads the experts' projected tokens and the mean embedding of the text before the image, "
        "the text's part scaled by 0.1; the image alone chooses the top-3 experts for each image, and the text weighs them.")
    results = _results("qa", [{"question_type": "count", "router_probs": [[0.6, 0.4, 0.0]]}])
    results["router"], results["settings"] = {"input": "visual+text", "routing": "image", "top_k": 2}, {"image_position": "before"}
    md, _ = write_router_report([results], tmp_path, expected={"count": ["b"]})
    text = md.read_text()
    assert "only the chat's opening, not the question" in text and "| count | 1 | 0.6000 | 0.4000 | 0.0000 | a | b | no |" in text
    assert "Largest total-variation distance between two groups: 0.000" in text


def _stage_logs(tmp_path):
    one = tmp_path / "align-1-caption"
    one.mkdir()
    (one / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"step": 5, "loss": 2.0, "learning_rate": 1e-3, "epoch": 0.5},
        {"step": 10, "loss": 1.5, "learning_rate": 5e-4, "epoch": 1.0},
        {"step": 10, "train_runtime": 3.0, "train_loss": 1.75},
    ]}))
    two = tmp_path / "align-2-classification"
    for step, loss in [(4, 9.0), (8, 1.2)]:  # the last checkpoint is read
        (two / f"checkpoint-{step}").mkdir(parents=True)
        history = [{"step": 4, "loss": 1.4, "router/entropy": 0.9}] + ([{"step": 8, "loss": loss}] if step == 8 else [])
        (two / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    three = tmp_path / "instruct"
    three.mkdir()
    (three / "stage_done.json").write_text(json.dumps({"stage": "instruct", "log_history": [{"step": 2, "loss": 1.0, "mmep": 55.0}]}))
    return [one, two, three]


def test_training_curves_follow_the_stages(tmp_path):
    stages = _stage_logs(tmp_path)
    loaded = [entry for stage in stages for entry in load_log_history(stage)]
    assert [name for name, _ in loaded] == ["align-1-caption", "align-2-classification", "instruct"]
    curves, spans = stage_curves(loaded)
    assert spans == [("align-1-caption", 0.0, 10.0), ("align-2-classification", 10.0, 18.0), ("instruct", 18.0, 20.0)]
    assert curves["loss"] == [(5.0, 2.0, 0), (10.0, 1.5, 0), (14.0, 1.4, 1), (18.0, 1.2, 1), (20.0, 1.0, 2)]
    assert set(curves) == {"loss", "learning_rate", "router/entropy", "mmep"}  # no bookkeeping keys
    png = plot_training_curves(stages, tmp_path / "curves.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 400
    summary = tmp_path / "alignment_summary.json"
    summary.write_text(json.dumps([{"stage": "s1", "log_history": [{"step": 1, "loss": 3.0}]},
                                   {"stage": "s2", "log_history": [{"step": 1, "loss": 2.0}]}]))
    assert [name for name, _ in load_log_history(summary)] == ["s1", "s2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no trainer_state.json"):
        load_log_history(tmp_path / "empty")


def test_report_command_line(tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps(_results("vqa", [{"question_type": "t", "router_probs": [[0.2, 0.3, 0.5]]}])))
    stages = _stage_logs(tmp_path)
    assert report_main(["--results", str(results), "--stages", *map(str, stages), "--output", str(tmp_path / "rep")]) == 0
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"router.md", "router.png", "training_curves.png"}


# ------------------------------------------------------------------------------- lmms-eval
class _Request:
    """What lmms-eval hands a model: an object whose ``args`` is the request tuple."""

    def __init__(self, *args):
        self.args = args


def _messages(doc):
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["text"]}]}]


def test_lmms_adapter_follows_the_model_api(workdir, loaded):
    model_dir = workdir / "model"
    adapter = AstreaLmms.create_from_arg_string(f"pretrained={model_dir},max_new_tokens=5", {"batch_size": 2, "device": "cpu"})
    assert adapter.is_simple is False and adapter.rank == 0 and adapter.world_size == 1 and adapter.batch_size == 2
    if HAS_LMMS_EVAL:
        from lmms_eval.api.model import lmms

        assert isinstance(adapter, lmms)
    paths = [workdir / "data" / "images" / f"{i}.png" for i in range(3)]
    docs = [{"image": Image.open(p).convert("RGB"), "text": f"Question {i}?"} for i, p in enumerate(paths)]
    docs[2]["image"] = str(paths[2])  # a path works too
    adapter.task_dict = {"toy": {"test": docs}}
    greedy = {"max_new_tokens": 5, "temperature": 0}
    requests = [_Request(f"ctx{i}", _messages, dict(greedy), i, "toy", "test") for i in range(3)]
    requests.insert(1, _Request("ctx", _messages, {"max_new_tokens": 3}, 0, "toy", "test"))  # another kwargs group
    answers = adapter.generate_until(requests)

    model, processor = loaded
    images = [[Image.open(p).convert("RGB")] for p in paths]
    expected, _ = generate_batch(model, processor, [d["text"] for d in docs], images, 5)
    assert [answers[0], answers[2], answers[3]] == expected  # order of the requests kept
    assert answers[1] == generate_batch(model, processor, [docs[0]["text"]], images[:1], 3)[0][0]
    stop = expected[0][2:4]
    if stop.strip():
        cut = adapter.generate_until([_Request("c", _messages, {"max_new_tokens": 5, "until": [stop]}, 0, "toy", "test")])
        assert cut == [expected[0].split(stop, 1)[0]]

    # loglikelihood: the sum of the continuation's token log-probabilities, which is
    # -(number of continuation tokens) * the model's own loss on them.
    continuation = "cat"
    [(logprob, is_greedy)] = adapter.loglikelihood([_Request("What is it?", continuation, lambda d: [d["image"]], 0, "toy", "test")])
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                                         tokenize=False, add_generation_prompt=True)
    inputs = processor(images=images[0], text=[text], return_tensors="pt")
    target = processor.tokenizer(" " + continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    input_ids = torch.cat([inputs["input_ids"], target], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -target.shape[1]:] = target
    with torch.no_grad():
        out = model(**{**inputs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, labels=labels)
    assert logprob == pytest.approx(-float(out.loss) * target.shape[1], rel=1e-4)
    assert isinstance(is_greedy, bool) and logprob < 0
    with pytest.raises(NotImplementedError):
        adapter.generate_until_multi_round(requests)


@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (pip install 'astrea-vlm[lmms]')")
def test_lmms_eval_finds_astrea_through_the_entry_point():
    from lmms_eval.models import get_model

    assert get_model("astrea") is AstreaLmms


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed")
def test_lmms_eval_command_on_a_local_task(workdir, tmp_path):
    records = [{"image": str(workdir / "data" / "images" / f"{i}.png"), "question": f"What is {i}?", "answers": ["noise"] * 10}
               for i in range(3)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "utils.py").write_text(
        "from PIL import Image\nfrom astrea_vlm.eval.metrics import vqa_soft_accuracy\nfrom astrea_vlm.eval.prompts import PROMPTS\n"
        "def doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return PROMPTS['vqa'].format(question=doc['question'])\n"
        "def process_results(doc, results):\n    return {'vqa_accuracy': vqa_soft_accuracy(results[0], doc['answers'])}\n"
    )
    (tmp_path / "astrea_toy.yaml").write_text(
        "task: astrea_toy_vqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\ndoc_to_text: !function utils.doc_to_text\ndoc_to_target: answers\n"
        "generation_kwargs:\n  max_new_tokens: 6\nprocess_results: !function utils.process_results\n"
        "metric_list:\n  - metric: vqa_accuracy\n    aggregation: mean\n    higher_is_better: true\n"
    )
    command = [sys.executable, "-m", "lmms_eval", "--model", "astrea", "--model_args", f"pretrained={workdir / 'model'}",
               "--tasks", "astrea_toy_vqa", "--include_path", str(tmp_path), "--batch_size", "2", "--device", "cpu",
               "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "astrea_toy_vqa" in done.stdout and "vqa_accuracy" in done.stdout
    logged = [json.loads(line) for path in (tmp_path / "out").rglob("*samples*.jsonl") for line in path.read_text().splitlines()]
    assert len(logged) == 3
