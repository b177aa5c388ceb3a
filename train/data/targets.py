"""Pre-alignment targets (paper §3.1.1, §3.1.3): one labelled line per stage, CUMULATIVE in the order given.

Stage k's instruction is the words of stages 1..k joined by ``", "`` (the paper's "caption,
recognization", spelt "recognition"), its target their lines joined by newlines::

    Caption: a red circle and two blue stars on a striped background.
    Tags: circle, star, red, blue, stripes
    Boxes: red circle [120, 340, 200, 420]; blue star [...]
    Masks: red circle: (120,340) (200,340) (160,420); blue star: ...

Objects are listed in reading order; a target too long for the model's context is shortened
(fewer polygon vertices, then fewer objects). Details: ``docs/training_data.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...geometry import DEFAULT_MAX_VERTICES, DEFAULT_TOLERANCE, format_box, polygon_text, to_grid
from ..stages import STAGES, normalise_order, stage_roles
from .annotations import AlignmentSource, AnnotatedImage, ObjectAnnotation
from .report import PYTHON_HINT
from .rows import make_dataset, row_features, single_turn_row
from .synthetic_source import source_from_scenes

STAGE_WORDS: dict[str, str] = {
    "caption": "caption",
    "classification": "recognition",
    "detection": "detection",
    "segmentation": "segmentation",
}
STAGE_HEADERS: dict[str, str] = {"caption": "Caption", "classification": "Tags", "detection": "Boxes", "segmentation": "Masks"}


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
    hint: str = PYTHON_HINT,
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
            raise ValueError(message + f"; allow a longer sequence or {hint} to leave them out")
        if log is not None:
            log(message + " (left out)")
    return make_dataset(rows, row_features({"stage": Value("string")}))


def build_stage_datasets(source: AlignmentSource | Sequence[Any], order: str | Sequence[Any] | None = None, **kwargs) -> list:
    """:func:`build_stage_dataset` for every stage of ``order``, in order."""
    return [build_stage_dataset(source, k, order, **kwargs) for k in range(len(normalise_order(order)))]
