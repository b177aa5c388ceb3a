"""RAM++ tower: the classification / tagging expert (RAM++'s Swin-L@384 image encoder, as timm's
``swin_large_patch4_window12_384``: 12x12 grid tokens of width 1536).

Loads the image-encoder keys of the released RAM++ checkpoint through timm's Swin checkpoint
filter; the tagging decoder's keys are ignored. The layout differences it converts:
``docs/towers.md``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .tower_timm import TimmTower
from .towers import register_tower

try:  # optional dependency; building the tower without timm raises a clear ImportError (TimmTower)
    from timm.models import swin_transformer
except ImportError:
    swin_transformer = None


@register_tower("ram_plus")
class RamPlusTower(TimmTower):
    """A :class:`TimmTower` that must be a timm Swin and loads original RAM++ checkpoints.

    The architecture comes from ``tower_config`` like any timm tower (the paper presets use
    ``swin_large_patch4_window12_384`` at 384 px; the tiny preset a 2-stage toy Swin); it must be a
    timm ``SwinTransformer`` because the RAM++ key conversion is Swin's.
    """

    preprocessing = ("bilinear", "pil", False)  # RAM++'s get_transform: Resize((384, 384)) on PIL
    #: Key prefix of RAM++'s image encoder inside the full-model checkpoint.
    visual_prefix: str = "visual_encoder."
    #: A local folder is searched for the released RAM++ file first, then for timm-style weights.
    default_filenames: tuple[str, ...] = ("ram_plus_swin_large_14m.pth",) + TimmTower.default_filenames

    def __init__(self, config):
        super().__init__(config)
        if not isinstance(self.model, swin_transformer.SwinTransformer):
            raise ValueError(
                f"a ram_plus tower needs a timm Swin Transformer (RAM++'s image encoder is Swin-L, "
                f"swin_large_patch4_window12_384); tower_config.architecture={self.architecture!r} builds a "
                f"{type(self.model).__name__}. Use kind='timm' for other timm backbones"
            )

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
        """RAM++ full-model state dict -> timm Swin state dict.

        Keeps the ``visual_encoder.*`` keys without the prefix. A checkpoint with no such key but
        with ``patch_embed.proj.weight`` is taken as a bare Swin state dict (Microsoft or timm
        layout, e.g. the Swin-L that RAM++ was initialised from), since the same filter converts both.
        Anything else is not a RAM++ image encoder and raises ``ValueError``.
        """
        prefix = self.visual_prefix
        visual = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not visual:
            if "patch_embed.proj.weight" not in state_dict:
                example = sorted(state_dict)[:5]
                raise ValueError(
                    f"{source} holds no RAM++ image encoder: no `{prefix}*` keys (and no bare Swin "
                    f"`patch_embed.proj.weight`); found {len(state_dict)} keys, e.g. {example}. Expected the RAM++ "
                    f"checkpoint ram_plus_swin_large_14m.pth"
                )
            visual = dict(state_dict)
        return super().convert_state_dict(visual, source=source)

    def _timm_checkpoint_filter(self) -> Callable:
        """Always timm's Swin filter: Microsoft layout -> timm layout (downsample moved to the start of
        the next stage, ``relative_position_index`` / ``attn_mask`` dropped, bias tables and patch
        embedding resized when the window / patch size differs)."""
        return swin_transformer.checkpoint_filter_fn


__all__ = ["RamPlusTower"]
