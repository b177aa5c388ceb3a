"""Two CPU processes under `accelerate launch` match one process at the same global batch.

accelerate 1.15's `--cpu` flag selects its simple launcher, which starts one process unless an MPI
hostfile is given; `--multi_gpu --num_processes 2` on a machine without CUDA starts two processes
through torchrun, and they train on the CPU with the gloo backend. That is the launch tested here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_ddp_matches_one_process(tmp_path):
    module = ["-m", "astrea_vlm.train.distributed_check", "--steps", "3", "--workdir", str(tmp_path / "work")]
    _run([sys.executable, *module, "--per-device-batch", "4", "--output", str(tmp_path / "single.json")], tmp_path)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    _run([*launcher, *module, "--per-device-batch", "2", "--output", str(tmp_path / "ddp.json")], tmp_path)
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    # Same parameters and the same global batch: the first step's L_reg is the same number.
    assert ddp["loss_reg"][0] == pytest.approx(single["loss_reg"][0], rel=1e-5)
    # Later steps differ only through MoCo's per-rank in-batch negatives and token sampling.
    for a, b in zip(ddp["loss_reg"][1:], single["loss_reg"][1:]):
        assert a == pytest.approx(b, rel=1e-2)
