"""Momentum contrast (eq. 5-8) and AstreaSFTTrainer: loss terms, EMA, queue, freezing, resume."""

from __future__ import annotations

import math

import pytest
import torch

from astrea_vlm.train.distributed_check import textured_colour_dataset
from transformers import Trainer, TrainerCallback

from astrea_vlm.configuration import get_preset
from astrea_vlm.modeling import AstreaForConditionalGeneration
from astrea_vlm.processing import build_processor
from astrea_vlm.train.moco import MomentumContrast
from astrea_vlm.train.stages import configure_stage
from astrea_vlm.train.trainer import MOCO_STATE, AstreaSFTConfig, AstreaSFTTrainer

def _dataset(n=16):
    # Coloured images with texture: uniform images would make every visual token identical, and
    # attention over identical keys has no gradient for its query/key maps.
    return textured_colour_dataset(n)


def _model(seed=0, **overrides):
    config = get_preset("tiny", **overrides)
    torch.manual_seed(seed)
    return AstreaForConditionalGeneration(config), build_processor(config)


def _args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        report_to=[],
        assistant_only_loss=True,
        save_strategy="no",
        max_length=None,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return AstreaSFTConfig(**base)


# ---------------------------------------------------------------------------- MoCo maths
class _Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from astrea_vlm.modeling import MoEFusion

        self.fusion = MoEFusion(2, 4, 4, 1, use_text=False)
        self.moco_head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))


def test_moco_loss_matches_eq_5_to_7_by_hand():
    moco = MomentumContrast(_Backbone(), queue_size=1, momentum=0.9, temperature=0.5, lam=0.25)
    moco.queue.copy_(torch.tensor([[0.0, 1.0]]))
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    k = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    expected = 0.0
    for i in range(2):
        keys = [k[0], k[1], moco.queue[0]]
        row = [math.exp(float(q[i] @ key) / 0.5) for key in keys]
        col = [math.exp(float(k[i] @ q[j]) / 0.5) for j in range(2)]
        r_i, c_i = row[i] / sum(row), col[i] / sum(col)
        expected += 0.25 * math.log(r_i) + 0.75 * math.log(c_i)
    expected = -expected / 2
    assert moco.loss(q, k).item() == pytest.approx(expected, rel=1e-6)


def test_queue_is_fifo_and_wraps():
    moco = MomentumContrast(_Backbone(), queue_size=3, momentum=0.9, temperature=0.1, lam=0.5)
    moco.enqueue(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    assert int(moco.queue_ptr) == 2
    moco.enqueue(torch.tensor([[3.0, 0.0], [4.0, 0.0]]))
    assert moco.queue[:, 0].tolist() == [4.0, 2.0, 3.0]  # 4 overwrote the oldest entry (1)
    assert int(moco.queue_ptr) == 1


def test_momentum_update_is_eq_8():
    backbone = _Backbone()
    moco = MomentumContrast(backbone, queue_size=2, momentum=0.9, temperature=0.1, lam=0.5)
    before = moco.head[0].weight.clone()
    with torch.no_grad():
        backbone.moco_head[0].weight.add_(1.0)
    moco.update(backbone)
    torch.testing.assert_close(moco.head[0].weight, 0.9 * before + 0.1 * backbone.moco_head[0].weight)


# ---------------------------------------------------------------------------- trainer
def test_instruct_steps_add_moco_log_router_stats_and_update_momentum_encoder(tmp_path):
    model, processor = _model()
    configure_stage(model, ["router", "adapters", "moco_head", "llm"], list(model.config.expert_order))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = AstreaSFTTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_dataset(), processing_class=processor)
    momentum_before = trainer.moco.head[0].weight.clone()
    queue_before = trainer.moco.queue.clone()
    trainer.train()
    m = trainer.args.moco_momentum
    # eq. 8 after the single optimizer step
    torch.testing.assert_close(trainer.moco.head[0].weight, m * momentum_before + (1 - m) * model.model.moco_head[0].weight)
    assert int(trainer.moco.queue_ptr) == 4 and not torch.equal(trainer.moco.queue[:4], queue_before[:4])
    assert torch.equal(trainer.moco.queue[4:], queue_before[4:])
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    changed = [n for n, v in trainable.items() if not torch.equal(dict(model.named_parameters())[n], v)]
    assert any("fusion.router" in n for n in changed) and any("moco_head" in n for n in changed)
    logs = trainer.state.log_history[0]
    assert logs["loss_moco"] > 0 and "loss_reg" in logs
    probs = [logs[f"router/prob_{r}"] for r in model.config.expert_order]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert sum(logs[f"router/load_{r}"] for r in model.config.expert_order) == pytest.approx(model.config.fusion_top_k)
    assert 0 < logs["router/entropy"] <= math.log(model.config.fusion_top_k) + 1e-5
    assert logs["loss"] == pytest.approx(logs["loss_reg"] + trainer.args.moco_mu * logs["loss_moco"], rel=1e-4)


