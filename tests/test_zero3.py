"""DeepSpeed ZeRO-3 with the shipped accelerate config: one CPU process, the tiny recipe (slow).

``train/accelerate/zero3.yaml`` takes gradient accumulation and clipping from the recipe
(``auto``), so a recipe with any accumulation runs; its ``mixed_precision: bf16`` needs the recipe's
``bf16: true`` (DeepSpeed refuses a mismatch). Needs the ``deepspeed`` extra (``pip install -e
".[deepspeed]"``); skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

ZERO3 = Path(__file__).resolve().parents[1] / "train" / "accelerate" / "zero3.yaml"


def test_one_process_zero3_instruct_on_cpu_trains_and_saves_a_loadable_folder(tmp_path):
    from astrea_vlm.modeling import AstreaForConditionalGeneration

    recipe = {
        "model": {"preset": "tiny", "seed": 0},
        "data": {"source": "synthetic", "train_size": 8, "image_size": 48, "seed": 0, "max_objects": 3},
        "optim": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "bf16": True},
        "align": {"max_steps": 2, "learning_rate": 2.0e-3, "trainable": ["projector", "bridge"]},
        "instruct": {"max_steps": 2, "learning_rate": 1.0e-3, "trainable": ["router", "adapters", "moco_head", "llm"]},
        "output_dir": str(tmp_path / "out"),
        "save_steps": 1,
        "logging_steps": 1,
        "cache": False,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3), "--num_processes", "1",
           "--main_process_port", "0", "-m", "astrea_vlm.cli", "instruct", "--recipe", str(tmp_path / "recipe.yaml")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # DeepSpeed ran, with the recipe's accumulation (accelerate reports the value DeepSpeed's config holds).
    assert "DeepSpeed config has 2" in done.stdout + done.stderr
    final = tmp_path / "out" / "final"
    summary = json.loads((final / "instruct_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert losses and all(loss == loss for loss in losses)  # trained, finite
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_astrea.AstreaForConditionalGeneration"
    assert config["dtype"] == "bfloat16"  # DeepSpeed's bf16 mode trains (and saves) bf16 weights
    model, info = AstreaForConditionalGeneration.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(p.numel() for p in model.parameters())  # full tensors, not ZeRO-3 partitions
