"""Old home of recipe parsing and the trainable groups: see :mod:`.recipe` and :mod:`.stages`.

Kept so that ``astrea_vlm.train.schedule`` imports keep working.
"""

from .recipe import PAPER_OPTIM, RECIPES_DIR, PhaseRecipe, Recipe, load_recipe, resolve_recipe
from .stages import ALIGN_GROUPS, INSTRUCT_GROUPS, configure_stage, format_audit, parameter_audit, trainable_modules

__all__ = [
    "ALIGN_GROUPS", "INSTRUCT_GROUPS", "PAPER_OPTIM", "RECIPES_DIR", "PhaseRecipe", "Recipe", "configure_stage",
    "format_audit", "load_recipe", "parameter_audit", "resolve_recipe", "trainable_modules",
]
