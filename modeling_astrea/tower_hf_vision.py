"""Generic transformers vision tower: CLIP, EVA-CLIP, DINOv2, SigLIP variants (Table 5 alternatives).

The tower runs ``AutoModel.from_config(tower_config)`` and reads ``hidden_states[feature_layer]``.
Prefix tokens (CLS, register tokens) are dropped so that the remaining tokens form the patch grid
``image_size / patch_size``; the grid is what the resampler pools to the visual-token count.
"""

from __future__ import annotations

import torch
from transformers import AutoModel

from .towers import ExpertTower, load_into, register_tower


@register_tower("hf_vision")
class HFVisionTower(ExpertTower):
    def __init__(self, config):
        super().__init__(config)
        tower_config = config.tower_config
        self.model = AutoModel.from_config(tower_config)
        patch = tower_config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        side = config.image_size // patch
        self.grid = (side, side)
        self.out_dim = tower_config.hidden_size
        self.freeze_if_configured()

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        tokens = out.hidden_states[self.config.feature_layer]
        num_patches = self.grid[0] * self.grid[1]
        # CLS / register tokens come first in every supported model; keep the patch grid.
        return tokens[:, tokens.shape[1] - num_patches :]

    def load_pretrained(self, source: str, **hub_kwargs) -> None:
        loaded = type(self.model).from_pretrained(source, config=self.config.tower_config, dtype=self.input_dtype, **hub_kwargs)
        load_into(self.model, loaded.state_dict(), source)
        self.freeze_if_configured()
