"""What Astrea's forward passes return (transformers ``ModelOutput`` dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, ModelOutput


@dataclass
class AstreaImageFeaturesOutput(BaseModelOutputWithPooling):
    """Visual side of one forward pass (``get_image_features``), in the transformers 5 layout.

    Args:
        last_hidden_state (`(n_images, N, D)`): fused visual tokens that replace the ``<image>``
            placeholders (also reachable as ``fused``).
        pooler_output (`tuple` of `(N, D)`): the same tokens, one entry per image, as LLaVA's.
        hidden_states, attentions (`tuple`, when asked): those of the first expert's tower in
            ``expert_order`` (the stage-1 expert), if its tower reports them (transformers towers do).
        expert_hidden_states, expert_attentions (`dict[str, tuple]`, when asked): the same for every
            expert whose tower reports them.
        expert_features (`dict[str, (n_images, N, D)]`): projector outputs ``C_i`` per expert.
        bridged_features (`dict[str, (n_images, N, D)]`): expert features after the residual bridge.
        router_logits, router_probs (`(n_images, E)`, or `(n_images, N, E)` with per-token routing): router
            outputs, experts in ``expert_order``.
        load_balance_loss (`()`): the Switch-style balancing term (used when its coefficient > 0).
    """

    expert_hidden_states: dict[str, tuple[torch.Tensor, ...]] | None = None
    expert_attentions: dict[str, tuple[torch.Tensor, ...]] | None = None
    expert_features: dict[str, torch.Tensor] | None = None
    bridged_features: dict[str, torch.Tensor] | None = None
    router_logits: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    load_balance_loss: torch.Tensor | None = None

    @property
    def fused(self) -> torch.Tensor | None:
        return self.last_hidden_state


@dataclass
class AstreaModelOutputWithPast(BaseModelOutputWithPast):
    """:class:`BaseModelOutputWithPast` plus the visual side (``None`` when no image was given)."""

    image_hidden_states: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    load_balance_loss: torch.Tensor | None = None


@dataclass
class AstreaCausalLMOutputWithPast(ModelOutput):
    """Output of :class:`AstreaForConditionalGeneration`.

    ``loss`` is the autoregressive loss on the labels given (``-100``: ignored; as in LLaVA, whoever
    builds the labels masks the ``<image>`` positions). Training terms -- the router's load
    balancing (``load_balance_loss`` is returned), momentum contrast -- are the trainer's
    (``AstreaSFTTrainer``: TRL never uses a loss computed here).
    ``router_logits`` / ``router_probs`` are ``(n_images, num_experts)`` in ``config.expert_order``
    (``(n_images, N, num_experts)`` with ``fusion_routing="token"``).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    load_balance_loss: torch.Tensor | None = None