def test_balance_bias_steps_each_expert_towards_its_share_and_travels_with_the_model(tmp_path):
    """Auxiliary-loss-free balancing: bias_i += rate * sign(1/E - share_i) after every optimizer step."""
    model, processor = _model()
    roles = list(model.config.expert_order)
    configure_stage(model, ["router", "adapters", "moco_head"], roles)
    args = _args(tmp_path, max_steps=4, fusion_balance_bias_rate=0.05, moco_queue_size=8)
    trainer = AstreaSFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=processor)
    bias = model.model.fusion.selection_bias
    # By hand: 24 top-k slots (8 images x top-3) taken 8 / 6 / 6 / 4 -> shares 1/3, 1/4, 1/4, 1/6.
    trainer._step_load = torch.tensor([8.0, 6.0, 6.0, 4.0])
    trainer.update_selection_bias()
    assert bias.tolist() == pytest.approx([-0.05, 0.0, 0.0, 0.05])
    assert trainer._step_load is None
    trainer._step_load = torch.tensor([9.0, 9.0, 6.0, 0.0])  # shares 3/8, 3/8, 1/4, 0: steps -, -, 0, + then centred
    trainer.update_selection_bias()
    assert bias.tolist() == pytest.approx([-0.05 - 0.05 + 0.0125, -0.05 + 0.0125, 0.0125, 0.05 + 0.05 + 0.0125])
    assert float(bias.sum()) == pytest.approx(0.0, abs=1e-7)
    # Under several processes each rank's loads are summed (accelerator.reduce) before the step, so every
    # rank moves its bias alike. A stand-in second rank whose 8 images all kept experts 2-4:
    bias.zero_()
    trainer._selection_bias = None

    def reduce_with_second_rank(tensor, reduction):
        assert reduction == "sum"
        return tensor + torch.tensor([0.0, 8.0, 8.0, 8.0])

    trainer.accelerator.reduce = reduce_with_second_rank
    trainer._step_load = torch.tensor([8.0, 6.0, 6.0, 4.0])  # this rank alone would step -, 0, 0, + (as above)
    trainer.update_selection_bias()
    del trainer.accelerator.reduce  # the real one again
    # Both ranks: 8 / 14 / 14 / 12 of 48 slots -> shares 1/6, 7/24, 7/24, 1/4: steps +, -, -, 0, centred.
    assert bias.tolist() == pytest.approx([0.05 + 0.0125, -0.05 + 0.0125, -0.05 + 0.0125, 0.0125])
    bias.zero_()
    trainer._selection_bias = None  # the float32 accumulator restarts from the (zeroed) buffer
    trainer._metrics["train"].clear()  # the hand step's logged bias is not a training step's

    trainer.train()
    # Training: the same rule on each step's logged loads (one micro-batch a step, logged every step).
    expected = torch.zeros(len(roles))
    steps = [log for log in trainer.state.log_history if f"router/load_{roles[0]}" in log]
    assert len(steps) == 4
    for log in steps:
        share = torch.tensor([log[f"router/load_{r}"] for r in roles]) / model.config.fusion_top_k
        step = 0.05 * torch.sign(1.0 / len(roles) - share)
        expected += step - step.mean()
        assert [log[f"router/bias_{r}"] for r in roles] == pytest.approx(expected.tolist(), abs=1e-6)
    assert bias.abs().sum() > 0
    torch.testing.assert_close(bias, expected)
    torch.testing.assert_close(trainer.moco.fusion.selection_bias, bias)  # the key encoder routes alike

    # The bias is part of the saved model: reloaded, it routes as trained.
    model.save_pretrained(tmp_path / "saved")
    reloaded = AstreaForConditionalGeneration.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(reloaded.model.fusion.selection_bias, bias)

    # A bf16 model: small steps accumulate in float32, not in the buffer (bf16 would stall at 0.25).
    model.model.fusion.selection_bias = torch.zeros(len(roles), dtype=torch.bfloat16)
    trainer._selection_bias, trainer.balance_bias_rate = None, 0.0005
    for _ in range(1000):
        trainer._step_load = torch.tensor([8.0, 6.0, 6.0, 4.0])
        trainer.update_selection_bias()
    assert model.model.fusion.selection_bias.dtype == torch.bfloat16
    assert model.model.fusion.selection_bias.float().tolist() == pytest.approx([-0.5, 0.0, 0.0, 0.5], abs=4e-3)


