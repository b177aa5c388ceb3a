"""Tests of the generic timm tower (``kind="timm"``): shapes, layouts, freezing and weight loading.

Everything is random and tiny (CPU, no network): a 2-stage toy Swin (NHWC output), a ResNet with
one block per stage and 8-64 channels (NCHW output) and a 2-block ViT with a CLS token and two
register tokens (token output with prefix tokens).
"""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from astrea_vlm.configuration import get_preset
from astrea_vlm.configuration.configuration_astrea import AstreaExpertConfig
from astrea_vlm.modeling.tower_timm import TimmTower
from astrea_vlm.modeling.towers import TOWER_REGISTRY

RESNET_ARGS = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 2}


def timm_expert(architecture: str, model_args: dict, image_size: int) -> AstreaExpertConfig:
    return AstreaExpertConfig(
        kind="timm",
        image_size=image_size,
        tower_config={"model_type": "timm_wrapper", "architecture": architecture, "model_args": model_args, "do_pooling": False},
    )


def tiny_swin_expert() -> AstreaExpertConfig:
    """The tiny preset's classification expert (a toy Swin) as a generic ``timm`` expert."""
    config = get_preset("tiny").classification_config
    return timm_expert(config.tower_config.architecture, dict(config.tower_config.model_args), config.image_size)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every float parameter and BatchNorm statistic a seeded random value, so that outputs
    depend on every tensor (timm zero-inits some, e.g. ResNet's last BN gamma per block).
    Swin's relative-position bias tables (2-D) get fan-in scaled noise like the weights."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("running_var"):
            tensor.copy_(1.0 + noise.abs())
        elif name.endswith("weight") and tensor.dim() == 1:  # norm scales
            tensor.copy_(1.0 + 0.2 * noise)
        elif tensor.dim() >= 2:  # matrices / kernels: fan-in scaled, activations stay O(1)
            tensor.copy_(noise * (tensor[0].numel() ** -0.5))
        else:
            tensor.copy_(0.2 * noise)
    return model


def pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registered():
    assert TOWER_REGISTRY["timm"] is TimmTower


@pytest.mark.parametrize(
    "make_config, grid, out_dim, channels_last, prefix",
    [
        (tiny_swin_expert, (4, 4), 32, True, 0),
        (lambda: timm_expert("resnet18", RESNET_ARGS, 64), (2, 2), 64, False, 0),
        (lambda: timm_expert("vit_tiny_patch16_224", VIT_ARGS, 32), (4, 4), 32, False, 3),
    ],
    ids=["swin-nhwc", "resnet-nchw", "vit-cls-reg"],
)
def test_shapes_batch_invariance_and_layout(make_config, grid, out_dim, channels_last, prefix):
    config = make_config()
    tower = TimmTower(config)
    randomize_(tower.model, seed=1)
    assert tower.grid == grid and tower.out_dim == out_dim
    assert tower.num_tokens == grid[0] * grid[1]
    assert tower.channels_last is channels_last and tower.num_prefix_tokens == prefix

    x = pixels(3, config.image_size)
    tokens = tower(x)
    assert tokens.shape == (3, tower.num_tokens, tower.out_dim)
    assert torch.isfinite(tokens).all()
    # The same image alone and inside a batch gives the same tokens (no cross-sample leakage).
    alone = tower(x[1:2])
    torch.testing.assert_close(alone[0], tokens[1], atol=1e-5, rtol=1e-5)


def test_tokens_are_the_raw_features_in_raster_order():
    """Independent of the tower's layout logic: index the raw feature map / sequence by hand."""
    swin = TimmTower(tiny_swin_expert())
    x = pixels(2, 32)
    features = swin.model.forward_features(x)  # (B, H, W, C)
    tokens = swin(x)
    h, w = swin.grid
    for row, col in [(0, 0), (0, 3), (2, 1), (3, 3)]:
        torch.testing.assert_close(tokens[:, row * w + col], features[:, row, col])

    resnet = TimmTower(timm_expert("resnet18", RESNET_ARGS, 64))
    x = pixels(2, 64)
    features = resnet.model.forward_features(x)  # (B, C, H, W)
    tokens = resnet(x)
    torch.testing.assert_close(tokens[:, 1 * 2 + 0], features[:, :, 1, 0])

    vit = TimmTower(timm_expert("vit_tiny_patch16_224", VIT_ARGS, 32))
    x = pixels(2, 32)
    sequence = vit.model.forward_features(x)  # (B, 1 CLS + 2 registers + 16 patches, C)
    assert sequence.shape[1] == 1 + 2 + 16
    torch.testing.assert_close(vit(x), sequence[:, 3:])


def test_frozen_and_input_validation():
    tower = TimmTower(tiny_swin_expert())
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.model.training
    for bad in (torch.zeros(1, 3, 16, 16), torch.zeros(3, 32, 32), torch.zeros(1, 1, 32, 32), torch.zeros(1, 3, 32, 64)):
        with pytest.raises(ValueError, match="expects pixel_values of shape"):
            tower(bad)


def test_unfrozen_tower_trains():
    config = tiny_swin_expert()
    config.frozen = False
    tower = TimmTower(config)
    tower.train()
    assert tower.training and all(p.requires_grad for p in tower.parameters())
    tower(pixels(1, 32)).sum().backward()
    assert tower.model.patch_embed.proj.weight.grad is not None


def test_mismatched_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="img_size=48"):
        TimmTower(timm_expert("vit_tiny_patch16_224", VIT_ARGS, 48))


