"""The training stages: their order, what each trains, what it reads from the feature cache, and the loop.

Progressive pre-alignment (paper §3.1) trains one expert -- or a group of experts trained jointly
(Table 6) -- per stage, in a given order, each stage's targets holding the labels of every stage
so far (§3.1.3); instruction tuning (§3.2) then trains the MoE fusion with momentum contrast.
This module owns:

* the **order grammar** (:func:`normalise_order`), used by recipes and ablations alike;
* the **roles per stage** (:func:`stage_roles`: cumulative);
* the **trainable groups** (:func:`configure_stage`) and the parameter audit;
* the **cache plan** (:func:`cache_plan`: which frozen parts are read from the feature cache);
* the **stage loop** (:func:`run_stage` for one stage, :func:`run_alignment_stages` for all).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..configuration.configuration_astrea import EXPERT_ROLES
from ..modeling.modeling_astrea import find_backbone
from .atomic import save_safetensors_atomic, write_json_atomic
from .sharding import ShardingProbe, full_state_dict, full_tensor, is_rank_zero, is_sharded, load_full_state_dict, on_rank_zero

#: The stage roles, in the paper's default order (one per expert).
STAGES: tuple[str, ...] = EXPERT_ROLES

#: Named orders (Table 6). In a list, an item is a role or a list of roles trained jointly, and
#: ``"all"`` stands for every role the list does not name elsewhere (``["caption", "all"]`` is Cap->All).
ORDERS: dict[str, list] = {
    "default": ["caption", "classification", "detection", "segmentation"],
    "reverse": ["segmentation", "detection", "classification", "caption"],
    "cap_all": ["caption", ["classification", "detection", "segmentation"]],
    "all": [["caption", "classification", "detection", "segmentation"]],
}

# `llm` is allowed while aligning only for toy recipes whose LLM starts random (the tiny recipe):
# the paper aligns against a pretrained, frozen LLM, and a random frozen LLM cannot be steered.
ALIGN_GROUPS = ("projector", "bridge", "llm")
INSTRUCT_GROUPS = ("router", "adapters", "moco_head", "llm", "projector", "bridge")

#: Written into a stage's folder when it has finished (with its fingerprint and log history).
DONE = "stage_done.json"


# ------------------------------------------------------------------------------ order grammar
def normalise_order(order: str | Sequence[Any] | None = None) -> list[tuple[str, ...]]:
    """Stages as tuples of roles, from a name of :data:`ORDERS` or a list of roles / role lists.

    ``None`` is the default order. Every role must appear exactly once.
    """
    if order is None:
        order = ORDERS["default"]
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; use one of {sorted(ORDERS)} or a list of roles")
        order = ORDERS[order]
    if not isinstance(order, (list, tuple)):
        raise ValueError(f"order {order!r} must be one of {sorted(ORDERS)} or a list of roles")
    named = [r for item in order for r in ([item] if isinstance(item, str) else list(item)) if r != "all"]
    rest = tuple(r for r in STAGES if r not in named)
    stages: list[tuple[str, ...]] = []
    for item in order:
        group = (item,) if isinstance(item, str) else tuple(item)
        expanded: list[str] = []
        for role in group:
            expanded.extend(rest if role == "all" else (role,))
        if not expanded:
            raise ValueError(f"order {order!r} has an empty stage")
        stages.append(tuple(expanded))
    flat = [r for s in stages for r in s]
    unknown = [r for r in flat if r not in STAGES]
    if unknown or len(set(flat)) != len(flat) or set(flat) != set(STAGES):
        raise ValueError(f"order {order!r} must list each expert role once (roles: {list(STAGES)}; a list item may "
                         f"group several, 'all' stands for the roles not named elsewhere, or use one of {sorted(ORDERS)})")
    return stages


def stage_roles(stage_index: int, order: str | Sequence[Any] | None = None) -> list[str]:
    """The cumulative roles of stage ``stage_index`` (0-based): the roles of stages 0..k, in order."""
    stages = normalise_order(order)
    if not 0 <= stage_index < len(stages):
        raise IndexError(f"stage_index {stage_index} is out of range for {len(stages)} stage(s) {stages}")
    return [r for stage in stages[: stage_index + 1] for r in stage]


def stage_name(index: int, roles: Sequence[str]) -> str:
    """The folder name of alignment stage ``index`` (0-based): ``align-<index + 1>-<roles joined by +>``."""
    return f"align-{index + 1}-{'+'.join(roles)}"


# --------------------------------------------------------------------------- trainable groups
def trainable_modules(model, groups: list[str], roles: list[str]) -> dict[str, list[torch.nn.Module]]:
    """The modules of each named group; ``projector``/``bridge`` are those of ``roles``."""
    backbone = model.model
    found: dict[str, list[torch.nn.Module]] = {}
    for group in groups:
        if group == "projector":
            found[group] = [backbone.projectors[r] for r in roles]
        elif group == "bridge":
            found[group] = [backbone.bridges[r] for r in roles if r in backbone.bridges]
        elif group == "router":
            found[group] = [backbone.fusion.router]
        elif group == "adapters":
            found[group] = [backbone.fusion.adapters]
        elif group == "moco_head":
            found[group] = [backbone.moco_head]
        elif group == "llm":
            found[group] = [backbone.language_model, model.lm_head]
    return found


def configure_stage(model, groups: list[str], roles: list[str]) -> None:
    """Freeze everything, then unfreeze the stage's groups (towers are never unfrozen here)."""
    model.requires_grad_(False)
    for modules in trainable_modules(model, groups, roles).values():
        for module in modules:
            module.requires_grad_(True)


