"""Image preparation for Astrea: one set of pixels per expert tower.

Every expert reads the pixels its original was trained on, so :class:`AstreaImageProcessor` holds
one :class:`ExpertImageSpec` per expert (size, normalisation, resampling filter, what is resized,
aspect policy) and returns one tensor per expert, ``pixel_values_<role>``. The paper presets
follow each released model's own transform (the model card's "Preprocessing" table):

* SigLIP: 384x384 square, bicubic on the 8-bit image, mean/std 0.5 (its ``preprocessor_config.json``);
* RAM++: 384x384 square, bilinear on the 8-bit image, ImageNet statistics (``ram.transform``);
* Grounding-DINO: aspect ratio kept, shortest side 800 and longest at most 1333, bilinear on the
  8-bit image, ImageNet statistics (its ``load_image``); images of a batch are zero-padded at the
  bottom and right to the largest one and ``pixel_mask_<role>`` (1 = image, 0 = padding) says
  where, as DETR-style models batch them;
* SAM2: 1024x1024 square, bilinear with antialiasing on the [0, 1] float image (``ToTensor`` then
  ``Resize``), ImageNet statistics (``SAM2Transforms``).

Squares are ``(n_views, 3, S, S)``; aspect-preserving experts give ``(n_views, 3, H, W)`` with
``H, W`` the largest resized sides of the call's views.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
_RESIZE_ON = ("pil", "tensor")


@dataclass
class ExpertImageSpec:
    """How one expert wants its pixels (see the module docstring).

    ``size`` is the square side, or with ``keep_aspect_ratio`` the shortest side (the longest then
    at most ``max_size``). ``resize_on="pil"`` resizes the 8-bit image with PIL's ``resample``
    filter; ``"tensor"`` resizes the [0, 1] float image with torch's antialiased ``resample``.
    """

    size: int
    image_mean: list[float]
    image_std: list[float]
    resample: str = "bicubic"
    resize_on: str = "pil"
    keep_aspect_ratio: bool = False
    max_size: int | None = None

    @classmethod
    def from_expert_config(cls, expert) -> "ExpertImageSpec":
        return cls(
            size=expert.image_size,
            image_mean=list(expert.image_mean),
            image_std=list(expert.image_std),
            resample=expert.resample,
            resize_on=expert.resize_on,
            keep_aspect_ratio=bool(expert.keep_aspect_ratio),
            max_size=expert.longest_side,
        )


def aspect_preserving_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """``(height, width)`` with the shortest side ``size`` and the longest at most ``max_size``.

    Grounding-DINO's (and DETR's) rule: when the longest side would pass ``max_size``, the shortest
    side becomes ``round(max_size * short / long)`` instead; the other side is truncated to an int.
    As in the original, that rounding can leave the longest side a few pixels above ``max_size``
    (a 20x64 image at 32/53 becomes 17x54) or well below it (5x59 becomes 4x47).
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = max(1, int(round(max_size * short / long)))  # at least 1 pixel (the original fails below 1)
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_and_normalize(view: Image.Image, spec: dict, rescale_factor: float | None = 1 / 255, normalize: bool = True) -> np.ndarray:
    """One RGB view -> ``(3, h, w)`` float32 pixels for the expert ``spec``.

    ``rescale_factor`` multiplies the 8-bit values (``None``: left at 0-255; the default divides
    by 255, the arithmetic of earlier releases bit for bit); ``normalize`` applies the spec's mean
    and std. A ``"tensor"`` expert rescales before its resize, as ``ToTensor`` then ``Resize`` does.
    """
    if spec["keep_aspect_ratio"]:
        height, width = aspect_preserving_size(view.height, view.width, spec["size"], spec["max_size"])
    else:
        height = width = spec["size"]

    def rescale(values):
        if rescale_factor is None:
            return values
        if rescale_factor == 1 / 255:
            return values / 255.0
        return values * (float(np.float32(rescale_factor)) if isinstance(values, torch.Tensor) else np.float32(rescale_factor))

    if spec["resize_on"] == "tensor":
        pixels = rescale(torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1).float())
        if (height, width) != (view.height, view.width):
            pixels = F.interpolate(pixels[None], size=(height, width), mode=spec["resample"], align_corners=False, antialias=True)[0]
        pixels = pixels.numpy()
    else:
        if (height, width) != (view.height, view.width):
            view = view.resize((width, height), _RESAMPLE[spec["resample"]])
        pixels = rescale(np.asarray(view, dtype=np.float32)).transpose(2, 0, 1)
    if not normalize:
        return np.ascontiguousarray(pixels, dtype=np.float32)
    mean = np.asarray(spec["image_mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(spec["image_std"], dtype=np.float32)[:, None, None]
    return (pixels - mean) / std


def pad_bottom_right(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad ``(3, h_i, w_i)`` arrays to the largest ``h`` and ``w`` -> pixels and a 1/0 mask."""
    height = max(a.shape[1] for a in arrays)
    width = max(a.shape[2] for a in arrays)
    pixels = np.zeros((len(arrays), 3, height, width), dtype=np.float32)
    mask = np.zeros((len(arrays), height, width), dtype=np.int64)
    for index, array in enumerate(arrays):
        pixels[index, :, : array.shape[1], : array.shape[2]] = array
        mask[index, : array.shape[1], : array.shape[2]] = 1
    return pixels, mask


# ---------------------------------------------------------------------------------- inputs
def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "buif":
        raise TypeError(f"unsupported image dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")
    if array.size == 0:
        raise ValueError(f"the image is empty (shape {tuple(array.shape)}); pass an image of at least 1x1 pixels")
    if not np.isfinite(array).all():
        raise ValueError("the image holds NaN or infinite values; pass finite pixel values")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"a float image must hold values in [0, 1], got [{float(array.min()):.3g}, {float(array.max()):.3g}]; "
                "rescale it or pass uint8"
            )
        return (array * 255.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0:
            raise ValueError("an integer image must not hold negative values")
        if array.dtype == np.uint16 or array.max() > 255:  # 16-bit: scale to 8 bits instead of clipping
            return (array.astype(np.float64) / 65535.0 * 255.0).round().clip(0, 255).astype(np.uint8)
        return array.astype(np.uint8)
    raise TypeError(f"unsupported image dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")


def _channels_last(array: np.ndarray, input_data_format=None, channels: tuple[int, ...] = (1, 3)) -> np.ndarray:
    """A 3-D array with its channels last: ``input_data_format`` says where they are
    ("channels_first" / "channels_last", or transformers' ``ChannelDimension``); without it they are
    inferred as transformers' image processors do -- first when the first axis has ``channels``
    entries and the last does not (a 4x4x5 array is then an invalid 5-channel image, not RGBA)."""
    if array.ndim != 3:
        return array
    layout = getattr(input_data_format, "value", input_data_format)
    if layout is None:
        first_is_channels = array.shape[0] in channels and array.shape[-1] not in channels
    elif layout in ("channels_first", "channels_last"):
        first_is_channels = layout == "channels_first"
    else:
        raise ValueError(f"input_data_format={input_data_format!r}: use 'channels_first' or 'channels_last'")
    return np.moveaxis(array, 0, -1) if first_is_channels else array


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.size == 0:
        raise ValueError(f"the image is empty (shape {tuple(array.shape)}); pass an image of at least 1x1 pixels")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(_array_to_uint8(array), mode="L")
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(
            f"an image array must be HxW, HxWx1, HxWx3 or HxWx4 (or 1/3/4xHxW, channels first), got shape {tuple(array.shape)}"
        )
    return Image.fromarray(_array_to_uint8(array), mode="RGB" if array.shape[-1] == 3 else "RGBA")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "F":
        return _float_mode_to_rgb(image)
    if mode.startswith("I"):  # I;16*, I: 16/32-bit integers
        array = np.asarray(image)
        if mode.startswith("I;16"):
            array = array.astype(np.uint16)
        return _array_to_pil(array).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "La":  # premultiplied alpha: PIL converts it only to LA
        image, mode = image.convert("LA"), "LA"
    if mode == "LAB":  # PIL has no direct LAB -> RGB conversion; go through a colour transform
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(image, transform)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _float_mode_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    if array.size and array.max() > 1.0:
        array = array / array.max()
    return _array_to_pil(array.clip(0.0, 1.0)).convert("RGB")


def _check_decoded_size(image: Image.Image, what: str) -> None:
    """Refuse, before decoding, an image larger than PIL's decompression-bomb limit or with no pixels."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{what} is empty ({width}x{height} pixels); pass an image of at least 1x1 pixels")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ValueError(
            f"{what} is {width}x{height} = {width * height:,} pixels, more than PIL.Image.MAX_IMAGE_PIXELS = {limit:,}: "
            "refused as a possible decompression bomb. If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS "
            "(or set it to None); the processor then downscales it to max_image_pixels"
        )


def _open_checked(path: str) -> Image.Image:
    """Open and fully decode an image file; every failure is a ValueError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                _check_decoded_size(opened, f"the image {path}")
                opened.load()
                return _pil_to_rgb(opened)
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"the image {path} is refused as a possible decompression bomb ({error}); if you trust the file, "
            "raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None); the processor then downscales it to max_image_pixels"
        ) from None
    except ValueError as error:
        if str(error).startswith(("the image ", "an image ", "a float image", "an integer image")):
            raise
        raise ValueError(f"cannot read {path} as an image ({error}); pass a valid image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError, MemoryError) as error:
        # PIL's decoders raise many types for damaged data
        raise ValueError(f"cannot read {path} as an image ({type(error).__name__}: {error}); the file is corrupt, truncated or not an image") from None


def to_pil_rgb(image, input_data_format=None) -> Image.Image:
    """Convert any supported image input to an RGB PIL image (see "Inputs" in the AstreaImageProcessor docstring).

    Arrays and tensors may be channels first or last (``input_data_format``, else inferred).

    Files and lazily opened PIL images larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's
    decompression-bomb limit, about 89 megapixels) are refused before they are decoded.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            raise ValueError(f"image URLs are not fetched ({path}); download the file and pass its path or a PIL image")
        return _open_checked(path)
    if isinstance(image, Image.Image):
        if isinstance(image, ImageFile.ImageFile) and image.tile:  # opened, not decoded yet: check its declared size
            _check_decoded_size(image, "the image")
        elif image.width < 1 or image.height < 1:
            raise ValueError(f"the image is empty ({image.width}x{image.height} pixels); pass an image of at least 1x1 pixels")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
        except (OSError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"the image data is truncated or corrupt ({type(error).__name__}: {error})") from None
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        # Torch images are conventionally CHW: RGBA (4 channels) first is inferred too.
        return _pil_to_rgb(_array_to_pil(_channels_last(array.numpy(), input_data_format, channels=(1, 3, 4))))
    if isinstance(image, np.ndarray):
        return _pil_to_rgb(_array_to_pil(_channels_last(image, input_data_format)))
    raise TypeError(
        f"unsupported image type {type(image).__name__}; pass a PIL image, a numpy array, a torch tensor or a file path"
    )


# ----------------------------------------------------------------------------------- views
def select_best_resolution(image_size: tuple[int, int], candidates: list[list[int]]) -> tuple[int, int]:
    """Pick the ``(height, width)`` candidate keeping most image pixels, then wasting least padding."""
    height, width = image_size
    best, best_key = None, None
    for cand_h, cand_w in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_h * cand_w - effective
        key = (effective, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (cand_h, cand_w), key
    return best


def anyres_views(image: Image.Image, pinpoints: list[list[int]], tile_size: int, resample=Image.BICUBIC) -> list[Image.Image]:
    """The whole image followed by the tiles of its best pinpoint resolution (raster order)."""
    target_h, target_w = select_best_resolution((image.height, image.width), pinpoints)
    scale = min(target_w / image.width, target_h / image.height)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), resample), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    tiles = [
        canvas.crop((left, top, left + tile_size, top + tile_size))
        for top in range(0, target_h, tile_size)
        for left in range(0, target_w, tile_size)
    ]
    return [image] + tiles


def sample_frame_indices(num_available: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over a clip (centre of each segment); all if it is shorter."""
    if num_available <= num_frames:
        return list(range(num_available))
    step = num_available / num_frames
    return [min(num_available - 1, int(step * (i + 0.5))) for i in range(num_frames)]


def video_frames(video) -> list:
    """A video as a list of frames: ``(T, H, W, C)`` arrays, ``(T, C, H, W)`` tensors or a list of images."""
    if isinstance(video, torch.Tensor) and video.dim() == 4:
        return list(video.unbind(0))
    if isinstance(video, np.ndarray) and video.ndim == 4:
        return list(video)
    if isinstance(video, (list, tuple)):
        return list(video)
    raise TypeError(f"a video must be a 4-D array/tensor or a list of frames, got {type(video).__name__}")


# -------------------------------------------------------------------------- the processor
class AstreaImageProcessor(BaseImageProcessor):
    r"""Per-expert image processor of Astrea: one ``pixel_values_<role>`` tensor per expert (the module docstring
    lists each expert's transform).

    transformers' ``ProcessorMixin`` loads exactly one image processor through ``AutoImageProcessor``
    (further ones only by class names it finds in its own registries, which remote code is not in), so
    the four per-expert processors live inside this one object as specs rather than as four processor
    attributes.

    Views
        Each input image becomes one or more *views*; each view becomes ``num_visual_tokens`` tokens.
        Without tiling an image is one view. With ``image_grid_pinpoints`` (LLaVA-NeXT "AnyRes"), an
        image becomes the whole image plus the tiles of the pinpoint resolution that keeps most of its
        pixels: the image is resized to fit that resolution keeping its aspect ratio, padded, and cut
        into ``tile_size`` squares. A video is a list of frames; ``num_frames`` of them are sampled
        uniformly and each frame is one view.

    Inputs
        PIL images of any mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...), numpy arrays and torch tensors
        (HW, HWC or CHW; uint8, uint16 or float in [0, 1]; ``input_data_format`` settles an ambiguous
        layout) and file paths. EXIF orientation is applied; transparency is composited on white; 16-bit
        images are scaled, not clipped.

    Options (transformers' ``ImagesKwargs``, at construction or per call; a call's value wins)
        ``do_rescale`` / ``rescale_factor`` (8-bit values to [0, 1]: ``1/255``), ``do_normalize``,
        ``image_mean`` / ``image_std``, ``size`` (a square side, or ``{"height": s, "width": s}``; for an
        aspect-preserving expert the shortest side, its longest-side cap scaled with it) and
        ``resample``. The last four default to each expert's own value; given, they apply to every expert.
        Options a per-expert pipeline cannot honour (cropping, padding on request, no resize, channels
        last out) raise instead of being ignored.

    Args:
        experts (`dict[str, dict]`):
            Role -> the fields of an :class:`ExpertImageSpec` (``size``, ``image_mean``,
            ``image_std``, ``resample``, ``resize_on``, ``keep_aspect_ratio``, ``max_size``) for
            every expert, in the model's ``expert_order`` (build it with :meth:`from_model_config`).
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            AnyRes candidate resolutions ``[height, width]``, multiples of ``tile_size``; ``None``
            disables tiling (one view per image).
        tile_size (`int`, defaults to 384):
            Side of one AnyRes tile in the pinpoint grid.
        num_frames (`int`, defaults to 8):
            Frames sampled uniformly from each video.
        max_image_pixels (`int`, defaults to 64 megapixels):
            Larger images are downscaled (keeping their aspect ratio) before anything else.
    """

    model_input_names = ["pixel_values"]

    # ImagesKwargs defaults (see "Options" in the class docstring); None: each expert's own value.
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = None
    image_std = None
    size = None
    resample = None

    def __init__(
        self,
        experts: dict[str, dict] | None = None,
        image_grid_pinpoints: list[list[int]] | None = None,
        tile_size: int = 384,
        num_frames: int = 8,
        max_image_pixels: int = 64_000_000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not experts:
            raise ValueError("AstreaImageProcessor needs `experts`: build it with AstreaImageProcessor.from_model_config(config)")
        self.experts = {role: asdict(ExpertImageSpec(**spec)) for role, spec in experts.items()}
        for role, spec in self.experts.items():
            if spec["resample"] not in _RESAMPLE:
                raise ValueError(f"experts[{role!r}].resample={spec['resample']!r}: choose one of {sorted(_RESAMPLE)}")
            if spec["resize_on"] not in _RESIZE_ON:
                raise ValueError(f"experts[{role!r}].resize_on={spec['resize_on']!r}: choose one of {list(_RESIZE_ON)}")
            if spec["resize_on"] == "tensor" and spec["resample"] not in ("bilinear", "bicubic"):
                raise ValueError(f"experts[{role!r}]: an antialiased tensor resize is bilinear or bicubic, not {spec['resample']!r}")
            if spec["max_size"] is not None and (not spec["keep_aspect_ratio"] or spec["max_size"] < spec["size"]):
                raise ValueError(
                    f"experts[{role!r}].max_size={spec['max_size']!r} is the longest side of an aspect-preserving resize: "
                    f"set keep_aspect_ratio=True and max_size >= size ({spec['size']})"
                )
        if image_grid_pinpoints is not None:
            bad = [p for p in image_grid_pinpoints if len(p) != 2 or p[0] % tile_size or p[1] % tile_size]
            if bad:
                raise ValueError(f"image_grid_pinpoints {bad} are not [height, width] multiples of tile_size={tile_size}")
        self.image_grid_pinpoints = image_grid_pinpoints
        self.tile_size = tile_size
        self.num_frames = num_frames
        self.max_image_pixels = max_image_pixels
        self.model_input_names = [f"pixel_values_{role}" for role in self.experts] + [
            f"pixel_mask_{role}" for role, spec in self.experts.items() if spec["keep_aspect_ratio"]
        ]

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "AstreaImageProcessor":
        """One spec per expert of an :class:`AstreaConfig`, in its stage order."""
        experts = {role: asdict(ExpertImageSpec.from_expert_config(expert)) for role, expert in config.expert_configs.items()}
        return cls(experts=experts, **kwargs)

    # --------------------------------------------------------------------------- views
    def _limit_size(self, image: Image.Image) -> Image.Image:
        pixels = image.width * image.height
        if pixels > self.max_image_pixels:
            scale = math.sqrt(self.max_image_pixels / pixels)
            image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.BICUBIC)
        return image

    def image_views(self, image, input_data_format=None) -> list[Image.Image]:
        """The views one image becomes: itself, or itself plus its AnyRes tiles."""
        image = self._limit_size(to_pil_rgb(image, input_data_format))
        if self.image_grid_pinpoints:
            return anyres_views(image, self.image_grid_pinpoints, self.tile_size)
        return [image]

    def video_views(self, video, num_frames: int | None = None, input_data_format=None) -> list[Image.Image]:
        frames = video_frames(video)
        if not frames:
            raise ValueError("a video holds no frames")
        indices = sample_frame_indices(len(frames), num_frames or self.num_frames)
        return [self._limit_size(to_pil_rgb(frames[i], input_data_format)) for i in indices]

    def num_views(self, image, input_data_format=None) -> int:
        """How many views (each ``num_visual_tokens`` tokens) an image becomes."""
        if not self.image_grid_pinpoints:
            return 1
        image = to_pil_rgb(image, input_data_format)
        return self.num_views_for_size(image.height, image.width)

    def num_views_for_size(self, height: int, width: int) -> int:
        """How many views an image of ``height`` x ``width`` pixels becomes (see :meth:`num_views`)."""
        if not self.image_grid_pinpoints:
            return 1
        pixels = width * height
        if pixels > self.max_image_pixels:  # as _limit_size
            scale = math.sqrt(self.max_image_pixels / pixels)
            width, height = max(1, int(width * scale)), max(1, int(height * scale))
        best_height, best_width = select_best_resolution((height, width), self.image_grid_pinpoints)
        return 1 + (best_height // self.tile_size) * (best_width // self.tile_size)

    def resolve_options(self, **options) -> dict:
        """The ImagesKwargs of one call: given values, else the processor's; unsupported ones raise."""
        refused = {
            "do_resize": False,  # every tower reads a fixed square
            "do_center_crop": True,
            "do_pad": True,
            "do_convert_rgb": False,  # towers read RGB
        }
        for key, value in refused.items():
            if options.get(key) is value:
                raise ValueError(f"AstreaImageProcessor: {key}={value} is not supported; each expert reads RGB pixels resized to its own size (and padded only where its original pads)")
        for key in ("crop_size", "pad_size"):
            if options.get(key) is not None:
                raise ValueError(f"AstreaImageProcessor: {key} is not supported; each expert reads pixels resized to its own size")
        data_format = getattr(options.get("data_format"), "value", options.get("data_format"))
        if data_format not in (None, "channels_first"):
            raise ValueError(f"AstreaImageProcessor: data_format={data_format!r}; the towers read channels-first pixels")
        resolved = {key: options.get(key) if options.get(key) is not None else getattr(self, key) for key in
                    ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "size", "resample")}
        size = resolved["size"]
        if isinstance(size, dict):
            if set(size) != {"height", "width"} or size["height"] != size["width"]:
                raise ValueError(f"AstreaImageProcessor: size={size}; the towers read squares: pass an int or {{'height': s, 'width': s}}")
            resolved["size"] = size["height"]
        resample = resolved["resample"]
        if resample is not None and not isinstance(resample, str):
            names = {int(v): k for k, v in _RESAMPLE.items()}
            if int(resample) not in names:
                raise ValueError(f"AstreaImageProcessor: resample={resample!r}: use one of {sorted(_RESAMPLE)}")
            resolved["resample"] = names[int(resample)]
        elif resample is not None and resample not in _RESAMPLE:
            raise ValueError(f"AstreaImageProcessor: resample={resample!r}: use one of {sorted(_RESAMPLE)}")
        return resolved

    def pixels_for_views(self, views: list[Image.Image], return_tensors: str | None = "pt", roles=None, **options) -> BatchFeature:
        """Resize and normalise views for every expert -> ``pixel_values_<role>`` (and ``pixel_mask_<role>``).

        Square experts give ``(n_views, 3, S, S)``. Aspect-preserving experts give the views
        zero-padded at the bottom and right to the largest resized height and width of the call,
        ``(n_views, 3, H, W)``, and ``pixel_mask_<role>`` ``(n_views, H, W)``: 1 on the image, 0 on
        the padding. ``roles`` (default: every expert) limits the output to those experts' pixels;
        ``options`` are the call's ImagesKwargs (see "Options" in the class docstring).
        """
        if roles is not None:
            unknown = sorted(set(roles) - set(self.experts))
            if unknown:
                raise ValueError(f"no expert named {unknown}; this image processor's experts are {list(self.experts)}")
        options = self.resolve_options(**options)
        data = {}
        for role, spec in self.experts.items():
            if roles is not None and role not in roles:
                continue
            spec = {**spec, **{key: options[key] for key in ("size", "image_mean", "image_std", "resample") if options[key] is not None}}
            if options["size"] is not None and spec["max_size"] is not None:
                # A new shortest side scales the longest-side cap with it (1333 / 800 for Grounding-DINO).
                spec["max_size"] = max(options["size"], self.experts[role]["max_size"] * options["size"] // self.experts[role]["size"])
            if spec["resize_on"] == "tensor" and spec["resample"] not in ("bilinear", "bicubic"):
                raise ValueError(
                    f"AstreaImageProcessor: resample={spec['resample']!r} for the {role} expert, which resizes the float image "
                    f"with antialiasing (resize_on='tensor'): use 'bilinear' or 'bicubic'"
                )
            rescale = options["rescale_factor"] if options["do_rescale"] else None
            arrays = [resize_and_normalize(view, spec, rescale, options["do_normalize"]) for view in views]
            size = spec["size"]
            if not spec["keep_aspect_ratio"]:
                data[f"pixel_values_{role}"] = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.float32)
            elif arrays:
                data[f"pixel_values_{role}"], data[f"pixel_mask_{role}"] = pad_bottom_right(arrays)
            else:
                data[f"pixel_values_{role}"] = np.zeros((0, 3, size, size), np.float32)
                data[f"pixel_mask_{role}"] = np.zeros((0, size, size), np.int64)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def preprocess(self, images, return_tensors: str | None = "pt", input_data_format=None, **options) -> BatchFeature:
        """Process one image or a (nested) list of images; views of all images are concatenated in order."""
        views = [view for image in flatten_images(images) for view in self.image_views(image, input_data_format)]
        return self.pixels_for_views(views, return_tensors, **options)

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)


