"""``AstreaSFTTrainer``: TRL's ``SFTTrainer`` plus Astrea's training terms, set by :class:`AstreaSFTConfig`.

TRL trains VLMs through the backbone with a fused LM head, so a loss computed in
``AstreaForConditionalGeneration.forward`` is never used: every training term lives here, at
``SFTTrainer``'s documented hooks. ``compute_loss`` masks ``<image>`` positions out of the labels,
calls TRL's loss ``L_reg`` and adds ``mu * L_moco`` (eq. 11, :mod:`astrea_vlm.train.moco`) and the
router's load-balancing term ``fusion_load_balance_coef * L_balance``, reading the fused tokens and
router outputs with a forward hook (no second forward). A callback updates the momentum encoder
(eq. 8). Checkpoints hold the MoCo state and are written into a staging folder and renamed into
place once complete, so a killed save leaves the complete checkpoint or none; before resuming, the
checkpoint's files are checked (:mod:`astrea_vlm.modeling.checkpoint_files`).
Under FSDP2 (:mod:`astrea_vlm.train.sharding`) a checkpoint holds the model and optimizer states as
``torch.distributed.checkpoint`` shards (``checkpoint-N/sharded/``), written and read here: Trainer
5.23 cannot checkpoint the optimizer of a model that owns its sharding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from trl import SFTConfig, SFTTrainer

from ..modeling.checkpoint_files import CorruptCheckpointError, check_safetensors_file, check_torch_zip_file, check_weights_folder
from ..modeling.modeling_astrea import find_backbone
from .atomic import fsync_dir, save_safetensors_atomic
from .moco import MomentumContrast
from .sharding import is_sharded

MOCO_STATE = "moco_state.safetensors"

#: The folder of a sharded checkpoint's ``torch.distributed.checkpoint`` files (model and optimizer).
SHARDED_STATE = "sharded"

#: Prefix of the staging folder a checkpoint is written into before it is moved into place.
STAGING_PREFIX = ".partial-"


class _SelectionBiasUpdate(TrainerCallback):
    def __init__(self, trainer: "AstreaSFTTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.update_selection_bias()


class _MomentumUpdate(TrainerCallback):
    def __init__(self, trainer: "AstreaSFTTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.moco is not None:
            self.trainer.moco.update(self.trainer.backbone)


def publish_checkpoint(staged: str, final: str) -> None:
    """Move a complete checkpoint folder ``staged`` to ``final`` with one atomic rename.

    An existing ``final`` (the same step saved again) is first moved aside into the staging
    folder, so at no moment is a half-written folder visible under the final name.
    """
    staging_root = os.path.dirname(staged)
    if os.path.exists(final):
        os.replace(final, os.path.join(staging_root, "replaced"))
    os.replace(staged, final)
    fsync_dir(os.path.dirname(final) or ".")
    shutil.rmtree(staging_root, ignore_errors=True)


def check_checkpoint(folder: str, moco: bool = False) -> None:
    """Check a Trainer checkpoint's files before resuming; raise naming the first bad or missing one."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    sharded = os.path.isdir(os.path.join(folder, SHARDED_STATE))
    if sharded and not os.path.isfile(os.path.join(folder, SHARDED_STATE, ".metadata")):
        raise FileNotFoundError(f"{folder}/{SHARDED_STATE} has no .metadata: the sharded checkpoint is incomplete; "
                                "resume from another one")
    if not sharded and not check_weights_folder(folder) and not os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        raise FileNotFoundError(
            f"{folder} holds no model.safetensors (or shard index, or adapter_model.safetensors): "
            "it is not a complete checkpoint; resume from another one"
        )
    if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        check_safetensors_file(os.path.join(folder, "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"):
        if os.path.isfile(os.path.join(folder, name)):
            check_torch_zip_file(os.path.join(folder, name))
    state = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        raise FileNotFoundError(f"{state} is missing: the checkpoint is incomplete; resume from another one")
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(f"{state}: not valid JSON ({error}); the file is truncated or corrupt") from None
    if moco:
        path = os.path.join(folder, MOCO_STATE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint has no momentum encoder / queue to resume")
        check_safetensors_file(path)


@dataclasses.dataclass
class AstreaSFTConfig(SFTConfig):
    r"""``SFTConfig`` plus the settings of Astrea's training terms (the model config keeps what the model computes).

    Parameters:
        moco_queue_size (`int`, defaults to 4096), moco_momentum (`float`, defaults to 0.999),
        moco_temperature (`float`, defaults to 0.07), moco_lambda (`float`, defaults to 0.5),
        moco_mu (`float`, defaults to 0.1):
            Momentum contrast (eq. 5-8, 11): queue length N, EMA coefficient m, temperature tau,
            row/column weight lambda and the loss weight mu (0 leaves MoCo out).
        fusion_load_balance_coef (`float`, defaults to 0.0):
            Weight of the router's Switch-style load-balancing term (0: none, as in the paper).
        fusion_balance_bias_rate (`float`, defaults to 0.0):
            Auxiliary-loss-free balancing (DeepSeek-V3's bias update): after every optimizer step,
            each expert's ``selection_bias`` (added to the router logits when choosing the top-k,
            never to the kept experts' weights) moves by this amount: down for an expert that took
            more than its share ``1 / E`` of the step's top-k slots (all micro-batches and
            processes counted), up for one that took less (then all are shifted to keep the mean
            at 0). No gradient pushes the router towards uniform routing; an expert ranked last is
            picked again once its bias has risen. The bias is saved with the model. 0: off.
        gate_lr_multiplier (`float`, defaults to 1.0), router_lr_multiplier (`float`, defaults to 1.0):
            The bridges' tanh gates (a scalar each, starting at 0) and the fusion router train in
            their own optimizer groups at this multiple of the learning rate (same schedule).
    """

    moco_queue_size: int = 4096
    moco_momentum: float = 0.999
    moco_temperature: float = 0.07
    moco_lambda: float = 0.5
    moco_mu: float = 0.1
    fusion_load_balance_coef: float = 0.0
    fusion_balance_bias_rate: float = 0.0
    gate_lr_multiplier: float = 1.0
    router_lr_multiplier: float = 1.0

    def __post_init__(self):
        for name, ok, why in (
            ("moco_queue_size", self.moco_queue_size >= 1, "must be >= 1"),
            ("moco_momentum", 0.0 <= self.moco_momentum < 1.0, "m must lie in [0, 1) (eq. 8)"),
            ("moco_temperature", self.moco_temperature > 0, "tau must be > 0"),
            ("moco_lambda", 0.0 <= self.moco_lambda <= 1.0, "lambda must lie in [0, 1]"),
            ("moco_mu", self.moco_mu >= 0, "mu must be >= 0"),
            ("fusion_load_balance_coef", self.fusion_load_balance_coef >= 0, "must be >= 0"),
            ("fusion_balance_bias_rate", self.fusion_balance_bias_rate >= 0, "must be >= 0"),
            ("gate_lr_multiplier", self.gate_lr_multiplier > 0, "must be > 0"),
            ("router_lr_multiplier", self.router_lr_multiplier > 0, "must be > 0"),
        ):
            if not ok:
                raise ValueError(f"AstreaSFTConfig: invalid `{name}`={getattr(self, name)!r}: {why}")
        super().__post_init__()


#: The training terms' settings and their defaults (a plain ``SFTConfig`` gets these).
TRAINING_TERMS = {f.name: f.default for f in dataclasses.fields(AstreaSFTConfig) if f.name in AstreaSFTConfig.__annotations__}


class AstreaSFTTrainer(SFTTrainer):
    """``SFTTrainer`` with the momentum-contrast loss, the router's load balancing and statistics, and
    MoCo checkpointing.

    Args:
        use_moco (`bool`, defaults to `True`): add ``mu * L_moco`` (only while the MoE fusion is
            active, i.e. not during pre-alignment stages).
        All other arguments are ``SFTTrainer``'s. The terms' settings come from ``args`` (an
        :class:`AstreaSFTConfig`; a plain ``SFTConfig`` gets :data:`TRAINING_TERMS`' defaults).
    """

    def __init__(self, *args, use_moco: bool = True, **kwargs):
        model, train_args = kwargs.get("model", args[0] if args else None), kwargs.get("args", args[1] if len(args) > 1 else None)
        if model is not None and train_args is not None and is_sharded(model):
            # Trainer refuses to checkpoint a model that owns its sharding unless it saves the model
            # only; the sharded checkpoints are written here instead (_save_sharded_checkpoint).
            train_args.save_only_model = True
        super().__init__(*args, **kwargs)
        self.backbone = find_backbone(self.model)
        terms = {name: getattr(self.args, name, default) for name, default in TRAINING_TERMS.items()}
        self.expert_order = list(self.backbone.expert_order)
        self.image_token_id = self.backbone.config.image_token_id
        self.balance_bias_rate = terms["fusion_balance_bias_rate"]
        self._step_load = None  # top-k slots each expert took in the current optimizer step
        self._selection_bias = None  # float32 accumulator of the fusion's selection bias
        if self.balance_bias_rate > 0:  # before the momentum update, which copies the bias
            self.add_callback(_SelectionBiasUpdate(self))
        self.moco = None
        if use_moco and self.backbone.alignment_role is None and terms["moco_mu"] > 0:
            self.moco = MomentumContrast(
                self.backbone, terms["moco_queue_size"], terms["moco_momentum"], terms["moco_temperature"], terms["moco_lambda"]
            ).to(next(self.backbone.fusion.parameters()).device)
            self.add_callback(_MomentumUpdate(self))
        self.moco_mu = terms["moco_mu"]
        self.gate_lr_multiplier, self.router_lr_multiplier = terms["gate_lr_multiplier"], terms["router_lr_multiplier"]
        self.load_balance_coef = terms["fusion_load_balance_coef"]

    # ------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if "labels" in inputs and "input_ids" in inputs:  # <image> placeholders are inputs, never targets
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
            if self.balance_bias_rate > 0 and self.model.training:
                load = (fusion.router_probs.detach() > 0).reshape(-1, fusion.router_probs.shape[-1]).sum(dim=0).float()
                self._step_load = load if self._step_load is None else self._step_load + load
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            if self.load_balance_coef > 0:
                loss = loss + self.load_balance_coef * fusion.load_balance_loss / steps
                self._metrics[mode]["loss_balance"].append(self._global_mean(fusion.load_balance_loss))
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

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """``fusion_balance_bias_rate``'s sign step on the fusion's ``selection_bias``, from the top-k
        slots each expert took in this optimizer step (summed over processes, so every rank applies
        the same step).

        The bias accumulates in float32 here (a bf16 model's buffer would round small steps away)
        and is kept centred: only its differences choose experts, and near 0 a low-precision copy
        resolves them best."""
        if self._step_load is None:
            return
        load = self.accelerator.reduce(self._step_load, reduction="sum")
        self._step_load = None
        share = load / load.sum()
        bias = self.backbone.fusion.selection_bias
        if self._selection_bias is None:
            self._selection_bias = bias.detach().float().clone()
        step = self.balance_bias_rate * torch.sign(1.0 / share.numel() - share)
        self._selection_bias += step.to(self._selection_bias.device) - step.mean().to(self._selection_bias.device)
        bias.copy_(self._selection_bias.to(device=bias.device, dtype=bias.dtype))
        for index, role in enumerate(self.expert_order):
            self._metrics["train"][f"router/bias_{role}"].append(float(self._selection_bias[index]))

    def _global_mean(self, value: torch.Tensor) -> float:
        """Mean over processes: each rank's loss is its share of the global batch's mean."""
        return float(self.accelerator.gather(value.detach().reshape(1)).mean())

    def _log_router(self, mode: str, probs: torch.Tensor) -> None:
        probs = self.accelerator.gather_for_metrics(probs.float())
        probs = probs.reshape(-1, probs.shape[-1])  # per-token routing: every token counts
        mean = probs.mean(dim=0)
        load = (probs > 0).float().mean(dim=0)
        entropy = -(probs.clamp_min(1e-12).log() * probs).sum(dim=-1).mean()
        for index, role in enumerate(self.expert_order):
            self._metrics[mode][f"router/prob_{role}"].append(float(mean[index]))
            self._metrics[mode][f"router/load_{role}"].append(float(load[index]))
        self._metrics[mode]["router/entropy"].append(float(entropy))

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; the bridges' tanh gates and the router get their own parameter
        groups at ``gate_lr_multiplier`` / ``router_lr_multiplier`` times the group's lr."""
        optimizer = super().create_optimizer(model)
        multipliers = {id(bridge.gate): self.gate_lr_multiplier for bridge in self.backbone.bridges.values()}
        multipliers.update({id(p): self.router_lr_multiplier for p in self.backbone.fusion.router.parameters()})
        multipliers = {key: value for key, value in multipliers.items() if value != 1.0}
        for group in list(optimizer.param_groups):
            for multiplier in sorted({multipliers[id(p)] for p in group["params"] if id(p) in multipliers}):
                moved = [p for p in group["params"] if multipliers.get(id(p)) == multiplier]
                group["params"] = [p for p in group["params"] if multipliers.get(id(p)) != multiplier]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                           "lr": group["lr"] * multiplier})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    # ------------------------------------------------------------------- checkpoints
    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, the Trainer's run folder is the staging folder.
        staging = getattr(self, "_staging_run_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint (plus MoCo state) into a staging folder, then rename it into place."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging_root = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
        staged = os.path.join(staging_root, name)
        if self.args.should_save and os.path.exists(staging_root):
            shutil.rmtree(staging_root)  # left by a save that was killed
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging_root
        try:
            if is_sharded(self.model):
                self._save_sharded_checkpoint(staged)
            else:
                super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        if self.args.should_save:
            if self.moco is not None:
                save_safetensors_atomic(self.moco.state_dict(), os.path.join(staged, MOCO_STATE))
            best = self.state.best_model_checkpoint
            if best is not None and os.path.abspath(best).startswith(os.path.abspath(staging_root) + os.sep):
                self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))  # with the final paths
            publish_checkpoint(staged, final)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _save_sharded_checkpoint(self, folder: str) -> None:
        """Every rank: its model and optimizer shards (``torch.distributed.checkpoint``) and its RNG state;
        rank 0: scheduler and gradient scaler (the trainer and MoCo states follow in ``_save_checkpoint``)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        self.store_flos()
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds the torch one
        model_state, optimizer_state = get_state_dict(self.model, optimizer,
                                                      options=StateDictOptions(flatten_optimizer_state_dict=True))
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(folder, SHARDED_STATE))
        self._save_rng_state(folder)  # rng_state_<rank>.pth, one file per rank
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(folder, "scheduler.pt"))
            self._save_scaler(folder)
            for callback in [*self.callback_handler.callbacks, self.control]:  # as Trainer._save_checkpoint does
                if isinstance(callback, ExportableState):
                    name, state = type(callback).__name__, callback.state()
                    if isinstance(self.state.stateful_callbacks.get(name), list):
                        self.state.stateful_callbacks[name].append(state)
                    else:
                        self.state.stateful_callbacks[name] = state
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if is_sharded(self.model) and os.path.isdir(os.path.join(resume_from_checkpoint, SHARDED_STATE)):
            return  # read with the optimizer, once it exists (_load_optimizer_and_scheduler)
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or not os.path.isdir(os.path.join(checkpoint, SHARDED_STATE)):
            return super()._load_optimizer_and_scheduler(checkpoint)
        if not is_sharded(self.model):
            raise ValueError(f"{checkpoint} is a sharded (FSDP) checkpoint; resume it with the same launch "
                             "(torchrun ... with distributed: fsdp), or start the stage again")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        model_state, optimizer_state = get_state_dict(self.model, optimizer, options=options)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, SHARDED_STATE))
        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"--resume: no checkpoint found in {self.args.output_dir}")
        if resume_from_checkpoint:
            check_checkpoint(str(resume_from_checkpoint), moco=self.moco is not None)
        if resume_from_checkpoint and self.moco is not None:
            self.moco.load_state_dict(load_file(os.path.join(resume_from_checkpoint, MOCO_STATE)))
        self._parameter_count = None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate for ``total_flos`` (6 x input tokens x non-embedding parameters), with
        the parameters counted once per ``train()`` call.

        Why: ``Trainer`` counts them at every step, which walks every module (~10 ms a step on a
        2-core CPU for the demo model, ~5% of its step time); the model's structure does not change
        while it trains (PEFT adapters are in place before ``train()``).
        """
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if getattr(self, "_parameter_count", None) is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._parameter_count
