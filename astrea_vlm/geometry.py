"""Geometry and its text forms, shared by the training data and evaluation.

* **Grid**: a normalised coordinate (pixel-edge convention: pixel ``c`` spans ``[c, c+1]``, so a box
  of pixels ``c0..c1`` is ``[c0/W, (c1+1)/W]``) is written as an integer on a 0-1000 grid,
  ``floor(v * 1000 + 0.5)`` clipped to [0, 1000].
* **Box**: ``[x1, y1, x2, y2]`` on the grid (comma and one space between numbers). The training data
  writes boxes with :func:`format_box`; evaluation reads generations back with :func:`parse_boxes`,
  so the two stay each other's inverse on the grid.
* **Polygon**: ``"(x,y) (x,y) ..."`` on the grid (no space inside a point); masks become the outer
  boundary of their largest 4-connected component (:func:`mask_to_polygons`), simplified to a
  vertex budget by a budgeted Douglas-Peucker (:func:`simplify_polygon`).
* **RLE**: COCO's run-length encoding (column-major, zeros first), uncompressed and compressed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_MAX_VERTICES = 8
DEFAULT_TOLERANCE = 1.0

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


# ----------------------------------------------------------------------------- labelled boxes, masks
def parse_labelled_boxes(text: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """``(category, normalised xyxy)`` for every ``"<category> [x1, y1, x2, y2]"`` in a Boxes line."""
    found = []
    for match in re.finditer(r"([^\[\];\n:]*?)\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]", text):
        label = match.group(1).strip()
        found.append((label, tuple(int(match.group(i)) / GRID for i in range(2, 6))))
    return found


def format_polygon(points: Iterable[Sequence[float]]) -> str:
    """``"(x,y) (x,y) ..."`` on the 0-1000 grid from normalised points; repeated grid points written once."""
    cells: list[tuple[int, int]] = []
    for x, y in points:
        cell = (to_grid(x), to_grid(y))
        if not cells or cells[-1] != cell:
            cells.append(cell)
    if len(cells) > 1 and cells[0] == cells[-1]:
        cells.pop()
    return " ".join(f"({x},{y})" for x, y in cells)


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Normalised pixel-edge box ``(x1, y1, x2, y2)`` of the True pixels of ``mask`` (H, W)."""
    mask = np.asarray(mask, bool)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("the mask is empty: it has no box")
    h, w = mask.shape
    return (cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h)


# ----------------------------------------------------------------------------- masks as RLE
def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE ``{"size": [h, w], "counts": [...]}`` (column-major, zeros first)."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def rle_string_to_counts(text: str) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools ``rleFrString``) into run lengths."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("truncated compressed RLE string")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {text[p]!r} in a compressed RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_counts_to_string(counts: Sequence[int]) -> str:
    """Encode run lengths as COCO's compressed RLE string (pycocotools ``rleToString``)."""
    out = []
    for i, value in enumerate(counts):
        x = int(value) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """The (h, w) boolean mask of a COCO RLE (uncompressed counts list or compressed string)."""
    size = rle.get("size")
    counts = rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size)):
        raise ValueError(f"RLE size must be [height, width] integers, got {size!r}")
    if isinstance(counts, str):
        counts = rle_string_to_counts(counts)
    if not (isinstance(counts, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts)):
        raise ValueError("RLE counts must be a list of integers or a compressed string")
    if any(c < 0 for c in counts):
        raise ValueError("RLE counts must not be negative")
    h, w = size
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)} but size {h}x{w} has {h * w} pixels")
    values = np.arange(len(counts)) % 2
    flat = np.repeat(values.astype(bool), counts)
    return flat.reshape((w, h)).T.copy()


# ----------------------------------------------------------------------------- polygons
def polygon_area(points: Sequence[Sequence[float]]) -> float:
    """Signed shoelace area; positive for the clockwise-on-screen (y down) outer boundaries here."""
    pts = np.asarray(points, float)
    if len(pts) < 3:
        return 0.0
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def clip_polygon(points: Sequence[Sequence[float]], width: float, height: float) -> list[tuple[float, float]]:
    """The part of a polygon inside the image ``[0, width] x [0, height]`` (Sutherland-Hodgman
    against the image's four edges; exact, since the image is convex). Empty when nothing is inside."""
    def cut(pts, inside, cross):
        out = []
        for i, current in enumerate(pts):
            previous = pts[i - 1]
            if inside(current):
                if not inside(previous):
                    out.append(cross(previous, current))
                out.append(current)
            elif inside(previous):
                out.append(cross(previous, current))
        return out

    def at_x(x):
        return lambda a, b: (x, a[1] + (b[1] - a[1]) * (x - a[0]) / (b[0] - a[0]))

    def at_y(y):
        return lambda a, b: (a[0] + (b[0] - a[0]) * (y - a[1]) / (b[1] - a[1]), y)

    pts = [(float(x), float(y)) for x, y in points]
    for inside, cross in ((lambda p: p[0] >= 0, at_x(0.0)), (lambda p: p[0] <= width, at_x(float(width))),
                          (lambda p: p[1] >= 0, at_y(0.0)), (lambda p: p[1] <= height, at_y(float(height)))):
        if not pts:
            break
        pts = cut(pts, inside, cross)
    return pts