def parameter_audit(model) -> list[tuple[str, int, int]]:
    """``(group, trainable, total)`` parameter counts per module group, towers per expert."""
    if hasattr(model, "peft_config"):  # PeftModel -> the wrapped AstreaForConditionalGeneration
        model = model.base_model.model
    backbone = getattr(model, "model", model)
    rows = []
    named = {f"tower:{r}": t for r, t in backbone.towers.items()}
    named.update({f"projector:{r}": p for r, p in backbone.projectors.items()})
    named.update({f"bridge:{r}": b for r, b in backbone.bridges.items()})
    named.update({"router": backbone.fusion.router, "adapters": backbone.fusion.adapters, "moco_head": backbone.moco_head})
    named["llm"] = backbone.language_model
    for name, module in named.items():
        params = list(module.parameters())
        rows.append((name, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)))
    head = getattr(model, "lm_head", None)
    if head is not None:
        rows.append(("lm_head", sum(p.numel() for p in head.parameters() if p.requires_grad), head.weight.numel()))
    return rows


def format_audit(title: str, rows: list[tuple[str, int, int]]) -> str:
    lines = [f"trainable parameters -- {title}", f"  {'module':<28}{'trainable':>14}{'total':>14}"]
    for name, trainable, total in rows:
        lines.append(f"  {name:<28}{trainable:>14,}{total:>14,}{'  <- trains' if trainable else ''}")
    lines.append(f"  {'all':<28}{sum(r[1] for r in rows):>14,}{sum(r[2] for r in rows):>14,}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- cache plan
def cache_plan(model) -> dict[str, list[str]]:
    """Which active experts can read the feature cache, and what: ``{"tower": [...], "projected": [...]}``.

    A frozen tower's tokens never change, so they come from the cache (``tower``); when the
    expert's projector is frozen too (an earlier, finished alignment stage; instruction tuning
    with the projectors frozen) its output ``C_i`` comes from the cache instead (``projected``).
    An expert whose tower trains keeps reading pixels.
    """
    backbone = find_backbone(model)
    plan: dict[str, list[str]] = {"tower": [], "projected": []}
    for role in backbone.active_roles:
        if any(p.requires_grad for p in backbone.towers[role].parameters()):
            continue
        frozen_projector = not any(p.requires_grad for p in backbone.projectors[role].parameters())
        plan["projected" if frozen_projector else "tower"].append(role)
    return plan


def dataset_images(dataset) -> list:
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


def use_feature_cache(trainer, model, processor, dataset, cache_dir: Path, log=print, eval_dataset=None) -> None:
    """Fill the cache for this stage's frozen parts (the training images, and the validation images
    when the stage evaluates) and swap the trainer's collator for a cached one."""
    from .feature_cache import CachedFeatureCollator, FeatureCache

    plan = cache_plan(model)
    if not plan["tower"] and not plan["projected"]:
        return
    cache = FeatureCache(cache_dir)
    # The validation images are cached on their own, after the training images: batched in with
    # them they would change the training images' batches, and so their features in the last bits.
    for images in [dataset_images(dataset)] + ([dataset_images(eval_dataset)] if eval_dataset is not None else []):
        for kind, roles in plan.items():
            if roles:
                stats = cache.build(model, processor, images, roles=roles, kind=kind, progress=is_rank_zero())
                log(f"feature cache ({kind}: {', '.join(roles)}): {sum(stats['computed'].values())} computed, "
                    f"{sum(stats['skipped'].values())} reused, {stats['seconds']:.1f} s")
    trainer.data_collator = CachedFeatureCollator(trainer.data_collator, cache, model, processor,
                                                  tower_roles=plan["tower"], projected_roles=plan["projected"])


# -------------------------------------------------------------------------------- stage loop
def save_stage_weights(model, folder: Path) -> None:
    """``weights.safetensors``: the whole state dict (gathered from every rank when sharded), written by rank 0."""
    state = full_state_dict(model)
    with on_rank_zero() as writer:
        if writer:
            folder.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(state, folder / "weights.safetensors")


def load_stage_weights(model, folder: Path) -> None:
    try:
        load_full_state_dict(model, load_file(str(folder / "weights.safetensors")))
    except RuntimeError as error:  # missing / unexpected keys or other shapes: another model's stage
        raise ValueError(f"{folder} holds a finished stage of a different model ({str(error).splitlines()[-1].strip()}); "
                         f"use a new output folder, or delete {folder} to train the stage again") from None


def stage_fingerprint(model, recipe, phase, groups: list[str], roles: list[str], n_rows: int) -> str:
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
            values = full_tensor(tensor.detach()).double()  # sharded: the whole tensor, as unsharded
            digest.update(f"{name}{tuple(tensor.shape)}{float(values.sum()):.9e}{float(values.abs().sum()):.9e}".encode())
    return digest.hexdigest()[:16]


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def run_stage(model, processor, recipe, phase, groups: list[str], roles: list[str], dataset, stage_dir: Path,
              resume: bool, use_moco: bool, data_collator=None, log=print, cache_dir: Path | None = None, eval_dataset=None):
    """Train one stage; skipped when already done, resumed from its last checkpoint when asked.

    Freezes everything but the stage's ``groups`` (a PEFT model is configured when it is wrapped),
    prints the parameter audit, trains with :class:`AstreaSFTTrainer` on ``dataset`` with the
    recipe's ``TrainingArguments`` (:meth:`Recipe.training_args`), saves the weights and writes
    :data:`DONE` with the stage's fingerprint. With ``cache_dir`` the frozen towers' tokens and the
    finished stages' projected features are computed once into a :class:`FeatureCache` there and
    read from it while training (paper §3.1.2). With ``eval_dataset`` (a recipe with ``eval_steps``)
    its loss is logged every ``eval_steps`` steps as ``eval_loss``.
    """
    from .trainer import AstreaSFTTrainer

    fingerprint = stage_fingerprint(model, recipe, phase, groups, roles, len(dataset))
    if (stage_dir / DONE).is_file():
        done = json.loads((stage_dir / DONE).read_text())
        if done.get("fingerprint", fingerprint) != fingerprint:
            raise ValueError(f"{stage_dir} holds a finished stage that was trained from another model or with other "
                             f"settings than this run's; use a new output folder, or delete {stage_dir} to train the "
                             f"stage again")
        load_stage_weights(model, stage_dir)
        log(f"[{stage_dir.name}] done earlier: weights loaded")
        return done
    if not hasattr(model, "peft_config"):  # a PEFT model was configured when it was wrapped
        configure_stage(model, groups, roles)
    log(format_audit(stage_dir.name, parameter_audit(model)))
    trainer = AstreaSFTTrainer(
        model=model,
        args=recipe.training_args(phase, stage_dir),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=data_collator,
        use_moco=use_moco,
    )
    if cache_dir is not None and data_collator is None:
        use_feature_cache(trainer, model, processor, dataset, cache_dir, log=log, eval_dataset=eval_dataset)
    checkpoint = _last_checkpoint(stage_dir) if resume else None
    if checkpoint:
        log(f"[{stage_dir.name}] resuming from {checkpoint}")
    probe = ShardingProbe() if is_sharded(model) else None
    if probe is not None:
        trainer.add_callback(probe)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_stage_weights(model, stage_dir)
    summary = {"stage": stage_dir.name, "roles": roles, "groups": groups, "fingerprint": fingerprint, "train_loss": result.training_loss,
               "log_history": trainer.state.log_history}
    if probe is not None:
        summary["sharding"] = probe.summary(model)  # the evidence that the run was sharded (tests/test_fsdp.py)
    with on_rank_zero() as writer:
        if writer:
            write_json_atomic(stage_dir / DONE, summary)
    return summary


def run_alignment_stages(model, processor, recipe, output: Path, stage_dataset: Callable[[int], Any], resume: bool = False,
                         log=print, eval_dataset: Callable[[int], Any] | None = None) -> list[dict]:
    """Progressive pre-alignment: every stage of ``recipe.order`` in turn, into ``output/align-<k>-<roles>``.

    ``stage_dataset(k)`` gives stage ``k``'s dataset (cumulative targets). Each stage sets the
    model's alignment stage to its roles (:meth:`AstreaModel.set_alignment_stage`), trains
    ``recipe.align.trainable`` of those roles and reads the frozen parts from the feature cache in
    ``output/feature_cache`` or the recipe's ``cache_dir`` (when the recipe enables it); ``eval_dataset(k)``,
    when given, is stage ``k``'s validation set. Returns the stages' summaries; the model leaves with no
    alignment stage set.
    """
    cache_dir = recipe.feature_cache_dir(output)
    summaries = []
    for index, roles in enumerate(recipe.stages):
        stage_dir = output / stage_name(index, roles)
        model.model.set_alignment_stage(roles)
        dataset = stage_dataset(index)
        summaries.append(
            run_stage(model, processor, recipe, recipe.align, recipe.align.trainable, roles, dataset, stage_dir, resume,
                      use_moco=False, log=log, cache_dir=cache_dir, eval_dataset=eval_dataset(index) if eval_dataset else None)
        )
    model.model.set_alignment_stage(None)
    return summaries


__all__ = [
    "ALIGN_GROUPS", "DONE", "INSTRUCT_GROUPS", "ORDERS", "STAGES", "cache_plan", "configure_stage", "dataset_images",
    "format_audit", "load_stage_weights", "normalise_order", "parameter_audit", "run_alignment_stages", "run_stage",
    "save_stage_weights", "stage_fingerprint", "stage_name", "stage_roles", "trainable_modules", "use_feature_cache",
]
