"""Crash-safe writes: a temporary file next to the target, flushed to disk, then renamed over it.

A reader therefore sees the old file or the complete new one, never a half-written one, even if
the writer is killed. Temporaries are named ``.tmp-<pid>-<random>-<name>`` so that a later writer
can tell the leftovers of a dead process (:func:`remove_dead_temporaries`) from a live writer's.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

TEMPORARY_PREFIX = ".tmp-"


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name in ``path``'s folder (``.tmp-<pid>-<random>-<name>``)."""
    path = Path(path)
    return path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is flushed and renamed
    over ``path`` (and the folder flushed), on an error it is deleted."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, data: Any, compact: bool = False) -> None:
    """``json.dump`` to ``path`` atomically (``indent=1``, or without whitespace when ``compact``)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, **({"separators": (",", ":")} if compact else {"indent": 1}))


def save_safetensors_atomic(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` of CPU-contiguous copies of ``tensors``, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_dead_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporaries in ``folder`` left by processes that no longer run (a live writer's stay)."""
    for path in Path(folder).glob(f"{TEMPORARY_PREFIX}*"):
        pid = path.name[len(TEMPORARY_PREFIX):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)


__all__ = ["atomic_path", "fsync_dir", "fsync_file", "remove_dead_temporaries", "save_safetensors_atomic", "temporary_path",
           "write_json_atomic"]
