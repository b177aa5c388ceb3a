"""``astrea demo``: the whole method on a tiny Astrea, offline, on a CPU, in minutes.

1. **Data** -- the synthetic world (:mod:`astrea_vlm.train.synthetic`): train, validation and test
   splits drawn from different seeds; the test split is written to disk as an ``astrea eval``
   dataset (PNG images + ``test.jsonl``).
2. **Model** -- the recipe's tiny Astrea, its four toy towers first warmed up on their own
   specialities (:mod:`astrea_vlm.train.warmup`) so that the experts really differ, then frozen.
   With ``model.llm: world`` (the ``demo`` recipe) its LLM and tokenizer are the shipped *world
   LLM* (:mod:`astrea_vlm.train.pretrain_llm`), the demo's analogue of the paper's pretrained LLM.
   This model is saved as the *untrained* baseline (``untrained/``): pretrained LLM, warmed-up
   towers, random projectors, bridges and fusion.
3. **Progressive pre-alignment** -- ``run_align``: one stage per expert, coarse to fine, with
   cumulative labels, the residual bridges, and the feature cache.
4. **Instruction tuning** -- ``run_instruct``: MoE fusion with momentum contrast; writes the
   Hub-ready ``final/`` folder.
5. **Evaluation** on the test split against the majority answer per question type (taken from the
   *training* split) and the untrained model; nothing is tuned on the test split.
6. **Report** (``report.md``, ``loss.png``, ``router.png``, ``router.md``) and a **round trip**: ``final/`` is
   reloaded through ``pipeline("image-text-to-text", trust_remote_code=True)`` and asked about a
   freshly generated image.

Every setting comes from a recipe (default: the shipped ``demo`` recipe) and the few demo knobs of
:class:`DemoSettings`; ``astrea ablate`` reruns the same pipeline with variants.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .eval.runner import DEFAULT_BATCH_SIZE
from .train.reproducibility import DEFAULT_THREADS


#: The paper's Fig. 2 reading for the demo's question types: the experts it expects to lead
#: (caption -> SigLIP, tags/colour -> RAM++, grounding/position -> Grounding-DINO/SAM2); the paper
#: reads nothing for counting, existence and multiple choice.
FIG2_READING = {"caption": ("caption",), "colour": ("classification",), "grounding": ("detection", "segmentation"),
                "relative_position": ("detection", "segmentation")}


@dataclasses.dataclass
class DemoSettings:
    """The demo's own knobs (everything else is the recipe's)."""

    recipe: str = "demo"
    output: str = "outputs/demo"
    seed: int = 0
    test_size: int = 128  # scenes in the test and in the validation split (7 questions each)
    # Tower warm-up steps: one number for all, or per expert. The caption and segmentation towers
    # are cheap per step and gain from a longer warm-up; the other two cost 2-3x as much a step
    # (README, "Tower warm-up per expert").
    warmup_steps: int | dict[str, int] = dataclasses.field(
        default_factory=lambda: {"caption": 1200, "classification": 300, "detection": 300, "segmentation": 1200})
    # `astrea eval`'s defaults, so that the README's `astrea eval` command reproduces the report
    # (None: the model folder's generation_config max_new_tokens, see eval.runner.folder_max_new_tokens).
    eval_batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int | None = None
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"fusion_top_k": 2}
    recipe_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # Recipe fields, e.g. {"order": [...]}
    skip_untrained_eval: bool = False
    roundtrip: bool = True
    threads: int = DEFAULT_THREADS  # torch threads: fixed, so that the same seed gives the same tables


def _log_section(log, title: str) -> None:
    log(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def write_eval_split(scenes, folder: Path) -> Path:
    """Write ``scenes``' QA as an ``astrea eval --task qa`` dataset: ``images/*.png`` and ``records.jsonl``."""
    from .train.synthetic import eval_record

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for scene in scenes:
        name = f"images/{scene.image_id}.png"
        scene.image.save(folder / name)
        lines.extend(json.dumps(eval_record(qa, name)) for qa in scene.qa)
    path = folder / "records.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def majority_answers(train_scenes) -> dict[str, str]:
    """Per question type, the most frequent answer of the TRAINING split (ties: the smallest string).

    Grounding answers are all different, so its "majority" answer is the box of the per-coordinate
    medians of the training boxes -- the strongest constant box.
    """
    from .train.data import format_box
    from .train.synthetic import qa_records

    answers: dict[str, Counter] = {}
    boxes = []
    for qa in qa_records(train_scenes):
        answers.setdefault(qa["question_type"], Counter())[qa["answer"]] += 1
        if qa["question_type"] == "grounding":
            boxes.append(qa["box"])
    best = {qtype: min(counter.items(), key=lambda item: (-item[1], item[0]))[0] for qtype, counter in answers.items()}
    if boxes:
        best["grounding"] = format_box([statistics.median(b[i] for b in boxes) for i in range(4)])
    return best


