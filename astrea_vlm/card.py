"""The README.md model card of every folder astrea writes, generated from what is true of that folder.

A card is Hub metadata (``huggingface_hub.ModelCardData``: licence, library, pipeline tag, the real
parts the folder was built from as ``base_model``, training ``datasets``, tags, and the
``model-index`` of recorded ``astrea eval`` results) above a body written from the folder itself:
its parts, its prompt layout (rendered by its own processor), a usage snippet that runs as written
from the directory where astrea ran, its training recipe, its evaluation, its architecture (read
from the config) and its limitations. The method's interpretations of the paper and the citation
are the repository card's (``model_card.md``), true of every Astrea.

Where a folder came from is kept in the metadata (``astrea.parts``), so a folder trained from
another inherits its parts and ``base_model``.

Writers: ``astrea create`` (:func:`created_card`), ``astrea align`` / ``instruct``
(:func:`trained_card`), the demo's baseline (:func:`created_card` with its parts),
``astrea pretrain-llm`` (:func:`world_llm_card`); ``astrea eval --update-card`` and the demo add
results (:func:`record_eval_results`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

LICENSE = "apache-2.0"
TAGS = ["vision-language", "mixture-of-experts", "multimodal", "astrea", "custom_code"]
REPOSITORY_CARD = Path(__file__).resolve().parent / "model_card.md"
EVALUATION_HEADING = "## Evaluation"
EVAL_TASK_TYPES = {"caption": "image-to-text"}  # every other astrea eval task answers questions


# ------------------------------------------------------------------------------------ helpers
def hub_repo_id(source: str | None) -> str | None:
    """The Hub repository a part comes from (``org/name`` of ``org/name`` or ``org/name/file.pt``),
    or None for a local path, a random part or anything else."""
    if not source or Path(source).exists() or source.startswith((".", "/", "~")):
        return None
    parts = source.split("/")
    if len(parts) >= 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts[:2]):
        return "/".join(parts[:2])
    return None


def default_max_new_tokens(config) -> int:
    """Longest answer ``generate`` gives without a ``max_new_tokens``: 256 tokens, or a quarter of
    the LLM's context when that is shorter (the prompt and its visual tokens need the rest)."""
    context = int(getattr(config.get_text_config(), "max_position_embeddings", 2048) or 2048)
    return max(16, min(256, context // 4))


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The YAML metadata of ``folder``'s README.md ({} when there is none)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    if not path.is_file():
        return {}
    return ModelCard.load(path).data.to_dict()


def image_position_of(config=None, processor=None, recipe=None) -> str:
    """The prompt layout the folder's model expects: its config's or processor's ``image_position``,
    else the recipe's ``data.image_position``, else LLaVA's ``"before"``."""
    for source in (config, processor):
        value = getattr(source, "image_position", None)
        if value in ("before", "after"):
            return value
    if recipe is not None and (recipe.data or {}).get("image_position") in ("before", "after"):
        return recipe.data["image_position"]
    return "before"


def _user_content(question: str, image_expr: str, image_position: str) -> list[str]:
    image = f'{{"type": "image", "image": {image_expr}}}'
    text = f'{{"type": "text", "text": {json.dumps(question)}}}'
    return [image, text] if image_position == "before" else [text, image]


def _dataset_names(data: dict[str, Any]) -> list[str]:
    """The training data as the recipe names it: the synthetic world, or its annotation files."""
    if not data:
        return []
    if data.get("source", "synthetic") == "synthetic":
        return ["astrea-synthetic-world"]
    files = [Path(v).name for k, v in data.items() if isinstance(v, str) and Path(v).suffix in (".json", ".jsonl", ".parquet")]
    return files or [str(data["source"])]


# ------------------------------------------------------------------------------------ the facts
@dataclasses.dataclass
class CardFacts:
    """What a card says about its folder; everything else is read from the config and processor."""

    path: str                                   # the folder as the user named it (the snippet loads it)
    origin: str                                 # markdown: how this folder was written
    parts: dict[str, str]                       # component -> where it comes from ("random", a Hub id, a path)
    datasets: list[str] = dataclasses.field(default_factory=list)
    training: str | None = None                 # markdown body of "## Training"; None: not trained
    limitations: list[str] = dataclasses.field(default_factory=list)
    question: str = "What is in the image?"    # the usage snippet's question
    extra_tags: list[str] = dataclasses.field(default_factory=list)

    @property
    def base_model(self) -> list[str]:
        found = [hub_repo_id(source) for source in self.parts.values()]
        return list(dict.fromkeys(f for f in found if f))


def _parts_table(parts: dict[str, str]) -> str:
    lines = ["| part | from |", "| --- | --- |"]
    for name, source in parts.items():
        repo = hub_repo_id(source)
        shown = f"[`{source}`](https://huggingface.co/{repo})" if repo else (f"`{source}`" if "/" in source or "." in source else source)
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


def _prompt_section(processor, config, image_position: str, question: str, trained: bool) -> str:
    n = int(getattr(config, "num_visual_tokens", 0))
    content = [{"type": "image"}, {"type": "text", "text": question}]
    if image_position == "after":
        content.reverse()
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    where = "before the question (LLaVA's layout)" if image_position == "before" else "after the question"
    return "\n".join([
        f"This model {'was trained with' if trained else 'expects'} the image **{where}**: "
        f"`image_position: {image_position}`. Its processor's chat template applies this layout, and the usage "
        "below follows it; another layout changes what the model sees and its answers.",
        "",
        "One user turn with one image renders as (`<image>` then expands to "
        f"{n} visual tokens per view):",
        "",
        "```text",
        rendered,
        "```",
    ])


def _usage_section(facts: CardFacts, image_position: str, max_new_tokens: int, image_size: int) -> str:
    content = ",\n    ".join(_user_content(facts.question, "image", image_position))
    return "\n".join([
        "The modelling code ships in this folder: loading needs `trust_remote_code=True` (read the code first "
        "if the folder comes from someone you do not know), not `astrea-vlm`. Run from the directory where the "
        "folder was written, or replace `path` by the folder's Hub id.",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline",
        "",
        f"path = {json.dumps(facts.path)}",
        "processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)",
        'model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype="auto")',
        "",
        f'image = Image.new("RGB", ({image_size}, {image_size}), "white")  # or Image.open("your-image.jpg")',
        f'messages = [{{"role": "user", "content": [\n    {content},\n]}}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,",
        '                                       return_tensors="pt").to(model.device)',
        f"output = model.generate(**inputs, do_sample=False)  # up to {max_new_tokens} new tokens (generation_config.json)",
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "",
        'chat = pipeline("image-text-to-text", model=model, processor=processor)',
        'print(chat(text=messages, return_full_text=False)[0]["generated_text"])',
        "```",
    ])


def _architecture_section(config, n_parameters: int | None) -> str:
    text = config.get_text_config()
    lines = ["| stage | role | tower | input | tokens |", "| --- | --- | --- | --- | --- |"]
    side = int(round(int(config.num_visual_tokens) ** 0.5))
    for index, (role, expert) in enumerate(config.expert_configs.items(), start=1):
        tower = expert.kind + (f" (`{expert.pretrained}`)" if getattr(expert, "pretrained", None) else "")
        lines.append(f"| {index} | {role} | {tower} | {expert.image_size} px | resampled to {side}x{side} |")
    total = f"; {n_parameters:,} parameters in all" if n_parameters else ""
    return "\n".join([
        f"Four frozen expert towers, each with its FFN projector; residual bridges feed earlier experts' features "
        f"into later ones; a router keeps the top {config.fusion_top_k} of {len(config.expert_order)} experts per "
        f"image and mixes their adapters into {config.num_visual_tokens} visual tokens per view for a "
        f"{text.model_type} LLM ({text.num_hidden_layers} layers, width {text.hidden_size}, vocabulary "
        f"{text.vocab_size}){total}.",
        "",
        *lines,
    ])


def _preprocessing_section(config, processor) -> str:
    """Each expert's pixels as this folder's processor computes them (``processor_config.json``)."""
    from .processing.image_processing_astrea import ExpertImageSpec

    specs = getattr(getattr(processor, "image_processor", None), "experts", None) or {
        role: dataclasses.asdict(ExpertImageSpec.from_expert_config(expert)) for role, expert in config.expert_configs.items()
    }
    lines = ["| role | tower | size | aspect ratio | filter | resized data | padding | mean / std |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for role, spec in specs.items():
        expert = config.expert_configs.get(role)
        size, aspect = spec["size"], bool(spec.get("keep_aspect_ratio"))
        tensor = spec.get("resize_on") == "tensor"
        shape = f"shortest side {size}, longest at most {spec.get('max_size')}" if aspect else f"{size}x{size}"
        padding = f"zeros at the bottom and right, `pixel_mask_{role}`" if aspect else "none"
        statistics = f"{list(spec['image_mean'])} / {list(spec['image_std'])}"
        lines.append(
            f"| {role} | {getattr(expert, 'kind', '?')} | {shape} | {'kept' if aspect else 'squashed'} | "
            f"{spec['resample']}{', antialiased' if tensor else ''} | "
            f"{'the [0, 1] float image (torch)' if tensor else 'the 8-bit image (PIL)'} | {padding} | {statistics} |"
        )
    return "\n".join([
        "Each expert reads its own pixels (`pixel_values_<role>`), made by this folder's processor as below. "
        "The paper presets follow each released expert's own transform (SigLIP's processor config, RAM++'s "
        "`get_transform`, Grounding-DINO's `load_image`, `SAM2Transforms`); a processor call's `size`, "
        "`resample`, `image_mean` or `image_std` overrides them for every expert.",
        "",
        *lines,
    ])


def _repository_section(title: str) -> str:
    """A ``## title`` section of the repository card (``model_card.md``), or '' when absent."""
    if not REPOSITORY_CARD.is_file():
        return ""
    text = REPOSITORY_CARD.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not match:
        return ""
    note = ("*From the astrea-vlm repository card (`model_card.md`); sizes are the paper presets'.*\n\n"
            if title.startswith("Interpretations") else "")
    return f"## {title}\n\n{note}{match.group(1).strip()}\n"


def _evaluation_section(eval_results: list, folder: str) -> str:
    if not eval_results:
        return "\n".join([
            EVALUATION_HEADING,
            "",
            "No `astrea eval` results are recorded for this folder. To record some (they go into this card's "
            "`model-index`):",
            "",
            "```bash",
            f"astrea eval --model {folder} --task qa --data records.jsonl --update-card",
            "```",
            "",
        ])
    lines = [EVALUATION_HEADING, "", "Recorded by `astrea eval` (greedy decoding); also in the `model-index` metadata.", "",
             "| data | task | metric | value |", "| --- | --- | --- | ---: |"]
    for result in eval_results:
        lines.append(f"| {result.dataset_name} | {result.task_name or result.task_type} | {result.metric_name or result.metric_type} "
                     f"| {float(result.metric_value):.3f} |")
    return "\n".join(lines) + "\n"


def render_card(facts: CardFacts, config, processor, *, recipe=None, n_parameters: int | None = None,
                eval_results: list | None = None):
    """The :class:`huggingface_hub.ModelCard` of a folder."""
    from huggingface_hub import ModelCard, ModelCardData

    name = Path(facts.path).name
    image_position = image_position_of(config, processor, recipe)
    max_new_tokens = default_max_new_tokens(config)
    image_size = max(expert.image_size for expert in config.expert_configs.values())
    data = ModelCardData(
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=facts.base_model or None,
        datasets=facts.datasets or None,
        tags=TAGS + facts.extra_tags,
        language=["en"],
        model_name=name,
        eval_results=eval_results or None,
        astrea={"parts": dict(facts.parts), "image_position": image_position},
    )
    limitations = "\n".join(f"- {item}" for item in [
        *facts.limitations,
        "**Licences of the parts.** The code is Apache-2.0; pretrained parts keep their own licences "
        "(check each before you redistribute the folder).",
        "**Usual VLM risks.** A VLM can describe what is not in the image and inherits its parts' biases; "
        "do not use it for decisions about people.",
    ])
    body = "\n".join([
        f"# {name}",
        "",
        "An **Astrea** model (*Astrea: A MOE-based Visual Understanding Model with Progressive Alignment*, "
        "Yang et al., 2025), built with the `astrea-vlm` package: four specialised vision experts, residual "
        "bridges and a mixture-of-experts fusion feed a causal language model.",
        "",
        facts.origin,
        "",
        "## Parts",
        "",
        _parts_table(facts.parts),
        "",
        "## Prompt layout",
        "",
        _prompt_section(processor, config, image_position, facts.question, trained=facts.training is not None),
        "",
        "## Usage",
        "",
        _usage_section(facts, image_position, max_new_tokens, image_size),
        "",
        "## Training",
        "",
        facts.training or "Not trained: the projectors, bridges and fusion hold their initial weights.",
        "",
        _evaluation_section(eval_results or [], facts.path),
        "## Architecture",
        "",
        _architecture_section(config, n_parameters),
        "",
        "### Preprocessing",
        "",
        _preprocessing_section(config, processor),
        "",
        "## Limitations",
        "",
        limitations,
        "",
        _repository_section("Interpretations where the paper is ambiguous"),
        _repository_section("Citation"),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_card(folder: str | Path, facts: CardFacts, config, processor, **render_kwargs) -> Path:
    """Render and write ``folder/README.md``; returns its path."""
    path = Path(folder) / "README.md"
    render_card(facts, config, processor, **render_kwargs).save(path)
    return path


# ------------------------------------------------------------------------------- folder kinds
def created_facts(path: str | Path, parts: dict[str, str] | None, command: str) -> CardFacts:
    """An ``astrea create`` folder: the preset's random weights, or its pretrained parts."""
    if not parts:
        return CardFacts(
            path=str(path),
            origin=f"Written by `{command}`: **every weight is random** (seeded), and the tokenizer is an offline "
                   "byte-level one. It exists to test code paths and to start toy training; its outputs mean nothing.",
            parts={"language model": "random", "tokenizer": "byte-level (offline)",
                   **{role: "random toy tower" for role in ("caption", "classification", "detection", "segmentation")}},
            limitations=["**Random weights.** This model has learnt nothing; do not read anything into its answers."],
            extra_tags=["random-weights"],
        )
    return CardFacts(
        path=str(path),
        origin=f"Written by `{command}`: the language model and the four expert towers are the pretrained parts "
               "below; the projectors, residual bridges and MoE fusion are **random** until `astrea align` and "
               "`astrea instruct` train them. The paper's authors have released no Astrea weights.",
        parts=dict(parts),
        limitations=["**Not trained yet.** The experts and the LLM are pretrained, but the parts that connect them "
                     "are random: the model generates text without understanding the image.",
                     "**Grounding-DINO 1.5 is unavailable.** The detection expert is the open Grounding-DINO."],
    )


def recipe_summary(recipe, phase: str, stage_summaries: list[dict] | None = None) -> str:
    """Markdown: what a recipe trained (``phase``: ``"align"`` or ``"instruct"``, which includes align)."""
    import yaml

    optim = recipe.optim
    lines = []
    losses = {s.get("stage"): s.get("train_loss") for s in stage_summaries or [] if isinstance(s, dict)}

    def loss(stage: str) -> str:
        value = losses.get(stage)
        return f", final training loss {value:.3f}" if isinstance(value, (int, float)) else ""

    data = recipe.data or {}
    source = data.get("source", "synthetic")
    described = (f"the synthetic world (`astrea_vlm.train.synthetic`, {data.get('train_size', '?')} training scenes at "
                 f"{data.get('image_size', '?')} px, seed {data.get('seed', 0)})" if source == "synthetic" else
                 ", ".join(f"`{k}: {v}`" for k, v in data.items()))
    lines.append(f"**Data**: {described}.")
    stages = [" + ".join(stage) for stage in recipe.stages]
    align_lr = recipe.align.optim.get("learning_rate", optim.get("learning_rate"))
    lines.append(f"**Progressive pre-alignment** (`astrea align`): {len(stages)} stages, {' > '.join(stages)}; "
                 f"{recipe.align.max_steps} steps each at learning rate {align_lr}, training "
                 f"{', '.join(recipe.align.trainable)} of the stage's expert, the rest frozen.")
    for index, stage in enumerate(recipe.stages, start=1):
        name = f"align-{index}-{'+'.join(stage)}"
        if name in losses:
            lines.append(f"- stage {index} ({' + '.join(stage)}){loss(name)}")
    if phase == "instruct":
        instruct = recipe.instruct
        lora = f", LoRA r={instruct.lora.get('r')} on the LLM" if instruct.lora else ""
        lines.append(f"**Instruction tuning** (`astrea instruct`): {instruct.max_steps} steps at learning rate "
                     f"{instruct.optim.get('learning_rate', optim.get('learning_rate'))}, training "
                     f"{', '.join(instruct.trainable)}{lora}; MoE fusion {'with' if instruct.use_moco else 'without'} "
                     f"momentum contrast{loss('instruct')}.")
    lines.append(f"**Optimiser**: AdamW (betas {optim.get('adam_beta1')}, {optim.get('adam_beta2')}; weight decay "
                 f"{optim.get('weight_decay')}), {optim.get('lr_scheduler_type')} schedule with {optim.get('warmup_ratio')} "
                 f"warm-up, batch {optim.get('per_device_train_batch_size', 8)} per device x "
                 f"{optim.get('gradient_accumulation_steps', 1)} accumulation; seed {recipe.seed}.")
    full = yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False).rstrip()
    details = f"<details><summary>The full recipe</summary>\n\n```yaml\n{full}\n```\n\n</details>"
    return "\n\n".join([*lines, details])


def trained_facts(path: str | Path, recipe, phase: str, init_from: str | Path | None, stage_summaries: list[dict] | None,
                  command: str) -> CardFacts:
    """A folder written by ``astrea align`` (``phase="align"``) or ``astrea instruct``."""
    parent = read_metadata(init_from) if init_from else {}
    parts = dict((parent.get("astrea") or {}).get("parts") or {})
    if not parts:
        llm = (recipe.model or {}).get("llm")
        parts = {"language model": "the world LLM (`astrea_vlm/train/world_llm`)" if llm == "world" else (llm or "random"),
                 **{role: "random toy tower" for role in ("caption", "classification", "detection", "segmentation")}}
    started = f"from `{init_from}`" if init_from else f"from a random `{(recipe.model or {}).get('preset', 'tiny')}` preset"
    what = "progressive pre-alignment" if phase == "align" else "progressive pre-alignment and instruction tuning"
    limitations = []
    if (recipe.data or {}).get("source", "synthetic") == "synthetic":
        limitations.append("**A toy.** Trained on the synthetic world of coloured shapes only: it answers that world's "
                           "questions and nothing else.")
    if any(source == "random" or "random toy" in source for source in parts.values()):
        limitations.append("**Toy parts.** Some parts started random (see Parts); they are not pretrained models.")
    return CardFacts(
        path=str(path),
        origin=f"Written by `{command}`: {what}, started {started}; the recipe is under Training.",
        parts=parts,
        datasets=_dataset_names(recipe.data or {}),
        training=recipe_summary(recipe, phase, stage_summaries),
        limitations=limitations,
        question="How many shapes are in the image?" if (recipe.data or {}).get("source", "synthetic") == "synthetic"
        else "What is in the image?",
        extra_tags=["synthetic-data"] if (recipe.data or {}).get("source", "synthetic") == "synthetic" else [],
    )


def write_trained_card(folder: str | Path, model, processor, recipe, phase: str, init_from: str | Path | None = None,
                       stage_summaries: list[dict] | None = None) -> Path:
    """The card of a folder ``astrea align`` (``phase="align"``) or ``astrea instruct`` just wrote."""
    facts = trained_facts(folder, recipe, phase, init_from, stage_summaries, f"astrea {phase}")
    return write_card(folder, facts, model.config, processor, recipe=recipe, n_parameters=model.num_parameters())


# ------------------------------------------------------------------------------- eval results
def eval_results_of(results: dict, dataset_name: str | None = None) -> list:
    """``EvalResult`` entries of one ``astrea eval`` results dict: each question type's primary
    metric, and the mean accuracy of a ``qa`` run."""
    from huggingface_hub import EvalResult

    from .eval.runner import PRIMARY

    task = results["task"]
    name = dataset_name or str(results.get("data"))
    # model-index groups results by dataset type: the data as astrea eval read it (a local file or folder)
    common = {"task_name": f"astrea eval --task {task}", "dataset_type": str(results.get("data")), "dataset_name": name}
    found = []
    for qtype, values in sorted(results.get("per_type", {}).items()):
        key = PRIMARY[values["metric"]]
        found.append(EvalResult(task_type=EVAL_TASK_TYPES.get(values["metric"], "visual-question-answering"),
                                metric_type="cider" if key == "cider_d" else "accuracy", metric_name=f"{qtype} ({key})",
                                metric_value=round(float(values[key]), 4), **common))
    mean = results.get("metrics", {}).get("mean_accuracy")
    if mean is not None:
        found.append(EvalResult(task_type="visual-question-answering", metric_type="accuracy",
                                metric_name="mean accuracy (short answers)", metric_value=round(float(mean), 4), **common))
    return found


def record_eval_results(folder: str | Path, results: dict, dataset_name: str | None = None) -> Path:
    """Add ``results`` (an ``astrea eval`` results dict) to ``folder``'s card: its ``model-index`` and
    its Evaluation section. Earlier results for the same data and task are replaced."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no README.md model card to record results in; write the folder with astrea")
    card = ModelCard.load(path)
    new = eval_results_of(results, dataset_name)
    replaced = {(r.dataset_name, r.task_name) for r in new}
    kept = [r for r in card.data.eval_results or [] if (r.dataset_name, r.task_name) not in replaced]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or Path(folder).name
    text = card.text
    section = _evaluation_section(card.data.eval_results, str(folder))
    start = text.find(EVALUATION_HEADING + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(EVALUATION_HEADING))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}").save(path)
    return path


# ----------------------------------------------------------------------------------- world LLM
def world_llm_card(folder: str | Path, summary: dict, command: str, path: str | None = None) -> Path:
    """README.md of an ``astrea pretrain-llm`` folder (a text-only Llama with its tokenizer); ``path``:
    how the usage snippet names the folder (default: ``folder`` as given)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    settings, accuracy = summary.get("settings", {}), summary.get("symbolic_accuracy", {})
    text_config = summary.get("text_config", {})
    data = ModelCardData(license=LICENSE, library_name="transformers", pipeline_tag="text-generation",
                         datasets=["astrea-synthetic-world"], tags=["astrea", "synthetic-data", "toy"], language=["en"],
                         base_model=None)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
    body = "\n".join([
        f"# {folder.name}",
        "",
        f"The *world LLM* of the astrea demo, written by `{command}` "
        "(`astrea_vlm/train/pretrain_llm.py`): a "
        f"{text_config.get('num_hidden_layers', '?')}-layer Llama of width {text_config.get('hidden_size', '?')} "
        f"(vocabulary {text_config.get('vocab_size', '?')}), pretrained "
        f"{'from random weights' if 'continued_from' not in summary else 'from an earlier world LLM (`continued_from` in `pretrain.json`)'}"
        " on the synthetic world's "
        "questions and answers, with a *symbolic scene* in place of the image: visual token j is the sum of the "
        "LLM's word embeddings of what covers grid cell j, weighted by the covered fraction. No pixel, tower or "
        "projector is involved. It plays the part of the paper's pretrained LLM: a recipe with `model.llm: world` "
        "starts from it.",
        "",
        "## Training",
        "",
        f"{settings.get('steps', '?')} steps of batch {settings.get('batch_size', '?')} on "
        f"{settings.get('scenes', '?')} scenes of the `pretrain` split (seed {settings.get('seed', '?')}), AdamW at "
        f"{settings.get('learning_rate', '?')}, prompt layout `image_position: {settings.get('image_position', '?')}`; "
        "every setting and the loss curve are in `pretrain.json`."
        + ("" if "continued_from" not in summary else
           f" It continued a run of {summary['continued_from'].get('settings', {}).get('steps', '?')} steps from random "
           f"weights on {summary['continued_from'].get('settings', {}).get('scenes', '?')} scenes (its settings and scores: "
           "`continued_from` in `pretrain.json`)."),
        "",
        "## Evaluation",
        "",
        f"Answer accuracy on {settings.get('validation_scenes', '?')} held-out symbolic scenes: {scores or 'not recorded'}.",
        "",
        "## Usage",
        "",
        "As a text-only causal LM (without the symbolic scene it has nothing to look at, so its answers only "
        "show the format it learnt):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"path = {json.dumps(path or str(folder))}",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        'inputs = tokenizer("USER: How many shapes are there?\\nASSISTANT:", return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=8, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "## Limitations",
        "",
        "- **A toy.** It knows the synthetic world's language only (shapes, colours, positions); it is no general LLM.",
        "",
    ])
    card = folder / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(card)
    return card
