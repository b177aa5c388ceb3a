"""Which images a cache is built for: the training data, read by the training code's own loaders.

``astrea cache build`` takes its images from

* a recipe (``--recipe``): its ``data:`` section, as ``astrea align`` / ``astrea instruct`` read
  it -- the alignment source's images (synthetic scenes or COCO) and the instruction rows' images
  (synthetic QA, LLaVA conversations) -- see :func:`recipe_images`;
* a training JSON with the folder its image paths are relative to (``--data FILE --images DIR``):
  COCO captions or instances (a dict with ``images`` and ``annotations``) through
  :func:`~astrea_vlm.train.data.load_coco`, LLaVA conversations (records with ``conversations``)
  through :func:`~astrea_vlm.train.data.load_llava` -- see :func:`training_json_images`;
* anything else ``--data`` names (image lists, ``datasets`` folders, image folders):
  ``astrea_vlm.cli.load_image_list``.

Images are hashed by their decoded pixels, so the same file read by either path hits the same
entry: a cache built here is the one training reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def recipe_images(data: Mapping[str, Any] | None, split: str = "train", log=print) -> list:
    """Every image the recipe's ``data`` section trains on: alignment source, then instruction rows."""
    from ..data import instruct_dataset, load_source
    from ..data.from_recipe import _split_config
    from ..stages import dataset_images

    images = [item.image for item in load_source(data, split, log=log).images]
    cfg = _split_config(data, split)
    if cfg.get("source", "synthetic") == "synthetic" or cfg.get("instruct"):
        images.extend(dataset_images(instruct_dataset(data, split, log=log)))
    return images


def json_format(records: Any) -> str | None:
    """``"coco"``, ``"llava"`` or None (another layout) for a parsed training JSON."""
    if isinstance(records, Mapping) and isinstance(records.get("images"), list) and isinstance(records.get("annotations"), list):
        return "coco"
    if isinstance(records, Sequence) and not isinstance(records, str) and records:
        first = records[0]
        if isinstance(first, Mapping) and "conversations" in first:
            return "llava"
    return None


def training_json_images(path: str | os.PathLike, images_dir: str | os.PathLike, log=print) -> list | None:
    """The images of a COCO or LLaVA training JSON, read as training reads it; None for another layout."""
    from ..data import load_coco, load_llava
    from ..stages import dataset_images

    path = Path(path)
    if path.suffix != ".json":
        return None
    records = json.loads(path.read_text(encoding="utf-8"))
    kind = json_format(records)
    if kind == "coco":
        annotations = records["annotations"]
        captions = bool(annotations) and all("caption" in a for a in annotations)
        source = load_coco(images_dir, **{"captions" if captions else "instances": path}, log=log)
        return [item.image for item in source.images]
    if kind == "llava":
        dataset, _ = load_llava(path, images_dir, log=log)
        return dataset_images(dataset)
    return None


__all__ = ["json_format", "recipe_images", "training_json_images"]