def score_constant(records_path: Path, answers: dict[str, str]) -> dict:
    """``astrea eval``'s scores for a "model" that always gives ``answers[question_type]``."""
    from .eval.data import load_records, record_metric, record_references
    from .eval.runner import score_sample, score_samples

    records, _ = load_records(records_path)
    samples = []
    for index, record in enumerate(records):
        metric = record_metric("qa", record)
        references = record_references(metric, record)
        prediction = answers[record["question_type"]]
        samples.append({"id": record.get("id", index), "question_type": record["question_type"], "metric": metric,
                        "prediction": prediction, "references": references, "score": score_sample(metric, prediction, references)})
    metrics, per_type = score_samples("qa", samples)
    return {"metrics": metrics, "per_type": per_type, "samples": samples}


def primary_scores(results: dict) -> dict[str, float]:
    """``question_type -> primary metric`` (accuracy; CIDEr-D for captions) of an eval result."""
    from .eval.runner import PRIMARY

    return {qtype: float(values[PRIMARY[values["metric"]]]) for qtype, values in results["per_type"].items()}


def build_demo_model(recipe, settings: DemoSettings, train_scenes, log=print):
    """The recipe's tiny model (with ``config_overrides``), towers warmed up and frozen again."""
    from .modeling import AstreaForConditionalGeneration
    from .processing import build_processor
    from .configuration import get_preset, merge_overrides
    from .train.run import apply_prompt_layout, start_from_world_llm
    from .train.warmup import warm_up_towers

    preset = recipe.model.get("preset", "tiny")
    torch.manual_seed(int(recipe.model.get("seed", settings.seed)) + settings.seed)
    config = get_preset(preset, **merge_overrides(recipe.model.get("overrides") or {}, settings.config_overrides))
    model = AstreaForConditionalGeneration(config)
    llm = recipe.model.get("llm")
    # The recipe's LLM: the pretrained world LLM and its tokenizer, or a random one with a BPE
    # learned from the training split.
    tokenizer = start_from_world_llm(model, llm) if llm else demo_tokenizer(config, train_scenes)
    processor = build_processor(config, tokenizer=tokenizer)
    apply_prompt_layout(model, processor, recipe.data)  # the untrained baseline is prompted as the trained model
    steps = settings.warmup_steps
    if (sum(steps.values()) if isinstance(steps, dict) else steps) > 0:
        report = warm_up_towers(model, processor, train_scenes, steps=settings.warmup_steps, seed=settings.seed)
        for role, values in report.items():
            log(f"warm-up {role:<15} loss {values['loss_first']:.3f} -> {values['loss_last']:.3f} ({values['seconds']:.1f} s)")
    return model.eval(), processor


