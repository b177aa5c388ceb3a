"""Momentum contrast for the instruction-tuning stage (paper eq. 5-8, 11).

Queries are the online model's MoE-fused visual tokens, keys a momentum copy of the fusion and the
``moco_head`` on the same bridged expert features, each view pooling a random half of the tokens
(what is contrasted and why: the model card). With ``V = [k; Q]`` (keys, then the queue), rows
``S_r = q V^T / tau``, columns ``S_c = k q^T / tau``, ``r_i`` / ``c_i`` the row / column softmax at
the sample's own pair::

    L_moco = -(1/B) sum_i [lambda * log r_i + (1 - lambda) * log c_i]      L_total = L_reg + mu * L_moco

Keys are enqueued FIFO after the loss; eq. 8's momentum update ``theta_M = m * theta_M +
(1 - m) * theta_E`` runs after every optimizer step.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn


def _random_half_mean(tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over a random half of the tokens of each image: ``(B, N, D) -> (B, D)``."""
    batch, n, _ = tokens.shape
    keep = max(1, n // 2)
    scores = torch.rand(batch, n, device=tokens.device, generator=generator)
    index = scores.argsort(dim=1)[:, :keep]
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1])).mean(dim=1)


def _full_parameters(module: nn.Module):
    """Under DeepSpeed ZeRO-3 parameters are sharded: gather them for reading; otherwise a no-op."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _plain_copy(module: nn.Module) -> nn.Module:
    """A frozen copy holding plain, whole tensors (no ZeRO/FSDP attributes or hooks carried over).

    Under FSDP2 the parameters are ``DTensor`` shards: each is gathered whole (a collective, in the
    same order on every rank), so the momentum encoder is replicated -- see :class:`MomentumContrast`.
    """
    from .sharding import full_tensor

    with _full_parameters(module):
        # deepcopy with the parameters pre-copied into its memo: the copy gets plain whole tensors
        # and never copies a shard (nor a ZeRO-3 placeholder).
        memo = {id(p): nn.Parameter(full_tensor(p.detach()).clone(), requires_grad=False) for p in module.parameters()}
        return copy.deepcopy(module, memo)


class MomentumContrast(nn.Module):
    """Momentum encoder (EMA of ``fusion`` + ``moco_head``), the key queue, and the loss.

    Args:
        backbone: the :class:`AstreaModel` whose ``fusion`` and ``moco_head`` are the online encoder.
        queue_size, momentum, temperature, lam: N, m, tau and lambda of eq. 5-8.
    """

    def __init__(self, backbone: nn.Module, queue_size: int, momentum: float, temperature: float, lam: float):
        super().__init__()
        self.momentum = momentum
        self.temperature = temperature
        self.lam = lam
        self.fusion = _plain_copy(backbone.fusion)
        self.head = _plain_copy(backbone.moco_head)
        dim = self.head[-1].out_features
        generator = torch.Generator().manual_seed(0)
        queue = F.normalize(torch.randn(queue_size, dim, generator=generator), dim=-1)
        self.register_buffer("queue", queue.to(next(self.head.parameters()).device))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def online_pairs(self, backbone: nn.Module):
        return [(self.fusion, backbone.fusion), (self.head, backbone.moco_head)]

    @torch.no_grad()
    def update(self, backbone: nn.Module) -> None:
        """Eq. 8 on every parameter of the momentum encoder."""
        from .sharding import full_tensor

        for momentum_module, online_module in self.online_pairs(backbone):
            with _full_parameters(online_module):
                for theta_m, theta_e in zip(momentum_module.parameters(), online_module.parameters()):
                    online = full_tensor(theta_e.detach())  # FSDP2: gathered whole, on every rank
                    theta_m.mul_(self.momentum).add_(online.to(theta_m.dtype), alpha=1.0 - self.momentum)
                # Buffers (the fusion's selection bias) are not averaged: the key encoder keeps the
                # online encoder's choice of experts.
                for buffer_m, buffer_e in zip(momentum_module.buffers(), online_module.buffers()):
                    buffer_m.copy_(buffer_e)

    def query(self, backbone: nn.Module, fused: torch.Tensor) -> torch.Tensor:
        return F.normalize(backbone.moco_head(_random_half_mean(fused)), dim=-1)

    @torch.no_grad()
    def key(self, bridged: list[torch.Tensor], text_features: torch.Tensor | None = None) -> torch.Tensor:
        # Runs after the autocast forward: bf16 features meet the momentum copy's own dtype.
        dtype = next(self.fusion.parameters()).dtype
        text_features = None if text_features is None else text_features.detach().to(dtype)
        fused = self.fusion([b.detach().to(dtype) for b in bridged], text_features).fused
        return F.normalize(self.head(_random_half_mean(fused)), dim=-1)

    def loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Eq. 5-7 (see the module docstring); ``q`` carries gradients, ``k`` does not."""
        # In float32 whatever the training precision: a bf16 softmax over similarities / tau blurs the positive.
        q = q.float()
        k = k.to(q.dtype)
        keys = torch.cat([k, self.queue.to(q.dtype).clone().detach()], dim=0)
        targets = torch.arange(q.shape[0], device=q.device)
        rows = q @ keys.T / self.temperature
        cols = k @ q.T / self.temperature
        log_r = F.log_softmax(rows, dim=1).gather(1, targets[:, None]).squeeze(1)
        log_c = F.log_softmax(cols, dim=1).gather(1, targets[:, None]).squeeze(1)
        return -(self.lam * log_r + (1.0 - self.lam) * log_c).mean()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: write the newest keys over the oldest ones."""
        size = self.queue.shape[0]
        keys = keys.detach().to(self.queue.dtype)[-size:]
        ptr = int(self.queue_ptr)
        index = (torch.arange(keys.shape[0], device=keys.device) + ptr) % size
        self.queue[index] = keys
        self.queue_ptr.fill_((ptr + keys.shape[0]) % size)
