"""``astrea eval``: batched greedy generation over a local dataset, scored, saved as JSON + markdown.

Pipeline: :func:`~astrea_vlm.eval.data.load_records` -> one user turn per record (its images and
the :mod:`~astrea_vlm.eval.prompts` template) rendered with the processor's chat template, in the
prompt layout saved with the model (``image_position``; an ``image_position`` argument overrides
it) -> left-padded batches -> ``generate`` (greedy, ``do_sample=False``) -> the new tokens decoded with
``skip_special_tokens=True`` and stripped -> :func:`score_samples`.

``results.json`` holds the settings, the prompt templates, the metrics, the per-``question_type``
breakdown and every sample (prompt, prediction, references, per-sample score and the router
probabilities of each of its images, in ``expert_order``); :func:`score_samples` on its
``samples`` gives back its ``metrics`` and ``per_type``. ``results.md`` is the same as tables, and
``router.md`` / ``router.png`` the mean router probabilities per question type
(:mod:`~astrea_vlm.eval.report`).

Metric keys: ``vqa`` -> ``vqa_accuracy``; ``exact_match`` -> ``exact_match``; ``multiple_choice``
-> ``mc_accuracy``; ``grounding`` -> ``grounding_accuracy`` (Acc@IoU>0.5) and ``mean_iou``;
``caption`` -> ``bleu_1`` .. ``bleu_4``, ``rouge_l``, ``cider_d``. Task ``qa`` scores each
``question_type`` with its records' metric and adds ``mean_accuracy``, the unweighted mean of the
types' accuracies (caption types, which have no accuracy, are left out of it).
"""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from pathlib import Path

from ..geometry import box_iou, parse_boxes
from .caption_metrics import caption_scores
from .data import load_records, record_images, record_metric, record_references, validate_record
from .metrics import exact_match_score, parse_choice, vqa_soft_accuracy
from .prompts import OPTION_FORMAT, PROMPT_VERSION, PROMPTS, build_prompt

GROUNDING_IOU_THRESHOLD = 0.5
#: ``astrea eval``'s defaults (the demo evaluates with them too, so that the README's command
#: reproduces its report: another batch size pads differently, which can move a greedy answer).
DEFAULT_BATCH_SIZE = 8
#: New tokens when the model folder's ``generation_config.json`` sets no ``max_new_tokens``.
DEFAULT_MAX_NEW_TOKENS = 64
PRIMARY = {
    "vqa": "vqa_accuracy",
    "exact_match": "exact_match",
    "multiple_choice": "mc_accuracy",
    "grounding": "grounding_accuracy",
    "caption": "cider_d",
}


# ------------------------------------------------------------------------------------ scoring
def score_sample(metric: str, prediction: str, references: dict) -> dict:
    """Per-sample score fields (captions have none: their metrics are corpus-level)."""
    if metric == "vqa":
        return {"vqa_accuracy": vqa_soft_accuracy(prediction, references["answers"])}
    if metric == "exact_match":
        return {"exact_match": exact_match_score(prediction, references["answers"])}
    if metric == "multiple_choice":
        choice = parse_choice(prediction, references["options"])
        return {"choice": choice, "mc_accuracy": float(choice == references["answer_index"])}
    if metric == "grounding":
        boxes = parse_boxes(prediction)
        iou = box_iou(boxes[0], references["box"]) if boxes else 0.0
        return {
            "predicted_box": list(boxes[0]) if boxes else None,
            "iou": iou,
            "grounding_accuracy": float(iou > GROUNDING_IOU_THRESHOLD),
        }
    if metric == "caption":
        return {}
    raise ValueError(f"unknown metric {metric!r}")


def aggregate(metric: str, samples: list[dict]) -> dict:
    """Metrics of a group of samples that share ``metric`` (``n`` is the group size)."""
    out: dict = {"metric": metric, "n": len(samples)}
    if not samples:
        return out
    if metric == "caption":
        out.update(caption_scores([s["prediction"] for s in samples], [s["references"]["captions"] for s in samples]))
        return out
    scores = [score_sample(metric, s["prediction"], s["references"]) for s in samples]
    key = PRIMARY[metric]
    out[key] = sum(s[key] for s in scores) / len(scores)
    if metric == "grounding":
        out["mean_iou"] = sum(s["iou"] for s in scores) / len(scores)
    return out


