"""The segmentation tower against the ``sam2`` package itself (the ``[parity]`` extra).

Each test builds a SAM2.1 model with the package's own ``build_sam2`` from the config file the
package ships (``configs/sam2.1/sam2.1_hiera_<size>.yaml``), gives every parameter random values
(the package initialises its positional embeddings to zero, which would hide a wrong mapping of
them), and saves it as the released checkpoints are saved: ``torch.save({"model": state_dict})``
to a ``.pt`` file, image encoder and everything else (mask decoder, memory modules). The tower is
configured from the same yaml file, loads that file with ``Sam2Tower.load_pretrained``, and reads
one photo-like image through ``AstreaImageProcessor``; the package reads it through its own
``SAM2Transforms`` and ``image_encoder``. Pixels and all three FPN levels must agree.

Hiera-T runs in the default suite; Hiera-S, B+ and L in the slow one (``pytest -m slow``).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from astrea_vlm.configuration import get_preset
from astrea_vlm.configuration.configuration_astrea import AstreaExpertConfig
from astrea_vlm.modeling.tower_sam2 import Sam2Tower
from astrea_vlm.processing import AstreaImageProcessor

sam2 = pytest.importorskip("sam2", reason="the [parity] extra (sam2, hydra-core, omegaconf, iopath) is not installed")
from hydra import compose  # noqa: E402  (installed with sam2)
from sam2.build_sam import build_sam2  # noqa: E402
from sam2.modeling.backbones.hieradet import Hiera  # noqa: E402
from sam2.utils.transforms import SAM2Transforms  # noqa: E402

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
RESOLUTION = 1024
#: Largest difference allowed between the two float32 implementations (features are O(1)).
ATOL = 1e-4


def _config_file(size: str) -> str:
    return f"configs/sam2.1/sam2.1_hiera_{size}.yaml"


def tower_config_from_package(size: str) -> dict:
    """The ``sam2_vision_model`` config of the package's shipped yaml (Hiera defaults where it is silent)."""
    encoder = compose(config_name=_config_file(size)).model.image_encoder
    trunk, neck = encoder.trunk, encoder.neck
    defaults = {name: p.default for name, p in inspect.signature(Hiera.__init__).parameters.items()}

    def get(name):
        return trunk[name] if name in trunk else defaults[name]

    stages = list(get("stages"))
    dims, heads = [int(get("embed_dim"))], [int(get("num_heads"))]
    for _ in stages[1:]:  # the original multiplies at every stage change, truncating to int
        dims.append(int(dims[-1] * get("dim_mul")))
        heads.append(int(heads[-1] * get("head_mul")))
    assert encoder.scalp == 1 and neck.fpn_interp_model == "nearest"
    return {
        "model_type": "sam2_vision_model",
        "backbone_config": {
            "model_type": "sam2_hiera_det_model",
            "hidden_size": dims[0],
            "num_attention_heads": heads[0],
            "image_size": [RESOLUTION, RESOLUTION],
            "blocks_per_stage": stages,
            "embed_dim_per_stage": dims,
            "num_attention_heads_per_stage": heads,
            "window_size_per_stage": list(get("window_spec")),
            "global_attention_blocks": list(get("global_att_blocks")),
            "window_positional_embedding_background_size": list(get("window_pos_embed_bkg_spatial_size")),
            "query_stride": list(get("q_stride")),
            "num_query_pool_stages": int(get("q_pool")),
        },
        "backbone_channel_list": list(neck.backbone_channel_list),
        "backbone_feature_sizes": [[RESOLUTION // s] * 2 for s in (4, 8, 16)],
        "fpn_hidden_size": int(neck.d_model),
        "fpn_top_down_levels": list(neck.fpn_top_down_levels),
    }


def _photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x / 640 * 255, y / 480 * 255, (x * y) % 251], axis=-1) + rng.normal(0, 30, (480, 640, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def _released_checkpoint(size: str, path, seed: int = 0):
    """A randomly weighted SAM2.1 model built by the package, saved in the released ``.pt`` layout."""
    model = build_sam2(_config_file(size), ckpt_path=None, device="cpu", mode="eval")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    torch.save({"model": model.state_dict()}, path)
    return model


def _check_parity(size: str, tmp_path) -> dict[str, float]:
    path = tmp_path / f"sam2.1_hiera_{size}.pt"
    original = _released_checkpoint(size, path)
    expert = AstreaExpertConfig(
        kind="sam2", image_size=RESOLUTION, image_mean=IMAGENET[0], image_std=IMAGENET[1], feature_level=2,
        tower_config=tower_config_from_package(size),
    )
    tower = Sam2Tower(expert)
    tower.load_pretrained(str(path))
    image = _photo()

    ours = AstreaImageProcessor(experts={"segmentation": {
        "size": RESOLUTION, "image_mean": IMAGENET[0], "image_std": IMAGENET[1], "resample": expert.resample,
        "resize_on": expert.resize_on}})(image)["pixel_values_segmentation"]
    theirs = SAM2Transforms(resolution=original.image_size, mask_threshold=0.0)(np.array(image))[None]
    differences = {"pixels": float((ours - theirs).abs().max())}
    seen = {}

    def keep_levels(module, args, output):  # returns None: the output passes on unchanged
        seen["fpn"] = output.fpn_hidden_states

    handle = tower.model.register_forward_hook(keep_levels)
    try:
        with torch.no_grad():
            reference = original.image_encoder(theirs)
            tokens = tower(ours)
    finally:
        handle.remove()
    levels = seen["fpn"]
    embedding = reference["vision_features"]  # the stride-16 image embedding, (1, 256, 64, 64)
    differences["tokens"] = float((tokens - embedding.flatten(2).transpose(1, 2)).abs().max())
    for index, (level, expected) in enumerate(zip(levels, reference["backbone_fpn"])):
        assert level.shape == expected.shape, index
        differences[f"fpn{index}"] = float((level - expected).abs().max())
    differences["scale"] = float(embedding.abs().mean())
    return differences


def test_hiera_t_tower_equals_the_sam2_package(tmp_path):
    differences = _check_parity("t", tmp_path)
    print(f"Hiera-t: {differences}")  # shown with -s
    assert differences["pixels"] < 1e-6
    assert differences["scale"] > 0.1  # the features are not trivially small
    for key in ("tokens", "fpn0", "fpn1", "fpn2"):
        assert differences[key] < ATOL, differences


@pytest.mark.slow
@pytest.mark.parametrize("size", ["s", "b+", "l"])
def test_larger_hieras_equal_the_sam2_package(tmp_path, size):
    differences = _check_parity(size, tmp_path)
    print(f"Hiera-{size}: {differences}")  # shown with -s
    assert differences["pixels"] < 1e-6 and differences["scale"] > 0.1
    for key in ("tokens", "fpn0", "fpn1", "fpn2"):
        assert differences[key] < ATOL, differences


def test_paper_preset_is_the_packages_hiera_l():
    derived = tower_config_from_package("l")
    preset = get_preset("astrea-13b").segmentation_config
    ours = preset.tower_config.to_dict()
    for key, value in derived["backbone_config"].items():
        assert ours["backbone_config"][key] == value, key
    for key in ("backbone_channel_list", "backbone_feature_sizes", "fpn_hidden_size", "fpn_top_down_levels"):
        assert ours[key] == derived[key], key
    assert preset.image_size == compose(config_name=_config_file("l")).model.image_size == RESOLUTION
