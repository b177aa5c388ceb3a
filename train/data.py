"""Training data for Astrea: pre-alignment stage datasets and instruction-tuning datasets.

Every dataset this module builds is a :class:`datasets.Dataset` in TRL 1.16's conversational
vision-language format, which ``SFTTrainer`` sends to ``DataCollatorForVisionLanguageModeling``::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]},
                  {"role": "assistant", "content": [{"type": "text", "text": TARGET}]}],
     "images": [PIL.Image],          # one entry per {"type": "image"} placeholder, in order
     "image_id": "train-0-00003"}    # always a string (COCO's integer ids are converted)

The image parts are bare ``{"type": "image"}`` placeholders and the pictures live in the ``images``
column: TRL's ``prepare_multimodal_messages`` fills every placeholder (a part without an ``"image"``
key) from ``images`` in order. Arrow stores the content parts as one struct type, so an image part
reads back as ``{"type": "image", "text": None}``; the placeholder test and Astrea's chat template
only look at ``type``. ``images`` is a ``List(Image())`` column: in-memory pictures (the synthetic
world) are stored as PNG bytes, files (COCO, LLaVA) as paths that are decoded lazily on access.
Instruction rows add a ``question_type`` column. ``SFTTrainer`` keeps only ``messages``/``images``
when ``remove_unused_columns=True`` (its default); pass ``False`` to see ``image_id`` in the batch.

Pre-alignment stages (paper §3.1.1 and §3.1.3)
----------------------------------------------
:data:`STAGES` = ``caption, classification, detection, segmentation`` (the expert roles). Each
stage has an instruction word and a labelled target line:

=================  ============  ==============================================================
stage              word          target line
=================  ============  ==============================================================
caption            caption       ``Caption: a red circle and two blue stars on a striped background.``
classification     recognition   ``Tags: circle, star, red, blue, stripes``
detection          detection     ``Boxes: red circle [120, 340, 200, 420]; blue star [...]``
segmentation       segmentation  ``Masks: red circle: (120,340) (200,340) (160,420); blue star: ...``
=================  ============  ==============================================================

Labels are CUMULATIVE in the order given (paper §3.1.3, "the alignment process labels for each
stage contain a summary of the labels from previous stages"): stage k's instruction is the words
of stages 1..k joined by ``", "`` (the paper's ``"caption, recognization"``, spelt "recognition"),
and its target is their lines joined by ``"\\n"``, in that same order. An order is a list whose
items are a role or a list of roles trained jointly (Table 6): ``ORDERS["default"]``
(Cap→Cls→Det→Seg), ``ORDERS["reverse"]``, ``ORDERS["cap_all"]`` (caption, then the other three
jointly) and ``ORDERS["all"]`` (one joint stage). The string ``"all"`` inside an order stands for
every role not named elsewhere in it. See :func:`normalise_order`, :func:`stage_roles`.

Text forms
----------
* **Grid**: coordinates are normalised to [0, 1] (pixel-edge convention: pixel ``c`` spans
  ``[c, c+1]``, so a box of pixels ``c0..c1`` is ``[c0/W, (c1+1)/W]``) and written as integers on a
  0-1000 grid, ``floor(v * 1000 + 0.5)`` clipped to [0, 1000].
* **Box**: ``[x1, y1, x2, y2]`` (``", "`` between numbers); an object is ``"<category> [x1, y1, x2, y2]"``
  and objects are joined by ``"; "``. COCO ``bbox`` (``[x, y, w, h]`` in pixels) is converted to
  normalised xyxy and clipped to the image. :func:`format_box`, :func:`to_grid` and
  :func:`parse_boxes` are those of :mod:`astrea_vlm.eval.boxes` (shared with evaluation);
  :func:`parse_labelled_boxes` reads a ``Boxes:`` line back with its categories.
* **Mask**: ``"<category>: (x,y) (x,y) ..."`` (no space inside a point), objects joined by
  ``"; "``. The polygon is the instance's LARGEST outer polygon (COCO: its largest part by area;
  RLE and synthetic masks: the outer boundary of the largest 4-connected component, traced along
  pixel edges by :func:`mask_to_polygons`; holes are ignored), simplified to at most
  ``max_vertices`` (default :data:`DEFAULT_MAX_VERTICES` = 8) vertices by :func:`simplify_polygon`,
  a Douglas-Peucker that inserts the farthest remaining vertex until the budget is used or every
  vertex lies within ``tolerance`` pixels (default 1.0) of the simplified outline. Consecutive
  points equal on the grid are written once.
* **Object order**: boxes and masks list the same objects in reading order, sorted by grid
  ``(y1, x1, y2, x2, category)``. With ``max_objects`` only the largest ``max_objects`` (by area) are
  kept, so both lines name the same instances. An image with no objects gets ``none``, as does an
  empty tag list.
* **Tags**: ``", "``-joined, in the tag source's order, duplicates removed. With no tag source, a
  COCO image's tags are its instance category names (first appearance order).

Length
------
Cumulative targets are long (the segmentation stage of a 5-object synthetic scene is ~700
tokens with the tiny preset's byte-level tokenizer, whose context is 512). Pass the model's
processor (``build_stage_dataset(..., processor=p)`` / ``stage_dataset(..., processor=p)``): each
row's whole sequence (template, ``<image>`` tokens, target, eos) must then fit ``max_length``
(default ``tokenizer.model_max_length``); a longer target gets fewer polygon vertices (down to 4),
then leaves out its smallest objects (from Boxes and Masks alike), and the count of shortened
rows is logged. Without a processor, ``max_target_chars`` bounds characters instead; with
neither, targets are never shortened.

Sources and malformed records
-----------------------------
:func:`load_coco` reads COCO captions JSON (``images`` with ``id``/``file_name``/``width``/``height``,
``annotations`` with ``image_id``/``caption``), RAM-style tags (``{"file_name": [tags]}``, or a list
of ``{"file_name"|"image"|"image_id": ..., "tags": [...] | "a | b"}``), COCO instances JSON (``bbox``,
``category_id``, ``categories``; ``segmentation`` as polygons, uncompressed RLE ``{"size": [h, w],
"counts": [ints]}`` or compressed RLE ``"counts": "string"`` -- decoded in pure Python by
:func:`rle_string_to_counts`, COCO's LEB128-like code of ``maskApi.c``). :func:`load_llava` reads
LLaVA conversation JSON (``human`` -> ``user``, ``gpt`` -> ``assistant``, an optional first
``system`` turn; each ``<image>`` marker becomes an image part where it stands, multi-turn
conversations stay multi-turn, text-only records get ``images: []``, ``image_id`` is the record's
``id``, ``question_type`` is ``"conversation"``). :func:`synthetic_source` wraps
:mod:`astrea_vlm.train.synthetic`, the offline default, whose QA records become single-turn rows
(:func:`build_qa_dataset`). COCO crowd annotations (``iscrowd: 1``, usually RLE) are used like
the others.

Recipe entry points: :func:`stage_dataset` ``(data, stage_index, order, split, processor=None)``
and :func:`instruct_dataset` ``(data, split)`` read a recipe's ``data`` section
(:func:`load_source` lists its keys).

Every malformed record -- missing image file, corrupt image file, image size different from the
JSON, missing field, wrong type, duplicate id, annotation of an unknown image, unknown category
id, bbox with non-positive size, polygon with fewer than 3 points, inconsistent RLE, an image the
stage needs labels for that a source lacks, a badly formed conversation, a number of ``<image>``
markers different from the number of images -- is COUNTED per kind with the offending ids (the
annotation's ``id`` for annotation problems, else ``"<section>[<index>]"``) in a
:class:`BuildReport`, which is printed and kept on the source (``source.report``). By default the
loader then raises ``ValueError`` listing them; with ``skip_invalid=True`` it drops every image
(or conversation) that has a problem -- the whole image, so no target silently misses an object --
and the report lists the dropped ids too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.boxes import GRID, format_box, parse_boxes, to_grid

STAGES: tuple[str, ...] = ("caption", "classification", "detection", "segmentation")
STAGE_WORDS: dict[str, str] = {
    "caption": "caption",
    "classification": "recognition",
    "detection": "detection",
    "segmentation": "segmentation",
}
STAGE_HEADERS: dict[str, str] = {"caption": "Caption", "classification": "Tags", "detection": "Boxes", "segmentation": "Masks"}
ORDERS: dict[str, list] = {
    "default": ["caption", "classification", "detection", "segmentation"],
    "reverse": ["segmentation", "detection", "classification", "caption"],
    "cap_all": ["caption", ["classification", "detection", "segmentation"]],
    "all": [["caption", "classification", "detection", "segmentation"]],
}
DEFAULT_MAX_VERTICES = 8
DEFAULT_TOLERANCE = 1.0

PROBLEM_KINDS: tuple[str, ...] = (
    "missing_image_file",
    "corrupt_image",
    "image_size_mismatch",
    "missing_field",
    "wrong_type",
    "duplicate_id",
    "unknown_image",
    "unknown_category",
    "bad_bbox",
    "bad_polygon",
    "bad_rle",
    "missing_labels",
    "bad_conversation",
    "image_marker_mismatch",
)


# =============================================================================== grid and boxes
def parse_labelled_boxes(text: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """``(category, normalised xyxy)`` for every ``"<category> [x1, y1, x2, y2]"`` in a Boxes line."""
    import re

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


# =============================================================================== RLE
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


# =============================================================================== polygons
def polygon_area(points: Sequence[Sequence[float]]) -> float:
    """Signed shoelace area; positive for the clockwise-on-screen (y down) outer boundaries here."""
    pts = np.asarray(points, float)
    if len(pts) < 3:
        return 0.0
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


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


# =============================================================================== report
class InvalidDataError(ValueError):
    """Malformed records were found and ``skip_invalid`` was False; ``.report`` holds them."""

    def __init__(self, report: "BuildReport"):
        self.report = report
        super().__init__(
            f"{report.summary()}\nfix these records or pass skip_invalid=True to drop them (they stay listed in the report)"
        )


@dataclass
class BuildReport:
    """Problems found while loading one source: counts per kind and the offending ids.

    ``problems[kind]`` lists the offending ids in the order found (annotation ids for annotation
    problems, image ids for image problems, conversation ids for LLaVA records), ``details[kind]``
    a message for each; ``dropped`` lists the images / conversations left out with
    ``skip_invalid=True``; ``records`` counts the records examined and ``kept`` the images or
    conversations kept.
    """

    source: str
    records: int = 0
    kept: int = 0
    problems: dict[str, list[Any]] = field(default_factory=dict)
    details: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[Any] = field(default_factory=list)

    def add(self, kind: str, record_id: Any, detail: str = "") -> None:
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}; kinds are {PROBLEM_KINDS}")
        self.problems.setdefault(kind, []).append(record_id)
        self.details.setdefault(kind, []).append(detail)

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(ids) for kind, ids in self.problems.items()}

    @property
    def ok(self) -> bool:
        return not self.problems

    def ids(self, kind: str) -> list[Any]:
        return list(self.problems.get(kind, []))

    def summary(self, max_ids: int = 20) -> str:
        head = f"[{self.source}] {self.records} records examined, {self.kept} kept"
        if self.ok:
            return head + ", no problems"
        lines = [head + f", {sum(self.counts.values())} problem(s):"]
        for kind in PROBLEM_KINDS:
            if kind not in self.problems:
                continue
            ids = self.problems[kind]
            shown = ", ".join(
                f"{i!r} ({d})" if d else repr(i) for i, d in list(zip(ids, self.details[kind]))[:max_ids]
            )
            more = f", ... (+{len(ids) - max_ids})" if len(ids) > max_ids else ""
            lines.append(f"  {kind}: {len(ids)} -- {shown}{more}")
        if self.dropped:
            more = f", ... (+{len(self.dropped) - max_ids})" if len(self.dropped) > max_ids else ""
            lines.append(f"  dropped ({len(self.dropped)}): {', '.join(map(repr, self.dropped[:max_ids]))}{more}")
        return "\n".join(lines)

    __str__ = summary

    def finish(self, skip_invalid: bool, log=print) -> None:
        """Print the summary; raise :class:`InvalidDataError` on problems unless ``skip_invalid``."""
        if log is not None:
            log(self.summary())
        if not self.ok and not skip_invalid:
            raise InvalidDataError(self)


# =============================================================================== annotated images
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_image_file(path: Path, image_id: Any, width: int | None, height: int | None, report: BuildReport,
                      verify: bool | str) -> bool:
    if not path.is_file():
        report.add("missing_image_file", image_id, str(path))
        return False
    if not verify:
        return True
    from PIL import Image

    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
        if verify == "full":  # verify() does not decode JPEG data; a full decode finds truncated files
            with Image.open(path) as img:
                img.load()
    except Exception as err:  # PIL raises many types for broken files
        report.add("corrupt_image", image_id, f"{path.name}: {type(err).__name__}")
        return False
    if width is not None and height is not None and size != (width, height):
        report.add("image_size_mismatch", image_id, f"file is {size[0]}x{size[1]}, JSON says {width}x{height}")
        return False
    return True


def _read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    with open(path) as handle:
        return json.load(handle)


def _read_coco_images(data: Any, report: BuildReport, section_name: str) -> dict[Any, dict[str, Any]]:
    """``id -> {"file_name", "width", "height"}`` from a COCO ``images`` list, reporting bad entries."""
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{section_name}: a COCO file is a JSON object with an `images` list")
    found: dict[Any, dict[str, Any]] = {}
    for index, entry in enumerate(images):
        report.records += 1
        ref = entry.get("id", f"images[{index}]") if isinstance(entry, dict) else f"images[{index}]"
        if not isinstance(entry, dict):
            report.add("wrong_type", ref, "an image entry must be an object")
            continue
        missing = [k for k in ("id", "file_name", "width", "height") if k not in entry]
        if missing:
            report.add("missing_field", ref, f"image without {', '.join(missing)}")
            continue
        if not isinstance(entry["id"], (int, str)) or isinstance(entry["id"], bool) or not isinstance(entry["file_name"], str) \
                or not all(isinstance(entry[k], int) and not isinstance(entry[k], bool) and entry[k] > 0 for k in ("width", "height")):
            report.add("wrong_type", ref, "id must be an int or str, file_name a str, width/height positive ints")
            continue
        if entry["id"] in found:
            report.add("duplicate_id", ref, "image id listed twice")
            continue
        found[entry["id"]] = {"file_name": entry["file_name"], "width": entry["width"], "height": entry["height"]}
    return found


def _parse_segmentation(seg: Any, width: int, height: int) -> tuple[str | None, Any]:
    """``(problem_kind or None, polygon in pixels or message)`` for one COCO ``segmentation``."""
    if isinstance(seg, list):
        parts = []
        for part in seg:
            if not isinstance(part, list) or not all(_is_number(v) for v in part):
                return "wrong_type", "a polygon is a flat list of numbers [x1, y1, x2, y2, ...]"
            if len(part) % 2 or len(part) < 6:
                return "bad_polygon", f"polygon with {len(part) // 2} point(s){' and an odd coordinate count' if len(part) % 2 else ''}; needs >= 3"
            parts.append([(float(part[i]), float(part[i + 1])) for i in range(0, len(part), 2)])
        if not parts:
            return "bad_polygon", "empty polygon list"
        areas = [abs(polygon_area(p)) for p in parts]
        best = parts[int(np.argmax(areas))]
        if max(areas) == 0.0:
            return "bad_polygon", "polygon with zero area"
        return None, best
    if isinstance(seg, dict):
        try:
            mask = rle_decode(seg)
        except (ValueError, TypeError) as err:
            return "bad_rle", str(err)
        if mask.shape != (height, width):
            return "bad_rle", f"RLE size {list(mask.shape)} differs from the image's [{height}, {width}]"
        polygons = mask_to_polygons(mask)
        if not polygons:
            return "bad_rle", "empty mask"
        return None, polygons[0]
    return "wrong_type", "segmentation must be a polygon list or an RLE object"


def _read_tags(path: str | os.PathLike, report: BuildReport) -> dict[Any, list[str]]:
    """``key -> tags``: keys are file names (full and base name) or image ids."""
    data = _read_json(path, "tags")
    items: list[tuple[Any, Any]]
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for index, record in enumerate(data):
            report.records += 1
            if not isinstance(record, dict):
                report.add("wrong_type", f"tags[{index}]", "a tag record must be an object")
                continue
            key = next((record[k] for k in ("file_name", "image", "image_id") if k in record), None)
            if key is None or "tags" not in record:
                report.add("missing_field", f"tags[{index}]", "a tag record needs file_name/image/image_id and tags")
                continue
            items.append((key, record["tags"]))
    else:
        raise ValueError(f"tags file {path}: expected an object {{file_name: [tags]}} or a list of records")
    tags: dict[Any, list[str]] = {}
    for key, value in items:
        if isinstance(data, dict):
            report.records += 1
        if isinstance(value, str):
            value = [t.strip() for t in value.split("|")]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            report.add("wrong_type", key, "tags must be a list of strings or an 'a | b | c' string")
            continue
        clean = list(dict.fromkeys(t.strip() for t in value if t.strip()))
        tags[key] = clean
        if isinstance(key, str):
            tags.setdefault(os.path.basename(key), clean)
    return tags


def load_coco(
    images_dir: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    instances: str | os.PathLike | None = None,
    tags: str | os.PathLike | None = None,
    *,
    skip_invalid: bool = False,
    verify_images: bool | str = True,
    name: str = "coco",
    log=print,
) -> AlignmentSource:
    """COCO captions / instances (boxes + polygons or RLE) and RAM-style tags as an :class:`AlignmentSource`.

    The image set is every image listed in ``captions`` or ``instances``; an image needs a caption
    when ``captions`` is given, an entry in ``tags`` when ``tags`` is given, and an ``images`` entry
    in ``instances`` when it is given (an image there with no annotation has no objects). The
    stages served are those whose labels are present: caption (captions), classification (tags,
    or else instance category names), detection (instances), segmentation (instances with
    ``segmentation``). ``verify_images=True`` opens and verifies every file (``PIL.Image.verify``:
    the header, and the chunk checksums of a PNG), ``"full"`` also decodes it (finds truncated JPEGs;
    slow at COCO scale), False only checks that it exists. Malformed records: see the module
    docstring.
    """
    if captions is None and instances is None:
        raise ValueError("load_coco needs `captions` and/or `instances`")
    report = BuildReport(name)
    images_dir = Path(images_dir)
    bad_images: set[Any] = set()
    entries: dict[Any, dict[str, Any]] = {}
    caption_map: dict[Any, list[str]] | None = None
    object_map: dict[Any, list[ObjectAnnotation]] | None = None
    has_segmentation = False

    def merge_images(found: dict[Any, dict[str, Any]], what: str) -> None:
        for image_id, entry in found.items():
            previous = entries.get(image_id)
            if previous is not None and previous != entry:
                report.add("duplicate_id", image_id, f"{what} describes this image differently from another file")
                bad_images.add(image_id)
            entries.setdefault(image_id, entry)

    caption_ids: set[Any] = set()
    if captions is not None:
        data = _read_json(captions, "captions")
        found = _read_coco_images(data, report, str(captions))
        caption_ids = set(found)
        merge_images(found, "captions")
        caption_map = {image_id: [] for image_id in found}
        for index, ann in enumerate(data.get("annotations") or []):
            report.records += 1
            ref = ann.get("id", f"annotations[{index}]") if isinstance(ann, dict) else f"annotations[{index}]"
            if not isinstance(ann, dict):
                report.add("wrong_type", ref, "an annotation must be an object")
                continue
            missing = [k for k in ("image_id", "caption") if k not in ann]
            if missing:
                report.add("missing_field", ref, f"caption annotation without {', '.join(missing)}")
                bad_images.add(ann.get("image_id"))
                continue
            if not isinstance(ann["caption"], str) or not ann["caption"].strip():
                report.add("wrong_type", ref, "caption must be a non-empty string")
                bad_images.add(ann["image_id"])
                continue
            if ann["image_id"] not in caption_map:
                report.add("unknown_image", ref, f"image_id {ann['image_id']!r} is not in `images`")
                continue
            caption_map[ann["image_id"]].append(" ".join(ann["caption"].split()))

    instance_ids: set[Any] = set()
    if instances is not None:
        data = _read_json(instances, "instances")
        found = _read_coco_images(data, report, str(instances))
        instance_ids = set(found)
        merge_images(found, "instances")
        categories: dict[Any, str] = {}
        for index, cat in enumerate(data.get("categories") or []):
            report.records += 1
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                report.add("missing_field", f"categories[{index}]", "a category needs id and name")
                continue
            if not isinstance(cat["name"], str):
                report.add("wrong_type", cat["id"], "category name must be a string")
                continue
            categories[cat["id"]] = cat["name"]
        annotations = data.get("annotations") or []
        has_segmentation = any(isinstance(a, dict) and "segmentation" in a for a in annotations)
        object_map = {image_id: [] for image_id in found}
        for index, ann in enumerate(annotations):
            report.records += 1
            ref = ann.get("id", f"annotations[{index}]") if isinstance(ann, dict) else f"annotations[{index}]"
            if not isinstance(ann, dict):
                report.add("wrong_type", ref, "an annotation must be an object")
                continue
            required = ["image_id", "bbox", "category_id"] + (["segmentation"] if has_segmentation else [])
            missing = [k for k in required if k not in ann]
            if missing:
                report.add("missing_field", ref, f"instance annotation without {', '.join(missing)}")
                bad_images.add(ann.get("image_id"))
                continue
            image_id = ann["image_id"]
            if image_id not in object_map:
                report.add("unknown_image", ref, f"image_id {image_id!r} is not in `images`")
                continue
            entry = found[image_id]
            width, height = entry["width"], entry["height"]
            bbox = ann["bbox"]
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                report.add("wrong_type", ref, "bbox must be [x, y, width, height] numbers")
                bad_images.add(image_id)
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                report.add("bad_bbox", ref, f"bbox {list(bbox)} has non-positive size")
                bad_images.add(image_id)
                continue
            if ann["category_id"] not in categories:
                report.add("unknown_category", ref, f"category_id {ann['category_id']!r} is not in `categories`")
                bad_images.add(image_id)
                continue
            polygon = None
            if has_segmentation:
                kind, value = _parse_segmentation(ann["segmentation"], width, height)
                if kind is not None:
                    report.add(kind, ref, value)
                    bad_images.add(image_id)
                    continue
                polygon = value
            box = (
                min(max(x / width, 0.0), 1.0),
                min(max(y / height, 0.0), 1.0),
                min(max((x + w) / width, 0.0), 1.0),
                min(max((y + h) / height, 0.0), 1.0),
            )
            area = float(ann["area"]) if _is_number(ann.get("area")) else w * h
            object_map[image_id].append(ObjectAnnotation(categories[ann["category_id"]], box, area, polygon))

    tag_map = _read_tags(tags, report) if tags is not None else None

    kept: list[AnnotatedImage] = []
    checked = 0
    for image_id, entry in entries.items():
        problems = False
        if captions is not None and instances is not None:
            if image_id not in caption_ids:
                report.add("missing_labels", image_id, "in the instances file but not in the captions file")
                problems = True
            if image_id not in instance_ids:
                report.add("missing_labels", image_id, "in the captions file but not in the instances file")
                problems = True
        if caption_map is not None and image_id in caption_ids and not caption_map.get(image_id):
            report.add("missing_labels", image_id, "no caption")
            problems = True
        image_tags = None
        if tag_map is not None:
            image_tags = tag_map.get(entry["file_name"], tag_map.get(os.path.basename(entry["file_name"]), tag_map.get(image_id)))
            if image_tags is None:
                report.add("missing_labels", image_id, f"no tags for {entry['file_name']}")
                problems = True
        path = images_dir / entry["file_name"]
        checked += 1
        if not _check_image_file(path, image_id, entry["width"], entry["height"], report, verify_images):
            problems = True
        if problems or image_id in bad_images:
            report.dropped.append(image_id)
            continue
        objects = object_map.get(image_id) if object_map is not None else None
        if image_tags is None and objects is not None:
            image_tags = list(dict.fromkeys(o.category for o in objects))
        kept.append(
            AnnotatedImage(
                image_id=str(image_id),
                image=str(path),
                width=entry["width"],
                height=entry["height"],
                captions=caption_map.get(image_id, []) if caption_map is not None else [],
                tags=image_tags,
                objects=objects,
            )
        )
    report.kept = len(kept)
    if report.ok:
        report.dropped.clear()
    stages = tuple(
        s
        for s, present in (
            ("caption", captions is not None),
            ("classification", tags is not None or instances is not None),
            ("detection", instances is not None),
            ("segmentation", instances is not None and has_segmentation),
        )
        if present
    )
    report.finish(skip_invalid, log)
    return AlignmentSource(name, kept, report, stages)


# =============================================================================== synthetic source
@lru_cache(maxsize=8)
def _synthetic_split(split: str, n: int, seed: int, image_size: Any, min_objects: int, max_objects: int):
    from .synthetic import make_split

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


# =============================================================================== stages
def normalise_order(order: str | Sequence[Any] | None = None) -> list[tuple[str, ...]]:
    """Stages as tuples of roles: ``"default"``/``"reverse"``/``"cap_all"``/``"all"`` or a list of roles / role lists.

    ``"all"`` inside a list means every role the list does not name elsewhere (``["caption", "all"]``
    is Cap→All). Every role must appear exactly once.
    """
    if order is None:
        order = ORDERS["default"]
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; use one of {sorted(ORDERS)} or a list of roles")
        order = ORDERS[order]
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
        raise ValueError(f"order {order!r} must list each of {STAGES} exactly once (a list item may group several)")
    return stages


def stage_roles(stage_index: int, order: str | Sequence[Any] | None = None) -> list[str]:
    """The cumulative roles of stage ``stage_index`` (0-based): the roles of stages 0..k, in order."""
    stages = normalise_order(order)
    if not 0 <= stage_index < len(stages):
        raise IndexError(f"stage_index {stage_index} is out of range for {len(stages)} stage(s) {stages}")
    return [r for stage in stages[: stage_index + 1] for r in stage]


def stage_instruction(roles: Sequence[str]) -> str:
    """``"caption, recognition, ..."``: the instruction words of ``roles`` in order."""
    return ", ".join(STAGE_WORDS[r] for r in roles)


def _selected_objects(image: AnnotatedImage, max_objects: int | None) -> list[tuple[ObjectAnnotation, tuple[int, ...]]]:
    objects = list(image.objects or [])
    if max_objects is not None and len(objects) > max_objects:
        ranked = sorted(range(len(objects)), key=lambda i: (-objects[i].area, i))[:max_objects]
        objects = [objects[i] for i in sorted(ranked)]
    keyed = [(obj, tuple(to_grid(v) for v in (obj.box[1], obj.box[0], obj.box[3], obj.box[2]))) for obj in objects]
    keyed.sort(key=lambda item: (item[1], item[0].category))
    return keyed


def stage_line(role: str, image: AnnotatedImage, caption: str | None = None, *, max_objects: int | None = None,
               max_vertices: int = DEFAULT_MAX_VERTICES, tolerance: float = DEFAULT_TOLERANCE) -> str:
    """One labelled target line (``"Caption: ..."``, ``"Tags: ..."``, ``"Boxes: ..."``, ``"Masks: ..."``)."""
    header = STAGE_HEADERS[role]
    if role == "caption":
        text = caption if caption is not None else (image.captions[0] if image.captions else None)
        if not text:
            raise ValueError(f"image {image.image_id} has no caption")
        return f"{header}: {text}"
    if role == "classification":
        if image.tags is None:
            raise ValueError(f"image {image.image_id} has no tags")
        return f"{header}: {', '.join(image.tags) if image.tags else 'none'}"
    if image.objects is None:
        raise ValueError(f"image {image.image_id} has no instance annotations")
    chosen = _selected_objects(image, max_objects)
    if not chosen:
        return f"{header}: none"
    if role == "detection":
        return f"{header}: " + "; ".join(f"{obj.category} {format_box(obj.box)}" for obj, _ in chosen)
    if role == "segmentation":
        parts = []
        for obj, _ in chosen:
            if obj.polygon is None:
                raise ValueError(f"image {image.image_id}: object {obj.category!r} has no polygon")
            parts.append(f"{obj.category}: {polygon_text(obj.polygon, image.width, image.height, max_vertices, tolerance)}")
        return f"{header}: " + "; ".join(parts)
    raise ValueError(f"unknown stage role {role!r}; roles are {STAGES}")


def stage_target(image: AnnotatedImage, roles: Sequence[str], caption: str | None = None, **kwargs) -> str:
    """The cumulative target of ``roles``: their lines joined by newlines, in the order given."""
    return "\n".join(stage_line(role, image, caption, **kwargs) for role in roles)


def _features(extra: Mapping[str, Any] | None = None):
    from datasets import Features, Image, List, Value

    feats = {
        "messages": List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}),
        "images": List(Image()),
        "image_id": Value("string"),
    }
    feats.update(extra or {})
    return Features(feats)


def _dataset(rows: list[dict[str, Any]], features):
    """``Dataset.from_list`` that also accepts an empty list."""
    import datasets

    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    if "images" in features:
        rows = _encode_images_once(rows)
    return datasets.Dataset.from_list(rows, features=features)


def _encode_images_once(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose PIL images are replaced by their encoded form, each distinct image encoded once.

    The QA rows of one scene share its image object; ``Dataset.from_list`` would PNG-encode it
    once per row (6-7 times a scene, most of the dataset's build time). The bytes are what the
    ``Image`` feature itself would store, so the dataset is unchanged.
    """
    from datasets.features.image import encode_pil_image
    from PIL import Image as PILImage

    encoded: dict[int, dict[str, Any]] = {}

    def encode(image):
        if not isinstance(image, PILImage.Image):
            return image
        if id(image) not in encoded:
            encoded[id(image)] = encode_pil_image(image)
        return encoded[id(image)]

    return [{**row, "images": [encode(image) for image in row["images"]]} if row.get("images") else row for row in rows]


