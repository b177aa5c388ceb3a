"""LLaVA conversation JSON as instruction-tuning rows (``question_type="conversation"``).

``human`` -> ``user``, ``gpt`` -> ``assistant``, an optional first ``system`` turn; each ``<image>``
marker becomes an image part where it stands; text-only records get ``images: []``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .qa import instruct_features
from .report import PYTHON_HINT, BuildReport, check_image_file, read_json
from .rows import make_dataset


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
        if not check_image_file(full, ref, None, None, report, verify_images):
            return None
        files.append(str(full))
    return {"messages": messages, "images": files, "image_id": str(ref), "question_type": "conversation"}


def load_llava(path: str | os.PathLike, images_dir: str | os.PathLike | None = None, *, skip_invalid: bool = False,
               verify_images: bool | str = True, log=print, hint: str = PYTHON_HINT):
    """LLaVA-style conversation JSON as a TRL conversational VLM dataset (``question_type="conversation"``).

    Returns ``(dataset, report)``. Malformed records are reported by id (see
    :func:`llava_record_to_row`); by default a ValueError is raised, with ``skip_invalid=True``
    they are dropped and listed in ``report.dropped`` (``hint``: how the error says to skip them).
    """

    data = read_json(path, "LLaVA conversation")
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
    report.finish(skip_invalid, log, hint)
    return make_dataset(rows, instruct_features()), report
