"""Fully sharded training (FSDP2) of ``astrea align`` / ``astrea instruct`` under ``torchrun``.

``distributed: fsdp`` in a recipe (or ``--fsdp``) shards the model's parameters, gradients and
optimizer states over the launched processes with torch's FSDP2 (``fully_shard``), through
transformers' own API for it (``DistributedConfig`` + ``maybe_distribute_model``): the model is
then one that "owns its sharding", which ``Trainer`` 5.23 trains as it is (no DDP wrap, gradient
reduction by FSDP2, collective saves). Why not accelerate's FSDP plugin
(``train/accelerate/fsdp.yaml``): accelerate 1.15 on a machine without GPUs silently turns it into
plain data parallel (``DistributedType.MULTI_CPU``), so nothing would be sharded on CPU.

FSDP units (all-gathered for their forward, freed after it): every LLM decoder layer (the LLM's
``_no_split_modules``), every expert tower, projector and residual bridge (Astrea's
``_no_split_modules``; a tower or projector is also called alone, outside the model's forward, when
the feature cache is built). The root unit holds the rest: embeddings, final norm, ``lm_head``
(TRL's fused LM head reads ``lm_head.weight`` directly), the MoE fusion and the MoCo head (the
momentum encoder copies both, :func:`astrea_vlm.train.moco`). Unused parameters (the adapters of
experts the router dropped on one rank) reduce zero gradients, as DDP's ``find_unused_parameters``.

Files: whatever one rank can write alone is written by rank 0 while the others wait at a barrier
(:func:`on_rank_zero`); resumable checkpoints are written by every rank, each its own shard,
with ``torch.distributed.checkpoint`` (see :mod:`astrea_vlm.train.trainer`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn
from transformers import TrainerCallback

#: Values of a recipe's ``distributed`` key.
MODES = ("none", "fsdp")


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def on_rank_zero() -> Iterator[bool]:
    """``with on_rank_zero() as writer: if writer: ...``: rank 0 writes, every rank then meets at a barrier
    (so nobody reads a file before it exists). Without a process group it is rank 0 alone."""
    try:
        yield is_rank_zero()
    finally:
        barrier()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank must call it), or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (its storage and in-place version counter), or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def unsharded_class(module: nn.Module) -> type:
    """The module's own class: FSDP2 swaps in a generated ``FSDP<Class>`` subclass defined in torch."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch."):
            return cls
    return type(module)


def fsdp_units(model: nn.Module) -> list[str]:
    """Names of the modules that become FSDP units (see the module docstring); ``*`` stands for layer numbers."""
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    backbone = model.model
    llm_blocks = set(getattr(backbone.language_model, "_no_split_modules", None) or ())
    # `layers.*` (transformers' plan syntax) rather than one entry per layer
    units = list(dict.fromkeys(replace_layer_number_by_wildcard(f"model.language_model.{name}")
                               for name, module in backbone.language_model.named_modules() if type(module).__name__ in llm_blocks))
    if not units:
        raise ValueError(f"the LLM ({type(backbone.language_model).__name__}) names no decoder-layer class in "
                         f"_no_split_modules; FSDP cannot find its layers")
    for group in ("towers", "projectors", "bridges"):
        units += [f"model.{group}.{role}" for role in getattr(backbone, group)]
    return units


def require_launcher() -> None:
    """Raise unless this process is one of two or more started by a launcher (``torchrun``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or "RANK" not in os.environ:
        raise ValueError("distributed: fsdp shards the model over the processes of a launcher; start two or more with "
                         "`torchrun --standalone --nproc_per_node N -m astrea_vlm.cli ...`, or train in one process "
                         "without it (distributed: none, the default)")


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` (an ``AstreaForConditionalGeneration``) over the launched processes with FSDP2.

    Needs a ``torchrun`` launch of two or more processes; the process group
    (gloo on CPU, nccl on GPU) is created here when there is none. Returns the model (the same
    object, now of FSDP2's generated subclass, its parameters ``DTensor`` shards).
    """
    from transformers.distributed import DistributedConfig

    require_launcher()
    if hasattr(model, "peft_config"):
        raise ValueError("distributed: fsdp with a LoRA recipe (instruct.lora) is not supported; train the whole LLM "
                         "(lora: null) or launch without fsdp (data parallel)")
    cls = type(model)
    # The plan names Astrea's units; the class-level plans merged from the sub-models would name
    # modules Astrea does not have.
    model.fsdp_plan = dict.fromkeys(fsdp_units(model), "free_full_weight")
    config, _, mesh = cls.prepare_distribute_model(DistributedConfig(fsdp_size=int(os.environ["WORLD_SIZE"])))
    model = cls.maybe_distribute_model(model, config, mesh)
    # FSDP2 makes the first module to run forward its root. The feature cache runs a tower alone
    # before any forward of the whole model, which would make that tower a root of its own (and the
    # model's first forward fail): settle the root now.
    model._get_fsdp_state()._lazy_init()
    # Data-dependent routing: an adapter no image of this rank's batch was routed to has no gradient
    # here but may on another rank; reduce a zero gradient for it so the collectives match.
    model.set_reduce_scatter_unused_params(True)
    return model


class ShardingProbe(TrainerCallback):
    """Records after every optimizer step whether all of the model's parameters are FSDP2 shards and how
    many parameter elements this rank holds; :meth:`summary` gathers it over the ranks."""

    def __init__(self):
        self.steps = 0
        self.sharded_at_every_step = True
        self.local_elements = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        self.steps += 1
        self.sharded_at_every_step &= bool(params) and all(isinstance(p, DTensor) for p in params)
        self.local_elements = sum(local_tensor(p).numel() for p in params)

    def summary(self, model: nn.Module) -> dict:
        """``{"world_size", "fsdp_units", "parameters", "local_parameters" (per rank), "steps", "sharded_at_every_step"}``
        (a collective: every rank calls it)."""
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule

        mine = (self.local_elements, self.steps, self.sharded_at_every_step)
        every = [mine] * world_size()
        if dist.is_available() and dist.is_initialized():
            dist.all_gather_object(every, mine)
        return {"world_size": world_size(), "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
                "parameters": sum(p.numel() for p in model.parameters()), "local_parameters": [e[0] for e in every],
                "steps": [e[1] for e in every], "sharded_at_every_step": all(e[2] for e in every)}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU: gathered from the shards (every rank must call it) or the plain one."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict into ``model``, sharded or not; raises ``RuntimeError`` on missing
    or unexpected keys, as ``load_state_dict(strict=True)``."""
    if not is_sharded(model):
        model.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


__all__ = ["MODES", "ShardingProbe", "barrier", "fsdp_units", "full_state_dict", "full_tensor", "is_rank_zero", "is_sharded", "load_full_state_dict",
           "local_tensor", "on_rank_zero", "rank", "require_launcher", "shard_model", "unsharded_class", "world_size"]
