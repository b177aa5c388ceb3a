"""Integrity checks for saved weights, run before anything is read from them.

safetensors reports a truncated or damaged file as "Error while deserializing header: incomplete
metadata, file not fully covered", without saying which file; torch reports a truncated ``.pt`` as
"PytorchStreamReader failed reading zip archive". These checks read only the headers (a few KB,
whatever the checkpoint's size) and raise :class:`CorruptCheckpointError` naming the file, what is
wrong with it and what to do.

What they find: truncation (a killed copy or download, a full disk), a damaged safetensors header,
a shard listed in ``model.safetensors.index.json`` that is missing. What they cannot find: flipped
bytes inside tensor data, which the safetensors format has no checksum for.

Standard library only: this file is shipped in ``trust_remote_code`` folders.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile

#: safetensors caps its JSON header at 100 MB.
_MAX_HEADER_BYTES = 100_000_000

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class CorruptCheckpointError(ValueError):
    """A weights or checkpoint file is truncated, damaged or missing (the message names it)."""


def _fail(path: str, problem: str) -> None:
    raise CorruptCheckpointError(
        f"{path}: {problem}; the file is truncated or corrupt (an interrupted save, copy or download?) -- "
        "save or download it again, or resume from an earlier checkpoint"
    )


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``path`` is a complete safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; save or download it again")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            _fail(path, f"it is {size} bytes long, shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            _fail(path, f"its header claims {header_len} bytes but the file is {size} bytes long")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            _fail(path, "its header is not valid JSON")
    if not isinstance(header, dict):
        _fail(path, "its header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            _fail(path, f"tensor {name!r} has no valid data_offsets in the header")
        end = max(end, offsets[1])
    data = size - 8 - header_len
    if data != end:
        _fail(path, f"its header describes {end} bytes of tensor data but the file holds {data}")


def check_torch_zip_file(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``path`` (a ``torch.save`` file) has an intact zip directory."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        _fail(path, f"it is not a readable torch.save archive ({error})")


def check_weights_folder(folder: str | os.PathLike) -> list[str]:
    """Check ``model.safetensors`` or every shard of ``model.safetensors.index.json`` in ``folder``.

    Returns the files checked (none when the folder holds no safetensors weights). Missing shards
    raise ``FileNotFoundError`` listing them.
    """
    folder = os.fspath(folder)
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            _fail(index, "it is not a valid shard index (JSON with a `weight_map`)")
        files = [os.path.join(folder, shard) for shard in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"{index} lists {len(files)} shard(s) but {len(missing)} are missing: {', '.join(missing)}; "
                "copy or download the missing shard(s) again"
            )
    elif os.path.isfile(single):
        files = [single]
    else:
        return []
    for file in files:
        check_safetensors_file(file)
    return files


__all__ = ["CorruptCheckpointError", "check_safetensors_file", "check_torch_zip_file", "check_weights_folder"]
