"""Really sharded training: `astrea align` / `astrea instruct` under FSDP2 on two CPU processes (gloo).

Launched as the README documents: `torchrun --standalone --nproc_per_node 2 -m astrea_vlm.cli instruct
--recipe R --fsdp` (`--standalone` picks a free port). The reference is the same launch without
`--fsdp` (plain data parallel): the same data on each rank, the same seed, the same MoCo keys -- only
the sharding differs. (Instruction tuning in one process differs from any 2-process run by more:
MoCo's in-batch negatives are each rank's own half-batch.) The aligned model is also compared with
one process at the same global batch. A last launch is killed (SIGKILL, every process) after its
first sharded checkpoint and resumed with `--resume`. Slow: six runs, about 5 minutes on a loaded
2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import AstreaModelTester

from worker_runs import THREAD_ENV, run_checked, worker_errors

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CLI = ["-m", "astrea_vlm.cli"]
INSTRUCT_STEPS, SAVE_STEPS = 4, 2


def _recipe(tmp_path, per_device_batch: int = 2, name: str = "recipe.yaml"):
    body = {
        "model": {"preset": "tiny", "seed": 0},
        "data": {"source": "synthetic", "train_size": 8, "image_size": 48, "seed": 0, "max_objects": 3},
        "optim": {"per_device_train_batch_size": per_device_batch},
        "align": {"max_steps": 2, "learning_rate": 2.0e-3, "trainable": ["projector", "bridge", "llm"]},
        "instruct": {"max_steps": INSTRUCT_STEPS, "learning_rate": 1.0e-3, "trainable": ["router", "adapters", "moco_head", "llm"]},
        "save_steps": SAVE_STEPS,
        "logging_steps": 1,
        "cache": True,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def _logits(folder) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    tester = AstreaModelTester()
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(input_ids=tester.prompt(n_images=1), **tester.pixels(1)).logits


def _kill_after_checkpoint(cmd, cwd, checkpoint, timeout=1800) -> str:
    """Run ``cmd``; SIGKILL the launcher and every worker as soon as ``checkpoint`` is in place (it is published by a
    rename, so it is complete). Returns the output."""
    import psutil

    log = open(cwd / "killed.log", "w+")
    env = {**os.environ, **THREAD_ENV, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    launcher = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    polls = int(timeout / 0.05)  # a bound on the wait, counted in polls (the suite reads no clock)
    try:
        while not checkpoint.is_dir():
            polls -= 1
            if launcher.poll() is not None or polls < 0:
                log.seek(0)
                output = log.read()
                pytest.fail(f"the run to be killed ended ({launcher.returncode}) or timed out before {checkpoint.name}\n"
                            f"{worker_errors(output)}\n--- last output ---\n{output[-2000:]}")
            time.sleep(0.05)
        processes = [launcher_process := psutil.Process(launcher.pid), *launcher_process.children(recursive=True)]
        for process in reversed(processes):  # workers first: nothing is left to clean up after them
            process.send_signal(signal.SIGKILL)
        psutil.wait_procs(processes, timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
    log.seek(0)
    return log.read()


def test_fsdp_without_a_launcher_or_with_lora_or_an_unknown_mode_fails_in_one_line(tmp_path, capsys, monkeypatch):
    from astrea_vlm.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = _recipe(tmp_path)
    assert main(["align", "--recipe", str(recipe), "--output", str(tmp_path / "out"), "--fsdp"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --standalone --nproc_per_node N" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was built or written
    body = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**body, "distributed": "fsdp", "instruct": {**body["instruct"], "lora": {"r": 4}}}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["instruct", "--recipe", str(recipe), "--output", str(tmp_path / "out")]) == 2
    assert "with a LoRA recipe (instruct.lora) is not supported" in capsys.readouterr().err
    recipe.write_text(yaml.safe_dump({**body, "distributed": "zero"}))
    assert main(["instruct", "--recipe", str(recipe)]) == 2
    assert "distributed='zero'; choose one of ['none', 'fsdp']" in capsys.readouterr().err


@pytest.mark.slow
def test_fsdp_align_and_instruct_shard_save_resume_and_match_data_parallel(tmp_path):
    recipe = _recipe(tmp_path)
    fsdp, ddp, killed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "killed"
    run_checked([*TORCHRUN, *CLI, "align", "--recipe", str(recipe), "--output", str(fsdp), "--fsdp"], tmp_path)
    run_checked([*TORCHRUN, *CLI, "instruct", "--recipe", str(recipe), "--output", str(fsdp), "--fsdp"], tmp_path)
    run_checked([*TORCHRUN, *CLI, "instruct", "--recipe", str(recipe), "--output", str(ddp)], tmp_path)
    # One process at the same global batch (2 ranks x 2 = 4): the alignment stages have no per-rank
    # terms, so the sharded aligned model is the one-process one too.
    single = _recipe(tmp_path, per_device_batch=4, name="single.yaml")
    run_checked([sys.executable, *CLI, "align", "--recipe", str(single), "--output", str(tmp_path / "single")], tmp_path)

    # Sharded during training: after every optimizer step every parameter was a DTensor shard, and
    # the two ranks held complementary halves of the parameters.
    summaries = [*json.loads((fsdp / "aligned" / "alignment_summary.json").read_text()),
                 json.loads((fsdp / "final" / "instruct_summary.json").read_text())]
    assert [s["stage"] for s in summaries][-1] == "instruct" and len(summaries) == 5
    for summary in summaries:
        sharding = summary["sharding"]
        assert sharding["world_size"] == 2 and sharding["sharded_at_every_step"], summary["stage"]
        assert sharding["fsdp_units"] >= 2 + 4 + 4 + 3 + 1  # LLM layers, towers, projectors, bridges, root
        assert sum(sharding["local_parameters"]) == sharding["parameters"], summary["stage"]
        assert max(sharding["local_parameters"]) < 0.6 * sharding["parameters"], summary["stage"]
        assert sharding["steps"] == [summary["log_history"][-1]["step"]] * 2
    assert not any("sharding" in s for s in json.loads((ddp / "aligned" / "alignment_summary.json").read_text()))

    # Resumable checkpoints are torch.distributed.checkpoint shards, one file per rank.
    checkpoint = fsdp / "instruct" / f"checkpoint-{SAVE_STEPS}"
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json", "moco_state.safetensors"} <= {
        p.name for p in checkpoint.iterdir()}
    assert not list(checkpoint.glob("model*.safetensors"))  # no gathered copy in a resumable checkpoint

    # The final folders are whole models with Astrea's own classes; sharded = data parallel's logits.
    for folder in (fsdp / "aligned", fsdp / "final"):
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["AstreaForConditionalGeneration"]
        assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_astrea.AstreaForConditionalGeneration"
        assert "distributed_config" not in config and not list(folder.glob("*.tmp"))
    for name in ("aligned", "final"):
        torch.testing.assert_close(_logits(fsdp / name), _logits(ddp / name), atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(fsdp / "aligned"), _logits(tmp_path / "single" / "aligned"), atol=1e-4, rtol=0)

    # Killed (every process, SIGKILL) after the first sharded checkpoint, then resumed from it:
    # the same final model as the uninterrupted sharded run.
    instruct = [*TORCHRUN, *CLI, "instruct", "--recipe", str(recipe), "--output", str(killed), "--fsdp",
                "--init-from", str(fsdp / "aligned")]
    _kill_after_checkpoint(instruct, tmp_path, killed / "instruct" / f"checkpoint-{SAVE_STEPS}")
    assert not (killed / "final").exists()
    resumed = run_checked([*instruct, "--resume"], tmp_path)
    assert f"resuming from {killed / 'instruct' / f'checkpoint-{SAVE_STEPS}'}" in resumed.stdout + resumed.stderr
    torch.testing.assert_close(_logits(killed / "final"), _logits(fsdp / "final"), atol=1e-4, rtol=0)