def score_samples(task: str, samples: list[dict]) -> tuple[dict, dict]:
    """``(metrics, per_type)`` of saved samples (each with ``metric``, ``prediction``, ``references``,
    ``question_type``); used for a run and to recompute a results JSON."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for sample in samples:
        groups[sample["question_type"]].append(sample)
    per_type = {}
    for name, group in groups.items():
        metrics = {s["metric"] for s in group}
        if len(metrics) > 1:
            raise ValueError(f"question_type {name!r} mixes metrics {sorted(metrics)}; give each type one metric")
        per_type[name] = aggregate(metrics.pop(), group)
    if task == "qa":
        accuracies = [v[PRIMARY[v["metric"]]] for v in per_type.values() if v["metric"] != "caption"]
        metrics = {"n": len(samples), "n_types": len(per_type)}
        if accuracies:
            metrics["mean_accuracy"] = sum(accuracies) / len(accuracies)
    else:
        metrics = aggregate(task, samples)
    return metrics, per_type


# ---------------------------------------------------------------------------------- the model
def load_model(model_dir: str | Path, device: str | None = None, dtype: str = "auto"):
    """Model and processor of an ``astrea create`` folder, through the transformers Auto classes."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), trust_remote_code=True, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=True)
    return model.to(device).eval(), processor


class RouterProbsRecorder:
    """Forward hook collecting the router probabilities (``(n_images, n_experts)``; with per-token
    routing each image's mean over its tokens) of each prefill.

    ``generate`` calls the model once with the pixels (the prefill) and then once per new token
    without them; only calls that return ``router_probs`` are kept.
    """

    def __init__(self, model):
        self.calls: list = []
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        probs = getattr(output, "router_probs", None)
        if probs is not None:
            probs = probs.detach().float().cpu()
            self.calls.append(probs.mean(dim=1) if probs.dim() == 3 else probs)  # per-token routing: the image's mean

    def pop(self):
        calls, self.calls = self.calls, []
        return calls

    def remove(self) -> None:
        self._handle.remove()


def render_prompt(processor, conversation: list[dict], image_position: str | None = None) -> str:
    """``conversation`` as the prompt string the model reads: the processor's chat template with a
    generation prompt, in the processor's prompt layout or, when given, ``image_position``."""
    override = {} if image_position is None else {"image_position": image_position}
    return processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **override)


def prompt_layout(processor, image_position: str | None = None) -> dict:
    """The layout a run prompts with: the processor's (saved with the model), ``image_position`` overriding."""
    layout = dict(getattr(processor, "prompt_layout", None) or {"image_position": "before", "system_prompt": None})
    if image_position is not None:
        if image_position not in ("before", "after"):
            raise ValueError(f"image_position={image_position!r}: use 'before' or 'after' (the prompt), or leave it "
                             f"out to use the layout saved with the model")
        layout["image_position"] = image_position
    return layout


