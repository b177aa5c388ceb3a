"""Progressive pre-alignment and instruction tuning, driven by one declarative recipe (YAML).

A recipe names the model, the data, the stage order and, per phase, what trains and for how long.
``astrea align`` runs the pre-alignment stages in order (paper §3.1); ``astrea instruct`` runs
instruction tuning with the MoE fusion and momentum contrast (§3.2). See ``train/recipes/`` for
the tiny and paper recipes. Each stage:

1. freezes the whole model, then unfreezes the stage's trainable groups (``projector`` and
   ``bridge`` of the stage's experts while aligning; ``router``, ``adapters``, ``moco_head``,
   ``llm`` -- or LoRA on the LLM -- for instruction tuning); towers stay frozen;
2. prints a trainable-parameter audit;
3. trains with :class:`AstreaSFTTrainer` on its dataset (cumulative labels: stage k's target holds
   the labels of stages 1..k in the recipe's order), with the paper's optimiser defaults
   (AdamW (0.9, 0.98), weight decay 0.05, cosine schedule, 15 % warm-up);
4. saves its weights and marks itself done, so ``--resume`` skips it next time; an interrupted
   stage resumes from its last checkpoint (weights, optimizer, scheduler, RNG, MoCo state);
5. (alignment) adds its experts' projected features ``C_k`` to the feature cache, from which
   later stages read them instead of recomputing the frozen tower and projector.

Stage order (Table 6): ``order: [caption, classification, detection, segmentation]`` (default),
the reverse, or a list with a joint group, e.g. ``[caption, [classification, detection,
segmentation]]`` for "Cap->All".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PAPER_OPTIM = {
    "learning_rate": 1e-4,
    "weight_decay": 0.05,
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.15,
}

# `llm` is allowed while aligning only for toy recipes whose LLM starts random (the tiny recipe):
# the paper aligns against a pretrained, frozen LLM, and a random frozen LLM cannot be steered.
ALIGN_GROUPS = ("projector", "bridge", "llm")
INSTRUCT_GROUPS = ("router", "adapters", "moco_head", "llm", "projector", "bridge")


@dataclass
class PhaseRecipe:
    max_steps: int = 100
    trainable: list[str] = field(default_factory=list)
    optim: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    use_moco: bool = True


@dataclass
class Recipe:
    """A parsed recipe (see ``train/recipes/tiny.yaml`` for every field, commented)."""

    model: dict[str, Any]
    data: dict[str, Any]
    order: list[Any]
    optim: dict[str, Any]
    align: PhaseRecipe
    instruct: PhaseRecipe
    output_dir: str = "outputs/astrea"
    save_steps: int = 50
    logging_steps: int = 10
    use_cache: bool = True
    seed: int = 0

    @property
    def stages(self) -> list[list[str]]:
        return [[item] if isinstance(item, str) else list(item) for item in self.order]


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe file path, or the name of a shipped recipe (``tiny``, ``astrea-13b``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no recipe file {name_or_path!r}; give a YAML path or one of the shipped recipes {names}")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe YAML (or a shipped recipe's name); errors name the field and the fix."""
    import yaml

    path = resolve_recipe(path)
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    known = {"model", "data", "order", "optim", "align", "instruct", "output_dir", "save_steps", "logging_steps", "cache", "seed"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"recipe {path}: unknown field(s) {unknown}; known fields are {sorted(known)}")

    def phase(name: str, allowed: tuple[str, ...], default: list[str]) -> PhaseRecipe:
        body = dict(raw.get(name) or {})
        trainable = body.pop("trainable", default)
        bad = [g for g in trainable if g not in allowed]
        if bad:
            raise ValueError(f"recipe {path}: {name}.trainable has unknown group(s) {bad}; choose from {list(allowed)}")
        return PhaseRecipe(
            max_steps=int(body.pop("max_steps", 100)),
            trainable=list(trainable),
            lora=body.pop("lora", None),
            use_moco=bool(body.pop("use_moco", True)),
            optim=body,
        )

    from ..configuration import EXPERT_ROLES

    order = raw.get("order", list(EXPERT_ROLES))
    flat = [r for item in order for r in ([item] if isinstance(item, str) else item)]
    bad = [r for r in flat if r not in EXPERT_ROLES]
    if bad or len(set(flat)) != len(flat):
        raise ValueError(f"recipe {path}: order={order} must list each expert role once (roles: {list(EXPERT_ROLES)})")
    return Recipe(
        model=raw.get("model", {"preset": "tiny"}),
        data=raw.get("data", {"source": "synthetic"}),
        order=order,
        optim={**PAPER_OPTIM, **(raw.get("optim") or {})},
        align=phase("align", ALIGN_GROUPS, ["projector", "bridge"]),
        instruct=phase("instruct", INSTRUCT_GROUPS, ["router", "adapters", "moco_head", "llm"]),
        output_dir=raw.get("output_dir", "outputs/astrea"),
        save_steps=int(raw.get("save_steps", 50)),
        logging_steps=int(raw.get("logging_steps", 10)),
        use_cache=bool(raw.get("cache", True)),
        seed=int(raw.get("seed", 0)),
    )


# --------------------------------------------------------------------------- freezing
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
