"""Astrea modeling (``astrea_vlm.modeling``): towers, projectors, bridge, fusion and the model."""

from .bridge import ResidualBridge
from .fusion import ExpertRouter, MoEFusion
from .modeling_astrea import AstreaForConditionalGeneration, AstreaModel, AstreaPreTrainedModel, find_backbone
from .projector import ExpertProjector, resample_tokens
from .registry import TOWER_REGISTRY, build_tower
from .towers import ExpertTower, register_tower

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
    "find_backbone",
    "register_tower",
    "resample_tokens",
]


def _register_auto_classes() -> None:
    """Let AutoConfig / AutoModel / AutoModelForImageTextToText resolve ``model_type="astrea"`` in-process."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from ..configuration import AstreaConfig, AstreaExpertConfig

    AutoConfig.register("astrea", AstreaConfig, exist_ok=True)
    AutoConfig.register("astrea_expert", AstreaExpertConfig, exist_ok=True)
    AutoModel.register(AstreaConfig, AstreaModel, exist_ok=True)
    AutoModelForImageTextToText.register(AstreaConfig, AstreaForConditionalGeneration, exist_ok=True)


_register_auto_classes()
