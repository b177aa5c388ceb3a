"""The recipe's entry points: a recipe's ``data`` section -> the source, the stage datasets, the instruction rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...geometry import DEFAULT_MAX_VERTICES, DEFAULT_TOLERANCE
from .annotations import AlignmentSource
from .coco import load_coco
from .llava import load_llava
from .report import RECIPE_HINT
from .qa import build_qa_dataset
from .synthetic_source import synthetic_scenes, synthetic_source
from .targets import build_stage_dataset


_DATA_KEYS = {
    "source", "train_size", "validation_size", "test_size", "image_size", "seed", "min_objects", "max_objects",
    "max_vertices", "tolerance", "max_objects_in_target", "max_target_chars", "max_length", "caption_mode", "skip_invalid",
    "verify_images",
    "coco_captions", "coco_instances", "tags", "images", "instruct", "instruct_images", "question_types", "type_fractions", "image_position", "system_prompt", "splits",
}
_SPLIT_SIZES = {"train": 256, "validation": 64, "test": 64}


def _split_config(data: Mapping[str, Any] | None, split: str) -> dict[str, Any]:
    data = dict(data or {"source": "synthetic"})
    unknown = sorted(set(data) - _DATA_KEYS)
    if unknown:
        raise ValueError(f"data config: unknown key(s) {unknown}; known keys are {sorted(_DATA_KEYS)}")
    overrides = (data.pop("splits", None) or {}).get(split, {})
    data.update(overrides)
    return data


def load_source(data: Mapping[str, Any] | None = None, split: str = "train", log=print) -> AlignmentSource:
    """The recipe's ``data`` section as an :class:`AlignmentSource` (``source: synthetic`` or ``coco``).

    Synthetic keys: ``train_size`` / ``validation_size`` / ``test_size`` (256 / 64 / 64),
    ``image_size`` (64), ``seed`` (0), ``min_objects`` / ``max_objects`` (2 / 5). COCO keys:
    ``images``, ``coco_captions``, ``coco_instances``, ``tags``, ``skip_invalid``,
    ``verify_images``; ``splits: {validation: {...}}`` overrides keys per split.
    """
    cfg = _split_config(data, split)
    kind = cfg.get("source", "synthetic")
    if kind == "synthetic":
        n = int(cfg.get(f"{split}_size", _SPLIT_SIZES.get(split, 64)))
        return synthetic_source(split, n, int(cfg.get("seed", 0)), cfg.get("image_size", 64),
                                min_objects=int(cfg.get("min_objects", 2)), max_objects=int(cfg.get("max_objects", 5)))
    if kind == "coco":
        if "images" not in cfg:
            raise ValueError("data config: source coco needs `images` (the image folder)")
        key = _coco_key(cfg, split)
        if key not in _COCO_SOURCES:  # the stages of a run share one load (and one printed report)
            _COCO_SOURCES.clear()
            _COCO_SOURCES[key] = load_coco(
                cfg["images"], captions=cfg.get("coco_captions"), instances=cfg.get("coco_instances"), tags=cfg.get("tags"),
                skip_invalid=bool(cfg.get("skip_invalid", False)), verify_images=cfg.get("verify_images", True),
                name=f"coco-{split}", log=log, hint=RECIPE_HINT)
        return _COCO_SOURCES[key]
    raise ValueError(f"data config: unknown source {kind!r}; use 'synthetic' or 'coco'")


_COCO_SOURCES: dict[tuple, AlignmentSource] = {}


def _coco_key(cfg: Mapping[str, Any], split: str) -> tuple:
    """What a COCO load depends on: the settings and each file's size and modification time."""
    import os

    stamps = []
    for name in ("images", "coco_captions", "coco_instances", "tags"):
        path = cfg.get(name)
        stat = os.stat(path) if path and os.path.exists(path) else None
        stamps.append((name, str(path), stat and (stat.st_size, stat.st_mtime_ns)))
    return (split, tuple(stamps), bool(cfg.get("skip_invalid", False)), str(cfg.get("verify_images", True)))


def stage_dataset(data: Mapping[str, Any] | None, stage_index: int, order: str | Sequence[Any] | None = None,
                  split: str = "train", processor: Any = None, log=print):
    """The recipe-level entry point: stage ``stage_index`` (0-based) of ``order`` built from the ``data`` section.

    Pass the model's ``processor`` so that every sequence fits its context (see
    :func:`build_stage_dataset`); target keys: ``max_objects_in_target``, ``max_vertices``,
    ``tolerance``, ``caption_mode``, ``max_length`` (with a processor) or ``max_target_chars``.
    """
    cfg = _split_config(data, split)
    source = load_source(data, split, log=log)
    return build_stage_dataset(
        source,
        stage_index,
        order,
        max_objects=cfg.get("max_objects_in_target"),
        max_vertices=int(cfg.get("max_vertices", DEFAULT_MAX_VERTICES)),
        tolerance=float(cfg.get("tolerance", DEFAULT_TOLERANCE)),
        caption_mode=cfg.get("caption_mode", "first"),
        processor=processor,
        max_length=cfg.get("max_length"),
        max_target_chars=cfg.get("max_target_chars"),
        skip_invalid=bool(cfg.get("skip_invalid", False)),
        image_position=cfg.get("image_position", "before"),
        log=log,
        hint=RECIPE_HINT,
    )


def instruct_dataset(data: Mapping[str, Any] | None = None, split: str = "train", log=print):
    """Instruction-tuning rows: the synthetic QA records (synthetic source) and/or LLaVA conversations (``instruct``)."""
    import datasets

    cfg = _split_config(data, split)
    parts = []
    if cfg.get("source", "synthetic") == "synthetic":
        n = int(cfg.get(f"{split}_size", _SPLIT_SIZES.get(split, 64)))
        scenes = synthetic_scenes(split, n, int(cfg.get("seed", 0)), cfg.get("image_size", 64),
                                  int(cfg.get("min_objects", 2)), int(cfg.get("max_objects", 5)))
        parts.append(build_qa_dataset(scenes, cfg.get("question_types"), type_fractions=cfg.get("type_fractions"),
                                      image_position=cfg.get("image_position", "before")))
    if cfg.get("instruct"):
        dataset, _ = load_llava(cfg["instruct"], cfg.get("instruct_images"), skip_invalid=bool(cfg.get("skip_invalid", False)),
                                verify_images=cfg.get("verify_images", True), log=log, hint=RECIPE_HINT)
        parts.append(dataset)
    if not parts:
        raise ValueError("data config: no instruction data; use source: synthetic or give `instruct` (LLaVA JSON)")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
