"""SAM2 tower: the segmentation expert (transformers' ``Sam2VisionModel``, Hiera trunk + FPN neck;
SAM2.1 Hiera-L in the paper presets).

The tokens are FPN level ``config.feature_level`` in raster order. Weights: the original SAM2
checkpoints (keys renamed by :func:`convert_original_sam2_state_dict`) or a transformers folder.
Which level is which, and the key mapping: ``docs/towers.md``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import Sam2VisionModel

from .towers import ExpertTower, fit_attn_implementation, load_into, load_state_dict_file, register_tower, resolve_weights_file, tokens_from_feature_map

#: Ordered (pattern, replacement) pairs turning original ``image_encoder.*`` names into
#: ``Sam2VisionModel`` names. Every ``image_encoder.*`` key must match one of them.
ORIGINAL_TO_HF_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"^image_encoder\.trunk\.patch_embed\.proj\.(weight|bias)$", r"backbone.patch_embed.projection.\1"),
    (r"^image_encoder\.trunk\.(pos_embed|pos_embed_window)$", r"backbone.\1"),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.norm([12])\.(weight|bias)$", r"backbone.blocks.\1.layer_norm\2.\3"),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$", r"backbone.blocks.\1.attn.\2.\3"),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.proj\.(weight|bias)$", r"backbone.blocks.\1.proj.\2"),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.0\.(weight|bias)$", r"backbone.blocks.\1.mlp.proj_in.\2"),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.1\.(weight|bias)$", r"backbone.blocks.\1.mlp.proj_out.\2"),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.(weight|bias)$", r"neck.convs.\1.\2"),
)
_COMPILED_PATTERNS = tuple((re.compile(pattern), replacement) for pattern, replacement in ORIGINAL_TO_HF_PATTERNS)

#: Files looked for when ``load_pretrained`` gets a folder or a bare Hub repo id.
_DEFAULT_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def convert_original_sam2_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original SAM2 state dict (``image_encoder.*`` keys) to ``Sam2VisionModel`` names.

    Keys outside ``image_encoder.`` (mask decoder, prompt encoder, memory modules) are dropped.
    An ``image_encoder.*`` key that matches no rule raises ``ValueError`` instead of being dropped
    silently: it means the checkpoint is not a Hiera + FpnNeck SAM2 encoder (e.g. a SAM 1 ViT).
    """
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if not key.startswith("image_encoder."):
            continue
        for pattern, replacement in _COMPILED_PATTERNS:
            new_key, hits = pattern.subn(replacement, key)
            if hits:
                converted[new_key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} image-encoder tensors have names a SAM2 Hiera + FPN image encoder does not use "
            f"(e.g. {unknown[:5]}); this is not an original SAM2/SAM2.1 checkpoint (a SAM 1 ViT encoder?)"
        )
    if not converted:
        raise ValueError("the checkpoint has no `image_encoder.*` tensors; it is not an original SAM2 checkpoint")
    return converted


