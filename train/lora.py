"""LoRA in recipes: a phase's ``lora:`` block is a PEFT ``LoraConfig`` plus where the result goes.

::

    instruct:
      trainable: [router, adapters, moco_head, llm]
      lora:
        r: 16
        lora_alpha: 32
        lora_dropout: 0.05
        target_modules: ".*language_model.*\\.(q_proj|v_proj)"  # default: every LLM projection
        save: adapter      # merged (default) | adapter | both

Every ``LoraConfig`` field is accepted under its PEFT name (``alpha`` is read as ``lora_alpha``);
an unknown field is an error that lists the valid ones. ``target_modules`` defaults to the LLM's
attention and MLP projections only, as a regex: a list of names is suffix-matched by PEFT and would
also put LoRA into the vision towers and projectors.

With LoRA the LLM trains through its LoRA weights; the phase's other trainable groups (router,
adapters, MoCo head, projectors, bridges) train in place, as without LoRA. ``save`` says what
``astrea instruct`` writes:

* ``merged``: ``<output>/final``, a complete model folder with the LoRA merged into the LLM;
* ``adapter``: ``<output>/adapter``, a PEFT folder (``adapter_config.json``,
  ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads on the aligned folder
  (``<output>/aligned``, its ``base_model_name_or_path``). The other groups the phase trained are
  saved in it as PEFT ``modules_to_save``, so base + adapter is the trained model;
* ``both``: the two.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

#: What ``lora.save`` may say.
SAVE_MODES = ("merged", "adapter", "both")

#: The LLM's projections, as a regex PEFT full-matches (towers and projectors stay LoRA-free).
DEFAULT_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
DEFAULTS = {"r": 16, "lora_alpha": 32, "target_modules": DEFAULT_TARGET_MODULES}

#: Recipe spellings read as PEFT names.
ALIASES = {"alpha": "lora_alpha"}


def lora_fields() -> list[str]:
    """The fields a ``LoraConfig`` takes at construction (PEFT's own list)."""
    from peft import LoraConfig

    return sorted(f.name for f in dataclasses.fields(LoraConfig) if f.init)


def parse_lora(spec: dict[str, Any] | None, where: str = "lora") -> dict[str, Any] | None:
    """A recipe's ``lora:`` block, checked and completed: the ``LoraConfig`` fields plus ``save``.

    Raises ``ValueError`` naming ``where`` and the field for an unknown field, a field given twice
    (``alpha`` and ``lora_alpha``), a bad ``save`` or a value ``LoraConfig`` refuses.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping of LoraConfig fields (e.g. {{r: 16, lora_alpha: 32}}) or null, got {spec!r}")
    body = dict(spec)
    save = body.pop("save", "merged")
    if save not in SAVE_MODES:
        raise ValueError(f"{where}.save={save!r}: choose one of {list(SAVE_MODES)}")
    for alias, name in ALIASES.items():
        if alias in body:
            if name in body:
                raise ValueError(f"{where} gives both {alias!r} and {name!r}; keep {name!r}")
            body[name] = body.pop(alias)
    valid = lora_fields()
    unknown = sorted(set(body) - set(valid))
    if unknown:
        raise ValueError(
            f"{where} has unknown field(s) {unknown}; it takes `save` ({'/'.join(SAVE_MODES)}) and the fields of "
            f"peft.LoraConfig: {valid}"
        )
    config = {**DEFAULTS, **body}
    rank = config["r"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}.r={rank!r}: the LoRA rank is a positive integer")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}.lora_dropout={dropout!r}: a dropout probability in [0, 1)")
    build_lora_config(config, where)  # refuse values PEFT refuses now, not after the alignment stages
    return {**config, "save": save}


def build_lora_config(spec: dict[str, Any], where: str = "lora"):
    """The ``LoraConfig`` of a parsed ``lora:`` block (``save`` is not part of it)."""
    from peft import LoraConfig

    fields = {key: value for key, value in spec.items() if key != "save"}
    try:
        return LoraConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: peft.LoraConfig refuses {fields}: {error}") from None


def wrap_with_lora(model, spec: dict[str, Any], groups: list[str], roles: list[str]):
    """``get_peft_model`` with the phase's LoRA; the phase's other groups train in place."""
    from peft import get_peft_model

    from .stages import configure_stage, trainable_modules

    others = [group for group in groups if group != "llm"]
    configure_stage(model, others, roles)
    peft_model = get_peft_model(model, build_lora_config(spec))
    base = peft_model.base_model.model
    for modules in trainable_modules(base, others, roles).values():
        for module in modules:
            module.requires_grad_(True)
    return peft_model


def trained_module_names(model, groups: list[str], roles: list[str]) -> list[str]:
    """Dotted names (in ``AstreaForConditionalGeneration``) of the modules the non-LLM ``groups`` train.

    Module lists are named element by element: PEFT wraps a ``modules_to_save`` module in a
    wrapper that forwards calls, which a ``ModuleList`` has none of.
    """
    from .stages import trainable_modules

    names = {id(module): name for name, module in model.named_modules()}
    found = []
    for group, modules in trainable_modules(model, [g for g in groups if g != "llm"], roles).items():
        for module in modules:
            children = list(module) if isinstance(module, nn.ModuleList) else [module]
            found.extend(names[id(child)] for child in children)
    return found


def save_lora_result(peft_model, spec: dict[str, Any], output: Path, aligned: Path, groups: list[str], roles: list[str],
                     save_merged) -> dict[str, Path]:
    """Write what ``spec["save"]`` asks for; returns ``{"adapter": folder, "merged": folder}`` (those written).

    ``save_merged(model, folder)`` writes a merged model folder (the caller's Hub-folder writer).
    The adapter is written first: merging replaces the PEFT wrappers.
    """
    from peft.utils.other import set_additional_trainable_modules

    written: dict[str, Path] = {}
    if spec["save"] in ("adapter", "both"):
        base = peft_model.base_model.model
        config = peft_model.peft_config[peft_model.active_adapter]
        extra = trained_module_names(base, groups, roles)
        config.modules_to_save = sorted(set(config.modules_to_save or []) | set(extra))
        # Wraps each trained module with a copy of its current (trained) weights, which save_pretrained then writes.
        set_additional_trainable_modules(base, config, base.config, peft_model.active_adapter)
        config.base_model_name_or_path = str(Path(aligned).resolve())
        folder = output / "adapter"
        from .sharding import is_rank_zero

        peft_model.save_pretrained(str(folder), is_main_process=is_rank_zero())
        written["adapter"] = folder
    if spec["save"] in ("merged", "both"):
        folder = output / "final"
        save_merged(peft_model.merge_and_unload(), folder)
        written["merged"] = folder
    return written


__all__ = ["DEFAULTS", "DEFAULT_TARGET_MODULES", "SAVE_MODES", "build_lora_config", "lora_fields", "parse_lora",
           "save_lora_result", "trained_module_names", "wrap_with_lora"]
