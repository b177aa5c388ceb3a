"""A synthetic visual world for training and testing Astrea offline (numpy + PIL, no downloads).

Each scene is a small picture of 2-5 flat-coloured shapes (six shapes, eight colours, three sizes,
rotation, occlusion) on a textured background, with every label the four pre-alignment experts need
(caption, tags, boxes, masks of the VISIBLE pixels) and one instruction QA record of each of seven
types, answers balanced over each split. :func:`make_split` is deterministic per ``(name, n, seed,
image_size)``. The world's rules, annotations and question types: ``docs/synthetic_world.md``.
"""

from __future__ import annotations

import colorsys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..geometry import box_from_mask, format_box, mask_to_polygons, rle_encode

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                           "diamond": "diamonds", "cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.10, 0.13), "medium": (0.14, 0.17), "large": (0.18, 0.22)}
BACKGROUNDS: dict[str, tuple[str, str]] = {  # kind -> (caption adjective, tag)
    "noise": ("noisy", "noise"),
    "stripes": ("striped", "stripes"),
    "checkerboard": ("checkered", "checkerboard"),
    "gradient": ("gradient", "gradient"),
}
question_types: tuple[str, ...] = (
    "counting",
    "colour",
    "existence",
    "relative_position",
    "grounding",
    "multiple_choice",
    "caption",
)
QUESTION_TYPES = question_types
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six")

SUPERSAMPLE = 4
NOISE_SIGMA = 5.0
COLOUR_JITTER = 12
MIN_VISIBLE_FRACTION = 0.6
PLACEMENT_TRIES = 30


@dataclass
class SceneObject:
    """One drawn shape; every geometric field describes its VISIBLE pixels (see the module docstring)."""

    shape: str
    colour: str
    size: str
    center: tuple[float, float]
    radius: float
    angle: float
    z: int
    mask: np.ndarray = field(repr=False)
    full_area: int = 0

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def visible_fraction(self) -> float:
        return self.area / max(1, self.full_area)

    @property
    def box(self) -> tuple[float, float, float, float]:
        return box_from_mask(self.mask)

    @property
    def centroid(self) -> tuple[float, float]:
        rows, cols = np.nonzero(self.mask)
        return float(cols.mean() + 0.5), float(rows.mean() + 0.5)

    @property
    def rle(self) -> dict[str, Any]:
        return rle_encode(self.mask)

    @property
    def polygons_px(self) -> list[list[tuple[float, float]]]:
        return mask_to_polygons(self.mask)

    def annotation(self) -> dict[str, Any]:
        """JSON-ready record (no image data; the mask as RLE)."""
        return {
            "shape": self.shape, "colour": self.colour, "size": self.size, "category": self.category,
            "center": list(self.center), "radius": self.radius, "angle": self.angle, "z": self.z,
            "box": list(self.box), "area": self.area, "visible_fraction": self.visible_fraction, "rle": self.rle,
        }


@dataclass
class Scene:
    """One picture with its annotations and QA records (see the module docstring)."""

    image_id: str
    image: Image.Image = field(repr=False)
    background: str
    objects: list[SceneObject]
    caption: str
    tags: list[str]
    qa: list[dict[str, Any]] = field(default_factory=list)
    caption_references: list[str] = field(default_factory=list)  # the caption's content in every template

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool visible masks, in drawing order."""
        return np.stack([o.mask for o in self.objects]) if self.objects else np.zeros((0, self.height, self.width), bool)

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [o.box for o in self.objects]

    @property
    def categories(self) -> list[str]:
        return [o.category for o in self.objects]

    def annotation(self) -> dict[str, Any]:
        """JSON-ready annotations of the scene (everything but the pixels)."""
        return {
            "image_id": self.image_id, "width": self.width, "height": self.height, "background": self.background,
            "caption": self.caption, "tags": list(self.tags), "objects": [o.annotation() for o in self.objects],
            "qa": [dict(q) for q in self.qa],
        }


# ------------------------------------------------------------------------------ drawing
def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        local = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        local = [(r * np.cos(a), r * np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "star":
        local = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = np.deg2rad(-90 + 36 * k)
            local.append((rad * np.cos(a), rad * np.sin(a)))
    elif shape == "diamond":
        local = [(0, -r), (0.7 * r, 0), (0, r), (-0.7 * r, 0)]
    elif shape == "cross":
        a, b = 0.33 * r, r
        local = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in local]


def shape_mask(shape: str, center: tuple[float, float], radius: float, angle: float, width: int, height: int) -> np.ndarray:
    """The full (unoccluded) bool mask of a shape, rasterised at 4x and reduced by majority vote."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (width * k, height * k), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = center[0] * k, center[1] * k, radius * k
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=255)
    big = np.asarray(canvas, np.float32).reshape(height, k, width, k) / 255.0
    return big.mean(axis=(1, 3)) >= 0.5