def single_turn_row(image: Any, prompt: str, answer: str, image_id: str, image_position: str = "before", **extra: Any) -> dict[str, Any]:
    """One TRL conversational VLM row: the image placeholder, then the prompt (or the reverse, with
    ``image_position="after"``); the answer."""
    parts = [{"type": "image"}, {"type": "text", "text": prompt}]
    if image_position == "after":
        parts.reverse()
    elif image_position != "before":
        raise ValueError(f"image_position={image_position!r}: use 'before' or 'after' (the prompt)")
    return {
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image],
        "image_id": str(image_id),
        **extra,
    }


def fit_stage_target(image: AnnotatedImage, roles: Sequence[str], caption: str | None = None, *, max_length: int | None = None,
                     length_fn=len, max_objects: int | None = None, max_vertices: int = DEFAULT_MAX_VERTICES,
                     tolerance: float = DEFAULT_TOLERANCE, min_vertices: int = 4) -> tuple[str, str | None]:
    """:func:`stage_target` shortened to ``length_fn(text) <= max_length``; returns ``(text, how)``.

    ``length_fn`` is ``len`` (characters) or a token counter. ``how`` is None (fits as is),
    ``"vertices"`` (polygons simplified further, down to ``min_vertices``), ``"objects"`` (then the
    smallest objects left out of Boxes/Masks, keeping at least one) or ``"too_long"``.
    """
    kwargs = {"max_objects": max_objects, "max_vertices": max_vertices, "tolerance": tolerance}
    text = stage_target(image, roles, caption, **kwargs)

    def fits(candidate: str) -> bool:
        return max_length is None or length_fn(candidate) <= max_length

    if fits(text):
        return text, None
    if "segmentation" in roles:
        for k in range(max_vertices - 1, min_vertices - 1, -1):
            kwargs["max_vertices"] = k
            text = stage_target(image, roles, caption, **kwargs)
            if fits(text):
                return text, "vertices"
    if "detection" in roles or "segmentation" in roles:
        n = len(image.objects or [])
        for m in range(min(n, max_objects if max_objects is not None else n) - 1, 0, -1):
            kwargs["max_objects"] = m
            text = stage_target(image, roles, caption, **kwargs)
            if fits(text):
                return text, "objects"
    return text, "too_long"


