"""Named Astrea configurations.

* ``tiny``       -- random, CPU-sized: every tower kind of the paper at toy width; builds and runs a
                    forward pass in well under 2 s on a 2-core CPU. Used by the tests and the demo.
* ``astrea-13b`` -- the paper's 13B model: Vicuna-1.5-13B, SigLIP SO400M/14@384, RAM++ (Swin-L@384),
                    Grounding-DINO and SAM2 Hiera-L.
* ``astrea-34b`` -- the same experts with Nous-Hermes-2-Yi-34B.

Grounding-DINO 1.5, which the paper uses, has no public weights: the paper presets use the open
Grounding-DINO (``IDEA-Research/grounding-dino-base``, Swin-B) instead.

Each ``pretrained`` field names where ``astrea create`` fetches the real part; every one of them
can be overridden with a local path.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

# Fixed, class-agnostic Grounding-DINO prompt "object ." in bert-base-uncased ids
# ([CLS] object . [SEP]); the detector's text branch needs some text.
GDINO_OBJECT_PROMPT_IDS = [101, 4874, 1012, 102]


# ------------------------------------------------------------------------------------- tiny
def _tiny_parts() -> dict[str, Any]:
    text_config = {
        "model_type": "llama",
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    caption = {
        "kind": "siglip",
        "image_size": 32,
        "image_mean": SIGLIP_MEAN,
        "image_std": SIGLIP_STD,
        "tower_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
    }
    classification = {
        "kind": "ram_plus",
        "image_size": 32,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "tower_config": {
            "model_type": "timm_wrapper",
            "architecture": "swin_tiny_patch4_window7_224",
            "model_args": {"img_size": 32, "embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2], "window_size": 4},
            "do_pooling": False,
        },
    }
    detection = {
        "kind": "grounding_dino",
        "image_size": 32,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        # "[CLS] <word 7> . [SEP]": the real prompt's layout. Grounding-DINO derives its phrase
        # attention mask and position ids from the ids 101/102/1012/1029, so the tiny vocabulary
        # covers them (1030 words) to exercise that path.
        "prompt_ids": [101, 7, 1012, 102],
        "token_source": "encoder",
        "feature_level": 0,
        "tower_config": {
            "model_type": "grounding-dino",
            "backbone_config": {
                "model_type": "swin",
                "image_size": 32,
                "embed_dim": 16,
                "depths": [1, 1, 1],
                "num_heads": [1, 2, 4],
                "window_size": 2,
                "out_indices": [2, 3],
            },
            "text_config": {
                "model_type": "bert",
                "vocab_size": 1030,
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
                "max_position_embeddings": 32,
            },
            "d_model": 32,
            "num_queries": 16,
            "encoder_layers": 1,
            # Two decoder layers: GroundingDinoForObjectDetection with a shared box head cannot be
            # built with one (its weight-tying pattern finds nothing to tie), and the queries mode
            # reads the boxes the last layer refines from the previous layer's.
            "decoder_layers": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "num_feature_levels": 2,
            "encoder_n_points": 2,
            "decoder_n_points": 2,
            "max_text_len": 8,
            "disable_custom_kernels": True,
        },
    }
    segmentation = {
        "kind": "sam2",
        "image_size": 32,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "feature_level": 0,
        "tower_config": {
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 16,
                "num_attention_heads": 1,
                "image_size": [32, 32],
                # Global attention sits inside stage 3, after its first (query-pooling) block, as in
                # every SAM2 Hiera: a pooling block with global attention divides by zero in both the
                # original and the transformers Hiera (window 0 // query stride).
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [16, 32, 64, 128],
                "num_attention_heads_per_stage": [1, 2, 4, 8],
                "window_size_per_stage": [2, 2, 2, 2],
                "global_attention_blocks": [3],
                "window_positional_embedding_background_size": [2, 2],
            },
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[8, 8], [4, 4], [2, 2]],
            "fpn_hidden_size": 32,
        },
    }
    return {
        "text_config": text_config,
        "caption_config": caption,
        "classification_config": classification,
        "detection_config": detection,
        "segmentation_config": segmentation,
        "num_visual_tokens": 16,
        "image_token_id": 3,
        "bridge_num_heads": 4,
        "fusion_top_k": 3,
        "fusion_adapter_dim": 64,
        "moco_dim": 32,
    }


# ------------------------------------------------------------------------------- paper scale
def _paper_experts() -> dict[str, Any]:
    caption = {
        "kind": "siglip",
        "pretrained": "google/siglip-so400m-patch14-384",
        "image_size": 384,
        "image_mean": SIGLIP_MEAN,
        "image_std": SIGLIP_STD,
        "feature_layer": -2,
        "tower_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 14,
        },
    }
    classification = {
        "kind": "ram_plus",
        "pretrained": "xinyu1205/recognize-anything-plus-model/ram_plus_swin_large_14m.pth",
        "image_size": 384,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "tower_config": {
            "model_type": "timm_wrapper",
            "architecture": "swin_large_patch4_window12_384",
            "model_args": {"img_size": 384},
            "do_pooling": False,
        },
    }
    detection = {
        "kind": "grounding_dino",
        "pretrained": "IDEA-Research/grounding-dino-base",
        "image_size": 800,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "prompt_ids": GDINO_OBJECT_PROMPT_IDS,
        "token_source": "encoder",
        "feature_level": 1,
        "tower_config": {
            "model_type": "grounding-dino",
            "backbone_config": {
                "model_type": "swin",
                "image_size": 384,
                "embed_dim": 128,
                "depths": [2, 2, 18, 2],
                "num_heads": [4, 8, 16, 32],
                "window_size": 12,
                "out_indices": [2, 3, 4],
            },
            "text_config": {"model_type": "bert"},
        },
    }
    segmentation = {
        "kind": "sam2",
        "pretrained": "facebook/sam2.1-hiera-large/sam2.1_hiera_large.pt",
        "image_size": 1024,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "feature_level": 2,
        "tower_config": {
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 144,
                "num_attention_heads": 2,
                "blocks_per_stage": [2, 6, 36, 4],
                "embed_dim_per_stage": [144, 288, 576, 1152],
                "num_attention_heads_per_stage": [2, 4, 8, 16],
                "window_size_per_stage": [8, 4, 16, 8],
                "global_attention_blocks": [23, 33, 43],
                "window_positional_embedding_background_size": [7, 7],
            },
            "backbone_channel_list": [1152, 576, 288, 144],
        },
    }
    return {
        "caption_config": caption,
        "classification_config": classification,
        "detection_config": detection,
        "segmentation_config": segmentation,
        "num_visual_tokens": 576,
        "bridge_num_heads": 8,
        "fusion_top_k": 3,
    }


def paper_13b_parts() -> dict[str, Any]:
    parts = _paper_experts()
    parts["text_config"] = {
        "model_type": "llama",
        "vocab_size": 32064,  # 32000 + <image> at 32000, padded to a multiple of 64 (as llava-1.5-hf)
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    parts["image_token_id"] = 32000
    return parts


def paper_34b_parts() -> dict[str, Any]:
    parts = _paper_experts()
    parts["text_config"] = {
        "model_type": "llama",
        "vocab_size": 64064,  # 64000 + <image> at 64000, padded
        "hidden_size": 7168,
        "intermediate_size": 20480,
        "num_hidden_layers": 60,
        "num_attention_heads": 56,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
        "rope_theta": 5000000.0,
        "rms_norm_eps": 1e-5,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 7,
    }
    parts["image_token_id"] = 64000
    return parts


PRESETS = {"tiny": _tiny_parts, "astrea-13b": paper_13b_parts, "astrea-34b": paper_34b_parts}

#: Where `astrea create` fetches each preset's LLM.
TEXT_PRETRAINED = {"astrea-13b": "lmsys/vicuna-13b-v1.5", "astrea-34b": "NousResearch/Nous-Hermes-2-Yi-34B"}


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in; neither is modified.

    Where both values are dicts they merge key by key, recursively; any other value (a number, a
    list, ``None``, a config object) replaces. So ``{"text_config": {"hidden_size": 128}}`` changes
    one field of a preset's LLM config and keeps the rest -- transformers would otherwise complete a
    partial sub-config dict with the class defaults (a 7B Llama) -- and ``segmentation_config=None``
    removes that expert. This is the only override merge of the package: presets
    (:func:`astrea_vlm.configuration.get_preset`), recipes' ``model.overrides`` and the demo's
    ablations all use it.
    """
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge_overrides(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def preset_parts(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of :class:`AstreaConfig` for preset ``name``, ``overrides`` merged in (:func:`merge_overrides`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return merge_overrides(copy.deepcopy(PRESETS[name]()), dict(overrides or {}))


__all__ = ["PRESETS", "TEXT_PRETRAINED", "merge_overrides", "paper_13b_parts", "paper_34b_parts", "preset_parts"]
