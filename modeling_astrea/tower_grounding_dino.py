"""Grounding-DINO tower: the detection expert (transformers' ``GroundingDinoModel``; the open
Grounding-DINO base, Swin-B, in the paper presets -- 1.5 has no public weights).

A fixed class-agnostic prompt (``config.prompt_ids``) drives the text branch. The tokens are the
encoder's text-enhanced image memory on one pyramid level (``token_source="encoder"``, a grid) or
the decoder's score-ranked object queries with their boxes (``"queries"``). With ``keep_aspect_ratio``
every image is cut out of its batch padding (``pixel_mask``) and run unpadded, as the original does.
The prompt, the padding, the grid sizes and the checkpoints it loads: ``docs/towers.md``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re

import torch
from torch import nn
from transformers import GroundingDinoForObjectDetection, GroundingDinoModel, PreTrainedModel
from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoMLPPredictionHead

from .projector import resample_grid
from .towers import ExpertTower, _named_non_persistent_buffers, fit_attn_implementation, load_into, register_tower

#: Keys of the detection head that sits outside ``GroundingDinoModel`` (``class_embed`` has no
#: weights in transformers but may appear in converted checkpoints).
_HEAD_KEY = re.compile(r"^(model\.)?(decoder\.)?(bbox_embed|class_embed)\.")


def grounding_dino_level_shapes(tower_config, image_size: int | tuple[int, int]) -> list[tuple[int, int]]:
    """``(h, w)`` of every encoder pyramid level for an input of ``image_size`` (a square side or ``(height, width)``)."""
    backbone = tower_config.backbone_config
    if backbone.model_type != "swin":
        raise ValueError(
            f"grounding_dino tower: cannot derive the pyramid grid of a {backbone.model_type!r} backbone; "
            f"the tower supports Swin backbones (every published Grounding-DINO uses one)"
        )
    patch = backbone.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size

    def sides(length: int) -> list[int]:
        stage_side = {1: math.ceil(length / patch)}
        for stage in range(2, len(backbone.depths) + 1):
            stage_side[stage] = math.ceil(stage_side[stage - 1] / 2)
        out = [stage_side[index] for index in backbone.out_indices]
        for _ in range(tower_config.num_feature_levels - len(out)):
            out.append(math.ceil(out[-1] / 2))  # 3x3 conv, stride 2, padding 1
        return out

    return list(zip(sides(height), sides(width)))


def image_sizes_from_mask(pixel_mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(height, width)`` of each image in a bottom/right zero-padded batch, from its 1/0 mask.

    Raises ``ValueError`` unless every mask is 1 on exactly a non-empty top-left rectangle.
    """
    mask = pixel_mask.bool()
    heights, widths = mask[:, :, 0].sum(1), mask[:, 0, :].sum(1)
    rows = torch.arange(mask.shape[1], device=mask.device)[None, :, None] < heights[:, None, None]
    cols = torch.arange(mask.shape[2], device=mask.device)[None, None, :] < widths[:, None, None]
    if not bool((mask == (rows & cols)).all()) or bool((heights == 0).any()):
        raise ValueError(
            "grounding_dino tower: each pixel_mask must be 1 on the image, a non-empty rectangle at the top left, "
            "and 0 on the padding at the bottom and right (as AstreaProcessor pads)"
        )
    return list(zip(heights.tolist(), widths.tolist()))


def attach_box_head(model: GroundingDinoModel) -> None:
    """Give ``model.decoder`` the box-regression head of ``GroundingDinoForObjectDetection``.

    One 3-layer MLP per decoder layer, initialised as transformers does (last layer zero, so a fresh
    head leaves the reference boxes unchanged). With ``decoder_bbox_embed_share`` (the released
    models) transformers ties the layers' heads; here they are equal copies instead, not shared
    tensors: an Astrea checkpoint stores every tensor once and ``save_pretrained`` refuses shared
    tensors it has no tie declaration for. The copies are equal after loading and stay equal while
    the tower is frozen (the paper's setting).
    """
    config = model.config

    def new_head():
        head = GroundingDinoMLPPredictionHead(config.d_model, config.d_model, 4, num_layers=3)
        for module in head.modules():
            model._init_weights(module)
        return head

    if config.decoder_bbox_embed_share:
        first = new_head()
        heads = [first] + [copy.deepcopy(first) for _ in range(config.decoder_layers - 1)]
    else:
        heads = [new_head() for _ in range(config.decoder_layers)]
    model.decoder.bbox_embed = nn.ModuleList(heads)


