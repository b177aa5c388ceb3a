"""Crash-safe checkpoints: atomic saves, resume after SIGKILL, clear errors for damaged files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import get_last_checkpoint

from astrea_vlm.configuration import get_preset
from astrea_vlm.modeling import AstreaForConditionalGeneration
from astrea_vlm.modeling.checkpoint_files import (
    CorruptCheckpointError,
    check_safetensors_file,
    check_torch_zip_file,
    check_weights_folder,
)
from astrea_vlm.train.trainer import MOCO_STATE, STAGING_PREFIX, check_checkpoint

CHILD = Path(__file__).with_name("kill_resume_child.py")


class ForkServer:
    """``kill_resume_child.py --serve``: imports torch/TRL once and forks one process per training run."""

    def __init__(self):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, output_dir: Path, kill: str | None = None, expect_killed: bool = True) -> str:
        self.proc.stdin.write(f"{output_dir} {kill or '-'}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        log = Path(f"{output_dir}.log").read_text()
        assert answer[:1] == ["rc"], f"fork server died: {answer}"
        expected = -9 if expect_killed else 0  # -9: SIGKILL
        assert int(answer[1]) == expected, f"{kill}: rc={answer[1]}, expected {expected}:\n{log[-3000:]}"
        return log

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=600)  # generous: the server may still be finishing a run on a loaded machine


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


# ------------------------------------------------------------------------ SIGKILL + resume
def test_training_killed_at_four_points_resumes_to_bit_identical_weights_queue_and_momentum_encoder(tmp_path):
    """max_steps=8, save_steps=2. One run dies at each kill point; the next resumes from the last
    complete checkpoint. The final weights, MoCo queue, pointer and momentum encoder must equal an
    uninterrupted run's, bit for bit."""
    server = ForkServer()
    try:
        server.run(tmp_path / "ref", expect_killed=False)  # uninterrupted reference
        run = tmp_path / "killed"

        # 1. between steps: killed right after step 3 -> checkpoint-2 survives.
        server.run(run, "step:3")
        assert _checkpoints(run) == ["checkpoint-2"]

        # 2. in the middle of saving checkpoint-4 (weights written, optimizer/RNG/state not yet).
        out = server.run(run, "save-weights:4")
        assert f"resuming from {run / 'checkpoint-2'}" in out
        partial = run / f"{STAGING_PREFIX}checkpoint-4" / "checkpoint-4"
        assert (partial / "model.safetensors").is_file() and not (partial / "optimizer.pt").exists()
        assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")  # never the half-written one

        # 3. every file of checkpoint-6 written, killed just before the rename.
        out = server.run(run, "save-publish:6")
        assert f"resuming from {run / 'checkpoint-2'}" in out
        partial = run / f"{STAGING_PREFIX}checkpoint-6" / "checkpoint-6"
        assert (partial / MOCO_STATE).is_file() and (partial / "trainer_state.json").is_file()
        assert get_last_checkpoint(str(run)) == str(run / "checkpoint-4")
        assert not (run / f"{STAGING_PREFIX}checkpoint-4").exists()  # the stale staging folder was cleared

        # 4. inside step 7, after the MoCo queue took the step's keys (an unsaved in-memory change).
        out = server.run(run, "mid-step:7")
        assert f"resuming from {run / 'checkpoint-4'}" in out
        assert get_last_checkpoint(str(run)) == str(run / "checkpoint-6")
        assert not any(p.name.startswith(STAGING_PREFIX) for p in run.iterdir())

        out = server.run(run, expect_killed=False)
        assert f"resuming from {run / 'checkpoint-6'}" in out
    finally:
        server.close()

    expected, got = load_file(tmp_path / "ref" / "final.safetensors"), load_file(run / "final.safetensors")
    assert sorted(expected) == sorted(got)
    assert {"moco.queue", "moco.queue_ptr"} <= set(got) and any(k.startswith("moco.fusion.") for k in got)
    assert int(got["moco.queue_ptr"]) == (8 * 2) % 32  # 8 steps x batch 2 keys, once each
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert different == []
    # and training did change the weights (the comparison is not between two untouched models)
    torch.manual_seed(0)
    initial = AstreaForConditionalGeneration(get_preset("tiny")).state_dict()
    assert not torch.equal(initial["model.fusion.router.linear.weight"], got["model.model.fusion.router.linear.weight"])


# ---------------------------------------------------------------------------- atomic saves
def test_save_checkpoint_leaves_only_complete_folders(tmp_path):
    from test_train_moco import _args, _dataset, _model

    from astrea_vlm.train.trainer import AstreaSFTTrainer

    model, processor = _model()
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer = AstreaSFTTrainer(model=model, args=args, train_dataset=_dataset(8), processing_class=processor)
    trainer.train()
    # rotation ran on the real folder (limit 1), and no staging folder or temp file is left
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-2"]
    files = {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", MOCO_STATE} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    check_checkpoint(str(tmp_path / "checkpoint-2"), moco=True)
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and STAGING_PREFIX not in json.dumps(state)


# -------------------------------------------------------------------- damaged files: errors
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(get_preset("tiny"))
    model.save_pretrained(folder / "single")
    model.save_pretrained(folder / "sharded", max_shard_size="400KB")
    return folder


def _copy(saved: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved / name, tmp_path / name))


