"""Minimal per-expert image preparation: resize to each tower's square input and normalise.

Every expert tower reads its own resolution and normalisation, so one image yields one tensor per
expert, keyed ``pixel_values_<role>`` as :class:`AstreaForConditionalGeneration` expects.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps


def to_rgb(image) -> Image.Image:
    """PIL / numpy (HWC, uint8 or float in [0, 1]) / torch (CHW) image -> RGB PIL image."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def pixel_values_for_experts(images, config) -> dict[str, torch.Tensor]:
    """Resize every image to each expert's ``image_size`` (bicubic) and normalise with its mean/std."""
    images = [to_rgb(image) for image in images]
    out = {}
    for role, expert in config.expert_configs.items():
        size = expert.image_size
        arrays = [np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0 for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(expert.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(expert.image_std).view(1, 3, 1, 1)
        out[f"pixel_values_{role}"] = (pixels - mean) / std
    return out
