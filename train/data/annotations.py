"""Annotated images: one image and every label a pre-alignment stage may ask for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..stages import STAGES
from .report import BuildReport


@dataclass
class ObjectAnnotation:
    """One instance: ``category`` text, normalised xyxy ``box``, pixel ``area`` and its polygon.

    ``polygon`` is the instance's largest outer polygon in PIXEL units (unsimplified), or None when
    the source has no segmentation.
    """

    category: str
    box: tuple[float, float, float, float]
    area: float
    polygon: list[tuple[float, float]] | None = None


@dataclass
class AnnotatedImage:
    """One image and every label a pre-alignment stage may ask for.

    ``image`` is a PIL image or a file path (decoded lazily by ``datasets``); ``tags``/``objects``
    are None when the source has no such labels (an empty list means "none in this image").
    """

    image_id: str
    image: Any
    width: int
    height: int
    captions: list[str] = field(default_factory=list)
    tags: list[str] | None = None
    objects: list[ObjectAnnotation] | None = None


@dataclass
class AlignmentSource:
    """Annotated images from one source, with the stages it can serve and its :class:`BuildReport`."""

    name: str
    images: list[AnnotatedImage]
    report: BuildReport
    stages: tuple[str, ...] = STAGES

    def __len__(self) -> int:
        return len(self.images)