def _muted(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.7))
    return np.array(rgb) * 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[str, np.ndarray]:
    kind = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    a, b = _muted(rng), _muted(rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "noise":
        img = a[None, None, :] + rng.normal(0.0, 18.0, (height, width, 3))
    elif kind == "stripes":
        period = rng.uniform(4, 10) * max(width, height) / 64
        direction = int(rng.integers(3))
        coord = yy if direction == 0 else xx if direction == 1 else (xx + yy) / np.sqrt(2)
        t = (np.floor(coord / (period / 2)) % 2)[..., None]
        img = a * (1 - t) + b * t
    elif kind == "checkerboard":
        period = rng.uniform(4, 10) * max(width, height) / 64
        t = ((np.floor(xx / (period / 2)) + np.floor(yy / (period / 2))) % 2)[..., None]
        img = a * (1 - t) + b * t
    else:  # gradient
        theta = rng.uniform(0, 2 * np.pi)
        proj = (xx - width / 2) * np.cos(theta) + (yy - height / 2) * np.sin(theta)
        t = ((proj - proj.min()) / max(1e-6, np.ptp(proj)))[..., None]
        img = a * (1 - t) + b * t
    return kind, np.asarray(img, np.float32)


def nearest_colour(rgb: Any) -> str:
    """The :data:`COLOURS` name nearest (Euclidean, RGB) to ``rgb``."""
    rgb = np.asarray(rgb, float)
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - rgb) ** 2)))


# ------------------------------------------------------------------------------ relations and text
def relation(a: SceneObject, b: SceneObject, width: int, height: int) -> str | None:
    """Where ``a`` is relative to ``b`` (left/right/above/below), or None when no axis clearly dominates."""
    (ax, ay), (bx, by) = a.centroid, b.centroid
    dx, dy = ax - bx, ay - by
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= 0.15 * width:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= 0.15 * height:
        return "above" if dy < 0 else "below"
    return None


