"""Each expert's pixels against its original's transform, rebuilt from the published definition.

The references are torchvision transforms set up as each released model's own code sets them up:

* SigLIP (``google/siglip-so400m-patch14-384``, ``preprocessor_config.json``): resize to 384x384
  with resample 3 (PIL bicubic), rescale 1/255, normalise with mean = std = 0.5; also transformers'
  PIL SigLIP processor with those values;
* RAM++ (``ram.transform.get_transform``): ``Resize((384, 384))`` on the PIL image (bilinear),
  ``ToTensor``, ``Normalize`` with ImageNet statistics;
* Grounding-DINO (``groundingdino.util.inference.load_image``): ``RandomResize([800],
  max_size=1333)`` -- the shortest side to 800 unless the longest would pass 1333, the other side
  truncated, bilinear on the PIL image --, ``ToTensor``, ImageNet ``Normalize``; a batch is
  zero-padded at the bottom and right with a mask (DETR's ``nested_tensor_from_tensor_list``);
* SAM2 (``sam2.utils.transforms.SAM2Transforms``): ``ToTensor``, then ``Resize((1024, 1024))`` of
  the float tensor (bilinear, antialiased), ImageNet ``Normalize``.

Every comparison must agree within 1e-3 (in normalised units); each also checks that the previous
preprocessing (bicubic squares for every expert) would not pass, so the tests can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from astrea_vlm.configuration import get_preset
from astrea_vlm.modeling import AstreaForConditionalGeneration
from astrea_vlm.processing import AstreaImageProcessor, build_processor
from astrea_vlm.processing.image_processing_astrea import aspect_preserving_size, resize_and_normalize

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
TOLERANCE = 1e-3

#: The released models' published preprocessing: (size, max_size, mean, std, filter, resized data, aspect ratio kept).
PUBLISHED = {
    "caption": (384, None, *HALF, "bicubic", "pil", False),  # SigLIP SO400M/14@384
    "classification": (384, None, *IMAGENET, "bilinear", "pil", False),  # RAM++ Swin-L
    "detection": (800, 1333, *IMAGENET, "bilinear", "pil", True),  # Grounding-DINO
    "segmentation": (1024, None, *IMAGENET, "bilinear", "tensor", False),  # SAM2.1 Hiera-L
}


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: fine detail on which different filters give different pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 255, y / height * 255, (x + y) % 97 * 2.6], axis=-1)
    noisy = base + rng.normal(0, 40, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


IMAGES = [_photo(640, 480, 0), _photo(300, 1000, 1), _photo(257, 257, 2)]


def _specs(preset: str) -> dict[str, dict]:
    return AstreaImageProcessor.from_model_config(get_preset(preset)).experts


def _processor_pixels(preset: str, role: str, images) -> dict[str, torch.Tensor]:
    processor = AstreaImageProcessor.from_model_config(get_preset(preset))
    return processor(images, return_tensors="pt")


# ------------------------------------------------------------------------------ the constants
@pytest.mark.parametrize("preset", ["astrea-13b", "astrea-34b"])
def test_paper_presets_pin_the_published_preprocessing(preset):
    specs = _specs(preset)
    for role, (size, max_size, mean, std, resample, resize_on, keep) in PUBLISHED.items():
        spec = specs[role]
        assert spec["size"] == size, role
        assert spec["max_size"] == max_size, role
        assert spec["image_mean"] == mean and spec["image_std"] == std, role
        assert (spec["resample"], spec["resize_on"], spec["keep_aspect_ratio"]) == (resample, resize_on, keep), role


def test_tiny_preset_has_the_same_policy_per_kind_at_toy_sizes():
    tiny, paper = _specs("tiny"), _specs("astrea-13b")
    for role, spec in tiny.items():
        assert spec["size"] == 32
        for field in ("image_mean", "image_std", "resample", "resize_on", "keep_aspect_ratio"):
            assert spec[field] == paper[role][field], (role, field)
    assert tiny["detection"]["max_size"] == 32 * 1333 // 800 == 53  # Grounding-DINO's 1333 / 800 ratio


# --------------------------------------------------------------------- the original transforms
def _siglip(size):
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(*HALF)])


def _ram_plus(size):
    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(*IMAGENET)])


def _sam2(size):
    return T.Compose([T.ToTensor(), T.Resize((size, size)), T.Normalize(*IMAGENET)])


def _grounding_dino_size(width: int, height: int, size: int, max_size: int) -> tuple[int, int]:
    """``RandomResize([size], max_size)``'s output ``(height, width)``, written from its definition."""
    short, long = float(min(width, height)), float(max(width, height))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _grounding_dino_batch(images, size: int, max_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grounding-DINO's load_image per image, then DETR's padded batch with its mask (True = padding)."""
    tensors = []
    for image in images:
        height, width = _grounding_dino_size(image.width, image.height, size, max_size)
        tensors.append(T.Compose([T.Resize((height, width)), T.ToTensor(), T.Normalize(*IMAGENET)])(image))
    height = max(t.shape[1] for t in tensors)
    width = max(t.shape[2] for t in tensors)
    batch = torch.zeros(len(tensors), 3, height, width)
    padding = torch.ones(len(tensors), height, width, dtype=torch.bool)
    for index, tensor in enumerate(tensors):
        batch[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor
        padding[index, : tensor.shape[1], : tensor.shape[2]] = False
    return batch, padding


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).abs().max())


def _old_square_bicubic(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """The preprocessing every expert had before: a bicubic PIL square."""
    spec = {"size": size, "image_mean": mean, "image_std": std, "resample": "bicubic", "resize_on": "pil",
            "keep_aspect_ratio": False, "max_size": None}
    return torch.from_numpy(resize_and_normalize(image, spec))


@pytest.mark.parametrize("preset", ["tiny", "astrea-13b"])
@pytest.mark.parametrize(
    ("role", "original", "statistics"),
    [("caption", _siglip, HALF), ("classification", _ram_plus, IMAGENET), ("segmentation", _sam2, IMAGENET)],
)
def test_square_experts_match_their_original_transform(preset, role, original, statistics):
    size = _specs(preset)[role]["size"]
    pixels = _processor_pixels(preset, role, IMAGES)[f"pixel_values_{role}"]
    reference = torch.stack([original(size)(image) for image in IMAGES])
    assert _max_difference(pixels, reference) < TOLERANCE
    if role != "caption":  # SigLIP was bicubic before too; the others were not
        old = torch.stack([_old_square_bicubic(image, size, *statistics) for image in IMAGES])
        assert _max_difference(old, reference) > 10 * TOLERANCE


@pytest.mark.parametrize("preset", ["tiny", "astrea-13b"])
def test_grounding_dino_keeps_the_aspect_ratio_pads_and_masks_as_the_original(preset):
    spec = _specs(preset)["detection"]
    out = _processor_pixels(preset, "detection", IMAGES)
    reference, padding = _grounding_dino_batch(IMAGES, spec["size"], spec["max_size"])
    assert _max_difference(out["pixel_values_detection"], reference) < TOLERANCE
    assert torch.equal(out["pixel_mask_detection"], (~padding).long())
    if preset == "astrea-13b":
        # 640x480 -> 800x1066; 300x1000 -> the 1333 cap: 400x1333 (w x h); 257x257 -> 800x800.
        sizes = [tuple(int(v) for v in mask.nonzero().max(0).values + 1) for mask in out["pixel_mask_detection"]]
        assert sizes == [(800, 1066), (1333, 400), (800, 800)]


def test_siglip_matches_transformers_own_siglip_processor_with_the_released_config():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    released = SiglipImageProcessorPil(
        size={"height": 384, "width": 384}, resample=3, image_mean=HALF[0], image_std=HALF[1], rescale_factor=1 / 255
    )
    reference = released(IMAGES, return_tensors="pt")["pixel_values"]
    pixels = _processor_pixels("astrea-13b", "caption", IMAGES)["pixel_values_caption"]
    assert _max_difference(pixels, reference) < TOLERANCE


def test_sam2_matches_the_sam2_package_transform_when_installed():
    transforms = pytest.importorskip("sam2.utils.transforms")
    original = transforms.SAM2Transforms(resolution=1024, mask_threshold=0.0)
    reference = torch.stack([original(np.array(image)) for image in IMAGES])
    pixels = _processor_pixels("astrea-13b", "segmentation", IMAGES)["pixel_values_segmentation"]
    assert _max_difference(pixels, reference) < TOLERANCE


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(480, 640, (800, 1066)), (1000, 300, (1333, 400)), (800, 1200, (800, 1200)), (100, 100, (800, 800)), (2000, 500, (1332, 333))],
)
def test_aspect_preserving_size_is_grounding_dinos_rule(height, width, expected):
    assert aspect_preserving_size(height, width, 800, 1333) == expected
    assert _grounding_dino_size(width, height, 800, 1333) == expected


def test_aspect_preserving_size_keeps_at_least_one_pixel():
    # The original rounds the shortest side of a 500x1 image at 32/53 to 0 and fails; here it stays 1.
    assert aspect_preserving_size(500, 1, 32, 53) == (500, 1)
    assert aspect_preserving_size(1, 500, 32, 53) == (1, 500)


# ----------------------------------------------------------------- the tower honours the mask
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = get_preset("tiny")
    return AstreaForConditionalGeneration(config).eval(), build_processor(config)


def test_an_images_detection_tokens_do_not_depend_on_its_batch(tiny):
    model, processor = tiny
    landscape, portrait = _photo(40, 30, 3), _photo(20, 64, 4)
    batch = processor(images=[landscape, portrait, landscape], text=["<image> a", "<image> b <image>"])
    alone = processor(images=[landscape], text="<image>")
    assert batch["pixel_values_detection"].shape[-2:] != alone["pixel_values_detection"].shape[-2:]
    detection = model.model.get_tower_tokens
    with torch.no_grad():
        batched = detection("detection", batch["pixel_values_detection"], batch["pixel_mask_detection"])
        single = detection("detection", alone["pixel_values_detection"], alone["pixel_mask_detection"])
        unmasked = detection("detection", batch["pixel_values_detection"])  # padding read as image
    torch.testing.assert_close(batched[0], single[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[2], single[0], rtol=0, atol=1e-5)
    assert float((unmasked[0] - single[0]).abs().max()) > 1e-2
    with torch.no_grad():
        out = model(**batch)
    assert out.image_hidden_states.shape == (3, 16, model.config.hidden_size)


def test_a_mask_that_is_not_a_top_left_rectangle_is_refused(tiny):
    model, _ = tiny
    pixels = torch.zeros(1, 3, 32, 40)
    mask = torch.ones(1, 32, 40, dtype=torch.long)
    mask[0, 5, 5] = 0
    with pytest.raises(ValueError, match="top left"):
        model.model.get_tower_tokens("detection", pixels, mask)
    with pytest.raises(ValueError, match="pixel_mask_detection.*without `pixel_values_detection`"):
        model(input_ids=torch.tensor([[5, 6]]), pixel_mask_detection=mask)


def test_decode_steps_drop_the_pixel_masks(tiny):
    model, processor = tiny
    batch = processor(images=[_photo(40, 30, 5)], text="<image> what")
    calls = []
    handle = model.model.towers["detection"].register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert calls == [1]
