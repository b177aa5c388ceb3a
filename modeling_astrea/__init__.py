"""Astrea modeling (``astrea_vlm.modeling``): towers, projectors, bridge, fusion and the model."""

from .bridge import ResidualBridge
from .fusion import ExpertRouter, MoEFusion
from .modeling_astrea import AstreaForConditionalGeneration, AstreaModel, AstreaPreTrainedModel
from .projector import ExpertProjector, resample_tokens
from .towers import TOWER_REGISTRY, ExpertTower, build_tower, register_tower

__all__ = [
    "AstreaForConditionalGeneration",
    "AstreaModel",
    "AstreaPreTrainedModel",
    "ExpertProjector",
    "ExpertRouter",
    "ExpertTower",
    "MoEFusion",
    "ResidualBridge",
    "TOWER_REGISTRY",
    "build_tower",
    "register_tower",
    "resample_tokens",
]