_RELATION_PHRASES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _caption(rng: np.random.Generator, objects: list[SceneObject], background: str, width: int, height: int) -> tuple[str, list[str]]:
    """The scene's caption and its references: the same content in every template (the caption is one of them)."""
    groups: dict[str, list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault(obj.category, []).append(obj)
    ordered = sorted(groups.values(), key=lambda g: min(o.centroid[0] for o in g))
    phrases = []
    for group in ordered:
        obj = group[0]
        if len(group) == 1:
            words = f"{obj.size} {obj.category}" if rng.random() < 0.35 else obj.category
            phrases.append(f"{_article(words)} {words}")
        else:
            phrases.append(f"{NUMBER_WORDS[len(group)]} {obj.colour} {PLURALS[obj.shape]}")
    things = _join(phrases)
    adjective = BACKGROUNDS[background][0]
    be = "are" if len(ordered[0]) > 1 else "is"
    templates = [
        f"{things} on {_article(adjective)} {adjective} background.",
        f"{_article(adjective).capitalize()} {adjective} background with {things}.",
        f"This image shows {things} on {_article(adjective)} {adjective} background.",
        f"There {be} {things} in the picture.",
        f"From left to right: {things}.",
        f"{things}, drawn over {_article(adjective)} {adjective} background.",
    ]
    templates = [t[0].upper() + t[1:] for t in templates]
    chosen = int(rng.integers(len(templates)))
    unique = [g[0] for g in ordered if len(g) == 1]
    if len(unique) >= 2 and rng.random() < 0.5:
        pairs = [(a, b) for a in unique for b in unique if a is not b and relation(a, b, width, height)]
        if pairs:
            a, b = pairs[int(rng.integers(len(pairs)))]
            clause = f" The {a.category} is {_RELATION_PHRASES[relation(a, b, width, height)]} the {b.category}."
            templates = [t + clause for t in templates]
    return templates[chosen], templates


def _tags(objects: list[SceneObject], background: str) -> list[str]:
    shapes = [s for s in SHAPES if any(o.shape == s for o in objects)]
    colours = [c for c in COLOURS if any(o.colour == c for o in objects)]
    return shapes + colours + [BACKGROUNDS[background][1]]


# ------------------------------------------------------------------------------ QA
class _Balancer:
    """Per-type answer counters of a split; picks the least-used answer among a scene's candidates."""

    def __init__(self):
        self.counts: dict[str, Counter] = {t: Counter() for t in question_types}

    def pick(self, qtype: str, candidates: list[tuple[str, Any]], rng: np.random.Generator) -> tuple[str, Any]:
        counter = self.counts[qtype]
        answers = sorted({a for a, _ in candidates})
        low = min(counter[a] for a in answers)
        least = [a for a in answers if counter[a] == low]
        answer = least[int(rng.integers(len(least)))]
        options = [c for c in candidates if c[0] == answer]
        return options[int(rng.integers(len(options)))]

    def commit(self, qtype: str, answer: str) -> None:
        self.counts[qtype][answer] += 1


def _choose(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


_COUNT_PROMPTS = ("How many {what} are there in the image?", "Count the {what} in the picture.", "How many {what} can you see?")
_COLOUR_PROMPTS = ("What colour is the {shape}?", "Which colour does the {shape} have?", "What is the colour of the {shape}?")
_EXIST_PROMPTS = ("Is there {art} {cat} in the image?", "Does the picture contain {art} {cat}?", "Can you see {art} {cat}?")
_REL_PROMPTS = ("Where is the {a} relative to the {b}?", "Is the {a} left of, right of, above or below the {b}?")
_GROUND_PROMPTS = ("Give the bounding box of the {cat}.", "Where is the {cat}? Answer with its bounding box.",
                   "Locate the {cat} in the image.")
_CAPTION_PROMPTS = ("Describe the image in one sentence.", "What does this picture show?", "Write a short caption for the image.",
                    "Describe the shapes in the image.")
_MC_HINT = "Answer with the option's letter from the given choices directly."


def _qa_candidates(objects: list[SceneObject], width: int, height: int) -> dict[str, list[tuple[str, Any]]]:
    by_shape = Counter(o.shape for o in objects)
    by_colour = Counter(o.colour for o in objects)
    by_cat = Counter(o.category for o in objects)
    cands: dict[str, list[tuple[str, Any]]] = {}
    count = [(str(by_shape[s]), ("shape", s)) for s in SHAPES]
    count += [(str(n), ("colour", c)) for c, n in by_colour.items()]
    count.append((str(len(objects)), ("all", None)))
    cands["counting"] = count
    cands["colour"] = [(o.colour, o) for o in objects if by_shape[o.shape] == 1]
    present = [(o.category, o) for o in objects]
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in by_cat]
    hard = [cat for cat in absent if by_shape[cat.split()[1]] or by_colour[cat.split()[0]]]
    cands["existence"] = [("yes", cat) for cat, _ in present] + [("no", cat) for cat in (hard or absent)]
    unique = [o for o in objects if by_cat[o.category] == 1]
    rel = []
    for a in unique:
        for b in unique:
            if a is not b:
                r = relation(a, b, width, height)
                if r is not None:
                    rel.append((r, (a, b)))
    cands["relative_position"] = rel
    cands["grounding"] = [("box", o) for o in unique]
    mc = [("mc", ("colour", o)) for o in objects if by_shape[o.shape] == 1]
    mc += [("mc", ("shape", o)) for o in objects if by_colour[o.colour] == 1]
    mc += [("mc", ("count", s)) for s in by_shape]
    cands["multiple_choice"] = mc
    cands["caption"] = [("caption", None)]
    return cands


def _make_qa(rng: np.random.Generator, balancer: _Balancer, cands: dict[str, list], image_id: str,
             caption: str, caption_references: list[str]) -> list[dict[str, Any]]:
    records = []

    def record(qtype, question, answer, options=(), box=None, target=None):
        records.append({"image_id": image_id, "question_type": qtype, "question": question, "answer": answer,
                        "options": list(options), "box": None if box is None else [float(v) for v in box], "target": target})
        if qtype != "grounding" and qtype != "caption":
            balancer.commit(qtype, answer)

    answer, (kind, what) = balancer.pick("counting", cands["counting"], rng)
    noun = PLURALS[what] if kind == "shape" else f"{what} shapes" if kind == "colour" else "shapes"
    record("counting", _choose(rng, _COUNT_PROMPTS).format(what=noun) + " Answer with a number.", answer,
           target=noun)

    answer, obj = balancer.pick("colour", cands["colour"], rng)
    record("colour", _choose(rng, _COLOUR_PROMPTS).format(shape=obj.shape) + " Answer with one word.", answer, target=obj.shape)

    answer, cat = balancer.pick("existence", cands["existence"], rng)
    record("existence", _choose(rng, _EXIST_PROMPTS).format(art=_article(cat), cat=cat) + " Answer yes or no.", answer, target=cat)

    answer, (a, b) = balancer.pick("relative_position", cands["relative_position"], rng)
    record("relative_position", _choose(rng, _REL_PROMPTS).format(a=a.category, b=b.category)
           + " Answer with left, right, above or below.", answer, target=f"{a.category}|{b.category}")

    _, obj = _choose(rng, cands["grounding"])
    record("grounding", _choose(rng, _GROUND_PROMPTS).format(cat=obj.category)
           + " Answer with [x1, y1, x2, y2] on a 0-1000 grid.", format_box(obj.box), box=obj.box, target=obj.category)

    _, (kind, what) = _choose(rng, cands["multiple_choice"])
    if kind == "colour":
        question, right, pool = f"What colour is the {what.shape}?", what.colour, list(COLOURS)
    elif kind == "shape":
        question, right, pool = f"What shape is the {what.colour} object?", what.shape, list(SHAPES)
    else:
        right = str(_shape_count(cands, what))
        question, pool = f"How many {PLURALS[what]} are there?", [str(i) for i in range(0, 7)]
    distractors = [p for p in pool if p != right]
    picked = [distractors[i] for i in rng.permutation(len(distractors))[:3]]
    letter = balancer.pick("multiple_choice", [(letter, None) for letter in LETTERS], rng)[0]
    options = list(picked)
    options.insert(LETTERS.index(letter), right)
    text = question + "\n" + "\n".join(f"{l}. {o}" for l, o in zip(LETTERS, options)) + "\n" + _MC_HINT
    record("multiple_choice", text, letter, options=options, target=right)

    record("caption", _choose(rng, _CAPTION_PROMPTS), caption)
    records[-1]["references"] = list(caption_references)
    return records


def _shape_count(cands: dict[str, list], shape: str) -> int:
    """The number of ``shape`` objects, read from the counting candidates."""
    return int(next(a for a, (kind, what) in cands["counting"] if kind == "shape" and what == shape))


# ------------------------------------------------------------------------------ scenes
def _image_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    width, height = (int(v) for v in image_size)
    return width, height


def _place_objects(rng: np.random.Generator, width: int, height: int, n: int) -> list[SceneObject]:
    side = min(width, height)
    min_pixels = max(6, int(0.004 * width * height))
    objects: list[SceneObject] = []
    full_masks: list[np.ndarray] = []
    for _ in range(n):
        shape = _choose(rng, sorted({o.shape for o in objects})) if objects and rng.random() < 0.4 else _choose(rng, list(SHAPES))
        colour = _choose(rng, list(COLOURS))
        size = _choose(rng, list(SIZES))
        for _try in range(PLACEMENT_TRIES):
            radius = float(rng.uniform(*SIZES[size])) * side
            cx = float(rng.uniform(radius, width - radius))
            cy = float(rng.uniform(radius, height - radius))
            angle = 0.0 if shape == "circle" else float(rng.uniform(-15, 15))
            full = shape_mask(shape, (cx, cy), radius, angle, width, height)
            if full.sum() < min_pixels:
                continue
            ok = True
            for prev, prev_full in zip(objects, full_masks):
                visible = prev.mask & ~full
                if visible.sum() < max(min_pixels, MIN_VISIBLE_FRACTION * prev_full.sum()):
                    ok = False
                    break
            if ok:
                for prev in objects:
                    prev.mask = prev.mask & ~full
                objects.append(SceneObject(shape, colour, size, (cx, cy), radius, angle, len(objects), full.copy(), int(full.sum())))
                full_masks.append(full)
                break
    return objects


def make_scene(rng: np.random.Generator, image_id: str, image_size: int | tuple[int, int] = 64, *, min_objects: int = 2,
               max_objects: int = 5, balancer: _Balancer | None = None) -> Scene:
    """One scene drawn from ``rng`` (QA balanced through ``balancer``, a fresh one when None)."""
    width, height = _image_size(image_size)
    balancer = balancer or _Balancer()
    if min_objects < 2:
        raise ValueError("min_objects must be at least 2 (relative-position questions need two objects)")
    for _attempt in range(1000):
        background, pixels = _background(rng, width, height)
        objects = _place_objects(rng, width, height, int(rng.integers(min_objects, max_objects + 1)))
        if len(objects) < min_objects:
            continue
        cands = _qa_candidates(objects, width, height)
        if not all(cands[t] for t in question_types):
            continue
        for obj in objects:
            colour = np.array(COLOURS[obj.colour], np.float32) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
            full = shape_mask(obj.shape, obj.center, obj.radius, obj.angle, width, height)
            pixels[full] = colour
        pixels = pixels + rng.normal(0.0, NOISE_SIGMA, pixels.shape)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
        caption, references = _caption(rng, objects, background, width, height)
        scene = Scene(image_id, image, background, objects, caption, _tags(objects, background), caption_references=references)
        scene.qa = _make_qa(rng, balancer, cands, image_id, caption, references)
        return scene
    raise RuntimeError(f"could not draw a scene with {min_objects}-{max_objects} objects at {width}x{height}; use a larger image_size")


def split_rng(name: str, seed: int = 0) -> np.random.Generator:
    """The generator of split ``name``: ``default_rng([seed, crc32(name)])``."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def make_split(name: str = "train", n: int = 256, seed: int = 0, image_size: int | tuple[int, int] = 64, *,
               min_objects: int = 2, max_objects: int = 5) -> list[Scene]:
    """``n`` scenes of split ``name`` (``train``/``validation``/``test`` or any name), deterministic in its arguments.

    Image ids are ``"{name}-{seed}-{index:05d}"``. Answers are balanced over the split (see the
    module docstring), so keep ``n`` in the tens or more for balanced statistics.
    """
    rng = split_rng(name, seed)
    balancer = _Balancer()
    return [
        make_scene(rng, f"{name}-{seed}-{i:05d}", image_size, min_objects=min_objects, max_objects=max_objects, balancer=balancer)
        for i in range(n)
    ]


def qa_records(scenes: list[Scene], question_type: str | None = None) -> list[dict[str, Any]]:
    """Every QA record of ``scenes`` (of one type when given), in scene order."""
    return [q for s in scenes for q in s.qa if question_type is None or q["question_type"] == question_type]


def answer_distribution(scenes: list[Scene]) -> dict[str, Counter]:
    """``question_type -> Counter(answer)`` over the scenes' QA."""
    out: dict[str, Counter] = {t: Counter() for t in question_types}
    for q in qa_records(scenes):
        out[q["question_type"]][q["answer"]] += 1
    return out


def majority_baseline(scenes: list[Scene]) -> dict[str, float]:
    """Accuracy of always answering each type's most frequent answer (grounding/caption: exact-match)."""
    return {t: (max(c.values()) / sum(c.values()) if c else 0.0) for t, c in answer_distribution(scenes).items()}


# How `astrea eval` (task ``qa``) scores each question type.
EVAL_METRICS = {
    "counting": "exact_match",
    "colour": "exact_match",
    "existence": "exact_match",
    "relative_position": "exact_match",
    "grounding": "grounding",
    "multiple_choice": "multiple_choice",
    "caption": "caption",
}


def eval_record(qa: dict[str, Any], image: Any = None) -> dict[str, Any]:
    """One QA record in the format of ``astrea eval --task qa`` (see :mod:`astrea_vlm.eval.data`).

    ``question`` is what the fixed evaluation prompt of the record's ``metric`` wraps
    (:func:`astrea_vlm.eval.prompts.build_prompt`): the question with its answer-format hint for
    the short-answer types, the stem for multiple choice (the prompt lists the options), the
    object phrase for grounding. Training rows use the same prompts, so a model is evaluated on
    exactly the prompts it was tuned with. ``image`` (a path or a PIL image) is stored as given.
    """
    qtype = qa["question_type"]
    metric = EVAL_METRICS[qtype]
    record: dict[str, Any] = {"id": f"{qa['image_id']}-{qtype}", "image_id": qa["image_id"], "question_type": qtype,
                              "metric": metric, "image": image}
    if metric == "multiple_choice":
        record.update(question=qa["question"].split("\n")[0], options=list(qa["options"]), answer=qa["answer"])
    elif metric == "grounding":
        record.update(question=f"the {qa['target']}", box=list(qa["box"]), answer=qa["answer"])
    elif metric == "caption":
        # Every template rendering of the scene's content is a reference (as COCO has five
        # captions an image): a caption is scored on what it says, not on which template it drew.
        record.update(question=qa["question"], captions=list(qa.get("references") or [qa["answer"]]), answer=qa["answer"])
    else:
        record.update(question=qa["question"], answer=qa["answer"])
    return record


__all__ = [
    "BACKGROUNDS", "COLOURS", "LETTERS", "QUESTION_TYPES", "RELATIONS", "SHAPES", "SIZES", "Scene", "SceneObject",
    "EVAL_METRICS", "answer_distribution", "eval_record", "majority_baseline", "make_scene", "make_split", "nearest_colour", "qa_records", "question_types",
    "relation", "shape_mask", "split_rng",
]
