"""A collator that puts cached features in the batch in place of the cached experts' pixels."""

from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Any, Sequence

import torch
from torch import nn

from ..sharding import local_tensor
from .keys import CacheKey, cache_key, find_backbone, image_hash
from .store import FeatureCache

#: Where each kind goes in the model's forward.
BATCH_KEYS = {"tower": "tower_features", "projected": "expert_features"}


def _example_images(example: dict[str, Any]) -> list:
    images = example.get("images")
    if images is None and example.get("image") is not None:
        images = [example["image"]]
    return list(images or [])


class CachedFeatureCollator:
    """Wraps a VLM collator: cached features in, the cached roles' pixels out.

    Calls ``base_collator(examples)`` (TRL-style: each example has an ``images`` list, or an
    ``image``), then looks up the features of every image of the batch, in order, and sets
    ``batch["tower_features"] = {role: (n_views, N, D_i)}`` for ``tower_roles`` and
    ``batch["expert_features"] = {role: C_i}`` for ``projected_roles``, removing their
    ``pixel_values_<role>``. ``processor`` is the processor the base collator uses.

    Fingerprints are computed here, once; the modules of the cached roles must be frozen (no
    parameter requires grad: tower for ``tower_roles``, tower and projector for ``projected_roles``).
    With ``check_versions`` the cheap version key is re-checked per batch while the model is alive
    in this process (in spawned dataloader workers the construction-time fingerprints are used).
    A stale or missing image raises :class:`StaleFeaturesError` / :class:`MissingFeaturesError`.
    """

    def __init__(self, base_collator, cache: FeatureCache, model: nn.Module, processor,
                 tower_roles: Sequence[str] = (), projected_roles: Sequence[str] = (), *, check_versions: bool = True):
        self.base_collator = base_collator
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        self.processor = processor
        self.tower_roles, self.projected_roles = list(tower_roles), list(projected_roles)
        overlap = set(self.tower_roles) & set(self.projected_roles)
        if overlap:
            raise ValueError(f"roles {sorted(overlap)} are in both tower_roles and projected_roles; pick one kind per role")
        backbone = find_backbone(model)
        for kind, roles in (("tower", self.tower_roles), ("projected", self.projected_roles)):
            for role in roles:
                if role not in backbone.towers:
                    raise ValueError(f"the model has no expert {role!r}; its experts are {list(backbone.towers)}")
                parts = {"tower": backbone.towers[role]}
                if kind == "projected":
                    parts["projector"] = backbone.projectors[role]
                for part, module in parts.items():
                    training = [name for name, p in module.named_parameters() if p.requires_grad]
                    if training:
                        raise ValueError(
                            f"cannot cache the {kind} features of expert {role!r}: its {part} is not frozen "
                            f"({len(training)} parameter(s) require grad, e.g. {training[0]}); cached features of a "
                            f"module that trains go stale at the first step -- freeze it or use "
                            f"{'tower_roles' if kind == 'projected' else 'pixels'} for it"
                        )
        self.keys = {(role, kind): cache_key(backbone, processor, role, kind)
                     for kind, roles in (("tower", self.tower_roles), ("projected", self.projected_roles)) for role in roles}
        self._model_ref = weakref.ref(backbone) if check_versions else None
        self._versions = None  # the tensor versions ``keys`` was last computed at (None: recompute at the next batch)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_model_ref"], state["_versions"] = None, None
        return state

    @staticmethod
    def _tensor_versions(backbone: nn.Module, role: str, kind: str):
        """Storage and in-place version of every tensor the ``kind`` features of ``role`` depend on."""
        modules = [backbone.towers[role]] + ([backbone.projectors[role]] if kind == "projected" else [])
        try:
            tensors = [local_tensor(t) for module in modules for t in itertools.chain(module.parameters(), module.buffers())]
            return tuple((t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference tensors have no version counter
            return None

    def _current_keys(self) -> dict[tuple[str, str], CacheKey]:
        backbone = self._model_ref() if self._model_ref is not None else None
        if backbone is not None:
            # The full key (config and weights fingerprint) is recomputed only when a tensor was
            # written or replaced since the last batch: hashing configs every batch cost ~10 ms a step.
            versions = {(role, kind): self._tensor_versions(backbone, role, kind) for role, kind in self.keys}
            if versions != self._versions or None in versions.values():
                self.keys = {(role, kind): cache_key(backbone, self.processor, role, kind) for role, kind in self.keys}
                self._versions = versions
        return self.keys

    def _batch_views(self, batch) -> int | None:
        """Views in the batch, from its ``<image>`` tokens (None when the processor does not say how many a view has)."""
        token_id, per_view = getattr(self.processor, "image_token_id", None), getattr(self.processor, "num_visual_tokens", None)
        if token_id is None or not per_view or "input_ids" not in batch:
            return None
        return int((torch.as_tensor(batch["input_ids"]) == token_id).sum()) // per_view

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [_example_images(example) for example in examples]  # before the base collator mutates them
        names = [str(example.get("image_id", f"example {i}")) + (f" image {j}" if len(imgs) > 1 else "")
                 for i, (example, imgs) in enumerate(zip(examples, images)) for j in range(len(imgs))]
        cached_roles = self.tower_roles + self.projected_roles
        # An AstreaProcessor can leave the cached experts' pixels out instead of resizing and
        # normalising every image for them only to have them dropped here.
        skipping = getattr(self.processor, "skip_pixels", None)
        with skipping(cached_roles) if skipping is not None else contextlib.nullcontext():
            batch = self.base_collator(examples)
        flat = [image for item in images for image in item]
        if not flat:
            return batch
        hashes = [image_hash(image) for image in flat]
        views = self._batch_views(batch)
        for (role, kind), key in self._current_keys().items():
            features = self.cache.lookup_hashes(key, hashes, names)
            pixels = batch.pop(f"pixel_values_{role}", None)
            batch.pop(f"pixel_mask_{role}", None)
            n_views = pixels.shape[0] if pixels is not None else views
            if n_views is not None and n_views != features.shape[0]:
                raise ValueError(
                    f"the batch has {n_views} views of expert {role!r} but the cache gives {features.shape[0]}: "
                    f"the base collator's images are not the examples' `images` in order"
                )
            target = batch.get(BATCH_KEYS[kind]) or {}
            batch[BATCH_KEYS[kind]] = {**target, role: features}
        return batch
