"""Recipes: one declarative YAML file drives ``astrea align`` and ``astrea instruct``.

A recipe names the model, the data, the stage order (the grammar of :mod:`.stages`) and, per
phase, what trains, for how long and with which optimiser settings (the paper's defaults,
:data:`PAPER_OPTIM`). ``train/recipes/tiny.yaml`` comments every field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .lora import parse_lora
from .sharding import MODES
from .stages import ALIGN_GROUPS, INSTRUCT_GROUPS, STAGES, normalise_order

PAPER_OPTIM = {
    "learning_rate": 1e-4,
    "weight_decay": 0.05,
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.15,
}

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


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
    cache_dir: str | None = None
    seed: int = 0
    eval_steps: int = 0  # > 0: the validation split's loss every this many steps of every stage (loss.png draws it)
    distributed: str = "none"  # "fsdp": shard the model over the torchrun processes (train/sharding.py)

    def feature_cache_dir(self, output: str | os.PathLike | None = None) -> Path | None:
        """Where training reads and extends the feature cache: ``cache_dir`` (e.g. a cache built
        beforehand by ``astrea cache build --recipe``), else ``<output>/feature_cache``; ``None``
        with ``cache: false``."""
        if not self.use_cache:
            return None
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        return Path(output or self.output_dir) / "feature_cache"

    @property
    def stages(self) -> list[list[str]]:
        """The alignment stages' own roles, in order (``order`` read by :func:`normalise_order`)."""
        return [list(stage) for stage in normalise_order(self.order)]

    def training_args(self, phase: PhaseRecipe, output_dir: Path, **overrides):
        """The :class:`AstreaSFTConfig` of one stage of ``phase``: the recipe's and the phase's settings
        (optimiser, and the training terms' ``moco_*`` / ``fusion_load_balance_coef`` / ``*_lr_multiplier``)."""
        from .trainer import AstreaSFTConfig

        optim = {**self.optim, **phase.optim}
        if self.eval_steps > 0:  # off by default: with it, the weights differ in the last float bits (measured)
            overrides = {"eval_strategy": "steps", "eval_steps": self.eval_steps,
                         "per_device_eval_batch_size": int(optim.get("per_device_train_batch_size", 8)), **overrides}
        return AstreaSFTConfig(
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
            logging_steps=self.logging_steps,
            save_steps=self.save_steps,
            save_total_limit=2,
            seed=self.seed,
            data_seed=self.seed,
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
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:  # a syntax error: name the file and the place, not a parser trace
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"recipe {path} is not valid YAML: {getattr(err, 'problem', None) or err}{where}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path}: a recipe is a YAML mapping of fields (model, data, order, ...), got {type(raw).__name__}")
    known = {"model", "data", "order", "optim", "align", "instruct", "output_dir", "save_steps", "logging_steps", "cache",
             "cache_dir", "seed", "eval_steps", "distributed"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"recipe {path}: unknown field(s) {unknown}; known fields are {sorted(known)}")

    def phase(name: str, allowed: tuple[str, ...], default: list[str]) -> PhaseRecipe:
        body = dict(raw.get(name) or {})
        trainable = body.pop("trainable", default)
        bad = [g for g in trainable if g not in allowed]
        if bad:
            raise ValueError(f"recipe {path}: {name}.trainable has unknown group(s) {bad}; choose from {list(allowed)}")
        lora = body.pop("lora", None)
        if lora is not None and name != "instruct":
            raise ValueError(f"recipe {path}: {name}.lora: LoRA is for instruction tuning (the alignment stages train the "
                             f"projector and bridge against a frozen LLM); put it under instruct.lora")
        return PhaseRecipe(
            max_steps=int(body.pop("max_steps", 100)),
            trainable=list(trainable),
            lora=parse_lora(lora, f"recipe {path}: {name}.lora"),
            use_moco=bool(body.pop("use_moco", True)),
            optim=body,
        )

    distributed = str(raw.get("distributed", "none") or "none")
    if distributed not in MODES:
        raise ValueError(f"recipe {path}: distributed={distributed!r}; choose one of {list(MODES)} (fsdp: launch with torchrun)")
    order = raw.get("order", list(STAGES))
    try:
        normalise_order(order)
    except ValueError as error:
        raise ValueError(f"recipe {path}: {error}") from None
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
        cache_dir=None if raw.get("cache_dir") is None else str(raw["cache_dir"]),
        seed=int(raw.get("seed", 0)),
        eval_steps=int(raw.get("eval_steps", 0) or 0),
        distributed=distributed,
    )


__all__ = ["PAPER_OPTIM", "RECIPES_DIR", "PhaseRecipe", "Recipe", "load_recipe", "resolve_recipe"]