def baseline_card(folder: Path, recipe, settings: DemoSettings):
    """The card facts of the demo's untrained baseline (what its parts are; nothing of it is trained yet)."""
    from .card import CardFacts

    steps = settings.warmup_steps
    steps = steps if isinstance(steps, dict) else {role: steps for role in ("caption", "classification", "detection", "segmentation")}
    speciality = {"caption": "category presence", "classification": "tags", "detection": "per-cell boxes",
                  "segmentation": "per-cell masks"}
    towers = {f"{role} expert": (f"toy tower warmed up for {steps.get(role, 0)} steps on {speciality[role]} of the training split "
                                 "(`astrea_vlm.train.warmup`)" if steps.get(role, 0) else "random toy tower")
              for role in speciality}
    llm = recipe.model.get("llm")
    return CardFacts(
        path=str(folder),
        origin=f"Written by `astrea demo` (seed {settings.seed}): the demo's **untrained baseline** -- its LLM and its "
               "warmed-up, frozen expert towers, with random projectors, bridges and fusion. `astrea align` and "
               "`astrea instruct` start from it.",
        parts={"language model": "the world LLM (`astrea_vlm/train/world_llm`)" if llm == "world" else (llm or "random"),
               **towers},
        datasets=["astrea-synthetic-world"],
        limitations=["**Not trained.** The parts that connect the experts to the LLM are random: this is the demo's "
                     "baseline, a blind LLM."],
        question="How many shapes are in the image?",
        extra_tags=["synthetic-data"],
    )


def demo_tokenizer(config, train_scenes):
    """A byte-level BPE tokenizer whose merges are learned from the TRAINING split's text.

    Like a real LLM's tokenizer, it makes the frequent words of its domain single tokens (colour
    and shape names, yes/no, digits), so the toy LLM spends its capacity on seeing, not spelling.
    """
    from .train.pretrain_llm import world_tokenizer

    return world_tokenizer(train_scenes, config.text_config.vocab_size, config.text_config.max_position_embeddings)


def roundtrip(final: Path, seed: int, log=print) -> dict:
    """Reload ``final`` through the transformers pipeline (remote code) and ask about a fresh scene.

    The message lists the image first, as most clients do; the folder's chat template puts it
    where the model was trained to see it (the recipe's ``image_position``)."""
    from transformers import pipeline

    from .train.synthetic import eval_record, make_split
    from .eval.prompts import build_prompt

    scene = make_split("fresh", 1, seed=seed + 1000)[0]
    qa = next(q for q in scene.qa if q["question_type"] == "counting")
    record = eval_record(qa)
    chat = pipeline("image-text-to-text", model=str(final), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": scene.image},
                                             {"type": "text", "text": build_prompt(record["metric"], record)}]}]
    out = chat(text=messages, max_new_tokens=8, generate_kwargs={"do_sample": False})
    answer = out[0]["generated_text"][-1]["content"]
    answer = answer if isinstance(answer, str) else " ".join(part.get("text", "") for part in answer)
    log(f"pipeline('image-text-to-text', trust_remote_code=True) on a fresh image: {qa['question']!r}")
    log(f"  -> {answer.strip()!r} (truth {qa['answer']!r}; scene: {scene.caption})")
    return {"question": qa["question"], "answer": answer.strip(), "truth": qa["answer"], "caption": scene.caption}