def generate_conversations(
    model, processor, conversations: list[list[dict]], images: list[list], max_new_tokens: int,
    image_position: str | None = None, **generate_kwargs
) -> tuple[list[str], list]:
    """Answers to a batch of chats; returns ``(texts, router_probs per sample)``.

    ``conversations[i]`` is a list of ``{"role", "content"}`` messages whose ``{"type": "image"}``
    parts stand for ``images[i]``, in order. Each is rendered with the processor's chat template
    (``add_generation_prompt=True``; its saved prompt layout, or ``image_position`` when given:
    :func:`render_prompt`), the batch is left-padded and generated greedily unless
    ``generate_kwargs`` say otherwise; the new tokens are decoded with ``skip_special_tokens=True``
    and stripped. ``router_probs[i]`` lists the router probabilities of each image of sample ``i``
    (``None`` when the model returned none, e.g. in an alignment stage).
    """
    import torch

    texts = [render_prompt(processor, c, image_position) for c in conversations]
    flat_images = [image for sample_images in images for image in sample_images]
    inputs = processor(images=flat_images or None, text=texts, padding=True, padding_side="left", return_tensors="pt")
    inputs = inputs.to(model.device)
    for key, value in inputs.items():
        if torch.is_floating_point(value):
            inputs[key] = value.to(model.dtype)
    settings = {"do_sample": False, "num_beams": 1, "pad_token_id": processor.tokenizer.pad_token_id}
    settings.update(generate_kwargs)
    recorder = RouterProbsRecorder(model)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, **settings)
        calls = recorder.pop()
    finally:
        recorder.remove()
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    decoded = [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    per_sample: list = [None] * len(conversations)
    if calls:
        probs = calls[0].tolist()
        start = 0
        for i, sample_images in enumerate(images):
            per_sample[i] = probs[start : start + len(sample_images)]
            start += len(sample_images)
    return decoded, per_sample


def user_turn(prompt: str, n_images: int, image_position: str = "before") -> list[dict]:
    """One user message: ``n_images`` images, then the prompt text (``image_position="after"``: the reverse)."""
    images = [{"type": "image"} for _ in range(n_images)]
    text = [{"type": "text", "text": prompt}]
    if image_position not in ("before", "after"):
        raise ValueError(f"image_position={image_position!r}: use 'before' or 'after' (the prompt)")
    return [{"role": "user", "content": images + text if image_position == "before" else text + images}]


def generate_batch(model, processor, prompts: list[str], images: list[list], max_new_tokens: int,
                   image_position: str | None = None) -> tuple[list[str], list]:
    """Greedy answers to single-turn prompts (:func:`user_turn`, then :func:`generate_conversations`)
    in the processor's prompt layout, or ``image_position`` when given."""
    layout = prompt_layout(processor, image_position)["image_position"]
    conversations = [user_turn(p, len(i), layout) for p, i in zip(prompts, images)]
    return generate_conversations(model, processor, conversations, images, max_new_tokens, image_position=image_position)


# -------------------------------------------------------------------------------------- a run
def default_output(model_dir: str | Path, task: str) -> Path:
    """``outputs/eval/<model>/<task>``: ``<model>`` is the model folder's path relative to the working
    directory without a leading ``outputs/`` (``outputs/demo/train/final`` -> ``demo/train/final``),
    the folder's name for one elsewhere, or the Hub id. The model folder itself is never written to."""
    path = Path(model_dir)
    try:
        parts = path.resolve().relative_to(Path.cwd().resolve()).parts if path.exists() else path.parts
    except ValueError:  # outside the working directory
        parts = (path.resolve().name,)
    parts = tuple(p for p in parts if p not in ("", ".", ".."))
    if parts[:1] == ("outputs",) and len(parts) > 1:
        parts = parts[1:]
    return Path("outputs", "eval", *(parts or ("model",)), task)


def folder_max_new_tokens(model) -> int:
    """The model folder's ``generation_config.max_new_tokens``, or :data:`DEFAULT_MAX_NEW_TOKENS` when it sets none."""
    value = getattr(getattr(model, "generation_config", None), "max_new_tokens", None)
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_NEW_TOKENS


def run_eval(
    model_dir: str | Path,
    task: str,
    data: str | Path,
    output: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    progress: bool = True,
    model=None,
    processor=None,
    image_position: str | None = None,
) -> dict:
    """Evaluate ``model_dir`` on ``data`` for ``task`` and write ``results.json`` / ``results.md`` to
    ``output`` (default :func:`default_output`: ``outputs/eval/<model>/<task>``, outside the model
    folder). Returns the results dict.

    ``model``/``processor`` may be passed already loaded (then ``model_dir`` is only recorded).
    ``max_new_tokens``: default the folder's ``generation_config.max_new_tokens``
    (:func:`folder_max_new_tokens`).
    ``image_position``: ``None`` (default) prompts in the layout saved with the model (the
    processor's chat template: how it was trained); ``"before"`` / ``"after"`` put the images
    before / after the prompt instead. The layout used is recorded in the results.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise ValueError("batch_size and max_new_tokens must be at least 1")
    prompt_layout(None, image_position)  # a bad value fails before the model is loaded
    start = time.perf_counter()
    records, base_dir = load_records(data)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{data} has no records")
    metrics_of = [record_metric(task, r) for r in records]
    for metric, record in zip(metrics_of, records):  # fail before loading the model, not midway
        validate_record(metric, record)
    if model is None or processor is None:
        model, processor = load_model(model_dir, device=device, dtype=dtype)
    layout = prompt_layout(processor, image_position)
    if max_new_tokens is None:
        max_new_tokens = folder_max_new_tokens(model)
    expert_order = list(getattr(model.config, "expert_order", []) or [])

    samples: list[dict] = []
    bar = tqdm(total=len(records), desc=f"astrea eval {task}", unit="sample", disable=not progress)
    for begin in range(0, len(records), batch_size):
        batch = records[begin : begin + batch_size]
        images = [record_images(r, base_dir) for r in batch]
        prompts = [build_prompt(m, r) for m, r in zip(metrics_of[begin : begin + batch_size], batch)]
        predictions, router = generate_batch(model, processor, prompts, images, max_new_tokens, image_position)
        for offset, (record, prompt, prediction, probs, sample_images) in enumerate(zip(batch, prompts, predictions, router, images)):
            index = begin + offset
            metric = metrics_of[index]
            references = record_references(metric, record, sample_images)
            samples.append(
                {
                    "index": index,
                    "id": _jsonable(record.get("id", index)),
                    "question_type": str(record.get("question_type") or (metric if task == "qa" else task)),
                    "metric": metric,
                    "prompt": prompt,
                    "prediction": prediction,
                    "references": references,
                    "score": score_sample(metric, prediction, references),
                    "router_probs": probs,
                }
            )
        bar.update(len(batch))
    bar.close()

    metrics, per_type = score_samples(task, samples)
    output = Path(output) if output is not None else default_output(model_dir, task)
    results = {
        "task": task,
        "model": str(model_dir),
        "data": str(data),
        "output": str(output),
        "settings": {
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "limit": limit,
            "do_sample": False,
            "num_beams": 1,
            "padding_side": "left",
            "image_position": layout["image_position"],
            "system_prompt": layout["system_prompt"],
            "image_position_from": "folder" if image_position is None else "argument",
            "grounding_iou_threshold": GROUNDING_IOU_THRESHOLD,
        },
        "prompts": {"version": PROMPT_VERSION, "templates": dict(PROMPTS), "option_format": OPTION_FORMAT, "chat_template": processor.chat_template},
        "expert_order": expert_order,
        "router": {"input": getattr(model.config, "fusion_router_input", None), "routing": getattr(model.config, "fusion_routing", "image"),
                   "top_k": getattr(model.config, "fusion_top_k", None), "text_scale": getattr(model.config, "fusion_router_text_scale", 1.0),
                   "text_selects": getattr(model.config, "fusion_router_text_selects", True)},
        "metrics": metrics,
        "per_type": per_type,
        "samples": samples,
        "environment": _environment(),
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    write_results(results, output)
    if any(sample["router_probs"] for sample in samples):
        from .report import write_router_report

        write_router_report([results], output)
    return results


def write_results(results: dict, output: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``output``; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output / "results.json", output / "results.md"
    json_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    md_path.write_text(results_markdown(results), encoding="utf-8")
    return json_path, md_path


def results_markdown(results: dict) -> str:
    """The metrics and the per-type breakdown of a results dict as markdown tables."""
    lines = [f"# astrea eval: {results['task']}", "", f"model `{results['model']}`, data `{results['data']}`", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    for key, value in results["metrics"].items():
        if key != "metric":
            lines.append(f"| {key} | {_fmt(value)} |")
    if results["per_type"]:
        keys = sorted({k for v in results["per_type"].values() for k in v if k not in ("metric", "n")})
        lines += ["", "## per question type", "", "| question_type | metric | n | " + " | ".join(keys) + " |"]
        lines.append("| --- | --- | --- | " + " | ".join("---" for _ in keys) + " |")
        for name, row in sorted(results["per_type"].items()):
            cells = [_fmt(row[k]) if k in row else "" for k in keys]
            lines.append(f"| {name} | {row['metric']} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## prompt templates", ""]
    for name, template in results["prompts"]["templates"].items():
        lines.append(f"- `{name}`: `{json.dumps(template)[1:-1]}`")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _jsonable(value):
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _environment() -> dict:
    import torch
    import transformers

    import astrea_vlm

    return {"astrea_vlm": astrea_vlm.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