def _drop_collinear(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    n = len(points)
    kept = []
    for i in range(n):
        a, b, c = points[i - 1], points[i], points[(i + 1) % n]
        if (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) != 0:
            kept.append(b)
    return kept


def mask_to_polygons(mask: np.ndarray) -> list[list[tuple[float, float]]]:
    """Outer boundaries of the 4-connected components of ``mask``, in pixel-corner coordinates.

    Each polygon follows pixel edges exactly (so it encloses exactly its component's pixels, holes
    aside), runs clockwise on screen (y down), starts at its top-most then left-most vertex and has
    no collinear vertices. Polygons are sorted by area, largest first. Holes are not returned.
    """
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"a mask is 2-D (H, W), got shape {m.shape}")
    p = np.pad(m, 1)
    core = p[1:-1, 1:-1]
    successors: dict[tuple[int, int], list[tuple[int, int]]] = {}
    edges: list[tuple[tuple[int, int], tuple[int, int]]] = []
    sides = (
        (core & ~p[:-2, 1:-1], (0, 0), (1, 0)),  # top: left -> right
        (core & ~p[1:-1, 2:], (1, 0), (1, 1)),  # right: down
        (core & ~p[2:, 1:-1], (1, 1), (0, 1)),  # bottom: right -> left
        (core & ~p[1:-1, :-2], (0, 1), (0, 0)),  # left: up
    )
    for side, start, end in sides:
        for r, c in zip(*np.nonzero(side)):
            a = (int(c) + start[0], int(r) + start[1])
            b = (int(c) + end[0], int(r) + end[1])
            edges.append((a, b))
            successors.setdefault(a, []).append(b)
    used: set[tuple[tuple[int, int], tuple[int, int]]] = set()
    polygons = []
    for first in sorted(edges, key=lambda e: (e[0][1], e[0][0], e[1][1], e[1][0])):
        if first in used:
            continue
        loop = []
        edge = first
        while edge not in used:
            used.add(edge)
            a, b = edge
            loop.append(a)
            options = successors[b]
            if len(options) == 1:
                nxt = options[0]
            else:  # two components touch diagonally at b: turn right, staying on the same pixel
                d = (b[0] - a[0], b[1] - a[1])
                nxt = next(o for o in options if d[0] * (o[1] - b[1]) - d[1] * (o[0] - b[0]) > 0)
            edge = (b, nxt)
        loop = _drop_collinear(loop)
        if len(loop) >= 3 and polygon_area(loop) > 0:
            start = min(range(len(loop)), key=lambda i: (loop[i][1], loop[i][0]))
            polygons.append([(float(x), float(y)) for x, y in loop[start:] + loop[:start]])
    polygons.sort(key=lambda poly: -polygon_area(poly))
    return polygons


def _segment_distances(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    denom = float(ab @ ab)
    if denom == 0.0:
        return np.linalg.norm(pts - a, axis=1)
    t = np.clip((pts - a) @ ab / denom, 0.0, 1.0)
    return np.linalg.norm(pts - (a + t[:, None] * ab), axis=1)


def simplify_polygon(
    points: Sequence[Sequence[float]], max_vertices: int = DEFAULT_MAX_VERTICES, tolerance: float = DEFAULT_TOLERANCE
) -> list[tuple[float, float]]:
    """A closed polygon simplified to at most ``max_vertices`` vertices (Douglas-Peucker, budgeted).

    Starts from the top-most-left vertex and the vertex farthest from it, then repeatedly inserts
    the vertex farthest from the current outline, until ``max_vertices`` are kept or none is farther
    than ``tolerance`` (in the points' units). Kept vertices stay in their original order.
    """
    if max_vertices < 3:
        raise ValueError(f"max_vertices must be at least 3, got {max_vertices}")
    pts = np.asarray(points, float)
    n = len(pts)
    if n <= 3:
        return [(float(x), float(y)) for x, y in pts]
    first = min(range(n), key=lambda i: (pts[i, 1], pts[i, 0]))
    second = int(np.argmax(np.linalg.norm(pts - pts[first], axis=1)))
    kept = sorted({first, second})

    def best_between(i: int, j: int) -> tuple[float, int]:
        idx = [(i + k) % n for k in range(1, (j - i) % n)]
        if not idx:
            return -1.0, -1
        d = _segment_distances(pts[idx], pts[i], pts[j])
        k = int(np.argmax(d))
        return float(d[k]), idx[k]

    while len(kept) < max_vertices:
        best = (-1.0, -1)
        for a, b in zip(kept, kept[1:] + kept[:1]):
            cand = best_between(a, b)
            if cand[0] > best[0]:
                best = cand
        # a third vertex is always taken, so the result is a polygon
        if best[1] < 0 or (best[0] <= tolerance and len(kept) >= 3):
            break
        kept = sorted(kept + [best[1]])
    return [(float(pts[i, 0]), float(pts[i, 1])) for i in kept]


def polygon_text(polygon_px: Sequence[Sequence[float]], width: int, height: int, max_vertices: int = DEFAULT_MAX_VERTICES,
                 tolerance: float = DEFAULT_TOLERANCE) -> str:
    """The grid text of a pixel-unit polygon after :func:`simplify_polygon`."""
    simple = simplify_polygon(polygon_px, max_vertices=max_vertices, tolerance=tolerance)
    return format_polygon((x / width, y / height) for x, y in simple)
