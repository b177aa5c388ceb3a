"""Child process of ``tests/test_checkpoint_safety.py``: a tiny instruct-stage training that can kill itself.

Usage: ``python kill_resume_child.py OUTPUT_DIR [KILL_POINT]`` (or ``--serve``, see :func:`serve`). It resumes from the last checkpoint
in OUTPUT_DIR when there is one, trains to ``MAX_STEPS`` and writes the final model weights and
MoCo state (queue, pointer, momentum encoder) to ``OUTPUT_DIR/final.safetensors``. KILL_POINT
makes it SIGKILL itself (no cleanup, no atexit, like the OOM killer or a preempted node):

* ``step:N``          -- right after optimizer step N;
* ``save-weights:N``  -- while saving checkpoint N, after the model weights are written and before
                         the optimizer, scheduler, RNG and trainer state;
* ``save-publish:N``  -- while saving checkpoint N, once every file (MoCo state included) is
                         written, just before the folder is renamed into place;
* ``mid-step:N``      -- inside step N, after the MoCo queue took the step's keys and before the
                         optimizer step.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

import astrea_vlm.train.trainer as trainer_module  # noqa: E402
from astrea_vlm.configuration import get_preset  # noqa: E402
from astrea_vlm.modeling import AstreaForConditionalGeneration  # noqa: E402
from astrea_vlm.processing import build_processor  # noqa: E402
from astrea_vlm.train.distributed_check import textured_colour_dataset  # noqa: E402
from astrea_vlm.train.stages import configure_stage  # noqa: E402
from astrea_vlm.train.trainer import AstreaSFTConfig, AstreaSFTTrainer  # noqa: E402

MAX_STEPS = 8
SAVE_STEPS = 2


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def dataset(n: int = 6):
    return textured_colour_dataset(n)


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            die()


def main(output_dir: str, kill: str | None) -> None:
    # The queue is longer than the keys one run adds, so a lost or repeated enqueue shows.
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config)
    processor = build_processor(config)
    configure_stage(model, ["router", "adapters", "moco_head", "llm"], list(config.expert_order))
    args = AstreaSFTConfig(
        output_dir=output_dir,
        moco_queue_size=32,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=2,  # 3 steps per epoch: the run crosses epoch boundaries
        learning_rate=1e-3,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        report_to=[],
        assistant_only_loss=True,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        max_length=None,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = AstreaSFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=processor, use_moco=True)

    kind, _, at = (kill or "").partition(":")
    at = int(at) if at else -1
    if kind == "step":
        trainer.add_callback(KillAfterStep(at))
    elif kind == "save-weights":
        original = trainer._save_optimizer_and_scheduler

        def save_optimizer_then_maybe_die(output_dir):
            if trainer.state.global_step == at:
                die()
            return original(output_dir)

        trainer._save_optimizer_and_scheduler = save_optimizer_then_maybe_die
    elif kind == "save-publish":
        publish = trainer_module.publish_checkpoint

        def publish_or_die(staged, final):
            if final.endswith(f"checkpoint-{at}"):
                die()
            return publish(staged, final)

        trainer_module.publish_checkpoint = publish_or_die
    elif kind == "mid-step":
        enqueue = trainer.moco.enqueue

        def enqueue_then_maybe_die(keys):
            enqueue(keys)
            if trainer.state.global_step == at - 1:
                die()

        trainer.moco.enqueue = enqueue_then_maybe_die
    elif kind:
        raise SystemExit(f"unknown kill point {kill!r}")

    resume = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    print(f"resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    final = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    final.update({f"moco.{k}": v.detach().clone().contiguous() for k, v in trainer.moco.state_dict().items()})
    save_file(final, os.path.join(output_dir, "final.safetensors"))


def serve() -> None:
    """Fork server: import once, then fork one training process per stdin line ``OUTPUT_DIR KILL|-``.

    Each forked child is a separate process that really receives SIGKILL; the server answers
    ``rc <exit status>`` (``-9`` when killed) and the child's output is in ``OUTPUT_DIR.log``. Forking
    saves the ~6 s of imports per run. The server itself never runs a torch op, so no thread pool
    exists when it forks.
    """
    for line in sys.stdin:
        output_dir, kill = line.split()
        log = os.open(f"{output_dir}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pid = os.fork()
        if pid == 0:
            os.dup2(log, 1)
            os.dup2(log, 2)
            try:
                main(output_dir, None if kill == "-" else kill)
                sys.stdout.flush()
                os._exit(0)
            except BaseException:
                import traceback

                traceback.print_exc()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
        os.close(log)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"rc {code}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
