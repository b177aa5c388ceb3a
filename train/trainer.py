"""``AstreaSFTTrainer``: TRL's ``SFTTrainer`` plus Astrea's training terms.

TRL trains VLMs through the backbone with a fused LM head, so a loss computed in
``AstreaForConditionalGeneration.forward`` is never used. Everything Astrea adds therefore lives
at ``SFTTrainer``'s documented hooks:

* ``compute_loss`` -- calls TRL's loss (``L_reg``, the autoregressive loss on answer tokens: the
  data uses ``assistant_only_loss`` and ``<image>`` positions are always masked), then adds
  ``mu * L_moco`` (eq. 11, see :mod:`astrea_vlm.train.moco`) and, when configured, the router's
  load-balancing term. The fused visual tokens and router outputs are read with a forward hook on
  the MoE fusion, so no second forward pass is needed. Logged per step: ``loss_reg``,
  ``loss_moco``, ``router/prob_<role>``, ``router/load_<role>``, ``router/entropy``.
* a callback updates the momentum encoder by EMA after every optimizer step (eq. 8);
* checkpoints hold the momentum encoder and the queue (``moco_state.safetensors``, written
  atomically), and ``train(resume_from_checkpoint=...)`` restores them.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTTrainer

from .moco import MomentumContrast

MOCO_STATE = "moco_state.safetensors"


def find_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The :class:`AstreaModel` inside ``model`` (plain, PEFT-wrapped, or loaded as remote code)."""
    for module in model.modules():
        if type(module).__name__ == "AstreaModel":
            return module
    raise ValueError("no AstreaModel found in the model given to AstreaSFTTrainer")


class _MomentumUpdate(TrainerCallback):
    def __init__(self, trainer: "AstreaSFTTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.moco is not None:
            self.trainer.moco.update(self.trainer.backbone)


def _save_atomic(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = f"{path}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class AstreaSFTTrainer(SFTTrainer):
    """``SFTTrainer`` with the momentum-contrast loss, router statistics and MoCo checkpointing.

    Args:
        use_moco (`bool`, defaults to `True`): add ``mu * L_moco`` (only while the MoE fusion is
            active, i.e. not during pre-alignment stages).
        All other arguments are ``SFTTrainer``'s. ``mu``, ``m``, ``tau``, ``lambda`` and the queue
        size come from the model config (``moco_*``).
    """

    def __init__(self, *args, use_moco: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone = find_backbone(self.model)
        config = self.backbone.config
        self.expert_order = list(self.backbone.expert_order)
        self.image_token_id = config.image_token_id
        self.moco = None
        if use_moco and self.backbone.alignment_role is None and config.moco_mu > 0:
            self.moco = MomentumContrast(
                self.backbone, config.moco_queue_size, config.moco_momentum, config.moco_temperature, config.moco_lambda
            ).to(next(self.backbone.fusion.parameters()).device)
            self.add_callback(_MomentumUpdate(self))
        self.moco_mu = config.moco_mu
        self.load_balance_coef = config.fusion_load_balance_coef

    # ------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if "labels" in inputs and "input_ids" in inputs:
            inputs["labels"] = inputs["labels"].masked_fill(inputs["input_ids"] == self.image_token_id, -100)
        captured: dict = {}

        use_moco = self.moco is not None and self.model.training

        def capture(module, args, output):
            if "output" in captured:  # a second forward (e.g. for logits) is not the training one
                return
            captured["args"], captured["output"] = args, output
            if use_moco:
                # The query head runs inside the model's forward, and is tied into the output with a
                # zero-weighted term, so DDP's unused-parameter search reaches it: otherwise DDP marks
                # it unused after the forward and fails when the MoCo loss then gives it a gradient.
                query = self.moco.query(self.backbone, output.fused)
                captured["query"] = query
                return dataclasses.replace(output, fused=output.fused + 0.0 * query.sum())

        handle = self.backbone.fusion.register_forward_hook(capture)
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        self._metrics[mode]["loss_reg"].append(self._global_mean(loss))

        fusion = captured.get("output")
        if fusion is not None:
            self._log_router(mode, fusion.router_probs.detach())
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            if self.load_balance_coef > 0:
                loss = loss + self.load_balance_coef * fusion.load_balance_loss / steps
            if use_moco:
                bridged = captured["args"][0]
                text = captured["args"][1] if len(captured["args"]) > 1 else None
                q = captured["query"]
                k = self.moco.key(bridged, text)
                moco_loss = self.moco.loss(q, k)
                loss = loss + self.moco_mu * moco_loss / steps
                self.moco.enqueue(self.accelerator.gather(k))
                self._metrics[mode]["loss_moco"].append(self._global_mean(moco_loss))
        return (loss, outputs) if return_outputs else loss

    def _global_mean(self, value: torch.Tensor) -> float:
        """Mean over processes: each rank's loss is its share of the global batch's mean."""
        return float(self.accelerator.gather(value.detach().reshape(1)).mean())

    def _log_router(self, mode: str, probs: torch.Tensor) -> None:
        probs = self.accelerator.gather_for_metrics(probs.float())
        mean = probs.mean(dim=0)
        load = (probs > 0).float().mean(dim=0)
        entropy = -(probs.clamp_min(1e-12).log() * probs).sum(dim=-1).mean()
        for index, role in enumerate(self.expert_order):
            self._metrics[mode][f"router/prob_{role}"].append(float(mean[index]))
            self._metrics[mode][f"router/load_{role}"].append(float(load[index]))
        self._metrics[mode]["router/entropy"].append(float(entropy))

    # ------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.moco is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            _save_atomic(self.moco.state_dict(), os.path.join(folder, MOCO_STATE))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"--resume: no checkpoint found in {self.args.output_dir}")
        if resume_from_checkpoint and self.moco is not None:
            path = os.path.join(resume_from_checkpoint, MOCO_STATE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: the checkpoint has no momentum encoder / queue to resume")
            self.moco.load_state_dict(load_file(path))
        return super().train(resume_from_checkpoint, *args, **kwargs)
