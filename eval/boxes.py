"""The box format of Astrea's text: ``[x1, y1, x2, y2]``, integers on a 0-1000 grid.

A box is written in normalised image coordinates (``x`` divided by the image width, ``y`` by its
height, so ``(0, 0)`` is the top-left corner and ``(1, 1)`` the bottom-right one), scaled by
:data:`GRID` = 1000 and rounded to the nearest integer (halves round up), as
``[x1, y1, x2, y2]`` with a comma and one space between the numbers. The training-data builders
write boxes with :func:`format_box`; evaluation reads generated text back with
:func:`parse_boxes`, so the two must stay each other's inverse on the grid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

GRID = 1000

# Four integers in square brackets, separated by commas (any whitespace around them).
_BOX = re.compile(r"\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")


def to_grid(value: float) -> int:
    """Normalised coordinate -> grid integer (round half up, clamped to ``[0, GRID]``)."""
    return min(GRID, max(0, math.floor(float(value) * GRID + 0.5)))


def format_box(box_xyxy_normalised: Sequence[float]) -> str:
    """``(x1, y1, x2, y2)`` in ``[0, 1]`` -> ``"[x1, y1, x2, y2]"`` on the 0-1000 grid.

    Raises ``ValueError`` for a box that is not four finite numbers with ``x1 <= x2`` and ``y1 <= y2``.
    Coordinates outside ``[0, 1]`` are clamped to the image.
    """
    values = [float(v) for v in box_xyxy_normalised]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"a box is four finite numbers (x1, y1, x2, y2), got {box_xyxy_normalised!r}")
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        raise ValueError(f"a box needs x1 <= x2 and y1 <= y2, got {box_xyxy_normalised!r}")
    return "[" + ", ".join(str(to_grid(v)) for v in values) + "]"


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """Every well-formed box in ``text``, in order, as normalised ``(x1, y1, x2, y2)`` floats.

    A bracketed group of four integers is a box when every integer is in ``[0, 1000]`` and
    ``x1 <= x2``, ``y1 <= y2``; other groups (and decimals, or fewer or more than four numbers) are
    skipped, so a caller can take the first valid box of a generation.
    """
    boxes = []
    for match in _BOX.finditer(text):
        x1, y1, x2, y2 = (int(g) for g in match.groups())
        if not all(0 <= v <= GRID for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
            continue
        boxes.append((x1 / GRID, y1 / GRID, x2 / GRID, y2 / GRID))
    return boxes


def pixel_to_normalised(box_xyxy_pixels: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """A pixel box ``(x1, y1, x2, y2)`` of an image ``width`` x ``height`` -> normalised coordinates."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy_pixels)
    return (x1 / width, y1 / height, x2 / width, y2 / height)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0 when the union is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