def sequence_length_fn(processor, instruction: str, image_size: tuple[int, int] = (64, 64)):
    """``target -> tokens`` of the whole training sequence (prompt, image tokens, answer, eos) under ``processor``.

    Renders the row with the processor's chat template, expands each ``<image>`` marker to the
    processor's tokens for an image of ``image_size`` and counts tokens as TRL's collator does
    (``add_special_tokens=False``: the template writes the BOS).
    """
    from PIL import Image

    marker = getattr(processor, "image_token", "<image>")
    if hasattr(processor, "num_image_tokens"):
        per_image = int(processor.num_image_tokens(Image.new("RGB", tuple(image_size))))
    else:
        per_image = int(getattr(processor, "num_visual_tokens", 1))
    tokenizer = getattr(processor, "tokenizer", processor)

    def length(target: str) -> int:
        messages = single_turn_row(None, instruction, target, "")["messages"]
        text = processor.apply_chat_template(messages, tokenize=False)
        text = text.replace(marker, marker * per_image)
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    return length


def build_stage_dataset(
    source: AlignmentSource | Sequence[Any],
    stage_index: int,
    order: str | Sequence[Any] | None = None,
    *,
    max_objects: int | None = None,
    max_vertices: int = DEFAULT_MAX_VERTICES,
    tolerance: float = DEFAULT_TOLERANCE,
    caption_mode: str = "first",
    processor: Any = None,
    max_length: int | None = None,
    max_target_chars: int | None = None,
    skip_invalid: bool = False,
    image_position: str = "before",
    log=print,
):
    """The pre-alignment dataset of stage ``stage_index`` (0-based) of ``order`` (cumulative labels).

    ``source`` is an :class:`AlignmentSource` or a list of synthetic scenes. Rows: instruction
    :func:`stage_instruction` of :func:`stage_roles`, target :func:`stage_target`, plus ``image_id``
    and ``stage`` (the stage's own roles joined by ``"+"``); ``image_position="after"`` puts the
    image after the instruction (as :func:`single_turn_row`). ``caption_mode="all"`` writes one row
    per caption (COCO has five), ``"first"`` one per image. ``max_objects`` keeps the largest
    objects in Boxes/Masks.

    Length: a model's context is finite and cumulative targets are long. With ``processor`` every
    whole training sequence must fit ``max_length`` tokens (default: the tokenizer's
    ``model_max_length``), counted by :func:`sequence_length_fn`; without it, ``max_target_chars``
    (if given) bounds the target's characters. A longer target is shortened by
    :func:`fit_stage_target` -- fewer polygon vertices first, then the smallest objects left out --
    and the number of shortened rows is logged; a target that still does not fit raises a
    ValueError naming the images, or with ``skip_invalid=True`` is left out and logged.
    """
    from datasets import Value

    if not isinstance(source, AlignmentSource):
        source = source_from_scenes(source)
    if caption_mode not in ("first", "all"):
        raise ValueError(f"caption_mode must be 'first' or 'all', got {caption_mode!r}")
    roles = stage_roles(stage_index, order)
    missing = [r for r in roles if r not in source.stages]
    if missing:
        raise ValueError(f"source {source.name!r} has no labels for stage(s) {missing}; it serves {list(source.stages)}")
    own = "+".join(normalise_order(order)[stage_index])
    instruction = stage_instruction(roles)
    budget: int | None = max_target_chars
    length_fns: dict[tuple[int, int], Any] = {}
    if processor is not None:
        tokenizer = getattr(processor, "tokenizer", processor)
        budget = int(max_length or tokenizer.model_max_length)
    kwargs = {"max_objects": max_objects, "max_vertices": max_vertices, "tolerance": tolerance, "max_length": budget}
    unit = "tokens" if processor is not None else "characters"
    rows = []
    shortened: dict[str, list[str]] = {"vertices": [], "objects": [], "too_long": []}
    for image in source.images:
        if processor is not None:
            size = (image.width, image.height)
            if size not in length_fns:
                length_fns[size] = sequence_length_fn(processor, instruction, size)
            kwargs["length_fn"] = length_fns[size]
        captions: list[str | None] = [None]
        if "caption" in roles:
            captions = list(image.captions) if caption_mode == "all" else image.captions[:1]
        for caption in captions:
            target, how = fit_stage_target(image, roles, caption, **kwargs)
            if how is not None:
                shortened[how].append(image.image_id)
            if how == "too_long":
                continue
            rows.append(single_turn_row(image.image, instruction, target, image.image_id, image_position, stage=own))
    if log is not None and (shortened["vertices"] or shortened["objects"]):
        log(f"[{source.name}] stage {stage_index + 1} ({own}): {len(shortened['vertices']) + len(shortened['objects'])} of "
            f"{len(rows) + len(shortened['too_long'])} targets shortened to fit {budget} {unit} "
            f"({len(shortened['vertices'])} with fewer polygon vertices, {len(shortened['objects'])} with fewer objects)")
    if shortened["too_long"]:
        message = (f"[{source.name}] stage {stage_index + 1} ({own}): {len(shortened['too_long'])} target(s) do not fit "
                   f"{budget} {unit} even with one object: {shortened['too_long'][:20]}")
        if not skip_invalid:
            raise ValueError(message + "; allow a longer sequence or pass skip_invalid=True to leave them out")
        if log is not None:
            log(message + " (left out)")
    return _dataset(rows, _features({"stage": Value("string")}))