def _read_hf_folder_weights(folder: Path) -> dict[str, torch.Tensor] | None:
    """State dict of a transformers folder (single file or sharded safetensors), or None if absent."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_state_dict_file(folder / shard))
        return state
    for name in _DEFAULT_FILENAMES:
        if (folder / name).is_file():
            return load_state_dict_file(folder / name)
    return None


@register_tower("sam2")
class Sam2Tower(ExpertTower):
    """SAM2 image encoder (Hiera + FPN) returning one FPN level as tokens ``(B, h*w, fpn_hidden_size)``."""

    tower_model_types = ("sam2_vision_model",)
    preprocessing = ("bilinear", "tensor", False)  # SAM2Transforms: ToTensor, then an antialiased Resize((1024, 1024))

    def __init__(self, config):
        super().__init__(config)
        tower_config = config.tower_config
        num_levels = tower_config.num_feature_levels
        if not 0 <= config.feature_level < num_levels:
            raise ValueError(
                f"sam2 tower: feature_level={config.feature_level} is out of range; Sam2VisionModel returns "
                f"{num_levels} FPN levels (0 = stride 4, finest; {num_levels - 1} = coarsest)"
            )
        fit_attn_implementation(tower_config, Sam2VisionModel)
        self.model = Sam2VisionModel(tower_config)
        self.grid = self._level_grid(tower_config, config.image_size, config.feature_level)
        self.out_dim = tower_config.fpn_hidden_size
        self.freeze_if_configured()

    @staticmethod
    def _level_grid(tower_config, image_size: int, level: int) -> tuple[int, int]:
        """Side of FPN level ``level`` for a square input, from the Hiera config.

        The patch embedding is a convolution (kernel 7, stride 4, padding 3 in SAM2), then each of
        the first ``num_query_pool_stages`` stage changes max-pools by ``query_stride`` (floor, as
        ``ceil_mode=False``). FPN level ``l`` has the resolution of Hiera stage ``l``.
        """
        backbone = tower_config.backbone_config

        def pair(value):
            return tuple(value) if isinstance(value, (list, tuple)) else (value, value)

        kernel, stride, padding = pair(backbone.patch_kernel_size), pair(backbone.patch_stride), pair(backbone.patch_padding)
        query_stride = pair(backbone.query_stride)
        side = [(image_size + 2 * padding[d] - kernel[d]) // stride[d] + 1 for d in range(2)]
        for stage in range(1, level + 1):
            if stage <= backbone.num_query_pool_stages:
                side = [side[d] // query_stride[d] for d in range(2)]
        return side[0], side[1]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        feature_map = out.fpn_hidden_states[self.config.feature_level]  # (B, C, h, w)
        if tuple(feature_map.shape[-2:]) != self.grid:
            raise RuntimeError(
                f"sam2 tower: FPN level {self.config.feature_level} is {tuple(feature_map.shape[-2:])}, "
                f"but the config implies {self.grid}"
            )
        return tokens_from_feature_map(feature_map)

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, source: str, **hub_kwargs) -> None:
        """Load an original SAM2 ``.pt`` or a transformers SAM2 folder / Hub repo (see module docstring)."""
        state = self._read_source(source, **hub_kwargs)
        load_into(self.model, self._to_vision_model_keys(state, source), source)
        self.freeze_if_configured()

    @staticmethod
    def _read_source(source: str, **hub_kwargs) -> dict[str, torch.Tensor]:
        path = Path(str(source)).expanduser()
        if path.is_dir():
            state = _read_hf_folder_weights(path)
            if state is not None:
                return state
            checkpoints = sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
            if len(checkpoints) == 1:
                return load_state_dict_file(checkpoints[0])
            raise FileNotFoundError(
                f"no SAM2 weights in {path}: expected {list(_DEFAULT_FILENAMES)}, a sharded safetensors index or "
                f"exactly one original .pt checkpoint (found {[c.name for c in checkpoints]})"
            )
        return load_state_dict_file(resolve_weights_file(str(source), _DEFAULT_FILENAMES, **hub_kwargs))

    @staticmethod
    def _to_vision_model_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """Recognise the checkpoint layout and return ``Sam2VisionModel`` keys."""
        keys = list(state)
        if any(k.startswith("image_encoder.") for k in keys):  # original SAM2 / SAM2.1 release
            return convert_original_sam2_state_dict(state)
        if any(k.startswith("vision_encoder.") for k in keys):  # transformers Sam2Model / Sam2VideoModel
            prefix = "vision_encoder."
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if any(k.startswith(("backbone.", "neck.")) for k in keys):  # transformers Sam2VisionModel
            return dict(state)
        raise ValueError(
            f"weights from {source} are not a SAM2 image encoder: expected original `image_encoder.*` keys or "
            f"transformers `vision_encoder.*` / `backbone.*` keys, got e.g. {keys[:5]}"
        )


__all__ = ["Sam2Tower", "convert_original_sam2_state_dict", "ORIGINAL_TO_HF_PATTERNS"]
