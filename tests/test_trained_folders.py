"""A short tiny `astrea instruct` (four alignment stages, then instruction tuning), run once as a
user runs it: no warning that astrea causes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent

RECIPE = {
    "model": {"preset": "tiny", "seed": 0},
    "data": {"source": "synthetic", "train_size": 8, "image_size": 48, "seed": 0, "max_objects": 3},
    "optim": {"per_device_train_batch_size": 4},
    "align": {"max_steps": 1, "learning_rate": 2.0e-3, "trainable": ["projector", "bridge"]},
    "instruct": {"max_steps": 1, "learning_rate": 1.0e-3, "trainable": ["router", "adapters", "moco_head", "llm"]},
    "save_steps": 1,
    "logging_steps": 1,
    "cache": True,
}


def run_capturing_warnings(args: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / "capture_warnings_child.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("CAPTURED ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("CAPTURED "):])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    (root / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "output_dir": "run"}))
    captured = run_capturing_warnings(["instruct", "--recipe", "recipe.yaml"], cwd=root)
    return root, captured


def test_training_raises_no_warning(trained):
    """Deprecated argument names (e.g. `gradient_checkpointing`) or a false "Requested torchvision
    backend is not available" would show up here, once per stage."""
    _, captured = trained
    assert captured["rc"] == 0
    assert captured["warnings"] == []
    assert captured["logs"] == []