def build_stage_datasets(source: AlignmentSource | Sequence[Any], order: str | Sequence[Any] | None = None, **kwargs) -> list:
    """:func:`build_stage_dataset` for every stage of ``order``, in order."""
    return [build_stage_dataset(source, k, order, **kwargs) for k in range(len(normalise_order(order)))]


# =============================================================================== instruction data
def _instruct_features():
    from datasets import Value

    return _features({"question_type": Value("string")})


def qa_to_row(qa: Mapping[str, Any], image: Any, prompts: str = "eval", image_position: str = "before") -> dict[str, Any]:
    """One synthetic QA record (``question``/``answer``/``question_type``/``image_id``) as a TRL row.

    ``prompts="eval"`` (default) words the user turn with the fixed prompt ``astrea eval`` uses
    for the record's metric (:func:`astrea_vlm.train.synthetic.eval_record`), so training and
    evaluation prompts are identical; ``prompts="native"`` keeps the record's own question text.
    """
    if prompts == "eval":
        from ..eval.prompts import build_prompt
        from .synthetic import eval_record

        record = eval_record(dict(qa))
        prompt = build_prompt(record["metric"], record)
    elif prompts == "native":
        prompt = qa["question"]
    else:
        raise ValueError(f"prompts={prompts!r}: use 'eval' or 'native'")
    return single_turn_row(image, prompt, qa["answer"], qa["image_id"], image_position=image_position,
                           question_type=qa["question_type"])


