"""Feature cache for progressive pre-alignment (paper §3.1.2): frozen expert features computed once per image.

The towers are frozen for the whole of training, and after stage k the projector of expert k is
frozen too, so their outputs are pure functions of the image: :class:`FeatureCache` (:mod:`.store`)
computes them once into memory-mapped safetensors shards, keyed by fingerprints of everything they
depend on (:mod:`.keys`), and :class:`CachedFeatureCollator` (:mod:`.collator`) puts them in every
training batch in place of pixels. Formats, keys, crash safety: ``docs/feature_cache.md``.
"""

from .collator import BATCH_KEYS, CachedFeatureCollator
from .keys import KINDS, CacheKey, cache_key, clear_fingerprint_memo, image_hash, preprocessing_spec, weights_fingerprint
from .store import FeatureCache, FeatureCacheError, MissingFeaturesError, StaleFeaturesError

__all__ = [
    "BATCH_KEYS",
    "KINDS",
    "CacheKey",
    "CachedFeatureCollator",
    "FeatureCache",
    "FeatureCacheError",
    "MissingFeaturesError",
    "StaleFeaturesError",
    "cache_key",
    "clear_fingerprint_memo",
    "image_hash",
    "preprocessing_spec",
    "weights_fingerprint",
]
