"""``astrea align`` and ``astrea instruct``: build the recipe's model and data, run its stages (:mod:`.stages`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .recipe import Recipe
from .stages import run_alignment_stages, run_stage


def load_model_and_processor(recipe: Recipe, init_from: str | Path | None = None):
    """The recipe's model: ``init_from`` (a saved folder), ``model.path``, or a random ``model.preset``."""
    from ..configuration import get_preset
    from ..modeling import AstreaForConditionalGeneration
    from ..processing import AstreaProcessor, build_processor

    source = init_from or recipe.model.get("path")
    if source is not None:
        if not Path(source, "config.json").is_file():
            raise FileNotFoundError(f"{source} is not an Astrea folder (no config.json); write one with `astrea create`")
        model, processor = AstreaForConditionalGeneration.from_pretrained(source), AstreaProcessor.from_pretrained(source)
    else:
        preset = recipe.model.get("preset", "tiny")
        if preset != "tiny":
            raise ValueError(f"model.preset={preset!r} has no random weights to start from; give model.path (an `astrea create` folder)")
        torch.manual_seed(int(recipe.model.get("seed", recipe.seed)))
        config = get_preset(preset, **(recipe.model.get("overrides") or {}))
        model = AstreaForConditionalGeneration(config)
        llm = recipe.model.get("llm")
        processor = build_processor(config, tokenizer=start_from_world_llm(model, llm) if llm else None)
    apply_prompt_layout(model, processor, recipe.data)
    return model, processor


def apply_prompt_layout(model, processor, data: dict | None) -> None:
    """Set the recipe's prompt layout (``data.image_position``, ``data.system_prompt``; each left
    out: the model's own) on the processor and the model's config, so that training renders every
    row in it and the saved folder prompts the model the same way (``astrea eval``, the pipeline)."""
    data = data or {}
    layout = {key: data[key] for key in ("image_position", "system_prompt") if key in data}
    processor.set_prompt_layout(**layout)
    model.config.image_position = processor.image_position
    model.config.system_prompt = processor.system_prompt


def start_from_world_llm(model, llm: str):
    """``model.llm`` of a recipe: ``world`` (the shipped pretrained world LLM,
    :mod:`astrea_vlm.train.pretrain_llm`) or a folder written by ``astrea pretrain-llm``. Loads its
    weights into ``model``'s LLM and returns its tokenizer."""
    from .pretrain_llm import SHIPPED, load_world_llm, load_world_tokenizer

    folder = SHIPPED if llm == "world" else Path(llm)
    load_world_llm(model, folder)
    return load_world_tokenizer(folder)


def prepare_model(model, recipe: Recipe):
    """``distributed: fsdp``: the model sharded over the launched processes (:mod:`.sharding`); else itself."""
    if recipe.distributed == "fsdp":
        from .sharding import shard_model

        return shard_model(model)
    return model


def _rank_zero_log(log, recipe: Recipe):
    """Only rank 0 prints (one log, not one per process). Also checks an FSDP recipe's launch before anything is built."""
    from .sharding import is_rank_zero, require_launcher

    if recipe.distributed == "fsdp":
        require_launcher()
    return log if is_rank_zero() else (lambda *args, **kwargs: None)


