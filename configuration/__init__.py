"""Configuration classes and presets of Astrea (``astrea_vlm.configuration``)."""

from .configuration_astrea import EXPERT_ROLES, TOWER_KINDS, AstreaConfig, AstreaExpertConfig
from .presets import PRESETS, get_preset

__all__ = ["AstreaConfig", "AstreaExpertConfig", "EXPERT_ROLES", "TOWER_KINDS", "PRESETS", "get_preset"]
