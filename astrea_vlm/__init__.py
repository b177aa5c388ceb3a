"""astrea_vlm: Astrea, a Hugging Face-native mixture-of-experts VLM with progressive pre-alignment.

The repository's folders install under this one namespace:
``configuration/`` -> ``astrea_vlm.configuration``, ``modeling_astrea/`` -> ``astrea_vlm.modeling``,
``processing/`` -> ``astrea_vlm.processing``, ``train/`` -> ``astrea_vlm.train``,
``eval/`` -> ``astrea_vlm.eval``.
"""

__version__ = "0.1.0"

from .configuration import AstreaConfig, AstreaExpertConfig, get_preset  # noqa: E402
from .modeling import AstreaForConditionalGeneration, AstreaModel  # noqa: E402

__all__ = ["AstreaConfig", "AstreaExpertConfig", "AstreaForConditionalGeneration", "AstreaModel", "get_preset"]