def run_align(recipe: Recipe, output_dir: str | Path | None = None, resume: bool = False, log=print) -> Path:
    """The progressive pre-alignment stages; writes ``<output>/aligned`` (a Hub-ready folder)."""
    from ..export import save_hub_folder
    from .data import stage_dataset
    from .sharding import on_rank_zero

    output = Path(output_dir or recipe.output_dir)
    log = _rank_zero_log(log, recipe)
    model, processor = load_model_and_processor(recipe)
    model = prepare_model(model, recipe)
    model.train()
    summaries = run_alignment_stages(
        model, processor, recipe, output,
        lambda index: stage_dataset(recipe.data, index, recipe.order, split="train", processor=processor, log=log),
        resume=resume, log=log,
        eval_dataset=(lambda index: stage_dataset(recipe.data, index, recipe.order, split="validation", processor=processor,
                                                  log=log)) if recipe.eval_steps else None,
    )
    model.requires_grad_(True)
    for tower in model.model.towers.values():
        tower.freeze_if_configured()
    aligned = output / "aligned"
    save_hub_folder(model.eval(), aligned, processor=processor)  # sharded: gathered, written by rank 0
    with on_rank_zero() as writer:
        if writer:
            (aligned / "alignment_summary.json").write_text(json.dumps(summaries, indent=1))
            from ..card import write_trained_card

            write_trained_card(aligned, model, processor, recipe, "align", recipe.model.get("path"), summaries)
    log(f"aligned model written to {aligned}")
    return aligned


def run_instruct(recipe: Recipe, output_dir: str | Path | None = None, resume: bool = False, init_from: str | Path | None = None,
                 log=print) -> Path:
    """Instruction tuning (MoE fusion + MoCo) from an aligned folder; runs the alignment first if there is none."""
    from ..export import save_hub_folder
    from .data import instruct_dataset
    from .sharding import on_rank_zero

    output = Path(output_dir or recipe.output_dir)
    log = _rank_zero_log(log, recipe)
    if recipe.instruct.lora and recipe.distributed == "fsdp":
        raise ValueError("distributed: fsdp with a LoRA recipe (instruct.lora) is not supported; train the whole LLM "
                         "(lora: null) or launch without fsdp (data parallel)")
    aligned = Path(init_from) if init_from else output / "aligned"
    if not (aligned / "config.json").is_file():
        if init_from:
            raise FileNotFoundError(f"no aligned model in {aligned}; run `astrea align --recipe ...` first or fix --init-from")
        log(f"no aligned model in {aligned}: running the alignment stages first")
        aligned = run_align(recipe, output, resume=resume, log=log)
    model, processor = load_model_and_processor(recipe, init_from=aligned)
    model = prepare_model(model, recipe)
    model.train()
    phase = recipe.instruct
    dataset = instruct_dataset(recipe.data, split="train")
    stage_dir = output / "instruct"
    roles = list(model.config.expert_order)
    if phase.lora:
        from .lora import wrap_with_lora

        model = wrap_with_lora(model, phase.lora, phase.trainable, roles)
    train_target = model
    summary = run_stage(train_target, processor, recipe, phase, phase.trainable, roles, dataset,
                        stage_dir, resume, use_moco=phase.use_moco, log=log,
                        cache_dir=recipe.feature_cache_dir(output),
                        eval_dataset=instruct_dataset(recipe.data, split="validation") if recipe.eval_steps else None)
    earlier = aligned / "alignment_summary.json"
    stages = json.loads(earlier.read_text()) if earlier.is_file() else []

    def save_merged(to_save, folder: Path) -> None:
        save_hub_folder(to_save.eval(), folder, processor=processor)  # sharded: gathered, written by rank 0
        with on_rank_zero() as writer:
            if writer:
                (folder / "instruct_summary.json").write_text(json.dumps(summary, indent=1))
                from ..card import write_trained_card

                write_trained_card(folder, to_save, processor, recipe, "instruct", aligned, [*stages, summary])

    if phase.lora:
        from .lora import save_lora_result

        written = save_lora_result(train_target, phase.lora, output, aligned, phase.trainable, roles, save_merged)
        if "adapter" in written:
            with on_rank_zero() as writer:
                if writer:
                    (written["adapter"] / "instruct_summary.json").write_text(json.dumps(summary, indent=1))
            log(f"LoRA adapter written to {written['adapter']} (PeftModel.from_pretrained on {aligned})")
        final = written.get("merged", written.get("adapter"))
    else:
        final = output / "final"
        save_merged(train_target, final)
    log(f"instruction-tuned model written to {final}")
    return final
