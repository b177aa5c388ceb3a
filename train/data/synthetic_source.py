"""The synthetic world (:mod:`astrea_vlm.train.synthetic`) as an :class:`AlignmentSource`, cached per split."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from ..stages import STAGES
from ..synthetic import make_split
from .annotations import AlignmentSource, AnnotatedImage, ObjectAnnotation
from .report import BuildReport


@lru_cache(maxsize=8)
def _synthetic_split(split: str, n: int, seed: int, image_size: Any, min_objects: int, max_objects: int):
    return tuple(make_split(split, n, seed, image_size=image_size, min_objects=min_objects, max_objects=max_objects))


def synthetic_scenes(split: str = "train", n: int = 256, seed: int = 0, image_size: int | tuple[int, int] = 64,
                     min_objects: int = 2, max_objects: int = 5) -> list:
    """:func:`astrea_vlm.train.synthetic.make_split`, cached (the stages of one run share the scenes)."""
    if isinstance(image_size, list):
        image_size = tuple(image_size)
    return list(_synthetic_split(split, int(n), int(seed), image_size, int(min_objects), int(max_objects)))


def source_from_scenes(scenes: Sequence[Any], name: str = "synthetic") -> AlignmentSource:
    """An :class:`AlignmentSource` over synthetic scenes (visible-pixel boxes and traced polygons)."""
    images = []
    for scene in scenes:
        objects = [
            ObjectAnnotation(
                category=obj.category,
                box=tuple(obj.box),
                area=float(obj.area),
                polygon=obj.polygons_px[0] if obj.polygons_px else None,
            )
            for obj in scene.objects
        ]
        images.append(AnnotatedImage(scene.image_id, scene.image, scene.width, scene.height, [scene.caption], list(scene.tags), objects))
    report = BuildReport(name, records=len(images), kept=len(images))
    return AlignmentSource(name, images, report, STAGES)


@lru_cache(maxsize=8)
def _synthetic_source(split: str, n: int, seed: int, image_size: Any, min_objects: int, max_objects: int) -> AlignmentSource:
    scenes = synthetic_scenes(split, n, seed, image_size, min_objects=min_objects, max_objects=max_objects)
    return source_from_scenes(scenes, name=f"synthetic-{split}")


def synthetic_source(split: str = "train", n: int = 256, seed: int = 0, image_size: int | tuple[int, int] = 64,
                     min_objects: int = 2, max_objects: int = 5) -> AlignmentSource:
    """The synthetic world (:mod:`astrea_vlm.train.synthetic`) as an :class:`AlignmentSource`.

    Cached like :func:`synthetic_scenes`: tracing every object's polygon is most of the cost, and
    the four alignment stages of a run read the same source (nothing downstream mutates it).
    """
    if isinstance(image_size, list):
        image_size = tuple(image_size)
    return _synthetic_source(split, int(n), int(seed), image_size, int(min_objects), int(max_objects))
