"""What went wrong while loading a source: :class:`BuildReport`, and the checks the loaders share.

Every malformed record is counted per kind (:data:`PROBLEM_KINDS`) with the offending id; the
loader then raises :class:`InvalidDataError` listing them, or with ``skip_invalid=True`` drops
every image (or conversation) that has a problem and lists it in ``report.dropped``. Repairs that
keep a record (a box or polygon partly outside its image, clipped to it) are counted in
``report.clipped``. The report is shown once: printed when the build goes on, carried by the
error when it stops. The error's hint is written in the syntax of where the user sets
``skip_invalid``: :data:`PYTHON_HINT` (a keyword argument) or :data:`RECIPE_HINT` (the recipe YAML).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    "box_outside_image",
    "bad_polygon",
    "polygon_outside_image",
    "bad_rle",
    "missing_labels",
    "bad_conversation",
    "image_marker_mismatch",
)


#: How to turn skipping on, in the words of where the user writes: a Python call or a recipe.
PYTHON_HINT = "pass skip_invalid=True"
RECIPE_HINT = "set `skip_invalid: true` in the recipe's `data:` section"


def read_json(path: str | os.PathLike, what: str) -> Any:
    """``json.load`` of a data file; a syntax error names the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


class InvalidDataError(ValueError):
    """Malformed records were found and ``skip_invalid`` was False; ``.report`` holds them."""

    def __init__(self, report: "BuildReport", hint: str = PYTHON_HINT):
        self.report = report
        self.hint = hint
        super().__init__(f"{report.summary()}\nfix these records or {hint} to drop them (they stay listed in the report)")


@dataclass
class BuildReport:
    """Problems found while loading one source: counts per kind and the offending ids.

    ``problems[kind]`` lists the offending ids in the order found (annotation ids for annotation
    problems, image ids for image problems, conversation ids for LLaVA records), ``details[kind]``
    a message for each; ``dropped`` lists the images / conversations left out with
    ``skip_invalid=True``; ``records`` counts the records examined and ``kept`` the images or
    conversations kept; ``clipped[what]`` lists the annotations (``"bbox"``, ``"polygon"``) partly
    outside their image that were clipped to it (not a problem: the record is kept).
    """

    source: str
    records: int = 0
    kept: int = 0
    problems: dict[str, list[Any]] = field(default_factory=dict)
    details: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[Any] = field(default_factory=list)
    clipped: dict[str, list[Any]] = field(default_factory=dict)

    def clip(self, what: str, record_id: Any) -> None:
        """Count an annotation clipped to its image (``what``: ``"bbox"`` or ``"polygon"``)."""
        self.clipped.setdefault(what, []).append(record_id)

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
        clipped = [f"  clipped to the image ({what}, partly outside): {len(ids)} -- {', '.join(map(repr, ids[:max_ids]))}"
                   f"{', ...' if len(ids) > max_ids else ''}" for what, ids in self.clipped.items()]
        if self.ok:
            return "\n".join([head + ", no problems", *clipped])
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
        return "\n".join(lines + clipped)

    __str__ = summary

    def finish(self, skip_invalid: bool, log=print, hint: str = PYTHON_HINT) -> None:
        """Raise :class:`InvalidDataError` (which carries the summary) on problems unless
        ``skip_invalid``; otherwise print the summary. Either way it is shown once."""
        if not self.ok and not skip_invalid:
            raise InvalidDataError(self, hint)
        if log is not None:
            log(self.summary())


def check_image_file(path: Path, image_id: Any, width: int | None, height: int | None, report: BuildReport,
                     verify: bool | str) -> bool:
    """Whether the image file exists (and, with ``verify``, decodes at the size the JSON gives); reports why not."""
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


