"""Cache keys: what cached features depend on, as fingerprints (see ``docs/feature_cache.md``).

An entry is found by ``(group, image hash)``. The image hash is the sha256 of the decoded RGB pixels
(the processor's own decoding); the group (:class:`CacheKey`) is the expert role, the kind, the
preprocessing spec and the weights fingerprints of the tower (and projector). Weights fingerprints
are memoised per module and tensor version, so recomputing them every batch is cheap. A module
sharded with FSDP2 has the fingerprint of its whole weights (gathered: every rank computes it).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...modeling.modeling_astrea import find_backbone
from ..sharding import full_tensor, local_tensor, unsharded_class

FORMAT = "astrea-feature-cache"
FORMAT_VERSION = 1
KINDS = ("tower", "projected")
# Config fields that cannot change a module's output (or whose effect the state dict already
# carries): leaving them out keeps a reloaded model's fingerprint equal to the original's.
_IGNORED_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "pretrained", "dtype", "torch_dtype", "architectures",
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "frozen", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "_commit_hash",
    "use_cache", "auto_map",
})


def rgb_image(image):
    from ...processing.image_processing_astrea import to_pil_rgb

    return to_pil_rgb(image)


def image_hash(image) -> str:
    """sha256 (hex) of an image's decoded RGB pixels and size (any input ``AstreaProcessor`` accepts)."""
    rgb = rgb_image(image)
    digest = hashlib.sha256(f"astrea-rgb:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _clean_config(value):
    if isinstance(value, dict):
        return {k: _clean_config(v) for k, v in sorted(value.items()) if k not in _IGNORED_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_clean_config(v) for v in value]
    return value


def _describe_module(module: nn.Module) -> str:
    """What, besides the state dict, fixes a module's output: its class and config (or its repr)."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        body: Any = _clean_config(config.to_dict())
    else:
        body = repr(module)
    extra = {name: getattr(module, name) for name in ("kind", "grid", "out_dim") if hasattr(module, name)}
    return json.dumps({"class": unsharded_class(module).__name__, "config": body, **extra}, sort_keys=True, default=str)


def _version_key(module: nn.Module, description: str):
    try:
        tensors = tuple(
            (name, local_tensor(t).data_ptr(), local_tensor(t)._version, str(t.dtype), tuple(t.shape), str(t.device))
            for name, t in module.state_dict(keep_vars=True).items()
        )
    except RuntimeError:  # inference tensors have no version counter: never memoise
        return None
    return description, tensors


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


_WEIGHTS_MEMO: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str]] = weakref.WeakKeyDictionary()


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's description (class, config or repr) and state dict (names, dtypes, shapes, bytes).

    Memoised per module and version key (see the module docstring), so calling it every batch is cheap.
    """
    description = _describe_module(module)
    key = _version_key(module, description)
    memo = _WEIGHTS_MEMO.get(module)
    if key is not None and memo is not None and memo[0] == key:
        return memo[1]
    digest = hashlib.sha256(description.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint {type(module).__name__}: {name} is on the meta device")
        digest.update(_tensor_bytes(full_tensor(tensor)))
    fingerprint = digest.hexdigest()
    if key is not None:
        _WEIGHTS_MEMO[module] = (key, fingerprint)
    return fingerprint


def clear_fingerprint_memo() -> None:
    """Forget memoised weights fingerprints (needed only after writes through ``param.data``)."""
    _WEIGHTS_MEMO.clear()


def astrea_image_processor(processor):
    image_processor = getattr(processor, "image_processor", processor)
    if not hasattr(image_processor, "experts") or not hasattr(image_processor, "pixels_for_views"):
        raise TypeError(f"expected an AstreaProcessor or AstreaImageProcessor, got {type(processor).__name__}")
    return image_processor


def preprocessing_spec(model: nn.Module, processor, role: str) -> dict[str, Any]:
    """Everything on the pixel side that an expert's features depend on (part of :class:`CacheKey`)."""
    backbone = find_backbone(model)
    image_processor = astrea_image_processor(processor)
    if role not in image_processor.experts:
        raise ValueError(f"the processor has no image spec for expert {role!r}; it has {sorted(image_processor.experts)}")
    num_visual_tokens = int(backbone.config.num_visual_tokens)
    processor_tokens = getattr(processor, "num_visual_tokens", num_visual_tokens)
    if processor_tokens != num_visual_tokens:
        raise ValueError(f"the processor makes {processor_tokens} visual tokens per view but the model {num_visual_tokens}")
    spec = image_processor.experts[role]
    pinpoints = image_processor.image_grid_pinpoints
    return {
        "format_version": FORMAT_VERSION,
        "image_processor": type(image_processor).__name__,
        "size": int(spec["size"]),
        "image_mean": [float(v) for v in spec["image_mean"]],
        "image_std": [float(v) for v in spec["image_std"]],
        "resample": spec["resample"],
        "resize_on": spec.get("resize_on", "pil"),
        "keep_aspect_ratio": bool(spec.get("keep_aspect_ratio", False)),
        "max_size": spec.get("max_size"),
        "num_visual_tokens": num_visual_tokens,
        "image_grid_pinpoints": [list(p) for p in pinpoints] if pinpoints else None,
        "tile_size": int(image_processor.tile_size) if pinpoints else None,
        "max_image_pixels": int(image_processor.max_image_pixels),
    }


@dataclass(frozen=True)
class CacheKey:
    """The group an expert's cached features belong to: role, kind and every fingerprint they depend on."""

    role: str
    kind: str
    preprocessing: dict[str, Any] = field(compare=False, hash=False)
    weights: dict[str, str] = field(compare=False, hash=False)
    group_id: str = ""

    @property
    def dirname(self) -> str:
        return f"{self.role}.{self.kind}.{self.group_id[:16]}"


def cache_key(model: nn.Module, processor, role: str, kind: str = "tower") -> CacheKey:
    """The :class:`CacheKey` of ``role``'s ``kind`` features for this model and processor (cheap: memoised hashes)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}")
    backbone = find_backbone(model)
    if role not in backbone.towers:
        raise ValueError(f"the model has no expert {role!r}; its experts are {list(backbone.towers)}")
    preprocessing = preprocessing_spec(backbone, processor, role)
    weights = {"tower": weights_fingerprint(backbone.towers[role])}
    if kind == "projected":
        weights["projector"] = weights_fingerprint(backbone.projectors[role])
    payload = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "role": role, "kind": kind,
                          "preprocessing": preprocessing, "weights": weights}, sort_keys=True)
    return CacheKey(role, kind, preprocessing, weights, hashlib.sha256(payload.encode()).hexdigest())