def test_training_terms_come_from_the_trainer_config(tmp_path):
    """AstreaSFTConfig holds the MoCo and load-balancing settings; the trainer adds the terms and masks <image> labels."""
    model, processor = _model()
    configure_stage(model, ["router", "adapters", "moco_head", "llm"], list(model.config.expert_order))
    args = _args(tmp_path, max_steps=1, moco_mu=0.0, fusion_load_balance_coef=0.5, moco_queue_size=8)
    trainer = AstreaSFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=processor)
    assert trainer.moco is None  # mu = 0 leaves MoCo out
    batch = trainer.data_collator([_dataset()[i] for i in range(2)])
    image = batch["input_ids"] == model.config.image_token_id
    model.eval()  # deterministic bridges; metrics of this check go to the "eval" log
    with torch.no_grad():
        masked = trainer.compute_loss(model, {**batch, "labels": batch["input_ids"].masked_fill(image, -100)})
        unmasked = trainer.compute_loss(model, {**batch, "labels": batch["input_ids"].clone()})
    assert image.any() and torch.equal(masked, unmasked)  # <image> positions are never targets
    model.train()
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss_balance"] > 0 and "loss_moco" not in logs
    assert logs["loss"] == pytest.approx(logs["loss_reg"] + 0.5 * logs["loss_balance"], rel=1e-4)

    with_moco = AstreaSFTTrainer(model=model, args=_args(tmp_path, max_steps=1, moco_queue_size=8, moco_momentum=0.5),
                                 train_dataset=_dataset(), processing_class=processor)
    assert with_moco.moco.queue.shape[0] == 8 and with_moco.moco.momentum == 0.5


def test_alignment_stage_trains_only_its_projector_and_bridge(tmp_path):
    model, processor = _model()
    role = model.config.expert_order[1]
    model.model.set_alignment_stage(role)
    configure_stage(model, ["projector", "bridge"], [role])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = AstreaSFTTrainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset(), processing_class=processor)
    assert trainer.moco is None  # no fusion while aligning
    counted = []
    num_parameters = model.num_parameters
    model.num_parameters = lambda **kwargs: counted.append(kwargs) or num_parameters(**kwargs)
    trainer.train()
    # total_flos: the Trainer's formula, with the parameters counted once per train() rather than per step
    assert counted == [{"exclude_embeddings": True}] and trainer.state.total_flos > 0
    batch = {"input_ids": torch.ones(2, 7, dtype=torch.long)}
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) == 6 * 14 * num_parameters(exclude_embeddings=True)
    for name, param in model.named_parameters():
        ours = name.startswith((f"model.projectors.{role}.", f"model.bridges.{role}."))
        if ours and "gate" not in name:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        elif not ours:
            assert torch.equal(param, before[name]), f"{name} changed but is frozen"