def build_qa_dataset(scenes: Sequence[Any], question_types: Sequence[str] | None = None, prompts: str = "eval",
                     type_fractions: Mapping[str, float] | None = None, image_position: str = "before"):
    """One single-turn row per synthetic QA record (every scene's records, in scene order).

    ``type_fractions`` keeps a type's record for only that fraction of the scenes (every
    ``round(1 / f)``-th scene), e.g. ``{"caption": 0.25}``. The loss is a mean over answer
    tokens, so a 25-token caption outweighs a 1-token "yes" 25 to 1; thinning the long-answer
    types gives the short-answer ones a fair share of the gradient.
    """
    fractions = dict(type_fractions or {})
    for qtype, fraction in fractions.items():
        if not 0 < float(fraction) <= 1:
            raise ValueError(f"type_fractions[{qtype!r}]={fraction}: a fraction must lie in (0, 1]")
    every = {qtype: max(1, round(1 / float(f))) for qtype, f in fractions.items()}
    rows = []
    for index, scene in enumerate(scenes):
        for qa in scene.qa:
            qtype = qa["question_type"]
            if question_types is not None and qtype not in question_types:
                continue
            if index % every.get(qtype, 1) == 0:
                rows.append(qa_to_row(qa, scene.image, prompts, image_position))
    return _dataset(rows, _instruct_features())


