"""Crash-safe writes (astrea_vlm.train.atomic): a reader sees the old file or the new one, never a part."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from astrea_vlm.train.atomic import TEMPORARY_PREFIX, atomic_path, remove_dead_temporaries, save_safetensors_atomic, write_json_atomic


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    write_json_atomic(target, {"step": 2}, compact=True)
    assert target.read_text() == '{"step":2}'
    weights = tmp_path / "w.safetensors"
    save_safetensors_atomic({"a": torch.arange(3.0)}, weights, metadata={"format": "pt"})
    assert torch.equal(load_file(str(weights))["a"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "w.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"step": object()})  # not serialisable: fails halfway through
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f"{TEMPORARY_PREFIX}{dead}-abc-shard.safetensors").write_bytes(b"partial")
    live = tmp_path / f"{TEMPORARY_PREFIX}{os.getpid()}-abc-shard.safetensors"
    live.write_bytes(b"being written")
    (tmp_path / "kept.json").write_text("{}")
    remove_dead_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "kept.json"])