@pytest.mark.parametrize(
    "make_source, architecture, model_args, size",
    [
        # A classifier checkpoint: its head keys (fc.*) are dropped, the backbone must match exactly.
        (lambda: timm.create_model("resnet18", pretrained=False, num_classes=7, **RESNET_ARGS), "resnet18", RESNET_ARGS, 64),
        (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **VIT_ARGS), "vit_tiny_patch16_224", VIT_ARGS, 32),
    ],
    ids=["resnet", "vit"],
)
def test_load_safetensors_folder(tmp_path, make_source, architecture, model_args, size):
    source = randomize_(make_source().eval(), seed=2)
    assert any(k.startswith(("fc.", "head.")) for k in source.state_dict())  # the head is in the file
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))

    tower = TimmTower(timm_expert(architecture, model_args, size))
    x = pixels(2, size)
    before = tower(x)
    tower.load_pretrained(str(tmp_path))

    expected = source.forward_features(x)
    expected = expected.flatten(2).transpose(1, 2) if expected.dim() == 4 else expected[:, source.num_prefix_tokens :]
    tokens = tower(x)
    torch.testing.assert_close(tokens, expected)
    assert not torch.allclose(tokens, before)
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training


def test_folder_prefers_safetensors_and_falls_back_to_pickle(tmp_path):
    config = timm_expert("resnet18", RESNET_ARGS, 64)
    x = pixels(1, 64)
    first, second = randomize_(TimmTower(config).model, 3), randomize_(TimmTower(config).model, 4)
    save_file(dict(first.state_dict()), str(tmp_path / "model.safetensors"))
    torch.save(second.state_dict(), tmp_path / "pytorch_model.bin")

    tower = TimmTower(config)
    tower.load_pretrained(str(tmp_path))
    torch.testing.assert_close(tower(x), first.forward_features(x).flatten(2).transpose(1, 2))

    (tmp_path / "model.safetensors").unlink()
    tower.load_pretrained(str(tmp_path))
    torch.testing.assert_close(tower(x), second.forward_features(x).flatten(2).transpose(1, 2))

    # A single file works too, whatever its name.
    torch.save({"state_dict": first.state_dict()}, tmp_path / "weights.pth")
    tower.load_pretrained(str(tmp_path / "weights.pth"))
    torch.testing.assert_close(tower(x), first.forward_features(x).flatten(2).transpose(1, 2))


def test_swin_timm_layout_roundtrip(tmp_path):
    """timm-layout Swin weights pass through timm's Swin filter unchanged (the filter is idempotent)."""
    config = tiny_swin_expert()
    source = randomize_(TimmTower(config).model, 5)
    save_file(dict(source.state_dict()), str(tmp_path / "model.safetensors"))
    tower = TimmTower(config)
    tower.load_pretrained(str(tmp_path / "model.safetensors"))
    x = pixels(2, 32)
    torch.testing.assert_close(tower(x), source.forward_features(x).flatten(1, 2))


def test_wrong_checkpoint_and_missing_file(tmp_path):
    other = timm.create_model("resnet18", pretrained=False, num_classes=0, **dict(RESNET_ARGS, layers=[2, 1, 1, 1]))
    save_file(dict(other.state_dict()), str(tmp_path / "model.safetensors"))
    tower = TimmTower(timm_expert("resnet18", RESNET_ARGS, 64))
    with pytest.raises(ValueError, match="do not match the tower's architecture"):
        tower.load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor a Hub id"):
        tower.load_pretrained(str(tmp_path / "missing.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        tower.load_pretrained(str(empty))


def test_restore_non_persistent_buffers():
    """Garbage in the non-persistent buffers (Swin's relative_position_index) is recomputed."""
    tower = TimmTower(tiny_swin_expert())
    randomize_(tower.model, 6)
    x = pixels(2, 32)
    reference = tower(x)
    buffers = [b for m in tower.modules() for n, b in m._buffers.items() if n in m._non_persistent_buffers_set and b is not None]
    assert buffers
    with torch.no_grad():
        for buffer in buffers:
            buffer.copy_(torch.randint_like(buffer, 0, 3) if not buffer.is_floating_point() else torch.randn_like(buffer))
    assert not torch.allclose(tower(x), reference)
    tower.restore_non_persistent_buffers()
    torch.testing.assert_close(tower(x), reference)


def test_build_on_meta_device():
    """Shape discovery needs no real compute: the tower builds entirely on the meta device."""
    with torch.device("meta"):
        tower = TimmTower(timm_expert("vit_tiny_patch16_224", VIT_ARGS, 32))
    assert tower.grid == (4, 4) and tower.out_dim == 32
    assert all(p.is_meta for p in tower.parameters())