_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def llava_record_to_row(record: Any, index: int, images_dir: str | os.PathLike | None, report: BuildReport,
                        verify_images: bool | str = True) -> dict[str, Any] | None:
    """One LLaVA conversation as a TRL row, or None after reporting why it is malformed.

    ``<image>`` markers in human turns become ``{"type": "image"}`` parts where they stand (the
    newline next to a marker is dropped); ``image`` (a path, or a list for several images,
    relative to ``images_dir``) must give one file per marker. Turns must alternate human / gpt,
    starting with human (after an optional system turn) and ending with gpt. Records without
    ``image`` are text-only rows with ``images: []``.
    """
    ref = record.get("id", f"[{index}]") if isinstance(record, dict) else f"[{index}]"
    if not isinstance(record, dict):
        report.add("wrong_type", ref, "a conversation record must be an object")
        return None
    if "conversations" not in record:
        report.add("missing_field", ref, "no `conversations`")
        return None
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        report.add("wrong_type", ref, "`conversations` must be a non-empty list")
        return None
    image_field = record.get("image")
    paths = [] if image_field is None else ([image_field] if isinstance(image_field, str) else image_field)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        report.add("wrong_type", ref, "`image` must be a path or a list of paths")
        return None
    messages = []
    markers = 0
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            report.add("missing_field", ref, f"turn {t} needs `from` and `value`")
            return None
        if not isinstance(turn["value"], str) or not isinstance(turn["from"], str):
            report.add("wrong_type", ref, f"turn {t}: `from` and `value` must be strings")
            return None
        role = _ROLE_NAMES.get(turn["from"].lower())
        if role is None:
            report.add("bad_conversation", ref, f"turn {t}: unknown speaker {turn['from']!r}")
            return None
        value = turn["value"]
        if role == "user":
            parts = []
            pieces = value.split("<image>")
            markers += len(pieces) - 1
            for p, piece in enumerate(pieces):
                text = piece
                if p > 0:
                    text = text[1:] if text.startswith("\n") else text
                if p < len(pieces) - 1:
                    text = text[:-1] if text.endswith("\n") else text
                if text.strip():
                    parts.append({"type": "text", "text": text.strip()})
                if p < len(pieces) - 1:
                    parts.append({"type": "image"})
        else:
            if "<image>" in value:
                report.add("image_marker_mismatch", ref, f"turn {t}: <image> outside a human turn")
                return None
            if not value.strip():
                report.add("bad_conversation", ref, f"turn {t}: empty answer")
                return None
            parts = [{"type": "text", "text": value.strip()}]
        messages.append({"role": role, "content": parts})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(body) // 2)
    if not body or [m["role"] for m in body] != expected or len(body) % 2 or any(m["role"] == "system" for m in body):
        report.add("bad_conversation", ref, "turns must alternate human/gpt, starting with human and ending with gpt")
        return None
    if any(not m["content"] for m in body):
        report.add("bad_conversation", ref, "empty turn")
        return None
    if markers != len(paths):
        report.add("image_marker_mismatch", ref, f"{markers} <image> marker(s) for {len(paths)} image(s)")
        return None
    files = []
    for path in paths:
        full = Path(images_dir or ".") / path
        if not _check_image_file(full, ref, None, None, report, verify_images):
            return None
        files.append(str(full))
    return {"messages": messages, "images": files, "image_id": str(ref), "question_type": "conversation"}


