"""What went wrong while loading a source: :class:`BuildReport`, and the checks the loaders share.

Every malformed record is counted per kind (:data:`PROBLEM_KINDS`) with the offending id; the
loader then raises :class:`InvalidDataError` listing them, or with ``skip_invalid=True`` drops
every image (or conversation) that has a problem and lists it in ``report.dropped``.
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
    "bad_polygon",
    "bad_rle",
    "missing_labels",
    "bad_conversation",
    "image_marker_mismatch",
)


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


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    with open(path) as handle:
        return json.load(handle)
