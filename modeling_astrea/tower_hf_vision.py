"""Generic transformers vision tower: CLIP, EVA-CLIP, DINOv2, SigLIP variants (Table 5 alternatives).

The tower runs ``AutoModel.from_config(tower_config)`` and reads ``hidden_states[feature_layer]``.
Prefix tokens (CLS, register tokens) are dropped so that the remaining tokens form the patch grid
``image_size / patch_size``; the grid is what the resampler pools to the visual-token count.
"""

from __future__ import annotations

import torch
from transformers import AutoModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .towers import ExpertTower, fit_attn_implementation, load_into, register_tower


@register_tower("hf_vision")
class HFVisionTower(ExpertTower):
    def __init__(self, config):
        super().__init__(config)
        tower_config = config.tower_config
        fit_attn_implementation(tower_config, MODEL_MAPPING[type(tower_config)])
        self.model = AutoModel.from_config(tower_config)
        patch = tower_config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        side = config.image_size // patch
        self.grid = (side, side)
        self.out_dim = tower_config.hidden_size
        self.freeze_if_configured()

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode_with_states(pixel_values, output_attentions=False)[0]

    def encode_with_states(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, dict]:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, output_attentions=output_attentions, return_dict=True)
        tokens = out.hidden_states[self.config.feature_layer]
        num_patches = self.grid[0] * self.grid[1]
        # CLS / register tokens come first in every supported model; keep the patch grid.
        return tokens[:, tokens.shape[1] - num_patches :], {"hidden_states": out.hidden_states, "attentions": out.attentions}

    def load_pretrained(self, source: str, **hub_kwargs) -> None:
        """Load a folder / Hub id of the tower's transformers model (e.g. a ``SiglipVisionModel``).

        transformers' ``from_pretrained`` converts legacy key names and fills whatever the checkpoint
        lacks with random weights, with only a log line; here a missing, unexpected or mis-shaped
        tensor is a ``ValueError`` that names them, as for the other towers.
        """
        loaded, info = type(self.model).from_pretrained(
            source,
            config=self.config.tower_config,
            dtype=self.input_dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below as a ValueError instead
            **hub_kwargs,
        )
        mismatched = sorted(info.get("mismatched_keys") or [])
        missing = sorted(info.get("missing_keys") or [])
        unexpected = sorted(info.get("unexpected_keys") or [])
        if mismatched or missing or unexpected:
            found = [f"{len(keys)} {what} (e.g. {keys[:5]})" for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if keys]
            raise ValueError(
                f"weights from {source} do not match the {self.kind} tower's {type(self.model).__name__}: "
                + "; ".join(found)
                + "; check that the expert's tower_config matches the checkpoint"
            )
        load_into(self.model, loaded.state_dict(), source)
        self.freeze_if_configured()