def load_llava(path: str | os.PathLike, images_dir: str | os.PathLike | None = None, *, skip_invalid: bool = False,
               verify_images: bool | str = True, log=print):
    """LLaVA-style conversation JSON as a TRL conversational VLM dataset (``question_type="conversation"``).

    Returns ``(dataset, report)``. Malformed records are reported by id (see
    :func:`llava_record_to_row`); by default a ValueError is raised, with ``skip_invalid=True``
    they are dropped and listed in ``report.dropped``.
    """

    data = _read_json(path, "LLaVA conversation")
    if not isinstance(data, list):
        raise ValueError(f"{path}: LLaVA data is a JSON list of conversation records")
    report = BuildReport(f"llava:{Path(path).name}")
    rows = []
    for index, record in enumerate(data):
        report.records += 1
        row = llava_record_to_row(record, index, images_dir, report, verify_images)
        if row is None:
            report.dropped.append(record.get("id", f"[{index}]") if isinstance(record, dict) else f"[{index}]")
        else:
            rows.append(row)
    report.kept = len(rows)
    report.finish(skip_invalid, log)
    return _dataset(rows, _instruct_features()), report


# =============================================================================== recipe entry points
_DATA_KEYS = {
    "source", "train_size", "validation_size", "test_size", "image_size", "seed", "min_objects", "max_objects",
    "max_vertices", "tolerance", "max_objects_in_target", "max_target_chars", "max_length", "caption_mode", "skip_invalid",
    "verify_images",
    "coco_captions", "coco_instances", "tags", "images", "instruct", "instruct_images", "question_types", "type_fractions", "image_position", "splits",
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
        return load_coco(cfg["images"], captions=cfg.get("coco_captions"), instances=cfg.get("coco_instances"), tags=cfg.get("tags"),
                         skip_invalid=bool(cfg.get("skip_invalid", False)), verify_images=cfg.get("verify_images", True),
                         name=f"coco-{split}", log=log)
    raise ValueError(f"data config: unknown source {kind!r}; use 'synthetic' or 'coco'")


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
                                verify_images=cfg.get("verify_images", True), log=log)
        parts.append(dataset)
    if not parts:
        raise ValueError("data config: no instruction data; use source: synthetic or give `instruct` (LLaVA JSON)")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


__all__ = [
    "AlignmentSource", "AnnotatedImage", "BuildReport", "DEFAULT_MAX_VERTICES", "GRID", "InvalidDataError", "ORDERS",
    "ObjectAnnotation", "PROBLEM_KINDS", "STAGES", "STAGE_HEADERS", "STAGE_WORDS", "box_from_mask", "build_qa_dataset",
    "build_stage_dataset", "build_stage_datasets", "fit_stage_target", "format_box", "format_polygon", "instruct_dataset", "llava_record_to_row",
    "load_coco", "load_llava", "load_source", "mask_to_polygons", "normalise_order", "parse_boxes", "parse_labelled_boxes", "polygon_area",
    "polygon_text", "qa_to_row", "rle_counts_to_string", "rle_decode", "rle_encode", "rle_string_to_counts",
    "sequence_length_fn", "simplify_polygon", "single_turn_row", "source_from_scenes", "stage_dataset", "stage_instruction", "stage_line",
    "stage_roles", "stage_target", "synthetic_scenes", "synthetic_source", "to_grid",
]
