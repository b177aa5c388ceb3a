"""COCO captions, instances (boxes; polygons or RLE) and RAM-style tag lists as an :class:`AlignmentSource`.

Formats and malformed records: ``docs/training_data.md``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...geometry import clip_polygon, mask_to_polygons, polygon_area, rle_decode
from .annotations import AlignmentSource, AnnotatedImage, ObjectAnnotation
from .report import PYTHON_HINT, BuildReport, check_image_file, read_json


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def _check_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[str | None, str, bool]:
    """``(problem kind or None, detail, clipped)`` of a positive-size COCO box on a ``width`` x ``height`` image.

    Wholly outside the image: ``box_outside_image``. Touching it only along an edge (zero width or
    height once clipped): ``bad_bbox``. Partly outside: kept, clipped to the image (``clipped``).
    """
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 > x2 or y1 > y2:
        return "box_outside_image", f"lies wholly outside the {width}x{height} image", False
    if x1 == x2 or y1 == y2:
        return "bad_bbox", f"has zero {'width' if x1 == x2 else 'height'} once clipped to the {width}x{height} image", False
    return None, "", (x1, y1, x2, y2) != (x, y, x + w, y + h)


def _check_polygon(polygon: list[tuple[float, float]], width: int, height: int) -> tuple[str | None, Any, bool]:
    """``(problem kind or None, polygon or message, clipped)``: the polygon's part inside the image.

    Nothing inside: ``polygon_outside_image``; only an edge or a point inside (zero area):
    ``bad_polygon``; partly outside: its inside part, ``clipped``.
    """
    inside = clip_polygon(polygon, width, height)
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    if not inside or max(xs) < 0 or max(ys) < 0 or min(xs) > width or min(ys) > height:
        return "polygon_outside_image", f"polygon lies wholly outside the {width}x{height} image", False
    if abs(polygon_area(inside)) == 0.0:
        return "bad_polygon", f"polygon has zero area inside the {width}x{height} image", False
    if inside == [(float(a), float(b)) for a, b in polygon]:
        return None, polygon, False
    return None, inside, True


def _read_tags(path: str | os.PathLike, report: BuildReport) -> dict[Any, list[str]]:
    """``key -> tags``: keys are file names (full and base name) or image ids."""
    data = read_json(path, "tags")
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


def _checked_annotation(ann: Any, index: int, report: BuildReport, required: list[str], what: str,
                        bad_images: set[Any]) -> Any | None:
    """The reference of an annotation that is an object with every ``required`` field, else None
    after reporting why (and marking its image bad)."""
    report.records += 1
    ref = ann.get("id", f"annotations[{index}]") if isinstance(ann, dict) else f"annotations[{index}]"
    if not isinstance(ann, dict):
        report.add("wrong_type", ref, "an annotation must be an object")
        return None
    missing = [k for k in required if k not in ann]
    if missing:
        report.add("missing_field", ref, f"{what} annotation without {', '.join(missing)}")
        bad_images.add(ann.get("image_id"))
        return None
    return ref


def _read_captions(data: Any, images: dict[Any, dict[str, Any]], report: BuildReport, bad_images: set[Any]) -> dict[Any, list[str]]:
    """``image id -> captions`` (whitespace folded) of a COCO captions file whose ``images`` are ``images``."""
    caption_map: dict[Any, list[str]] = {image_id: [] for image_id in images}
    for index, ann in enumerate(data.get("annotations") or []):
        ref = _checked_annotation(ann, index, report, ["image_id", "caption"], "caption", bad_images)
        if ref is None:
            continue
        if not isinstance(ann["caption"], str) or not ann["caption"].strip():
            report.add("wrong_type", ref, "caption must be a non-empty string")
            bad_images.add(ann["image_id"])
            continue
        if ann["image_id"] not in caption_map:
            report.add("unknown_image", ref, f"image_id {ann['image_id']!r} is not in `images`")
            continue
        caption_map[ann["image_id"]].append(" ".join(ann["caption"].split()))
    return caption_map


def _read_categories(data: Any, report: BuildReport) -> dict[Any, str]:
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
    return categories


def _instance(ann: dict[str, Any], ref: Any, image: dict[str, Any], categories: dict[Any, str], has_segmentation: bool,
              report: BuildReport) -> ObjectAnnotation | None:
    """One instance annotation as an :class:`ObjectAnnotation` (box normalised and clipped), or None after reporting why."""
    width, height = image["width"], image["height"]
    bbox = ann["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        report.add("wrong_type", ref, "bbox must be [x, y, width, height] numbers")
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        report.add("bad_bbox", ref, f"bbox {list(bbox)} has non-positive size")
        return None
    kind, detail, clipped = _check_box(x, y, w, h, width, height)
    if kind is not None:
        report.add(kind, ref, f"bbox {list(bbox)} {detail}")
        return None
    if clipped:
        report.clip("bbox", ref)
    if ann["category_id"] not in categories:
        report.add("unknown_category", ref, f"category_id {ann['category_id']!r} is not in `categories`")
        return None
    polygon = None
    if has_segmentation:
        kind, value = _parse_segmentation(ann["segmentation"], width, height)
        if kind is None:
            kind, value, clipped = _check_polygon(value, width, height)
            if clipped:
                report.clip("polygon", ref)
        if kind is not None:
            report.add(kind, ref, value)
            return None
        polygon = value
    box = (max(x, 0.0) / width, max(y, 0.0) / height, min(x + w, width) / width, min(y + h, height) / height)
    area = float(ann["area"]) if _is_number(ann.get("area")) else w * h
    return ObjectAnnotation(categories[ann["category_id"]], box, area, polygon)


def _read_instances(data: Any, images: dict[Any, dict[str, Any]], report: BuildReport,
                    bad_images: set[Any]) -> tuple[dict[Any, list[ObjectAnnotation]], bool]:
    """``(image id -> objects, whether the file has segmentations)`` of a COCO instances file whose ``images`` are ``images``."""
    categories = _read_categories(data, report)
    annotations = data.get("annotations") or []
    has_segmentation = any(isinstance(a, dict) and "segmentation" in a for a in annotations)
    required = ["image_id", "bbox", "category_id"] + (["segmentation"] if has_segmentation else [])
    object_map: dict[Any, list[ObjectAnnotation]] = {image_id: [] for image_id in images}
    for index, ann in enumerate(annotations):
        ref = _checked_annotation(ann, index, report, required, "instance", bad_images)
        if ref is None:
            continue
        image_id = ann["image_id"]
        if image_id not in object_map:
            report.add("unknown_image", ref, f"image_id {image_id!r} is not in `images`")
            continue
        instance = _instance(ann, ref, images[image_id], categories, has_segmentation, report)
        if instance is None:
            bad_images.add(image_id)
            continue
        object_map[image_id].append(instance)
    return object_map, has_segmentation


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
    hint: str = PYTHON_HINT,
) -> AlignmentSource:
    """COCO captions / instances (boxes + polygons or RLE) and RAM-style tags as an :class:`AlignmentSource`.

    The image set is every image listed in ``captions`` or ``instances``; an image needs a caption
    when ``captions`` is given, an entry in ``tags`` when ``tags`` is given, and an ``images`` entry
    in ``instances`` when it is given (an image there with no annotation has no objects). The
    stages served are those whose labels are present: caption (captions), classification (tags,
    or else instance category names), detection (instances), segmentation (instances with
    ``segmentation``). ``verify_images=True`` opens and verifies every file (``PIL.Image.verify``:
    the header, and the chunk checksums of a PNG), ``"full"`` also decodes it (finds truncated JPEGs;
    slow at COCO scale), False only checks that it exists. Boxes and polygons: wholly outside the
    image is a record error (``box_outside_image``, ``polygon_outside_image``), zero width, height
    or area inside it too (``bad_bbox``, ``bad_polygon``); partly outside, they are clipped to the
    image and counted in ``report.clipped``. Malformed records: :mod:`.report` (``hint``: how the
    error says to skip them).
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

    def read_images(path: str | os.PathLike, what: str) -> tuple[Any, dict[Any, dict[str, Any]]]:
        """A COCO file and its ``images``, merged into ``entries`` (an image two files describe differently is bad)."""
        data = read_json(path, what)
        found = _read_coco_images(data, report, str(path))
        for image_id, entry in found.items():
            previous = entries.get(image_id)
            if previous is not None and previous != entry:
                report.add("duplicate_id", image_id, f"{what} describes this image differently from another file")
                bad_images.add(image_id)
            entries.setdefault(image_id, entry)
        return data, found

    caption_ids: set[Any] = set()
    if captions is not None:
        data, found = read_images(captions, "captions")
        caption_ids = set(found)
        caption_map = _read_captions(data, found, report, bad_images)
    instance_ids: set[Any] = set()
    if instances is not None:
        data, found = read_images(instances, "instances")
        instance_ids = set(found)
        object_map, has_segmentation = _read_instances(data, found, report, bad_images)

    tag_map = _read_tags(tags, report) if tags is not None else None

    kept: list[AnnotatedImage] = []
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
        if not check_image_file(path, image_id, entry["width"], entry["height"], report, verify_images):
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
    report.finish(skip_invalid, log, hint)
    return AlignmentSource(name, kept, report, stages)
