"""Generic timm tower: any timm backbone as a grid expert (the ``timm`` kind; base of ``ram_plus``).

Tokens are ``forward_features``' last stage, flattened to ``(B, H*W, C)`` in raster order (NCHW,
NHWC and token-sequence layouts; prefix tokens dropped). The layout and grid come from a
shape-only dry run on the meta device at construction. Details: ``docs/towers.md``.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch
from torch import nn

from .towers import (
    ExpertTower,
    load_into,
    load_state_dict_file,
    register_tower,
    resolve_weights_file,
    tokens_from_feature_map,
)

try:  # optional dependency: only the `timm` and `ram_plus` experts need it (see `require_timm`)
    import timm
    from timm.models import clean_state_dict, model_entrypoint, parse_model_name, split_model_name_tag
except ImportError as error:  # a model without timm experts still loads, e.g. from a trust_remote_code folder
    timm = None
    _TIMM_IMPORT_ERROR = error
else:
    _TIMM_IMPORT_ERROR = None


def require_timm(kind: str) -> None:
    """Raise a clear ``ImportError`` if timm, which the ``kind`` expert needs, is not installed."""
    if timm is None:
        raise ImportError(f"the {kind} expert needs the `timm` package: pip install timm") from _TIMM_IMPORT_ERROR


class _ForwardFeatures(nn.Module):
    """Adapter whose ``forward`` is the backbone's ``forward_features`` (for ``functional_call``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``tensor``'s full shape (DeepSpeed ZeRO-3 partitions a parameter at creation and
    keeps its full shape in ``ds_shape``)."""
    return torch.empty(tuple(getattr(tensor, "ds_shape", tensor.shape)), dtype=tensor.dtype, device="meta")


@register_tower("timm")
class TimmTower(ExpertTower):
    """Any timm backbone; tokens are the last stage's feature map (or patch tokens) as ``(B, H*W, C)``.

    Attributes set at construction (from the dry run):
        model: the timm backbone (classifier-free).
        grid: ``(h, w)`` token grid for a ``config.image_size`` square input.
        out_dim: token width ``C``.
        channels_last: whether 4-D features are NHWC (Swin-like) rather than NCHW (conv nets).
        num_prefix_tokens: leading non-patch tokens dropped from 3-D (ViT-like) outputs.
    """

    tower_model_types = ("timm_wrapper",)
    #: Names looked for, in order, when ``load_pretrained`` is given a folder or a bare Hub repo id.
    #: safetensors first: it cannot execute code and loads without unpickling; timm's Hub repos and
    #: OpenCLIP repos use these names. Pickles are read with ``weights_only=True``.
    default_filenames: tuple[str, ...] = (
        "model.safetensors",
        "open_clip_model.safetensors",
        "pytorch_model.bin",
        "open_clip_pytorch_model.bin",
        "model.pth",
        "pytorch_model.pth",
    )

    def __init__(self, config):
        require_timm(config.kind)
        super().__init__(config)
        tower_config = config.tower_config
        self.architecture: str = tower_config.architecture
        model_args = dict(tower_config.model_args or {})
        # The tower owns these two: weights come only from load_pretrained, and there is no classifier.
        model_args.pop("pretrained", None)
        model_args.pop("num_classes", None)
        self.model = timm.create_model(self.architecture, pretrained=False, num_classes=0, **model_args)
        self.num_prefix_tokens: int = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        self.channels_last: bool = False
        self._feature_rank = 4
        self._configure_from_dry_run()
        self.freeze_if_configured()

    # ------------------------------------------------------------------ shape discovery
    def _feature_shape(self) -> torch.Size:
        """Shape of ``forward_features`` for one ``image_size`` square image, computed on the meta device.

        ``functional_call`` swaps in meta copies of every parameter and buffer for the duration of the
        call, so nothing real is computed or modified. The backbone is put in eval mode for the probe
        (BatchNorm in train mode rejects a batch of one with a 1x1 map). If an exotic model cannot
        run on meta tensors, a real dry run on zeros (under ``no_grad``) is the fallback, possible
        only when the parameters are real.
        """
        size = self.config.image_size
        dtype = self.input_dtype
        probe = _ForwardFeatures(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            state = {f"model.{name}": _meta_like(t) for name, t in self.model.named_parameters()}
            state.update({f"model.{name}": _meta_like(t) for name, t in self.model.named_buffers()})
            x = torch.zeros(1, 3, size, size, device="meta", dtype=dtype)
            try:
                with torch.no_grad():
                    out = torch.func.functional_call(probe, state, (x,))
            except Exception as meta_error:
                if any(p.is_meta for p in self.model.parameters()):
                    raise self._dry_run_error(meta_error) from meta_error
                device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
                try:
                    with torch.no_grad():
                        out = probe(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
                except Exception as error:
                    raise self._dry_run_error(error) from error
        finally:
            self.model.train(was_training)
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"timm model {self.architecture!r}: forward_features returned a {type(out).__name__}, not a "
                f"tensor; the timm tower needs a single feature map or token sequence"
            )
        return out.shape

    def _dry_run_error(self, error: Exception) -> ValueError:
        return ValueError(
            f"timm model {self.architecture!r} cannot encode a {self.config.image_size}x{self.config.image_size} "
            f"image ({type(error).__name__}: {error}); set the model's input size in tower_config.model_args "
            f"(e.g. img_size={self.config.image_size}) to match the expert's image_size"
        )

    def _configure_from_dry_run(self) -> None:
        """Set ``grid``, ``out_dim`` and the output layout from the dry-run shape."""
        shape = self._feature_shape()
        if len(shape) == 4:
            self._feature_rank = 4
            self.channels_last = self._declares_channels_last(shape)
            if self.channels_last:
                _, h, w, c = shape
            else:
                _, c, h, w = shape
            self.grid = (int(h), int(w))
            self.out_dim = int(c)
        elif len(shape) == 3:
            self._feature_rank = 3
            num_patches = int(shape[1]) - self.num_prefix_tokens
            self.grid = self._token_grid(num_patches)
            self.out_dim = int(shape[2])
        else:
            raise ValueError(
                f"timm model {self.architecture!r}: forward_features has shape {tuple(shape)}; the timm tower "
                f"needs (B, C, H, W), (B, H, W, C) or (B, N, C) features (a pooled (B, C) output has no grid)"
            )

    def _declares_channels_last(self, shape: torch.Size) -> bool:
        """NHWC if the model says so (``output_fmt``, set by Swin-like models), else inferred, else NCHW.

        timm's convention is NCHW; the models that deviate declare ``output_fmt``. Without the
        attribute, the channel axis is the one equal to ``num_features`` when that is unambiguous.
        """
        fmt = getattr(self.model, "output_fmt", None)
        if fmt is not None:
            return str(getattr(fmt, "value", fmt)).upper() == "NHWC"
        num_features = getattr(self.model, "num_features", None)
        if num_features is not None and shape[-1] == num_features and shape[1] != num_features:
            return True
        return False

    def _token_grid(self, num_patches: int) -> tuple[int, int]:
        """Grid of a ViT-like token sequence: the patch embedding's grid, else the square it fills."""
        grid_size = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid_size is not None and int(grid_size[0]) * int(grid_size[1]) == num_patches:
            return int(grid_size[0]), int(grid_size[1])
        side = math.isqrt(max(num_patches, 0))
        if num_patches > 0 and side * side == num_patches:
            return side, side
        raise ValueError(
            f"timm model {self.architecture!r} returns {num_patches} patch tokens (after dropping "
            f"{self.num_prefix_tokens} prefix tokens), which do not form a grid"
        )

    # ------------------------------------------------------------------ encoding
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(pixel_values)
        if self._feature_rank == 4:
            return tokens_from_feature_map(features, channels_last=self.channels_last)
        return features[:, self.num_prefix_tokens :]

    # ------------------------------------------------------------------ buffers
    # ------------------------------------------------------------------ weights
    def load_pretrained(self, source: str, **hub_kwargs) -> None:
        """Load real weights from a local file / folder or a Hub id (``org/repo`` or ``org/repo/file``).

        The state dict is unwrapped (``{"model": ...}``), passed through :meth:`convert_state_dict`
        and loaded strictly (:func:`load_into`), so a checkpoint of another architecture fails with a
        ``ValueError`` that names the mismatching keys instead of loading partially.
        """
        path = resolve_weights_file(source, self.default_filenames, **hub_kwargs)
        state_dict = load_state_dict_file(path)
        state_dict = self.convert_state_dict(state_dict, source=str(path))
        load_into(self.model, state_dict, str(path))
        self.freeze_if_configured()

    def convert_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "") -> dict[str, torch.Tensor]:
        """Map a checkpoint onto the backbone's own keys, with timm's own tools only.

        1. ``timm.models.clean_state_dict``: strip DDP / ``torch.compile`` wrapper prefixes.
        2. The architecture's ``checkpoint_filter_fn`` (the function timm itself applies to pretrained
           weights): converts original-repo layouts (Microsoft Swin, FB ConvNeXt, OpenAI CLIP, ...),
           resizes position embeddings / bias tables, and is a no-op on timm-layout weights.
        3. Drop classifier keys (``pretrained_cfg["classifier"]``): the tower has ``num_classes=0``.
        """
        state_dict = clean_state_dict(state_dict)
        filter_fn = self._timm_checkpoint_filter()
        if filter_fn is not None:
            try:
                state_dict = filter_fn(state_dict, self.model)
            except Exception as error:
                # Filters look up the modules a key names (e.g. Swin's bias tables); a checkpoint of
                # a deeper / other model fails there. Name the keys without a module in this model.
                strangers = [k for k in state_dict if not self._owns_module_of(k)]
                raise ValueError(
                    f"weights from {source} do not match the tower's architecture: timm's checkpoint filter for "
                    f"{self.architecture!r} failed ({type(error).__name__}: {error}); {len(strangers)} checkpoint "
                    f"keys name modules this model lacks (e.g. {strangers[:5]}); check that the expert's "
                    f"tower_config matches the checkpoint"
                ) from error
        return self._drop_classifier(state_dict)

    def _owns_module_of(self, key: str) -> bool:
        module_path = key.rpartition(".")[0]
        try:
            self.model.get_submodule(module_path)
        except AttributeError:
            return False
        return True

    def _timm_checkpoint_filter(self) -> Callable | None:
        """timm's ``checkpoint_filter_fn`` for this architecture, if its module defines one.

        It is looked up in the module of the architecture's entrypoint (the module whose
        ``build_model_with_cfg`` call passes it as ``pretrained_filter_fn``), falling back to the
        module of the model class.
        """
        modules = []
        try:
            _, name = parse_model_name(self.architecture)
            name, _ = split_model_name_tag(name)
            modules.append(model_entrypoint(name).__module__)
        except Exception:  # hf-hub: architectures and unknown names: use the class's module
            pass
        modules.append(type(self.model).__module__)
        for module_name in modules:
            filter_fn = getattr(importlib.import_module(module_name), "checkpoint_filter_fn", None)
            if callable(filter_fn):
                return filter_fn
        return None

    def _drop_classifier(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Remove classifier-head keys the headless backbone does not have.

        Only keys under the classifier names of the model's ``pretrained_cfg`` (e.g. ``head``,
        ``head.fc``, ``fc``, ``classifier``) that the model does not own are dropped; every other
        unknown key still reaches :func:`load_into` and is reported as an architecture mismatch.
        """
        classifiers = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier") or ()
        if isinstance(classifiers, str):
            classifiers = (classifiers,)
        own = set(self.model.state_dict())
        return {
            k: v
            for k, v in state_dict.items()
            if k in own or not any(k == c or k.startswith(c + ".") for c in classifiers)
        }


__all__ = ["TimmTower", "require_timm"]