def _is_single_image(item) -> bool:
    if isinstance(item, (Image.Image, str, os.PathLike)):
        return True
    if isinstance(item, np.ndarray):
        return item.ndim in (2, 3)
    if isinstance(item, torch.Tensor):
        return item.dim() in (2, 3)
    return False


def flatten_images(images) -> list:
    """A single image, a list of images or a list of lists (one per sample) -> a flat list, in order."""
    if images is None:
        return []
    if _is_single_image(images):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    raise TypeError(
        f"unsupported image input {type(images).__name__}; pass PIL images, numpy arrays, torch tensors or file paths"
    )


def flatten_videos(videos) -> list:
    """A single video, a list of videos or a list of lists of videos -> a flat list of videos."""
    if videos is None:
        return []
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return list(videos)
        raise ValueError(f"a video array must be 4-D (frames first), got shape {tuple(videos.shape)}")
    if isinstance(videos, (list, tuple)):
        if videos and all(_is_single_image(frame) for frame in videos):
            return [list(videos)]  # one video given as a list of frames
        return [video for item in videos for video in flatten_videos(item)]
    raise TypeError(f"unsupported video input {type(videos).__name__}")


__all__ = ["AstreaImageProcessor", "ExpertImageSpec", "aspect_preserving_size", "resize_and_normalize", "select_best_resolution", "to_pil_rgb"]
