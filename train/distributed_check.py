"""A few deterministic tiny instruct steps, to compare multi-process training with one process.

``accelerate launch --cpu --num_processes 2 -m astrea_vlm.train.distributed_check --per-device-batch 2``
and ``python -m astrea_vlm.train.distributed_check --per-device-batch 4`` see the same global batch of
4 and must give the same ``L_reg`` per step (within floating-point and MoCo-negative differences:
with two processes each rank's in-batch negatives are its own half-batch before the queue).
With ``--fsdp`` (under ``torchrun --nproc_per_node 2``) the model is sharded with FSDP2
(:mod:`astrea_vlm.train.sharding`); it records whether every parameter was a ``DTensor`` at every step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import TrainerCallback


def textured_colour_dataset(n: int = 32, size: int = 32, seed: int = 0):
    import datasets
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (250, 250, 250)}
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = list(colours)[i % len(colours)]
        pixels = np.clip(np.array(colours[name]) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        rows.append(
            {
                "images": [Image.fromarray(pixels)],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": name}]},
                ],
            }
        )
    return datasets.Dataset.from_list(rows)


class _ShardedSteps(TrainerCallback):
    """Per optimizer step: were all of the model's parameters FSDP2 shards (``DTensor``)?"""

    def __init__(self):
        self.steps: list[bool] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        self.steps.append(all(isinstance(p, DTensor) for p in model.parameters()))


@record  # under torchrun, a worker's exception and traceback go into the launcher's failure summary
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--output", required=True)
    parser.add_argument("--workdir", default="/tmp/astrea_distributed_check")
    parser.add_argument("--fail-on-rank", type=int, default=None, help="raise on this rank (tests the failure report)")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (launch with torchrun)")
    parser.add_argument("--balance-bias-rate", type=float, default=0.0, help="AstreaSFTConfig.fusion_balance_bias_rate")
    args = parser.parse_args(argv)
    if args.fail_on_rank is not None and int(os.environ.get("RANK", "0")) == args.fail_on_rank:
        raise RuntimeError(f"distributed_check: deliberate failure on rank {args.fail_on_rank}")

    from ..configuration import get_preset
    from ..modeling import AstreaForConditionalGeneration
    from ..processing import build_processor
    from .stages import configure_stage
    from .trainer import AstreaSFTConfig, AstreaSFTTrainer

    config = get_preset("tiny", bridge_p=1.0)  # deterministic residual terms for the comparison
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config)
    processor = build_processor(config)
    configure_stage(model, ["router", "adapters", "moco_head", "llm"], list(config.expert_order))
    if args.fsdp:
        from .sharding import shard_model

        model = shard_model(model)
    sft_args = AstreaSFTConfig(
        fusion_balance_bias_rate=args.balance_bias_rate, output_dir=args.workdir, max_steps=args.steps,
        per_device_train_batch_size=args.per_device_batch,
        learning_rate=1e-3, bf16=False, activation_checkpointing=False, logging_steps=1, report_to=[],
        assistant_only_loss=True, save_strategy="no", max_length=None, use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, ddp_find_unused_parameters=True,
    )
    trainer = AstreaSFTTrainer(model=model, args=sft_args, train_dataset=textured_colour_dataset(), processing_class=processor)
    sharded_steps = _ShardedSteps()
    trainer.add_callback(sharded_steps)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [h["loss_reg"] for h in trainer.state.log_history if "loss_reg" in h]
        with open(args.output, "w") as handle:
            from torch.distributed.fsdp import FSDPModule

            units = sorted(name or "<root>" for name, module in model.named_modules() if isinstance(module, FSDPModule))
            roles = list(config.expert_order)
            biases = [[h[f"router/bias_{r}"] for r in roles] for h in trainer.state.log_history if f"router/bias_{roles[0]}" in h]
            loads = [[h[f"router/load_{r}"] for r in roles] for h in trainer.state.log_history if f"router/load_{roles[0]}" in h]
            json.dump({"world_size": trainer.accelerator.num_processes, "loss_reg": losses, "sharded_steps": sharded_steps.steps,
                       "fsdp_units": units, "selection_bias": biases, "router_load": loads}, handle)
    # Tear the process group down on every rank together: a rank that exits while its peer still
    # holds open gloo connections can take the peer down at exit.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without interpreter finalisation. Under load, a worker whose work is done, output written
    # and process group destroyed occasionally aborted during teardown ("terminate called without an
    # active exception", SIGABRT, no Python frame left), which failed a run whose results were
    # complete. Nothing of this check needs finalisation: flush and exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