def test_loss_falls_clearly_on_a_fixed_tiny_batch(tmp_path):
    model, processor = _model()
    configure_stage(model, ["router", "adapters", "moco_head", "llm"], list(model.config.expert_order))
    trainer = AstreaSFTTrainer(
        model=model, args=_args(tmp_path, max_steps=50, learning_rate=3e-3), train_dataset=_dataset(4), processing_class=processor
    )
    trainer.train()
    losses = [h["loss_reg"] for h in trainer.state.log_history if "loss_reg" in h]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_after_a_stop_ends_with_the_same_weights_and_queue(tmp_path):
    def run(folder, stop=None, resume=False):
        model, processor = _model()
        configure_stage(model, ["router", "adapters", "moco_head", "llm"], list(model.config.expert_order))
        args = _args(folder, max_steps=6, save_strategy="steps", save_steps=3)
        trainer = AstreaSFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=processor)
        if stop:
            trainer.add_callback(_StopAt(stop))
        trainer.train(resume_from_checkpoint=True if resume else None)
        return model, trainer

    straight, t1 = run(tmp_path / "a")
    run(tmp_path / "b", stop=3)
    assert (tmp_path / "b" / "checkpoint-3" / MOCO_STATE).is_file()
    resumed, t2 = run(tmp_path / "b", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(t1.moco.queue, t2.moco.queue) and int(t1.moco.queue_ptr) == int(t2.moco.queue_ptr)
    assert torch.equal(t1.moco.head[0].weight, t2.moco.head[0].weight)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    model, processor = _model()
    trainer = AstreaSFTTrainer(model=model, args=_args(tmp_path / "empty"), train_dataset=_dataset(), processing_class=processor)
    with pytest.raises(ValueError, match="no checkpoint found"):
        trainer.train(resume_from_checkpoint=True)


def test_gate_and_router_lr_multipliers_are_own_optimizer_groups_that_follow_the_schedule(tmp_path):
    model, processor = _model()
    configure_stage(model, ["router", "adapters", "moco_head", "bridge", "projector"], list(model.config.expert_order))
    args = _args(tmp_path, max_steps=2, lr_scheduler_type="linear", gate_lr_multiplier=50.0, router_lr_multiplier=4.0)
    trainer = AstreaSFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=processor)
    gates = {id(bridge.gate) for bridge in model.model.bridges.values()}
    router = {id(p) for p in model.model.fusion.router.parameters()}
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    groups = trainer.optimizer.param_groups
    by_param = {id(p): group for group in groups for p in group["params"]}
    assert gates and router <= by_param.keys() and gates <= by_param.keys()
    base = [g for g in groups if not ({id(p) for p in g["params"]} & (gates | router))]
    assert base and all(g["lr"] == pytest.approx(1e-3) for g in base)
    for key in gates:
        assert by_param[key]["lr"] == pytest.approx(50e-3)
        assert {id(p) for p in by_param[key]["params"]} <= gates
    for key in router:
        assert by_param[key]["lr"] == pytest.approx(4e-3)
    # weight decay of the group a parameter came from is kept
    assert {g["weight_decay"] for g in groups} <= {g["weight_decay"] for g in base}
    # Every parameter is in exactly one group, and the linear schedule scales every group alike.
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    ratios = {round(g["lr"] / g["initial_lr"], 6) for g in groups}
    assert len(ratios) == 1 and ratios.pop() < 1.0


def test_lr_multipliers_are_recipe_phase_keys_and_must_be_positive(tmp_path):
    from astrea_vlm.train.recipe import load_recipe

    recipe = load_recipe("demo")
    for phase in (recipe.align, recipe.instruct):
        args = recipe.training_args(phase, tmp_path)
        assert args.gate_lr_multiplier == 50.0 and args.router_lr_multiplier == 1.0
    with pytest.raises(ValueError, match="gate_lr_multiplier"):
        _args(tmp_path, gate_lr_multiplier=0.0)
    with pytest.raises(ValueError, match="fusion_balance_bias_rate"):
        _args(tmp_path, fusion_balance_bias_rate=-0.01)


def test_momentum_update_reads_the_online_encoder_after_the_optimizer_step(tmp_path):
    """Eq. 8 after step t: theta_m <- m * theta_m + (1 - m) * theta_e(t + 1), not the pre-step theta_e(t)."""
    model, processor = _model()
    configure_stage(model, ["router", "adapters", "moco_head", "llm"], list(model.config.expert_order))
    trainer = AstreaSFTTrainer(model=model, args=_args(tmp_path, max_steps=1, learning_rate=0.05), train_dataset=_dataset(),
                               processing_class=processor)
    trainer.moco.momentum = 0.5  # (1 - m) large enough that the step's change shows far above rounding
    momentum_before = {n: p.detach().clone() for n, p in trainer.moco.head.named_parameters()}
    online_before = {n: p.detach().clone() for n, p in model.model.moco_head.named_parameters()}
    trainer.train()
    online_after = {n: p.detach() for n, p in model.model.moco_head.named_parameters()}
    assert max(float((online_after[n] - online_before[n]).abs().max()) for n in online_before) > 1e-2  # the step moved it
    for name, theta_m in trainer.moco.head.named_parameters():
        torch.testing.assert_close(theta_m, 0.5 * momentum_before[name] + 0.5 * online_after[name], rtol=0, atol=1e-6)
