"""Per-expert FFN projectors and the token resampler that puts every expert on one token grid.

Eq. 10 sums the experts' features token by token, so every expert must yield the same number of
tokens, and token t of each expert should describe the same image region. Grid towers (SigLIP,
RAM++ Swin, SAM2, Grounding-DINO's encoder memory, CLIP/DINOv2, timm) are therefore resampled on
their 2-D grid to a ``sqrt(N) x sqrt(N)`` grid: area pooling (``adaptive_avg_pool2d``) when the
tower's grid is finer, bilinear interpolation when it is coarser. Both are parameter-free, keep
spatial correspondence between experts, and cost nothing at decode time. Query tokens
(Grounding-DINO in ``queries`` mode) have no grid: the tower returns them sorted by detection
score and the top N are kept.

Resampling happens before projection: pooling SAM2's 64x64 grid to 24x24 first makes the
projector 7x cheaper. Pooling commutes with the projector's first (linear) layer but not with its
GELU, so the order is a modelling choice, the cheaper one, not an identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def resample_grid(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, C, *size)``: area pooling when both sides shrink, else bilinear."""
    size = tuple(size)
    if tuple(feature_map.shape[-2:]) == size:
        return feature_map
    if size[0] <= feature_map.shape[-2] and size[1] <= feature_map.shape[-1]:
        return F.adaptive_avg_pool2d(feature_map, size)
    return F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False)


def resample_tokens(tokens: torch.Tensor, grid: tuple[int, int] | None, num_tokens: int) -> torch.Tensor:
    """Resample expert tokens ``(B, N_i, C)`` to ``(B, num_tokens, C)`` (see the module docstring)."""
    if grid is None:
        if tokens.shape[1] < num_tokens:
            raise ValueError(f"cannot keep the top {num_tokens} of {tokens.shape[1]} query tokens")
        return tokens[:, :num_tokens]
    h, w = grid
    batch, n, channels = tokens.shape
    if n != h * w:
        raise ValueError(f"tower returned {n} tokens, expected a {h}x{w} grid")
    side = math.isqrt(num_tokens)
    if (h, w) == (side, side):
        return tokens
    fmap = tokens.transpose(1, 2).reshape(batch, channels, h, w)
    return resample_grid(fmap, (side, side)).flatten(2).transpose(1, 2)


class ExpertProjector(nn.Module):
    """FFN mapping one expert's tokens (width D_i) to the LLM width D (LLaVA-1.5's mlp2x_gelu at depth 2)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, act: str = "gelu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [ACT2FN[act], nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)
