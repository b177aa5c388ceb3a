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
        # transformers 5 names it activation checkpointing (`gradient_checkpointing` is a deprecated alias);
        # a recipe may use either name.
        activation_checkpointing=bool(optim.pop("activation_checkpointing", optim.pop("gradient_checkpointing", False))),
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
    config = preset_config(preset, recipe.model.get("overrides"))
    model = AstreaForConditionalGeneration(config)
    llm = recipe.model.get("llm")
    if llm is None:
        return model, build_processor(config)
    return model, build_processor(config, tokenizer=start_from_world_llm(model, llm))


def start_from_world_llm(model, llm: str):
    """``model.llm`` of a recipe: ``world`` (the shipped pretrained world LLM,
    :mod:`astrea_vlm.train.pretrain_llm`) or a folder written by ``astrea pretrain-llm``. Loads its
    weights into ``model``'s LLM and returns its tokenizer."""
    from .pretrain_llm import SHIPPED, load_world_llm, load_world_tokenizer

    folder = SHIPPED if llm == "world" else Path(llm)
    load_world_llm(model, folder)
    return load_world_tokenizer(folder)


def merge_overrides(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge_overrides(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def preset_config(preset: str, overrides: dict | None = None):
    """The preset's config with a recipe's ``model.overrides`` merged in, nested dicts key by key.

    So ``{text_config: {hidden_size: 128}}`` changes one field of the preset's LLM config (a
    whole sub-config is never replaced by a partial one).
    """
    from ..configuration import AstreaConfig
    from ..configuration.presets import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return AstreaConfig(**merge_overrides(PRESETS[preset](), dict(overrides or {})))


def _save_weights(model, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "weights.safetensors.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, folder / "weights.safetensors")


def _load_weights(model, folder: Path) -> None:
    try:
        model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
    except RuntimeError as error:  # missing / unexpected keys or other shapes: another model's stage
        raise ValueError(f"{folder} holds a finished stage of a different model ({str(error).splitlines()[-1].strip()}); "
                         f"use a new output folder, or delete {folder} to train the stage again") from None


def stage_fingerprint(model, recipe: Recipe, phase, groups: list[str], roles: list[str], n_rows: int) -> str:
    """A digest of what a stage starts from: the model's weights (shape, sum and absolute sum per
    tensor -- cheap even for a 13B model) and the stage's settings. A finished stage is reused only
    when the same model and settings would train it again."""
    import dataclasses
    import hashlib

    digest = hashlib.sha256()
    settings = {"phase": dataclasses.asdict(phase), "optim": recipe.optim, "groups": list(groups), "roles": list(roles),
                "rows": int(n_rows)}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if "lora_" in name:  # a fresh LoRA's random init is not part of what the stage starts from
                continue
            values = tensor.detach().double()
            digest.update(f"{name}{tuple(tensor.shape)}{float(values.sum()):.9e}{float(values.abs().sum()):.9e}".encode())
    return digest.hexdigest()[:16]


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def cache_plan(model) -> dict[str, list[str]]:
    """Which active experts can read the feature cache, and what: ``{"tower": [...], "projected": [...]}``.

    A frozen tower's tokens never change, so they come from the cache (``tower``); when the
    expert's projector is frozen too (an earlier, finished alignment stage; instruction tuning
    with the projectors frozen) its output ``C_i`` comes from the cache instead (``projected``).
    An expert whose tower trains keeps reading pixels.
    """
    from .feature_cache import find_backbone

    backbone = find_backbone(model)
    plan: dict[str, list[str]] = {"tower": [], "projected": []}
    for role in backbone.active_roles:
        if any(p.requires_grad for p in backbone.towers[role].parameters()):
            continue
        frozen_projector = not any(p.requires_grad for p in backbone.projectors[role].parameters())
        plan["projected" if frozen_projector else "tower"].append(role)
    return plan


def _dataset_images(dataset) -> list:
    """The dataset's distinct images, decoded once each (QA rows repeat their scene's image)."""
    import io

    from datasets import Image, List
    from PIL import Image as PILImage

    raw = dataset.select_columns(["images"]).cast_column("images", List(Image(decode=False)))
    seen: set[bytes] = set()
    images = []
    for row in raw:
        for item in row["images"] or []:
            data = item.get("bytes")
            if data is None:  # stored as a path: decode it as the Image feature would
                images.append(Image().decode_example(item))
            elif data not in seen:
                seen.add(data)
                images.append(PILImage.open(io.BytesIO(data)))
    return images


def _with_feature_cache(trainer, model, processor, dataset, cache_dir: Path, log=print):
    """Fill the cache for this stage's frozen parts and swap the trainer's collator for a cached one."""
    from .feature_cache import CachedFeatureCollator, FeatureCache

    plan = cache_plan(model)
    if not plan["tower"] and not plan["projected"]:
        return
    cache = FeatureCache(cache_dir)
    images = _dataset_images(dataset)
    for kind, roles in plan.items():
        if roles:
            stats = cache.build(model, processor, images, roles=roles, kind=kind, progress=True)
            log(f"feature cache ({kind}: {', '.join(roles)}): {sum(stats['computed'].values())} computed, "
                f"{sum(stats['skipped'].values())} reused, {stats['seconds']:.1f} s")
    trainer.data_collator = CachedFeatureCollator(trainer.data_collator, cache, model, processor,
                                                  tower_roles=plan["tower"], projected_roles=plan["projected"])


def run_stage(model, processor, recipe: Recipe, phase, groups: list[str], roles: list[str], dataset, stage_dir: Path,
              resume: bool, use_moco: bool, data_collator=None, log=print, cache_dir: Path | None = None):
    """Train one stage; skipped when already done, resumed from its last checkpoint when asked.

    With ``cache_dir`` the frozen towers' tokens and the finished stages' projected features are
    computed once into a :class:`FeatureCache` there and read from it while training (paper §3.1.2).
    """
    from .trainer import AstreaSFTTrainer

    fingerprint = stage_fingerprint(model, recipe, phase, groups, roles, len(dataset))
    if (stage_dir / DONE).is_file():
        done = json.loads((stage_dir / DONE).read_text())
        if done.get("fingerprint", fingerprint) != fingerprint:
            raise ValueError(f"{stage_dir} holds a finished stage that was trained from another model or with other "
                             f"settings than this run's; use a new output folder, or delete {stage_dir} to train the "
                             f"stage again")
        _load_weights(model, stage_dir)
        log(f"[{stage_dir.name}] done earlier: weights loaded")
        return done
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
    if cache_dir is not None and data_collator is None:
        _with_feature_cache(trainer, model, processor, dataset, cache_dir, log=log)
    checkpoint = _last_checkpoint(stage_dir) if resume else None
    if checkpoint:
        log(f"[{stage_dir.name}] resuming from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    _save_weights(model, stage_dir)
    summary = {"stage": stage_dir.name, "roles": roles, "groups": groups, "fingerprint": fingerprint, "train_loss": result.training_loss,
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
    cache_dir = output / "feature_cache" if recipe.use_cache else None
    summaries = []
    for index, roles in enumerate(recipe.stages):
        stage_dir = output / f"align-{index + 1}-{'+'.join(roles)}"
        model.model.set_alignment_stage(roles)
        dataset = stage_dataset(recipe.data, index, recipe.order, split="train", processor=processor, log=log)
        summaries.append(
            run_stage(model, processor, recipe, recipe.align, recipe.align.trainable, roles, dataset, stage_dir, resume,
                      use_moco=False, log=log, cache_dir=cache_dir)
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
                        stage_dir, resume, use_moco=phase.use_moco, log=log,
                        cache_dir=output / "feature_cache" if recipe.use_cache else None)
    final = output / "final"
    to_save = train_target.merge_and_unload() if phase.lora else train_target
    save_hub_folder(to_save.eval(), final, processor=processor)
    (final / "instruct_summary.json").write_text(json.dumps(summary, indent=1))
    log(f"instruction-tuned model written to {final}")
    return final


def _modules_for(model, groups):
    from .schedule import trainable_modules

    return trainable_modules(model, groups, list(model.config.expert_order))
