"""SigLIP tower: the captioning / global expert (SigLIP SO400M/14@384 in the paper presets).

27x27 = 729 patch tokens of width 1152 at 384 px; no CLS token. The presets read the penultimate
layer (``feature_layer=-2``), as LLaVA does for CLIP.
"""

from __future__ import annotations

from .tower_hf_vision import HFVisionTower
from .towers import register_tower


@register_tower("siglip")
class SiglipTower(HFVisionTower):
    """A :class:`HFVisionTower` restricted to ``siglip_vision_model`` / ``siglip2_vision_model`` configs."""

    tower_model_types = ("siglip_vision_model", "siglip2_vision_model")
    preprocessing = ("bicubic", "pil", False)  # the released preprocessor_config.json: resample 3, 384x384
