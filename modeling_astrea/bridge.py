"""The random residual connection between pre-alignment stages (paper eq. 2-4).

For the expert at stage position k (in ``config.expert_order``), with ``C_i`` the cached projector
outputs of the earlier experts and ``f_k`` its own projector output::

    Q  = F_q(gamma * sum_{i<k} p_i * C_i)          p_i ~ Bernoulli(p) per image, in training
    K  = F_k(f_k),  V = F_v(f_k)
    f'_k = f_k + tanh(g) * F_o(softmax(Q K^T / sqrt(d)) V)

Interpretations (the paper leaves these open):

* **Residual form.** Eq. 2 gives the attention output alone as the feature sent to the LLM. We read
  "residual connection" literally: the attention is a branch added to ``f_k`` through a scalar tanh
  gate ``g`` that starts at ``bridge_gate_init`` (0), so a freshly built model equals the
  projector-only path and stage k starts from what its projector already knows.
* **Heads.** Multi-head attention with an output projection ``F_o`` (standard MHA); tokens are
  aligned across experts (see ``projector.py``) so query t and key t describe the same region.
* **What C_i is.** The *projector output* of expert i (before its own bridge), exactly what the
  feature cache stores once stage i is frozen; bridges therefore do not chain.
* **Eval rule.** In eval ``p_i`` is replaced by its expectation ``p`` (as dropout does), so the
  query's scale matches training on average and inference is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBridge(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, gamma: float, p: float, gate_init: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.gamma = gamma
        self.p = p
        self.gate_init = gate_init
        self.q_proj = nn.Linear(hidden_size, hidden_size)  # F_q
        self.k_proj = nn.Linear(hidden_size, hidden_size)  # F_k
        self.v_proj = nn.Linear(hidden_size, hidden_size)  # F_v
        self.o_proj = nn.Linear(hidden_size, hidden_size)  # F_o
        self.gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def residual_query(self, previous: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """``gamma * sum_i p_i * C_i`` with per-image Bernoulli ``p_i`` in training, ``p_i = p`` in eval."""
        stacked = torch.stack(previous, dim=0)  # (k-1, B, N, D)
        if self.training:
            keep = torch.rand(stacked.shape[:2], device=stacked.device, generator=generator) < self.p
            weights = keep.to(stacked.dtype)
        else:
            weights = torch.full(stacked.shape[:2], self.p, device=stacked.device, dtype=stacked.dtype)
        return self.gamma * (weights[..., None, None] * stacked).sum(dim=0)

    def forward(self, current: torch.Tensor, previous: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """``current``: f_k ``(B, N, D)``; ``previous``: the C_i of the earlier experts, each ``(B, N, D)``."""
        if not previous:
            return current
        batch, n, dim = current.shape
        query = self.q_proj(self.residual_query(previous, generator))

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(query), heads(self.k_proj(current)), heads(self.v_proj(current)))
        attended = attended.transpose(1, 2).reshape(batch, n, dim)
        # The float32 gate would promote a bf16/fp16 branch (autocast) to float32: the bridged
        # feature keeps the dtype of the feature it bridges.
        return current + (torch.tanh(self.gate) * self.o_proj(attended)).to(current.dtype)