def _check_demo_packages() -> None:
    import importlib.util

    missing = [name for name in ("trl", "peft", "datasets", "yaml", "matplotlib", "evaluate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"astrea demo needs {', '.join(missing)}: install them with `pip install -e \".[demo]\"` "
                          "(or `pip install \"astrea-vlm[demo]\"`)")


def run_demo(settings: DemoSettings | None = None, log=print) -> dict:
    """Run the demo pipeline (see the module docstring); returns the summary written to ``summary.json``.

    The same settings give the same tables on the same machine: ``settings.threads`` torch threads,
    every generator seeded from ``settings.seed``, deterministic algorithms (:mod:`astrea_vlm.train.reproducibility`).
    """
    from .train.reproducibility import reproducible

    settings = settings or DemoSettings()
    _check_demo_packages()
    with reproducible(settings.seed, settings.threads):
        return _run_demo(settings, log)


def _run_demo(settings: DemoSettings, log) -> dict:
    from .eval.compare import comparison_markdown, paired_bootstrap
    from .eval.report import plot_training_curves, write_router_report
    from .eval.runner import run_eval
    from .card import record_eval_results, write_card
    from .export import save_hub_folder
    from .train.run import run_align, run_instruct
    from .train.recipe import load_recipe
    from .train.data import synthetic_scenes
    from .train.synthetic import make_split

    start = time.perf_counter()
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(settings.recipe)
    recipe = dataclasses.replace(recipe, **settings.recipe_overrides)
    data = dict(recipe.data)
    timings: dict[str, float] = {}

    _log_section(log, "1/6 synthetic world")
    tick = time.perf_counter()
    seed = int(data.get("seed", 0)) + settings.seed
    size = data.get("image_size", 64)
    world = {"image_size": size, "min_objects": int(data.get("min_objects", 2)), "max_objects": int(data.get("max_objects", 5))}
    # Through the training data's cache: the alignment stages and instruction tuning read the same scenes.
    train_scenes = synthetic_scenes("train", int(data.get("train_size", 256)), seed=seed, **world)
    test_scenes = make_split("test", settings.test_size, seed=seed, **world)
    test_records = write_eval_split(test_scenes, output / "data" / "test")
    # Settings are chosen on the validation split; the test split only reports.
    validation_records = write_eval_split(make_split("validation", settings.test_size, seed=seed, **world),
                                          output / "data" / "validation")
    recipe = dataclasses.replace(recipe, data={**data, "seed": seed})
    log(f"train {len(train_scenes)} scenes ({len(train_scenes) * 7} QA), test {len(test_scenes)} scenes -> {test_records}")
    timings["data"] = time.perf_counter() - tick

    _log_section(log, "2/6 tiny Astrea, towers warmed up on their specialities")
    tick = time.perf_counter()
    model, processor = build_demo_model(recipe, settings, train_scenes, log=log)
    untrained = output / "untrained"
    save_hub_folder(model, untrained, processor=processor)
    write_card(untrained, baseline_card(untrained, recipe, settings), model.config, processor, recipe=recipe,
               n_parameters=model.num_parameters())
    log(f"{sum(p.numel() for p in model.parameters()):,} parameters; untrained baseline written to {untrained}")
    timings["model"] = time.perf_counter() - tick

    _log_section(log, "3/6 progressive pre-alignment (cumulative labels, residual bridges, feature cache)")
    tick = time.perf_counter()
    recipe = dataclasses.replace(recipe, model={"path": str(untrained)})
    aligned = run_align(recipe, output / "train", log=log)
    timings["align"] = time.perf_counter() - tick

    _log_section(log, "4/6 instruction tuning (MoE fusion + momentum contrast)")
    tick = time.perf_counter()
    final = run_instruct(recipe, output / "train", init_from=aligned, log=log)
    timings["instruct"] = time.perf_counter() - tick

    _log_section(log, "5/6 evaluation on the test split")
    tick = time.perf_counter()
    # The folders' own prompt layout (the recipe's), as `astrea eval` uses it with no flag.
    eval_kwargs = dict(task="qa", data=test_records, batch_size=settings.eval_batch_size, max_new_tokens=settings.max_new_tokens)
    trained = run_eval(final, output=output / "eval" / "astrea", **eval_kwargs)
    validation = run_eval(final, output=output / "eval" / "astrea-validation", **{**eval_kwargs, "data": validation_records})
    baselines = {"majority": score_constant(test_records, majority_answers(train_scenes))}
    if not settings.skip_untrained_eval:
        baselines["untrained"] = run_eval(untrained, output=output / "eval" / "untrained", **eval_kwargs)
    timings["eval"] = time.perf_counter() - tick
    split = f"synthetic world, {{}} split ({settings.test_size} scenes, seed {seed})"
    record_eval_results(final, trained, dataset_name=split.format("test"))
    record_eval_results(final, validation, dataset_name=split.format("validation"))
    if "untrained" in baselines:
        record_eval_results(untrained, baselines["untrained"], dataset_name=split.format("test"))

    _log_section(log, "6/6 report and Hub round trip")
    tick = time.perf_counter()
    table = {name: primary_scores(result) for name, result in {**baselines, "astrea": trained}.items()}
    # "Beats the majority clearly": the 95% paired-bootstrap interval of the difference is above 0.
    versus_majority = paired_bootstrap(trained["samples"], baselines["majority"]["samples"], seed=settings.seed)
    stages = sorted(p for p in (output / "train").glob("align-*") if p.is_dir()) + [output / "train" / "instruct"]
    plot_training_curves(stages, output / "loss.png", keys=["loss", "loss_reg", "loss_moco"], title="astrea demo: training loss per stage (each stage on its own step axis)")
    write_router_report([trained], output, expected=FIG2_READING, title="test split: mean router probability per question type")
    routing = routing_report(trained, final)
    trip = roundtrip(final, settings.seed, log=log) if settings.roundtrip else None
    timings["report"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    summary = {"table": table, "versus_majority": versus_majority, "routing": routing, "validation": primary_scores(validation), "timings_s": {k: round(v, 1) for k, v in timings.items()}, "final": str(final),
               "untrained": str(untrained), "roundtrip": trip, "recipe": settings.recipe, "seed": settings.seed,
               "config_overrides": settings.config_overrides, "settings": _settings_record(settings)}
    (output / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (output / "report.md").write_text(report_markdown(summary, output), encoding="utf-8")
    log("\n" + summary_table(table))
    log("\n" + comparison_markdown(versus_majority, "astrea", "majority"))
    log(f"\nreport: {output / 'report.md'}; Hub-ready model: {final}; total {timings['total'] / 60:.1f} min")
    return summary


def routing_report(results: dict, final: Path) -> dict:
    """Routing on the test split (largest distance between two question types' mean router
    distributions, each expert's mean) and the final model's bridge gates ``tanh(g)``."""
    from safetensors import safe_open

    from .eval.report import router_table, routing_summary

    summary = routing_summary(*router_table([results]))
    with safe_open(str(Path(final) / "model.safetensors"), framework="pt") as weights:
        gates = {key.split(".")[-2]: float(torch.tanh(weights.get_tensor(key)).item()) for key in weights.keys() if key.endswith(".gate")}
    return {**summary, "tanh_gates": gates, "mean_abs_tanh_gate": statistics.fmean(abs(g) for g in gates.values()) if gates else 0.0}


def summary_table(table: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per question type, one column per model (accuracy; CIDEr-D for captions)."""
    names = list(table)
    types = list(table["astrea"])
    lines = ["| question type | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for qtype in types:
        unit = " (CIDEr-D)" if qtype == "caption" else ""
        lines.append(f"| {qtype}{unit} | " + " | ".join(f"{table[n].get(qtype, float('nan')):.3f}" for n in names) + " |")
    return "\n".join(lines)


def report_markdown(summary: dict, output: Path) -> str:
    from .eval.compare import comparison_markdown

    timings = summary["timings_s"]
    trip = summary.get("roundtrip")
    lines = [
        "# astrea demo report",
        "",
        f"Recipe `{summary['recipe']}`, seed {summary['seed']}; total {timings['total'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}).",
        "",
        "## Test split: trained Astrea against the baselines",
        "",
        "Accuracy per question type (grounding: Acc@IoU>0.5; caption: CIDEr-D). *majority*: the most",
        "frequent training answer of the type; *untrained*: the same model before alignment and",
        "instruction tuning (towers warmed up, the recipe's LLM, projectors, bridges and fusion random).",
        "",
        summary_table(summary["table"]),
        "",
        "Is the gain over the majority baseline clear? Paired bootstrap over the test questions (2000",
        "resamples; captions: per-image CIDEr-D): the difference and its 95% interval.",
        "",
        comparison_markdown(summary["versus_majority"], "astrea", "majority") if "versus_majority" in summary else "",
        "",
        "The same model on the validation split (where settings are chosen; the test split only reports): "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary.get("validation", {}).items()) + ".",
        "",
        "## Training loss per stage",
        "",
        "![loss per stage](loss.png)",
        "",
        "## Routing per question type (mean router probability per expert, test split)",
        "",
        "Next to the paper's Fig. 2 reading (caption -> SigLIP, tags/colour -> RAM++, grounding and position ->",
        "Grounding-DINO / SAM2); the demo's experts are toy towers warmed up on those specialities.",
        "",
        (output / "router.md").read_text(encoding="utf-8").split("\n", 2)[-1] if (output / "router.md").is_file() else "",
        "![routing](router.png)",
        "",
    ]
    routing = summary.get("routing")
    if routing:
        lines += ["Residual bridges: tanh(gate) " + ", ".join(f"{role} {g:+.3f}" for role, g in routing["tanh_gates"].items())
                  + f" (mean |tanh(gate)| {routing['mean_abs_tanh_gate']:.3f}).", ""]
    if trip:
        lines += ["## Hub round trip", "", f"`pipeline('image-text-to-text', model='{summary['final']}', trust_remote_code=True)`",
                  f"on a freshly generated image ({trip['caption']}): {trip['question']!r} -> {trip['answer']!r} (truth {trip['truth']!r}).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- ablations
def ablation_variants(what: str, recipe) -> dict[str, dict[str, Any]]:
    """The variants of one ablation: name -> ``{"config": {...}, "recipe": {...}}`` overrides.

    * ``topk`` (Table 3): ``fusion_top_k`` = 1, 2, 3, 4.
    * ``order`` (Table 6): Cap->Cls->Det->Seg, the reverse, and Cap->All (one joint stage after
      captioning).
    * ``residual`` (Table 4): with the random residual bridges, and without: the bridges are not
      trained in either phase, so their tanh gates stay at their initial 0 and every expert's features pass
      through unchanged (``f'_k = f_k``) -- the model without eq. 2-4.
    * ``moco`` (Table 4): instruction tuning with and without the momentum-contrast loss.
    """
    align_groups = list(recipe.align.trainable)
    if what == "topk":
        from .configuration import get_preset

        # the recipe's own k is the unchanged recipe (no override), so it shares the baseline run
        current = get_preset(recipe.model.get("preset", "tiny"), **(recipe.model.get("overrides") or {})).fusion_top_k
        return {f"top-{k}": {"config": {} if k == current else {"fusion_top_k": k}, "recipe": {}} for k in (1, 2, 3, 4)}
    if what == "order":
        orders = {
            "cap>cls>det>seg": ["caption", "classification", "detection", "segmentation"],
            "seg>det>cls>cap": ["segmentation", "detection", "classification", "caption"],
            "cap>all": ["caption", ["classification", "detection", "segmentation"]],
        }
        from .train.stages import normalise_order

        # the recipe's own order is the unchanged recipe (no override), so it shares the baseline run
        own = normalise_order(recipe.order)
        return {name: {"config": {}, "recipe": {} if normalise_order(order) == own else {"order": order}}
                for name, order in orders.items()}
    if what == "residual":
        without = {
            "align": dataclasses.replace(recipe.align, trainable=[g for g in align_groups if g != "bridge"]),
            "instruct": dataclasses.replace(recipe.instruct, trainable=[g for g in recipe.instruct.trainable if g != "bridge"]),
        }
        return {"with residual": {"config": {}, "recipe": {}}, "without residual": {"config": {}, "recipe": without}}
    if what == "moco":
        return {"with MoCo": {"config": {}, "recipe": {}},
                "without MoCo": {"config": {}, "recipe": {"instruct": dataclasses.replace(recipe.instruct, use_moco=False)}}}
    raise ValueError(f"unknown ablation {what!r}; choose topk, order, residual or moco")


def run_ablation(what: str, seeds: int = 3, base: DemoSettings | None = None, rerun: bool = False, log=print) -> dict:
    """Rerun the demo pipeline for every variant of ``what`` and ``seeds`` seeds; write ``ablation-<what>.md``.

    Each run is the full demo (own data seed, tower warm-up, alignment, instruction tuning) scored
    on its own test split; the table gives the mean and the standard deviation over seeds of the
    mean accuracy over the six short-answer types, and of each type. Below it, each variant is
    compared with the unchanged recipe on the same test questions (paired bootstrap,
    :mod:`astrea_vlm.eval.compare`; the seeds' questions pooled, ids prefixed with the seed;
    captions by per-image CIDEr-D with document frequencies over the pooled references), so a
    difference can be read against its 95% interval. Results are reported as they come out,
    whether or not they agree with the paper.

    A run whose folder holds a finished ``summary.json`` made with exactly the same settings and
    recipe content is reused instead of retrained, so an interrupted ablation resumes where it
    stopped, ``--seeds 3`` after ``--seeds 1`` trains only the new seeds, and the unchanged recipe
    (top-3, with residual, with MoCo, cap>cls>det>seg) is trained once per seed for all four
    ablations. ``rerun=True`` (``--rerun``) trains every run again.
    """
    from .eval.compare import paired_bootstrap
    from .train.recipe import load_recipe

    base = base or DemoSettings()
    if seeds < 1:
        raise ValueError("--seeds must be at least 1")
    # The variants change the recipe as the base settings run it (their overrides included).
    recipe = dataclasses.replace(load_recipe(base.recipe), **base.recipe_overrides)
    root = Path(base.output) / f"ablation-{what}"
    runs: dict[str, list[dict[str, float]]] = {}
    samples: dict[str, list[dict]] = {}
    variants = ablation_variants(what, recipe)
    for name, overrides in variants.items():
        for seed in range(seeds):
            _log_section(log, f"ablation {what}: {name}, seed {seed}")
            # The unchanged recipe is a variant of every ablation (top-3, with residual, with MoCo,
            # cap>cls>det>seg): its runs live in one shared folder and are trained once per seed.
            folder = Path(base.output) / "ablation-baseline" if _unchanged(overrides) else root / name.replace(">", "-").replace(" ", "_")
            settings = dataclasses.replace(
                base, output=str(folder / _seed_folder(seed, base.threads)), seed=seed,
                config_overrides={**base.config_overrides, **overrides["config"]},
                recipe_overrides={**base.recipe_overrides, **overrides["recipe"]}, skip_untrained_eval=True, roundtrip=False,
            )
            summary = None if rerun else _finished_run(settings)
            if summary is not None:
                log(f"{name}, seed {seed}: a finished run with the same settings is in {settings.output}; reusing it "
                    "(pass --rerun to train it again)")
            else:
                summary = run_demo(settings, log=log)
            runs.setdefault(name, []).append(summary["table"]["astrea"])
            samples.setdefault(name, []).extend(_run_samples(Path(settings.output), seed))
    reference = reference_variant(variants)
    versus = {name: paired_bootstrap(pooled, samples[reference], seed=0) for name, pooled in samples.items() if name != reference}
    result = {"what": what, "seeds": seeds, "runs": runs, "table": ablation_table(runs), "reference": reference,
              "versus_reference": versus, "comparison": ablation_comparison_markdown(versus, reference)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablation.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (root / "ablation.md").write_text(
        f"# astrea ablate --what {what} --seeds {seeds}\n\n{result['table']}\n\n"
        f"Each variant against the unchanged recipe ({reference}), paired on the same test questions "
        f"(all seeds pooled; 2000 bootstrap resamples; bold: the 95% interval excludes 0):\n\n{result['comparison']}\n",
        encoding="utf-8")
    log("\n" + result["table"])
    log("\n" + result["comparison"])
    log(f"\nwritten to {root / 'ablation.md'}")
    return result


def reference_variant(variants: dict[str, dict[str, Any]]) -> str:
    """The variant the others are compared with: the unchanged recipe (no overrides); for a recipe that is
    none of the variants (say, a stage order outside Table 6) the first variant."""
    unchanged = [name for name, overrides in variants.items() if _unchanged(overrides)]
    return unchanged[0] if unchanged else next(iter(variants))


def _seed_folder(seed: int, threads: int) -> str:
    """A run's folder name: ``seed-<s>``, or ``seed-<s>-threads-<n>`` for a thread count other than the default.

    Another thread count is another rounding order, hence another run; without the count in its name it
    would retrain -- and overwrite -- the default runs that every ablation shares."""
    return f"seed-{seed}" if threads == DEFAULT_THREADS else f"seed-{seed}-threads-{threads}"


def _unchanged(overrides: dict[str, Any]) -> bool:
    """Whether a variant's overrides leave the recipe as it is (no config and no recipe override)."""
    return not overrides["config"] and not overrides["recipe"]


def _run_samples(output: Path, seed: int) -> list[dict]:
    """The per-question samples of a run's test evaluation, ids prefixed with the seed (seeds draw different scenes)."""
    path = output / "eval" / "astrea" / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run in {output} did not finish its evaluation; "
                                f"delete {output} (or pass --rerun) to train it again")
    return [{**sample, "id": f"seed-{seed}/{sample['id']}"} for sample in json.loads(path.read_text(encoding="utf-8"))["samples"]]


def ablation_comparison_markdown(versus: dict[str, dict[str, dict[str, float]]], reference: str) -> str:
    """Markdown: per variant and question type, ``difference [low, high]`` against ``reference``; bold where
    the 95% interval excludes 0."""
    if not versus:
        return ""
    types = list(next(iter(versus.values())))

    def cell(row: dict[str, float]) -> str:
        text = f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"
        return f"**{text}**" if row["low"] > 0 or row["high"] < 0 else text

    lines = ["| variant - " + reference + " | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
    lines += [f"| {name} | " + " | ".join(cell(rows[t]) for t in types) + " |" for name, rows in versus.items()]
    return "\n".join(lines)


def _settings_record(settings: DemoSettings) -> str:
    """The settings of a run and the content of its recipe, as text: what decides whether a finished
    run can stand for a new one (an edited recipe file makes old runs stale)."""
    from .train.recipe import load_recipe

    record = {"settings": dataclasses.asdict(settings), "recipe": dataclasses.asdict(load_recipe(settings.recipe))}
    return json.dumps(record, sort_keys=True, default=repr)


def _finished_run(settings: DemoSettings) -> dict | None:
    """The summary of a finished run in ``settings.output`` made with exactly these settings, else None."""
    path = Path(settings.output) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return summary if summary.get("settings") == _settings_record(settings) else None


def ablation_table(runs: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: per variant, mean +- std over seeds of the short-answer mean accuracy and of each type."""
    types = list(next(iter(runs.values()))[0])
    accuracy_types = [t for t in types if t != "caption"]

    def cell(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"

    head = ["variant", "mean acc."] + [t + (" (CIDEr-D)" if t == "caption" else "") for t in types]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, tables in runs.items():
        means = [statistics.fmean(t[q] for q in accuracy_types) for t in tables]
        lines.append(f"| {name} | {cell(means)} | " + " | ".join(cell([t[q] for t in tables]) for q in types) + " |")
    return "\n".join(lines)


__all__ = ["DemoSettings", "ablation_comparison_markdown", "ablation_table", "ablation_variants", "run_ablation", "majority_answers", "reference_variant", "run_demo", "score_constant", "summary_table", "write_eval_split"]
