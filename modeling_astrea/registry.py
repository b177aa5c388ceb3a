"""Every expert tower kind, one import line each, and the factory that builds them.

Adding a tower kind is one file, ``tower_<kind>.py`` (a class decorated with ``@register_tower``),
plus its import line below; :data:`TOWER_REGISTRY` is the only list of kinds (the configuration
checks ``kind`` and ``tower_config`` against it). One ``from .module import name`` per line: the
trust_remote_code loader follows only that form of relative import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tower_grounding_dino import GroundingDinoTower  # noqa: F401
from .tower_hf_vision import HFVisionTower  # noqa: F401
from .tower_ram_plus import RamPlusTower  # noqa: F401
from .tower_sam2 import Sam2Tower  # noqa: F401
from .tower_siglip import SiglipTower  # noqa: F401
from .tower_timm import TimmTower  # noqa: F401
from .towers import TOWER_REGISTRY, ExpertTower

if TYPE_CHECKING:
    from ..configuration.configuration_astrea import AstreaExpertConfig


def tower_class(kind: str) -> type[ExpertTower]:
    """The registered tower class of ``kind``."""
    if kind not in TOWER_REGISTRY:
        raise ValueError(f"unknown expert kind {kind!r}; registered kinds: {sorted(TOWER_REGISTRY)}")
    return TOWER_REGISTRY[kind]


def build_tower(config: AstreaExpertConfig) -> ExpertTower:
    """Build a randomly initialised tower of ``config.kind``."""
    return tower_class(config.kind)(config)


__all__ = ["TOWER_REGISTRY", "build_tower", "tower_class"]
