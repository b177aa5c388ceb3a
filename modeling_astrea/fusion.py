"""Mixture-of-experts fusion of the expert features (paper eq. 9-10).

``ExpertRouter`` is one linear layer over the experts' projected tokens, concatenated (``E * D``
values), and -- with ``fusion_router_input="visual+text"`` -- the instruction vector the backbone
passes in (the mean embedding of the text before the image, see ``AstreaModel``), each part
RMS-normalised (``fusion_router_norm``) and the instruction multiplied by
``fusion_router_text_scale``. With ``fusion_routing="image"`` it reads the mean-pooled tokens and
routes each image once; with ``"token"`` it reads each token position and routes every visual
token on its own (the paper's "probability of the tokens being assigned to each expert").

``MoEFusion`` keeps the top-k router logits, softmaxes over the kept ones (eq. 9 over the surviving
set; dropped experts get probability exactly 0) and mixes per-expert MLP adapters::

    f = sum_{i in topk} P_i * F_i(f_i)                                       (eq. 10)

Only the kept experts' adapters run. Which experts are kept may be shifted by a per-expert
``selection_bias`` (auxiliary-loss-free balancing), or chosen from the logits without the
instruction (``fusion_router_text_selects=False``); the weights are always the softmax of the kept
logits. The optional load-balancing loss is the Switch-Transformer form
``E * sum_i frac_i * mean_prob_i`` with ``frac_i`` the share of top-k slots expert i takes and
``mean_prob_i`` its mean full-softmax probability.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput


class ExpertRouter(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, use_text: bool, per_token: bool = False, normalize: bool = False,
                 text_scale: float = 1.0):
        super().__init__()
        self.use_text = use_text
        self.text_scale = text_scale
        self.per_token = per_token
        self.normalize = normalize
        in_dim = num_experts * hidden_size + (hidden_size if use_text else 0)
        self.linear = nn.Linear(in_dim, num_experts)

    def forward(self, expert_features: list[torch.Tensor], text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, E)``, or ``(B, N, E)`` per token; ``text_features``: ``(B, D)``."""
        parts = list(expert_features) if self.per_token else [feature.mean(dim=1) for feature in expert_features]
        if self.use_text:
            text = torch.zeros_like(expert_features[0][:, 0]) if text_features is None else text_features
            text = text.to(parts[0].dtype)
            parts.append(text[:, None].expand(-1, parts[0].shape[1], -1) if self.per_token else text)
        if self.normalize:
            parts = [torch.nn.functional.rms_norm(part, (part.shape[-1],), eps=1e-6) for part in parts]
        if self.use_text and self.text_scale != 1.0:
            parts[-1] = parts[-1] * self.text_scale
        return self.linear(torch.cat(parts, dim=-1))


class ExpertAdapter(nn.Module):
    """F_i of eq. 10: a two-layer MLP on one expert's tokens, as a residual branch.

    ``F_i(x) = x + fc2(act(fc1(x)))`` with ``fc2`` initialised to zero. The paper does not say how
    the adapters start; a plain randomly initialised MLP would shrink the pre-aligned features
    ``f'_i`` by orders of magnitude and throw the alignment stages' work away at the first
    instruction-tuning step. Starting at the identity, the fusion initially hands the LLM the
    router-weighted mix of the aligned features and the adapters learn a correction.
    """

    def __init__(self, hidden_size: int, adapter_dim: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, adapter_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(adapter_dim, hidden_size)
        self.fc2.zero_init = True  # read by AstreaPreTrainedModel._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


@dataclass
class FusionOutput(ModelOutput):
    """A ``ModelOutput``, so that DeepSpeed ZeRO-3's module hooks see (and gather through) its tensors."""

    fused: torch.Tensor | None = None  # (B, N, D)
    router_logits: torch.Tensor | None = None  # (B, E), or (B, N, E) per token
    router_probs: torch.Tensor | None = None  # like router_logits, zeros outside the top-k
    load_balance_loss: torch.Tensor | None = None  # scalar


class MoEFusion(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, adapter_dim: int, top_k: int, use_text: bool, act: str = "gelu",
                 per_token: bool = False, jitter: float = 0.0, normalize: bool = False, text_scale: float = 1.0,
                 text_selects: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.text_selects = text_selects
        self.top_k = top_k
        self.jitter = jitter
        self.router = ExpertRouter(num_experts, hidden_size, use_text, per_token, normalize, text_scale)
        self.adapters = nn.ModuleList(ExpertAdapter(hidden_size, adapter_dim, act) for _ in range(num_experts))
        # Added to the logits when choosing the top-k only (auxiliary-loss-free balancing, as in
        # DeepSeek-V3): the trainer nudges it after each step (`fusion_balance_bias_rate`); it is
        # saved with the model, which then routes as it was trained. Zero: plain top-k.
        self.register_buffer("selection_bias", torch.zeros(num_experts))

    def route(self, logits: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k then softmax over the kept logits; probabilities of dropped experts are 0.

        ``scores`` (default: the logits) choose which experts are kept; the softmax is always over
        the kept *logits*.
        """
        kept_index = (logits if scores is None else scores).topk(self.top_k, dim=-1).indices
        probs = torch.zeros_like(logits)
        return probs.scatter(-1, kept_index, logits.gather(-1, kept_index).softmax(dim=-1))

    def forward(self, expert_features: list[torch.Tensor], text_features: torch.Tensor | None = None) -> FusionOutput:
        logits = self.router(expert_features, text_features).float()
        # The kept experts are chosen from `scores`, weighed by the logits' softmax.
        if self.text_selects or not self.router.use_text:
            scores = logits.detach()
        else:  # the image alone chooses the experts; the instruction only reweighs them
            with torch.no_grad():
                scores = self.router(expert_features, None).float()
        scores = scores + self.selection_bias.float()
        if self.training and self.jitter > 0 and self.top_k < self.num_experts:
            scores = scores + self.jitter * torch.randn_like(logits)
        probs = self.route(logits, scores)
        # Under autocast a cached (float32) expert can meet a bf16 one: mix in the widest dtype.
        dtype = functools.reduce(torch.promote_types, [feature.dtype for feature in expert_features])
        fused = torch.zeros_like(expert_features[0], dtype=dtype)
        for index, (adapter, feature) in enumerate(zip(self.adapters, expert_features)):
            weight = probs[..., index]  # (B,) or (B, N)
            used = weight > 0
            rows = (used if used.dim() == 1 else used.any(dim=1)).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            weight = weight[rows].to(feature.dtype)
            weight = weight[:, None, None] if weight.dim() == 1 else weight[..., None]
            fused = fused.index_add(0, rows, (weight * adapter(feature[rows])).to(dtype))
        flat_probs, flat_logits = probs.reshape(-1, self.num_experts), logits.reshape(-1, self.num_experts)
        share = (flat_probs > 0).float().mean(dim=0) / self.top_k
        balance = self.num_experts * (share * flat_logits.softmax(dim=-1).mean(dim=0)).sum()
        return FusionOutput(fused=fused, router_logits=logits, router_probs=probs, load_balance_loss=balance)
