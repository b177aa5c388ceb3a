"""Two CPU processes under `accelerate launch` match one process at the same global batch.

accelerate 1.15's `--cpu` flag selects its simple launcher, which starts one process unless an MPI
hostfile is given; `--multi_gpu --num_processes 2` on a machine without CUDA starts two processes
through torchrun, and they train on the CPU with the gloo backend. That is the launch tested here.
Launches run through :func:`worker_runs.run_checked`: a free port, one thread per worker, a
generous timeout, and a failing worker's own traceback in the assertion message.
"""

from __future__ import annotations

import json
import sys

import pytest

from worker_runs import run_checked, worker_errors

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def test_two_process_ddp_matches_one_process(tmp_path):
    # With bias balancing on: each step's top-k loads are summed over the processes before the bias moves.
    module = ["-m", "astrea_vlm.train.distributed_check", "--steps", "3", "--workdir", str(tmp_path / "work"), "--balance-bias-rate", "0.05"]
    run_checked([sys.executable, *module, "--per-device-batch", "4", "--output", str(tmp_path / "single.json")], tmp_path)
    run_checked([*LAUNCH, *module, "--per-device-batch", "2", "--output", str(tmp_path / "ddp.json")], tmp_path)
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    # Same parameters and the same global batch: the first step's L_reg is the same number.
    assert ddp["loss_reg"][0] == pytest.approx(single["loss_reg"][0], rel=1e-5)
    # ...and the first step's bias update, from the whole global batch's loads, is the same step.
    assert len(ddp["selection_bias"]) == len(single["selection_bias"]) == 3
    assert any(single["selection_bias"][0]) and ddp["selection_bias"][0] == pytest.approx(single["selection_bias"][0], abs=1e-7)
    # Every step's bias follows the rule on the global batch's logged loads (both ranks' images, top-3).
    bias = [0.0] * 4
    for load, logged in zip(ddp["router_load"], ddp["selection_bias"]):
        step = [0.05 * ((x / 3 < 0.25) - (x / 3 > 0.25)) for x in load]
        bias = [b + d - sum(step) / 4 for b, d in zip(bias, step)]
        assert logged == pytest.approx(bias, abs=1e-6)
    # Later steps differ only through MoCo's per-rank in-batch negatives and token sampling.
    for a, b in zip(ddp["loss_reg"][1:], single["loss_reg"][1:]):
        assert a == pytest.approx(b, rel=1e-2)


def test_a_failing_worker_is_reported_with_its_own_traceback(tmp_path):
    # Rank 1 raises inside the training loop; the failure message must show that worker's
    # traceback (file, line, exception), not only the launcher's exit summary.
    module = ["-m", "astrea_vlm.train.distributed_check", "--steps", "1", "--workdir", str(tmp_path / "work"),
              "--per-device-batch", "2", "--output", str(tmp_path / "ddp.json"), "--fail-on-rank", "1"]
    with pytest.raises(pytest.fail.Exception) as failure:
        run_checked([*LAUNCH, *module], tmp_path)
    message = str(failure.value)
    assert "exited with 1" in message
    assert "RuntimeError: distributed_check: deliberate failure on rank 1" in message
    assert "distributed_check.py" in message and "Traceback (most recent call last):" in message


def test_worker_errors_picks_tracebacks_and_abort_stacks_out_of_launcher_output():
    output = "\n".join([
        "[rank0]: some log line",
        "Traceback (most recent call last):",
        '  File "x.py", line 3, in <module>',
        "ValueError: bad",
        "noise",
        "Fatal Python error: Aborted",
        "",
        'Thread 0x1 (most recent call first):',
        '  File "y.py", line 9 in f',
        "Traceback (most recent call last):",
        '  File "x.py", line 3, in <module>',
        "ValueError: bad",
        "noise",
    ])
    picked = worker_errors(output)
    assert picked.count("ValueError: bad") == 1  # the same traceback twice is reported once
    assert "Fatal Python error: Aborted" in picked and 'File "y.py", line 9 in f' in picked
    assert "[rank0]: some log line" not in picked
