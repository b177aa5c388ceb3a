"""astrea_vlm: Astrea, a Hugging Face-native mixture-of-experts VLM with progressive pre-alignment.

The repository's folders install under this one namespace:
``configuration/`` -> ``astrea_vlm.configuration``, ``modeling_astrea/`` -> ``astrea_vlm.modeling``,
``processing/`` -> ``astrea_vlm.processing``, ``train/`` -> ``astrea_vlm.train``,
``eval/`` -> ``astrea_vlm.eval``.

The public names load on first use (PEP 562), so ``import astrea_vlm`` -- and ``astrea --help`` --
does not import torch or transformers. Importing the model (``from astrea_vlm import
AstreaForConditionalGeneration``, or ``astrea_vlm.modeling``) registers Astrea with transformers'
Auto classes.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "AstreaConfig": ".configuration",
    "AstreaExpertConfig": ".configuration",
    "get_preset": ".configuration",
    "AstreaForConditionalGeneration": ".modeling",
    "AstreaModel": ".modeling",
}

__all__ = ["AstreaConfig", "AstreaExpertConfig", "AstreaForConditionalGeneration", "AstreaModel", "get_preset"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