def _no_input_embeddings():
    return None


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bars; the tower raises its own precise errors."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@register_tower("grounding_dino")
class GroundingDinoTower(ExpertTower):
    """Grounding-DINO with a fixed prompt; encoder-memory grid tokens or score-ranked query tokens."""

    tower_model_types = ("grounding-dino",)
    preprocessing = ("bilinear", "pil", True)  # load_image: RandomResize([800], max_size=1333) on PIL

    @classmethod
    def tokens_on_grid(cls, config) -> bool:
        return config.token_source == "encoder"  # the queries are ranked, not placed

    def __init__(self, config):
        super().__init__(config)
        tower_config = config.tower_config
        self._check_prompt(config, tower_config)
        fit_attn_implementation(tower_config, GroundingDinoModel)
        self.model = GroundingDinoModel(tower_config)
        # transformers' `enable_input_require_grads` (run by `gradient_checkpointing_enable` on the
        # whole Astrea model) hooks the output of every sub-model's `get_input_embeddings()` with
        # `requires_grad_`. Swin (SwinBackbone and its inner SwinModel) reports its patch embedding,
        # which returns a tuple, and the hook crashes. The image backbone has no token embeddings to
        # make trainable, so its sub-models report none (instance attributes: classes untouched).
        for module in self.model.backbone.modules():
            if isinstance(module, PreTrainedModel):
                module.get_input_embeddings = _no_input_embeddings
        queries = config.token_source == "queries"
        if queries and tower_config.backbone_config.model_type != "swin":
            self.level_shapes = None  # not needed for query tokens, and only derivable for Swin
        else:
            self.level_shapes = grounding_dino_level_shapes(tower_config, config.image_size)
            positions = sum(h * w for h, w in self.level_shapes)
            if tower_config.two_stage and positions < tower_config.num_queries:
                raise ValueError(
                    f"grounding_dino tower: at {config.image_size} px the encoder has {positions} positions, fewer "
                    f"than num_queries={tower_config.num_queries} (two-stage query selection picks the top ones)"
                )
        if queries:
            attach_box_head(self.model)
            self.grid = None
            self.out_dim = tower_config.d_model + 4
        else:
            if not 0 <= config.feature_level < len(self.level_shapes):
                raise ValueError(
                    f"grounding_dino tower: feature_level={config.feature_level} is out of range; the encoder "
                    f"has {len(self.level_shapes)} pyramid levels {self.level_shapes} (0 = finest)"
                )
            self.grid = self.level_shapes[config.feature_level]
            self.out_dim = tower_config.d_model
        self.freeze_if_configured()

    @staticmethod
    def _check_prompt(config, tower_config) -> None:
        ids = config.prompt_ids
        if not ids:
            raise ValueError("grounding_dino tower: `prompt_ids` (token ids of the fixed text prompt) must be set")
        text = tower_config.text_config
        limit = min(tower_config.max_text_len, text.max_position_embeddings)
        if len(ids) > limit:
            raise ValueError(f"grounding_dino tower: the prompt has {len(ids)} tokens, more than the model takes ({limit})")
        if not all(0 <= i < text.vocab_size for i in ids):
            raise ValueError(f"grounding_dino tower: prompt_ids {ids} must index the text vocabulary (size {text.vocab_size})")

    # ------------------------------------------------------------------ forward
    def _run(self, pixel_values: torch.Tensor):
        batch = pixel_values.shape[0]
        input_ids = torch.tensor(self.config.prompt_ids, dtype=torch.long, device=pixel_values.device)
        input_ids = input_ids.unsqueeze(0).expand(batch, -1)
        seen = {}

        def record_shapes(module, args, kwargs):
            seen["shapes"] = [tuple(int(s) for s in shape) for shape in kwargs["spatial_shapes_list"]]

        handle = self.model.encoder.register_forward_pre_hook(record_shapes, with_kwargs=True)
        try:
            out = self.model(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                token_type_ids=torch.zeros_like(input_ids),
                return_dict=True,
            )
        finally:
            handle.remove()
        return out, seen["shapes"]

    def encode(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        if pixel_mask is None:
            return self._encode_unpadded(pixel_values)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(image_sizes_from_mask(pixel_mask)):
            groups.setdefault(size, []).append(index)
        if len(groups) == 1 and next(iter(groups)) == tuple(pixel_values.shape[-2:]):
            return self._encode_unpadded(pixel_values)
        tokens: torch.Tensor | None = None
        for (height, width), indices in groups.items():
            group = self._encode_unpadded(pixel_values[indices, :, :height, :width])
            if tokens is None:
                tokens = group.new_empty((pixel_values.shape[0], *group.shape[1:]))
            tokens[indices] = group
        return tokens

    def _encode_unpadded(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out, shapes = self._run(pixel_values)
        if self.level_shapes is not None:
            expected = grounding_dino_level_shapes(self.config.tower_config, tuple(pixel_values.shape[-2:]))
            if shapes != expected:
                raise RuntimeError(
                    f"grounding_dino tower: the encoder ran on pyramid levels {shapes}, but the config implies {expected}"
                )
        if self.config.token_source == "queries":
            return self._query_tokens(out)
        level = self.config.feature_level
        start = sum(h * w for h, w in shapes[:level])
        h, w = shapes[level]
        tokens = out.encoder_last_hidden_state_vision[:, start : start + h * w]
        if (h, w) == tuple(self.grid):
            return tokens
        # Another size than the token grid (an aspect-preserving input): resample the level map.
        feature_map = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        return resample_grid(feature_map, self.grid).flatten(2).transpose(1, 2)

    def _query_tokens(self, out) -> torch.Tensor:
        queries = out.last_hidden_state  # (B, Q, d), layer-normed like the heads' input
        text = out.encoder_last_hidden_state_text  # (B, T, d)
        scores = (queries @ text.transpose(-1, -2)).amax(-1)  # every prompt token is valid (all-ones mask)
        if self.model.config.decoder_layers > 1:
            reference = out.intermediate_reference_points[:, -2]  # the boxes the last layer refined
        else:
            reference = out.init_reference_points
        delta = self.model.decoder.bbox_embed[-1](queries)
        boxes = (delta + torch.special.logit(reference, eps=1e-5)).sigmoid()
        tokens = torch.cat([queries, boxes.to(queries.dtype)], dim=-1)
        order = scores.argsort(dim=1, descending=True, stable=True)
        return tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, source: str, **hub_kwargs) -> None:
        """Load a ``GroundingDinoModel`` or ``GroundingDinoForObjectDetection`` folder / Hub id."""
        queries = self.config.token_source == "queries"
        cls = GroundingDinoForObjectDetection if queries else GroundingDinoModel
        with _quiet_transformers():
            loaded, info = cls.from_pretrained(
                source,
                config=copy.deepcopy(self.config.tower_config),
                dtype=self.input_dtype,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below as a ValueError instead
                **hub_kwargs,
            )
        mismatched = list(info.get("mismatched_keys") or [])
        if mismatched:
            raise ValueError(
                f"weights from {source} have other shapes than the tower ({len(mismatched)} tensors, e.g. "
                f"{mismatched[:3]}); check that the expert's tower_config matches the checkpoint"
            )
        missing = set(info.get("missing_keys") or [])
        unexpected = set(info.get("unexpected_keys") or [])
        if queries and missing and all(_HEAD_KEY.match(k) for k in missing):
            raise ValueError(
                f"weights from {source} have no box head ({sorted(missing)[:3]} missing): token_source='queries' "
                f"needs a GroundingDinoForObjectDetection checkpoint, this looks like a bare GroundingDinoModel"
            )
        # Strip the detection head, and the buffers older checkpoints saved that the model now
        # recomputes (Swin `relative_position_index` under its legacy `attention.self.` path, BERT
        # `position_ids`): matched by their buffer name, which no weight carries.
        buffer_names = {name.rsplit(".", 1)[-1] for name, _ in _named_non_persistent_buffers(loaded)}
        unexpected = {k for k in unexpected if not _HEAD_KEY.match(k) and k.rsplit(".", 1)[-1] not in buffer_names}
        if missing or unexpected:
            raise ValueError(
                f"weights from {source} do not match the tower's Grounding-DINO: {len(missing)} missing "
                f"(e.g. {sorted(missing)[:5]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:5]}); "
                f"check that the expert's tower_config matches the checkpoint"
            )
        base = loaded.model if queries else loaded
        load_into(self.model, base.state_dict(), source)
        self.freeze_if_configured()


__all__ = ["GroundingDinoTower", "grounding_dino_level_shapes", "attach_box_head", "image_sizes_from_mask"]