def _truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep))


def test_intact_folders_pass_and_load(saved):
    assert [Path(f).name for f in check_weights_folder(saved / "single")] == ["model.safetensors"]
    assert len(check_weights_folder(saved / "sharded")) > 1
    a = AstreaForConditionalGeneration.from_pretrained(saved / "single")
    b = AstreaForConditionalGeneration.from_pretrained(saved / "sharded")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("damage", ["truncated", "header", "header_json", "tiny"])
def test_from_pretrained_names_a_damaged_safetensors_file(saved, tmp_path, damage):
    folder = _copy(saved, "single", tmp_path)
    path = folder / "model.safetensors"
    if damage == "truncated":
        _truncate(path)
    elif damage == "header":
        with open(path, "r+b") as handle:
            handle.write(b"\xff" * 8)  # absurd header length
    elif damage == "header_json":
        with open(path, "r+b") as handle:
            handle.seek(9)
            handle.write(b"\x00\x00\x00")
    else:
        path.write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*(truncated or corrupt)"):
        AstreaForConditionalGeneration.from_pretrained(folder)


def test_from_pretrained_names_a_missing_or_truncated_shard(saved, tmp_path):
    folder = _copy(saved, "sharded", tmp_path)
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 are missing: .*{shards[1].name}"):
        AstreaForConditionalGeneration.from_pretrained(folder)
    folder = _copy(saved, "sharded", tmp_path / "b")
    shards = sorted(folder.glob("model-*.safetensors"))
    _truncate(shards[-1], 0.9)
    with pytest.raises(CorruptCheckpointError, match=shards[-1].name):
        AstreaForConditionalGeneration.from_pretrained(folder)


def test_from_pretrained_loads_only_safetensors(saved, tmp_path):
    folder = _copy(saved, "single", tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")  # a pickle: never read
    with pytest.raises(OSError, match="model.safetensors"):
        AstreaForConditionalGeneration.from_pretrained(folder)


def _fake_checkpoint(saved: Path, tmp_path: Path) -> Path:
    folder = _copy(saved, "single", tmp_path)
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    save_file({"queue": torch.zeros(4, 2), "queue_ptr": torch.zeros((), dtype=torch.long)}, folder / MOCO_STATE)
    return folder


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng_state.pth", MOCO_STATE, "trainer_state.json"])
def test_resume_check_names_the_truncated_file(saved, tmp_path, name):
    folder = _fake_checkpoint(saved, tmp_path)
    check_checkpoint(str(folder), moco=True)  # intact: passes
    _truncate(folder / name)
    with pytest.raises(CorruptCheckpointError, match=rf"{name}.*(truncated or corrupt)"):
        check_checkpoint(str(folder), moco=True)


def test_resume_check_names_missing_files(saved, tmp_path):
    folder = _fake_checkpoint(saved, tmp_path)
    (folder / MOCO_STATE).unlink()
    with pytest.raises(FileNotFoundError, match=MOCO_STATE):
        check_checkpoint(str(folder), moco=True)
    check_checkpoint(str(folder), moco=False)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        check_checkpoint(str(folder))


def test_trainer_resume_refuses_a_truncated_checkpoint_before_training(saved, tmp_path):
    from test_train_moco import _args, _dataset, _model

    from astrea_vlm.train.trainer import AstreaSFTTrainer

    folder = _fake_checkpoint(saved, tmp_path)
    _truncate(folder / "model.safetensors")
    model, processor = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = AstreaSFTTrainer(model=model, args=_args(tmp_path / "out"), train_dataset=_dataset(4), processing_class=processor)
    with pytest.raises(CorruptCheckpointError, match=str(folder / "model.safetensors")):
        trainer.train(resume_from_checkpoint=str(folder))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_low_level_checks(tmp_path):
    save_file({"a": torch.arange(10.0)}, tmp_path / "ok.safetensors")
    check_safetensors_file(tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "long.safetensors").write_bytes(data + b"\x00")  # trailing bytes: not what the header says
    with pytest.raises(CorruptCheckpointError, match="describes 40 bytes of tensor data but the file holds 41"):
        check_safetensors_file(tmp_path / "long.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors is missing"):
        check_safetensors_file(tmp_path / "nope.safetensors")
    (tmp_path / "x.pt").write_bytes(b"not a zip")
    with pytest.raises(CorruptCheckpointError, match="x.pt"):
        check_torch_zip_file(tmp_path / "x.pt")
    (tmp_path / "empty").mkdir()
    assert check_weights_folder(tmp_path / "empty") == []
