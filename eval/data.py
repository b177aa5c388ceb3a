"""Local evaluation data for ``astrea eval``: JSON, JSONL or a ``datasets`` folder; nothing is downloaded.

Every record is a dict. The fields each task reads:

=================  ==============================================================================
all tasks          ``image`` (one) or ``images`` (a list): a path relative to the data file (or
                   absolute), a ``data:image/...;base64,`` string, raw bytes, a ``{"bytes", "path"}``
                   dict (``datasets`` Image) or a PIL image. Optional: ``id``, ``question_type``.
``vqa``            ``question``, ``answers`` (the human answers, 10 for VQAv2)
``exact_match``    ``question``, ``answer`` (a string) or ``answers`` (accepted strings)
``multiple_choice`` ``question``, ``options`` (list, letters A, B, ... in order), ``answer`` (a
                   letter, an index or the option's text)
``grounding``      ``question`` (the referring expression), ``box``: ``[x1, y1, x2, y2]`` normalised
                   to [0, 1], or ``box_pixels`` in pixels of the image
``caption``        ``captions`` (the reference captions)
``qa``             any of the above, with ``metric`` naming which (``vqa``, ``exact_match``,
                   ``multiple_choice``, ``grounding``, ``caption``) and ``question_type`` for the
                   breakdown; without ``metric`` it is inferred from the fields present.
=================  ==============================================================================

A JSON file holds a list of records, or a dict with the list under ``data``, ``records``,
``annotations`` or ``questions``. A ``datasets`` folder is read with ``load_from_disk``; for a
``DatasetDict`` the split is ``test``, then ``validation``, or the only one.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

TASKS = ("vqa", "exact_match", "multiple_choice", "grounding", "caption", "qa")
METRICS = ("vqa", "exact_match", "multiple_choice", "grounding", "caption")
_LIST_KEYS = ("data", "records", "annotations", "questions")


def parse_json(text: str, path: Path, line: int | None = None):
    """``json.loads`` whose syntax error names the file (and the JSONL line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {line}, column {err.colno}" if line is not None else f"line {err.lineno}, column {err.colno}"
        raise ValueError(f"{path} is not valid {'JSONL' if line is not None else 'JSON'}: {err.msg} at {where}") from None


def read_json_records(path: Path, list_keys: tuple[str, ...]) -> list | None:
    """The records of a ``.jsonl`` file (one JSON value a line) or a ``.json`` file (a list, or an
    object holding it under one of ``list_keys``); ``None`` for any other suffix."""
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [parse_json(line, path, number) for number, line in enumerate(lines, start=1) if line.strip()]
    if path.suffix != ".json":
        return None
    data = parse_json(path.read_text(encoding="utf-8"), path)
    if isinstance(data, Mapping):
        key = next((k for k in list_keys if isinstance(data.get(k), list)), None)
        if key is None:
            raise ValueError(f"{path}: a JSON object needs the records as a list under one of {list_keys}")
        data = data[key]
    return data


def load_records(path: str | Path) -> tuple[list[dict], Path]:
    """Records of a local data file or folder, and the folder that relative image paths start from."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}")
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            split = next((s for s in ("test", "validation") if s in loaded), splits[0] if len(splits) == 1 else None)
            if split is None:
                raise ValueError(f"{path} has splits {splits}; keep one, or a 'test' / 'validation' split")
            loaded = loaded[split]
        return [dict(r) for r in loaded], path
    records = read_json_records(path, _LIST_KEYS)
    if records is None:
        raise ValueError(f"{path}: use a .json or .jsonl file, or a folder saved with datasets' save_to_disk")
    if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
        raise ValueError(f"{path}: the records must be a list of JSON objects")
    return [dict(r) for r in records], path.parent


def load_image(value, base_dir: Path) -> Image.Image:
    """One image field value (see the module docstring) -> an RGB PIL image.

    A corrupt, truncated or non-image file raises ``ValueError`` saying so (PIL's own errors are
    many types and do not name the file).
    """
    try:
        return _load_image(value, base_dir)
    except (ValueError, TypeError, FileNotFoundError):
        raise
    except (OSError, SyntaxError, EOFError, IndexError, KeyError, Image.DecompressionBombError) as error:
        where = value if isinstance(value, str) and not value.startswith("data:") else (value.get("path") if isinstance(value, Mapping) else None)
        what = f"image {where!r}" if where else "an embedded image"
        raise ValueError(f"{what} is corrupt, truncated or not an image ({type(error).__name__}: {error})") from None


def _load_image(value, base_dir: Path) -> Image.Image:
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, Mapping):
        if value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            return _load_image(str(value["path"]), base_dir)
        else:
            raise ValueError(f"an image dict needs 'bytes' or 'path', got keys {sorted(value)}")
    elif isinstance(value, str):
        if value.startswith("data:"):
            image = Image.open(io.BytesIO(base64.b64decode(value.split(",", 1)[1])))
        elif value.startswith(("http://", "https://")):
            raise ValueError(f"image URLs are not fetched ({value}); download the images and give local paths")
        else:
            file = Path(value) if Path(value).is_absolute() else base_dir / value
            if not file.is_file():
                raise FileNotFoundError(f"image {value!r} not found (looked for {file})")
            image = Image.open(file)
    else:
        raise TypeError(f"unsupported image value of type {type(value).__name__}")
    image.load()
    return image.convert("RGB")


def record_images(record: Mapping, base_dir: Path) -> list[Image.Image]:
    """The images of a record, in order (``image`` or ``images``)."""
    if record.get("images") is not None:
        values = list(record["images"])
    elif record.get("image") is not None:
        values = [record["image"]]
    else:
        raise ValueError(f"record {record.get('id', '')!r} has no 'image' or 'images'")
    try:
        return [load_image(v, base_dir) for v in values]
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"record {record.get('id', '')!r}: {error}") from None


def validate_record(metric: str, record: Mapping) -> None:
    """Raise ``ValueError`` now for a record that would fail later (no image, an image URL, missing
    reference fields), so a run stops before loading the model rather than midway."""
    values = record.get("images") if record.get("images") is not None else [record.get("image")]
    if not values or any(v is None for v in values):
        raise ValueError(f"record {record.get('id', '')!r} has no 'image' or 'images'")
    for value in values:
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            raise ValueError(f"image URLs are not fetched ({value}); download the images and give local paths")
    if metric == "grounding" and record.get("box") is None and record.get("box_pixels") is not None:
        return  # normalised once the image is read
    record_references(metric, record)


def record_metric(task: str, record: Mapping) -> str:
    """Which metric scores ``record`` under ``task`` (for ``qa``: the record's ``metric``, or inferred)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    if task != "qa":
        return task
    metric = record.get("metric")
    if metric is None:
        if record.get("options") is not None:
            metric = "multiple_choice"
        elif record.get("box") is not None or record.get("box_pixels") is not None:
            metric = "grounding"
        elif record.get("captions") is not None:
            metric = "caption"
        elif isinstance(record.get("answers"), list) and len(record["answers"]) > 1:
            metric = "vqa"
        else:
            metric = "exact_match"
    metric = {"vqa_accuracy": "vqa", "mc": "multiple_choice", "multiple-choice": "multiple_choice"}.get(metric, metric)
    if metric not in METRICS:
        raise ValueError(f"record {record.get('id', '')!r} names metric {metric!r}; use one of {', '.join(METRICS)}")
    return metric


def record_references(metric: str, record: Mapping, images: list[Image.Image] | None = None) -> dict:
    """The reference fields ``metric`` scores against, as JSON-ready values (saved per sample)."""
    if metric == "vqa":
        answers = record.get("answers")
        if not answers:
            raise ValueError(f"vqa record {record.get('id', '')!r} needs 'answers'")
        return {"answers": [str(a) for a in answers]}
    if metric == "exact_match":
        answers = record.get("answers", record.get("answer"))
        if answers is None:
            raise ValueError(f"exact_match record {record.get('id', '')!r} needs 'answer' or 'answers'")
        return {"answers": [str(answers)] if isinstance(answers, (str, int, float)) else [str(a) for a in answers]}
    if metric == "multiple_choice":
        from .metrics import option_index

        options = [str(o) for o in record.get("options") or []]
        if not options or record.get("answer") is None:
            raise ValueError(f"multiple_choice record {record.get('id', '')!r} needs 'options' and 'answer'")
        return {"options": options, "answer_index": option_index(record["answer"], options)}
    if metric == "grounding":
        if record.get("box") is not None:
            box = [float(v) for v in record["box"]]
        elif record.get("box_pixels") is not None:
            from ..geometry import pixel_to_normalised

            if not images:
                raise ValueError("box_pixels needs the record's image to normalise it")
            box = list(pixel_to_normalised(record["box_pixels"], *images[0].size))
        else:
            raise ValueError(f"grounding record {record.get('id', '')!r} needs 'box' (normalised) or 'box_pixels'")
        if len(box) != 4:
            raise ValueError(f"a box is [x1, y1, x2, y2], got {box}")
        return {"box": box}
    if metric == "caption":
        captions = record.get("captions")
        if not captions:
            raise ValueError(f"caption record {record.get('id', '')!r} needs 'captions'")
        return {"captions": [str(c) for c in captions]}
    raise ValueError(f"unknown metric {metric!r}")
