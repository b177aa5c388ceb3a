"""Expert towers: the base class, the registration decorator and the helpers every tower shares.

A tower wraps one pretrained vision backbone and turns pixels into expert tokens
``(B, N_i, D_i)``. Each kind lives in its own ``tower_<kind>.py`` and registers itself::

    @register_tower("siglip")
    class SiglipTower(ExpertTower): ...

:mod:`.registry` imports every kind (one line each) and builds them; the class says which
``tower_config`` model types it reads and whether its tokens lie on a grid, so the configuration's
checks need no table of their own. ``tower.load_pretrained(source)`` loads real weights from a Hub
id or a local path. Towers are frozen (eval mode, no gradients) unless their config says ``frozen=False``.
"""

from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..configuration.configuration_astrea import AstreaExpertConfig

#: ``kind -> tower class``, filled by :func:`register_tower` when :mod:`.registry` imports the kinds.
TOWER_REGISTRY: dict[str, type["ExpertTower"]] = {}


def register_tower(kind: str):
    """Class decorator adding a tower implementation to :data:`TOWER_REGISTRY` under ``kind``."""

    def decorator(cls):
        cls.kind = kind
        TOWER_REGISTRY[kind] = cls
        return cls

    return decorator


class ExpertTower(nn.Module, abc.ABC):
    """Base class of the expert towers.

    Subclasses set ``self.out_dim`` (D_i) and ``self.grid`` (the ``(h, w)`` token grid for a square
    input of ``config.image_size``, or ``None`` for tokens without a grid) and implement
    :meth:`encode` and :meth:`load_pretrained`. A tower that reads aspect-preserving, padded images
    (``config.keep_aspect_ratio``) resamples each image's own region to ``self.grid``, which the
    Astrea model sets to its token grid.
    """

    kind: str = ""
    #: ``tower_config.model_type`` values this kind reads (None: any); checked by the configuration.
    tower_model_types: tuple[str, ...] | None = None
    #: The kind's original preprocessing, the defaults of its config's ``resample``, ``resize_on`` and
    #: ``keep_aspect_ratio``: the resampling filter, what is resized ("pil": the 8-bit image, as
    #: torchvision's ``Resize`` on a PIL image; "tensor": the [0, 1] float image, antialiased) and
    #: whether the aspect ratio is kept. Bicubic on the 8-bit image: CLIP, DINOv2, most timm models.
    preprocessing: tuple[str, str, bool] = ("bicubic", "pil", False)

    @classmethod
    def tokens_on_grid(cls, config: AstreaExpertConfig) -> bool:
        """Whether the tokens of a tower with ``config`` lie on a 2-D grid (resampled by area pooling / bilinear)."""
        return True

    def __init__(self, config: AstreaExpertConfig):
        super().__init__()
        self.config = config
        self.out_dim: int = 0
        self.grid: tuple[int, int] | None = None

    # ------------------------------------------------------------------ interface
    @abc.abstractmethod
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return tokens ``(B, N_i, D_i)`` for normalised pixels ``(B, 3, S, S)``.

        A tower with ``config.keep_aspect_ratio`` gets ``encode(pixel_values, pixel_mask)`` instead.
        """

    @abc.abstractmethod
    def load_pretrained(self, source: str, **hub_kwargs) -> None:
        """Load real weights in place from a Hub id or a local path (file or folder)."""

    @property
    def num_tokens(self) -> int:
        """Number of tokens per image the tower returns."""
        if self.grid is not None:
            return self.grid[0] * self.grid[1]
        return self.config.tower_config.num_queries

    # ------------------------------------------------------------------ behaviour
    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``(B, N_i, D_i)`` on ``self.grid``.

        Square towers take ``(B, 3, S, S)`` with ``S = config.image_size``. A tower with
        ``config.keep_aspect_ratio`` (Grounding-DINO) takes a zero-padded batch ``(B, 3, H, W)``
        and its ``pixel_mask`` ``(B, H, W)`` (1 on the image, 0 on the padding; ``None``: no padding).
        """
        args = self._encode_args(pixel_values, pixel_mask)
        if self.config.frozen:
            with torch.no_grad():
                return self.encode(*args)
        return self.encode(*args)

    def _encode_args(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> tuple:
        """Checked pixels in the tower's dtype (plus the mask for an aspect-preserving tower)."""
        self._check_pixels(pixel_values, pixel_mask)
        dtype = self.input_dtype
        self._match_buffer_dtype(dtype)
        return (pixel_values.to(dtype),) + ((pixel_mask,) if self.config.keep_aspect_ratio else ())

    def _check_pixels(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> None:
        config = self.config
        size = config.image_size
        if not config.keep_aspect_ratio:
            if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
                raise ValueError(
                    f"the {self.kind} tower expects pixel_values of shape (batch, 3, {size}, {size}), got "
                    f"{tuple(pixel_values.shape)}; preprocess images with AstreaProcessor"
                )
            if pixel_mask is not None:
                raise ValueError(f"the {self.kind} tower reads unpadded {size}x{size} squares and takes no pixel mask")
            return
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or min(pixel_values.shape[-2:]) < 1:
            raise ValueError(
                f"the {self.kind} tower expects pixel_values of shape (batch, 3, height, width) (shortest side {size}, "
                f"aspect ratio kept, padded), got {tuple(pixel_values.shape)}; preprocess images with AstreaProcessor"
            )
        if pixel_mask is not None and tuple(pixel_mask.shape) != (pixel_values.shape[0], *pixel_values.shape[-2:]):
            raise ValueError(
                f"the {self.kind} tower's pixel_mask must be (batch, height, width) = "
                f"{(pixel_values.shape[0], *pixel_values.shape[-2:])} like its pixel_values, got {tuple(pixel_mask.shape)}"
            )

    def _match_buffer_dtype(self, dtype: torch.dtype) -> None:
        """Give float buffers (attention masks, position tables) the parameters' dtype.

        ``module.to(dtype)`` casts buffers too, but DeepSpeed's bf16 mode converts only the
        parameters: a float32 Swin attention mask then turns a bf16 attention float32 mid-forward.
        """
        for module in self.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                    module._buffers[name] = buffer.to(dtype)

    def forward_with_states(
        self, pixel_values: torch.Tensor, output_attentions: bool = False, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """:meth:`forward` plus the tower's per-layer ``{"hidden_states", "attentions"}`` (``None`` where
        the tower does not report them; :meth:`encode_with_states` says which)."""
        pixels, *mask = self._encode_args(pixel_values, pixel_mask)
        if self.config.frozen:
            with torch.no_grad():
                return self.encode_with_states(pixels, output_attentions, *mask)
        return self.encode_with_states(pixels, output_attentions, *mask)

    def encode_with_states(self, pixel_values: torch.Tensor, output_attentions: bool = False, *pixel_mask) -> tuple[torch.Tensor, dict]:
        """:meth:`encode` plus per-layer states; towers that cannot report them return ``None`` for both.

        An aspect-preserving tower also gets its ``pixel_mask`` (as in :meth:`encode`).
        """
        return self.encode(pixel_values, *pixel_mask), {"hidden_states": None, "attentions": None}

    @property
    def input_dtype(self) -> torch.dtype:
        for param in self.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.float32

    def freeze_if_configured(self) -> None:
        if self.config.frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        # A frozen tower stays in eval mode (no dropout, fixed norm statistics) whatever its parent does.
        return super().train(mode and not self.config.frozen)

    @torch.no_grad()
    def restore_non_persistent_buffers(self) -> None:
        """Recompute buffers that are not saved (relative-position indices, attention masks, ...).

        ``from_pretrained`` materialises them as uninitialised memory. Modules that know how to
        rebuild their own (timm's ``init_non_persistent_buffers`` hook) do so; the rest are pure
        functions of the config, so a rebuild with parameters on the meta device gives their values.
        """
        handled = set()
        for prefix, sub in self.named_modules():
            if hasattr(sub, "init_non_persistent_buffers") and sub is not self:
                sub.init_non_persistent_buffers()
                handled.update(f"{prefix}.{name}" if prefix else name for name in sub._non_persistent_buffers_set)
        targets = [(name, buf) for name, buf in _named_non_persistent_buffers(self) if name not in handled]
        if not targets:
            return
        with _parameters_on_meta():
            fresh = type(self)(self.config)
        reference = dict(_named_non_persistent_buffers(fresh))
        for name, buffer in targets:
            value = reference.get(name)
            if value is None:
                continue
            if value.is_meta:
                raise RuntimeError(
                    f"cannot recompute the non-persistent buffer {name!r} of the {self.kind} tower: it depends on "
                    f"parameters; give the module an `init_non_persistent_buffers()` method"
                )
            if value.shape != buffer.shape:
                raise RuntimeError(f"recomputed buffer {name!r} has shape {tuple(value.shape)}, expected {tuple(buffer.shape)}")
            buffer.copy_(value.to(device=buffer.device, dtype=buffer.dtype))


def can_run_attn_implementation(model_class: type, implementation: str | None) -> bool:
    """Whether a transformers model class declares support for an attention implementation.

    Implementations other than SDPA, flash and flex (eager, kernels from the Hub, paged variants of
    the three) are left to the model to accept or refuse.
    """
    if implementation is None or implementation == "eager":
        return True
    name = implementation.split("|")[-1]
    if "sdpa" in name:
        return bool(getattr(model_class, "_supports_sdpa", False))
    if "flex_attention" in name:
        return bool(getattr(model_class, "_supports_flex_attn", False))
    if "flash" in name:
        return bool(getattr(model_class, "_supports_flash_attn", False))
    return True


def fit_attn_implementation(tower_config, model_class: type) -> None:
    """Let a tower model that cannot run the requested attention keep its default instead of failing.

    ``from_pretrained(..., attn_implementation="sdpa")`` sets the implementation on every sub-config
    of the Astrea config (transformers' setter recurses), tower configs included, and a model class
    without SDPA (Grounding-DINO) refuses it at construction. As in transformers' composite models,
    the string applies to the sub-models that support it: this tower's own config goes back to
    ``None`` (its default: SDPA where supported, else eager), while its nested configs (e.g.
    Grounding-DINO's Swin and BERT, which support SDPA) keep the request.
    """
    if not can_run_attn_implementation(model_class, tower_config._attn_implementation):
        tower_config._attn_implementation_internal = None


def _named_non_persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    found = []
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            buffer = sub._buffers.get(name)
            if buffer is not None:
                found.append((f"{prefix}.{name}" if prefix else name, buffer))
    return found


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device but real buffers."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    # The rebuild is a throwaway reference: under DeepSpeed ZeRO-3, transformers would build its
    # sub-models inside `deepspeed.zero.Init`, which cannot partition meta parameters.
    from transformers.integrations import deepspeed as hf_deepspeed

    zero3 = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        hf_deepspeed._hf_deepspeed_config_weak_ref = zero3


# ----------------------------------------------------------------------- weight files
def resolve_weights_file(source: str, default_filenames: tuple[str, ...] = (), **hub_kwargs) -> Path:
    """Find a weights file given a local file, a local folder, ``org/repo`` or ``org/repo/file``.

    Local paths win. A Hub id with a third path component names the file in the repo; without it
    the first of ``default_filenames`` present is used.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return path
    if path.is_dir():
        for name in default_filenames:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no weights file in {path}: looked for {list(default_filenames)}")
    parts = str(source).split("/")
    looks_local = str(source).startswith((".", "/", "~")) or path.parent.is_dir() and str(path.parent) != "."
    if len(parts) < 2 or looks_local or path.suffix in (".pth", ".pt", ".bin", ".safetensors") and Path(parts[0]).exists():
        raise FileNotFoundError(f"weights source {source!r} is neither an existing local path nor a Hub id")
    from huggingface_hub import hf_hub_download

    repo_id = "/".join(parts[:2])
    if len(parts) > 2:
        return Path(hf_hub_download(repo_id, "/".join(parts[2:]), **hub_kwargs))
    last_error = None
    for name in default_filenames:
        try:
            return Path(hf_hub_download(repo_id, name, **hub_kwargs))
        except Exception as error:  # try the next candidate name
            last_error = error
    raise FileNotFoundError(f"none of {list(default_filenames)} found in Hub repo {repo_id}: {last_error}")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a torch pickle with ``weights_only=True``.

    Pickled checkpoints that wrap the weights (``{"model": ...}``, ``{"state_dict": ...}``) are
    unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # mmap: only the tensors a tower uses are read (a RAM++ file also holds its tagging decoder).
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as error:
        raise ValueError(f"could not read checkpoint {path} with torch.load(weights_only=True): {error}") from error
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _is_zip(path: Path) -> bool:
    """``torch.save``'s zip format (the only one ``torch.load`` can memory-map)."""
    import zipfile

    return zipfile.is_zipfile(path)


def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the source and the mismatching keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"weights from {source} do not match the tower's architecture: "
            + "; ".join(
                f"{len(keys)} {what} (e.g. {keys[:5]})" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys
            )
            + "; check that the expert's tower_config matches the checkpoint"
        )
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"weights from {source} have other shapes than the tower ({len(wrong)} tensors, e.g. {k}: "
            f"{tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}); check the expert's tower_config"
        )
    if any(tensor.is_meta for tensor in own.values()):
        # A module built on the meta device (``astrea create`` assembling a paper-scale model): the
        # checkpoint's tensors become the module's, in the module's dtype, without a second copy.
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True, assign=True)
        return
    module.load_state_dict(state_dict, strict=True)


def tokens_from_feature_map(feature_map: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``(B, C, H, W)`` (or ``(B, H, W, C)``) -> ``(B, H*W, C)`` in raster order."""
    if channels_last:
        return feature_map.flatten(1, 2)
    return feature_map.flatten(2).transpose(1, 2)


__all__ = [
    "TOWER_REGISTRY",
    "ExpertTower",
    "can_run_attn_implementation",
    "fit_attn_implementation",
    "register_tower",
    "resolve_weights_file",
    "load_state_dict_file",
    "load_into",
    "tokens_from_feature_map",
]
