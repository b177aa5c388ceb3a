"""SAM2 tower: the segmentation expert (SAM2.1 Hiera-L image encoder in the paper presets).

The tower is transformers' native :class:`~transformers.Sam2VisionModel` -- the Hiera trunk plus
SAM2's FPN neck -- built from ``config.tower_config`` (a ``sam2_vision_model`` config). Nothing of
the ``sam2`` package is needed at run time.

Which tokens
    ``Sam2VisionModel`` returns ``fpn_hidden_states`` from high to low resolution: level 0 is the
    stride-4 map, level 1 stride 8, level 2 stride 16 (the lowest, stride-32 neck output is dropped,
    as SAM2's ``ImageEncoder(scalp=1)`` does). Levels 0 and 1 are the lateral 1x1 projections of
    Hiera stages 1 and 2 only (``fpn_top_down_levels=[2, 3]``); level 2 also receives the
    upsampled stride-32 features and is what SAM2 calls the *image embedding* (``vision_features``,
    64x64x256 at 1024 px). The tower returns level ``config.feature_level`` flattened in raster
    order to ``(B, h*w, fpn_hidden_size)``; the paper presets take level 2.

    SAM2's image predictor adds a learned constant ``no_mem_embed`` to that embedding before the
    mask decoder. It is a single vector added to every token, which the expert projector's first
    linear layer absorbs into its bias, so the tower leaves it out (it is not part of the image
    encoder's weights either).

Weights (:meth:`Sam2Tower.load_pretrained`)
    * the ORIGINAL SAM2 / SAM2.1 checkpoints (``sam2.1_hiera_large.pt``: a torch pickle
      ``{"model": state_dict}``), read with ``torch.load(weights_only=True)``. Only the
      ``image_encoder.trunk.*`` (Hiera) and ``image_encoder.neck.*`` (FpnNeck) tensors are used;
      their names are converted by :func:`convert_original_sam2_state_dict` (mapping below). The
      rest (``sam_mask_decoder.*``, ``sam_prompt_encoder.*``, ``memory_attention.*``,
      ``memory_encoder.*``, ``no_mem_embed``, ...) belongs to the prompt/video parts and is ignored;
    * a transformers folder (or Hub id) holding a saved ``Sam2VisionModel`` (keys ``backbone.*``,
      ``neck.*``) or ``Sam2Model`` / ``Sam2VideoModel`` (the same under ``vision_encoder.``).

Original -> transformers key mapping (checked numerically against the ``sam2`` 1.1.0 sources; see
the tests)::

    image_encoder.trunk.patch_embed.proj.*         -> backbone.patch_embed.projection.*
    image_encoder.trunk.pos_embed                  -> backbone.pos_embed
    image_encoder.trunk.pos_embed_window           -> backbone.pos_embed_window
    image_encoder.trunk.blocks.N.norm1.*           -> backbone.blocks.N.layer_norm1.*
    image_encoder.trunk.blocks.N.norm2.*           -> backbone.blocks.N.layer_norm2.*
    image_encoder.trunk.blocks.N.attn.qkv.*        -> backbone.blocks.N.attn.qkv.*
    image_encoder.trunk.blocks.N.attn.proj.*       -> backbone.blocks.N.attn.proj.*
    image_encoder.trunk.blocks.N.proj.*            -> backbone.blocks.N.proj.*   (stage-change blocks)
    image_encoder.trunk.blocks.N.mlp.layers.0.*    -> backbone.blocks.N.mlp.proj_in.*
    image_encoder.trunk.blocks.N.mlp.layers.1.*    -> backbone.blocks.N.mlp.proj_out.*
    image_encoder.neck.convs.K.conv.*              -> neck.convs.K.*

Both implementations index blocks and neck convolutions the same way (neck conv ``K`` reads Hiera
stage ``3 - K``), so indices are kept; no tensor is reshaped or transposed. The neck's sine
position encoding has no weights.
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
