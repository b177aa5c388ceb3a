"""Configuration classes and presets of Astrea (``astrea_vlm.configuration``)."""

from .configuration_astrea import EXPERT_ROLES, AstreaConfig, AstreaExpertConfig, get_preset, tower_kinds
from .presets import PRESETS, merge_overrides

__all__ = ["AstreaConfig", "AstreaExpertConfig", "EXPERT_ROLES", "PRESETS", "get_preset", "merge_overrides", "tower_kinds"]


def _register_auto_config() -> None:
    """``AutoConfig`` resolves ``model_type="astrea"`` once the configuration is imported (the processor
    needs it too, and ``import astrea_vlm`` no longer imports the model)."""
    from transformers import AutoConfig

    AutoConfig.register("astrea", AstreaConfig, exist_ok=True)
    AutoConfig.register("astrea_expert", AstreaExpertConfig, exist_ok=True)


_register_auto_config()
