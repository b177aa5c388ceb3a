"""``astrea align`` and ``astrea instruct``: run a recipe's stages (see :mod:`.schedule`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .schedule import Recipe, configure_stage, format_audit, parameter_audit

DONE = "stage_done.json"


def _sft_config(recipe: Recipe, phase, output_dir: Path, **overrides):
    from trl import SFTConfig

    optim = {**recipe.optim, **phase.optim}
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=phase.max_steps,
        per_device_train_batch_size=int(optim.pop("per_device_train_batch_size", 8)),
        gradient_accumulation_steps=int(optim.pop("gradient_accumulation_steps", 1)),
        learning_rate=float(optim.pop("learning_rate")),
        weight_decay=float(optim.pop("weight_decay")),
        adam_beta1=float(optim.pop("adam_beta1")),
        adam_beta2=float(optim.pop("adam_beta2")),
        lr_scheduler_type=optim.pop("lr_scheduler_type"),
        warmup_steps=max(0, round(float(optim.pop("warmup_ratio")) * phase.max_steps)),
        logging_steps=recipe.logging_steps,
        save_steps=recipe.save_steps,
        save_total_limit=2,
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=bool(optim.pop("bf16", False)),
        gradient_checkpointing=bool(optim.pop("gradient_checkpointing", False)),
        assistant_only_loss=True,
        max_length=None,
        report_to=[],
        dataloader_num_workers=0,
        ddp_find_unused_parameters=True,  # dropped experts' adapters and frozen stages take no gradient
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
        **optim,
        **overrides,
    )


def load_model_and_processor(recipe: Recipe, init_from: str | Path | None = None):
    """The recipe's model: ``init_from`` (a saved folder), ``model.path``, or a random ``model.preset``."""
    from ..configuration import get_preset
    from ..modeling import AstreaForConditionalGeneration
    from ..processing import AstreaProcessor, build_processor

    source = init_from or recipe.model.get("path")
    if source is not None:
        if not Path(source, "config.json").is_file():
            raise FileNotFoundError(f"{source} is not an Astrea folder (no config.json); write one with `astrea create`")
        return AstreaForConditionalGeneration.from_pretrained(source), AstreaProcessor.from_pretrained(source)
    preset = recipe.model.get("preset", "tiny")
    if preset != "tiny":
        raise ValueError(f"model.preset={preset!r} has no random weights to start from; give model.path (an `astrea create` folder)")
    torch.manual_seed(int(recipe.model.get("seed", recipe.seed)))
    config = get_preset(preset, **recipe.model.get("overrides", {}))
    return AstreaForConditionalGeneration(config), build_processor(config)


def _save_weights(model, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "weights.safetensors.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, folder / "weights.safetensors")


def _load_weights(model, folder: Path) -> None:
    model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def run_stage(model, processor, recipe: Recipe, phase, groups: list[str], roles: list[str], dataset, stage_dir: Path,
              resume: bool, use_moco: bool, data_collator=None, log=print):
    """Train one stage; skipped when already done, resumed from its last checkpoint when asked."""
    from .trainer import AstreaSFTTrainer

    if (stage_dir / DONE).is_file():
        _load_weights(model, stage_dir)
        log(f"[{stage_dir.name}] done earlier: weights loaded")
        return json.loads((stage_dir / DONE).read_text())
    if not hasattr(model, "peft_config"):  # a PEFT model was configured when it was wrapped
        configure_stage(model, groups, roles)
    log(format_audit(stage_dir.name, parameter_audit(model)))
    trainer = AstreaSFTTrainer(
        model=model,
        args=_sft_config(recipe, phase, stage_dir),
        train_dataset=dataset,
        processing_class=processor,
        data_collator=data_collator,
        use_moco=use_moco,
    )
    checkpoint = _last_checkpoint(stage_dir) if resume else None
    if checkpoint:
        log(f"[{stage_dir.name}] resuming from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    _save_weights(model, stage_dir)
    summary = {"stage": stage_dir.name, "roles": roles, "groups": groups, "train_loss": result.training_loss,
               "log_history": trainer.state.log_history}
    tmp = stage_dir / f"{DONE}.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, stage_dir / DONE)
    return summary


def run_align(recipe: Recipe, output_dir: str | Path | None = None, resume: bool = False, log=print) -> Path:
    """The progressive pre-alignment stages; writes ``<output>/aligned`` (a Hub-ready folder)."""
    from ..export import save_hub_folder
    from .data import stage_dataset

    output = Path(output_dir or recipe.output_dir)
    model, processor = load_model_and_processor(recipe)
    model.train()
    summaries = []
    for index, roles in enumerate(recipe.stages):
        stage_dir = output / f"align-{index + 1}-{'+'.join(roles)}"
        model.model.set_alignment_stage(roles)
        dataset = stage_dataset(recipe.data, index, recipe.order, split="train")
        summaries.append(
            run_stage(model, processor, recipe, recipe.align, recipe.align.trainable, roles, dataset, stage_dir, resume,
                      use_moco=False, log=log)
        )
    model.model.set_alignment_stage(None)
    model.requires_grad_(True)
    for tower in model.model.towers.values():
        tower.freeze_if_configured()
    aligned = output / "aligned"
    save_hub_folder(model.eval(), aligned, processor=processor)
    (aligned / "alignment_summary.json").write_text(json.dumps(summaries, indent=1))
    log(f"aligned model written to {aligned}")
    return aligned


def run_instruct(recipe: Recipe, output_dir: str | Path | None = None, resume: bool = False, init_from: str | Path | None = None,
                 log=print) -> Path:
    """Instruction tuning (MoE fusion + MoCo) from an aligned folder; runs the alignment first if there is none."""
    from ..export import save_hub_folder
    from .data import instruct_dataset

    output = Path(output_dir or recipe.output_dir)
    aligned = Path(init_from) if init_from else output / "aligned"
    if not (aligned / "config.json").is_file():
        if init_from:
            raise FileNotFoundError(f"no aligned model in {aligned}; run `astrea align --recipe ...` first or fix --init-from")
        log(f"no aligned model in {aligned}: running the alignment stages first")
        aligned = run_align(recipe, output, resume=resume, log=log)
    model, processor = load_model_and_processor(recipe, init_from=aligned)
    model.train()
    phase = recipe.instruct
    dataset = instruct_dataset(recipe.data, split="train")
    stage_dir = output / "instruct"
    if phase.lora:
        from peft import LoraConfig, get_peft_model

        groups = [g for g in phase.trainable if g != "llm"]
        configure_stage(model, groups, list(model.config.expert_order))
        lora = LoraConfig(r=int(phase.lora.get("r", 16)), lora_alpha=int(phase.lora.get("alpha", 32)),
                          target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
        model = get_peft_model(model, lora)
        for group_modules in _modules_for(model.base_model.model, groups).values():
            for module in group_modules:
                module.requires_grad_(True)
    train_target = model
    summary = run_stage(train_target, processor, recipe, phase, phase.trainable, list(model.config.expert_order), dataset,
                        stage_dir, resume, use_moco=phase.use_moco, log=log)
    final = output / "final"
    to_save = train_target.merge_and_unload() if phase.lora else train_target
    save_hub_folder(to_save.eval(), final, processor=processor)
    (final / "instruct_summary.json").write_text(json.dumps(summary, indent=1))
    log(f"instruction-tuned model written to {final}")
    return final


def _modules_for(model, groups):
    from .schedule import trainable_modules

    return trainable_modules(model, groups, list(model.config.expert_order))
