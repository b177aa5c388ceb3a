"""SAM2 tower: tokens, freezing, and loading ORIGINAL SAM2 checkpoints (``image_encoder.*`` keys).

How the original checkpoint format is tested without the ``sam2`` package
--------------------------------------------------------------------------
The key conversion is only worth something if the converted weights compute what the original
encoder computes. A round trip through the inverse of our own mapping cannot show that: a mapping
that is wrong in a shape-preserving way (say, ``norm1``/``norm2`` swapped in a block whose input and
output widths agree) inverts cleanly and passes. So this file carries a small, independent,
readable re-implementation of the original modules -- ``Hiera`` (``trunk``), ``FpnNeck`` (``neck``)
and ``ImageEncoder(scalp=1)`` from ``sam2/modeling/backbones`` of sam2 1.1.0 -- with the original
attribute names, so that its ``state_dict()`` *is* the original layout. The tests write that state
dict as a SAM2 release does (``torch.save({"model": {"image_encoder.<key>": tensor, ...}})``, plus
mask-decoder / memory tensors that must be ignored), load it through ``Sam2Tower.load_pretrained``
(``torch.load(weights_only=True)``) and compare the tower's tokens with the re-implementation's
``backbone_fpn`` output. During development the re-implementation and the tower were both checked
against the real ``sam2`` 1.1.0 sources (tiny, Hiera-T-like and Hiera-L layouts): max abs difference
0.0. A frozen golden value was not added: the comparison against the original computation already
pins the numbers, and a golden constant would only re-test that.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from astrea_vlm.configuration import get_preset
from astrea_vlm.configuration.configuration_astrea import AstreaExpertConfig
from astrea_vlm.modeling.tower_sam2 import Sam2Tower, convert_original_sam2_state_dict
from astrea_vlm.modeling.towers import TOWER_REGISTRY, _named_non_persistent_buffers


# ------------------------------------------------------------------ original SAM2 layout (reference)
def _window_partition(x: torch.Tensor, window: int):
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def _window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]):
    (hp, wp), (h, w) = padded, size
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.reshape(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :h, :w]


def _pool(x: torch.Tensor, stride):  # (B, H, W, C) max-pool, as the original `do_pool`
    if stride is None:
        return x
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).permute(0, 2, 3, 1)


class _PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class _MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])

    def forward(self, x):
        return self.layers[1](F.gelu(self.layers[0](x)))


class _MultiScaleAttention(nn.Module):
    def __init__(self, dim, dim_out, heads, q_stride):
        super().__init__()
        self.heads, self.q_stride = heads, q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x):
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).unbind(2)
        if self.q_stride:
            q = _pool(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.heads, -1)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(b, h, w, -1))


class _MultiScaleBlock(nn.Module):
    def __init__(self, dim, dim_out, heads, window, q_stride):
        super().__init__()
        self.dim, self.dim_out, self.window, self.q_stride = dim, dim_out, window, q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _MultiScaleAttention(dim, dim_out, heads, q_stride)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = _MLP(dim_out, 4 * dim_out)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = _pool(self.proj(x), self.q_stride)
        window = self.window
        if window > 0:
            x, padded = _window_partition(x, window)
        x = self.attn(x)
        if window > 0:
            if self.q_stride:  # windows shrank with the queries
                window //= self.q_stride[0]
                h, w = shortcut.shape[1:3]
                padded = (h + (window - h % window) % window, w + (window - w % window) % window)
            x = _window_unpartition(x, window, padded, shortcut.shape[1:3])
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class _Hiera(nn.Module):
    """The original trunk: stage-first blocks take the previous stage's window and width."""

    def __init__(self, embed_dim, heads, stages, global_blocks, background, window_spec, q_pool=3):
        super().__init__()
        self.patch_embed = _PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *background))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.blocks = nn.ModuleList()
        dim, stage = embed_dim, 0
        for i in range(sum(stages)):
            window = 0 if i in global_blocks else window_spec[stage]
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out, heads, stage = 2 * dim, 2 * heads, stage + 1
            self.blocks.append(_MultiScaleBlock(dim, dim_out, heads, window, (2, 2) if i in pool_blocks else None))
            dim = dim_out
        self.channel_list = [self.blocks[i].dim_out for i in self.stage_ends[::-1]]

    def forward(self, x):
        x = self.patch_embed(x)
        pos = F.interpolate(self.pos_embed, size=x.shape[1:3], mode="bicubic")
        tiles = [a // b for a, b in zip(pos.shape, self.pos_embed_window.shape)]
        x = x + (pos + self.pos_embed_window.tile(tiles)).permute(0, 2, 3, 1)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs  # high -> low resolution


class _FpnNeck(nn.Module):
    """The original neck: conv K reads trunk stage 3-K; top-down (nearest, sum) only on levels 2, 3."""

    def __init__(self, d_model, channel_list, top_down_levels=(2, 3)):
        super().__init__()
        self.top_down_levels = top_down_levels
        self.convs = nn.ModuleList()
        for dim in channel_list:
            conv = nn.Sequential()
            conv.add_module("conv", nn.Conv2d(dim, d_model, kernel_size=1))
            self.convs.append(conv)

    def forward(self, xs):
        out, prev, n = [None] * len(self.convs), None, len(self.convs) - 1
        for i in range(n, -1, -1):
            lateral = self.convs[n - i](xs[i])
            if i in self.top_down_levels and prev is not None:
                prev = lateral + F.interpolate(prev.float(), scale_factor=2.0, mode="nearest")
            else:
                prev = lateral
            out[i] = prev
        return out


class _OriginalImageEncoder(nn.Module):
    def __init__(self, tower_config):
        super().__init__()
        bb = tower_config.backbone_config
        self.trunk = _Hiera(
            bb.hidden_size,
            bb.num_attention_heads,
            bb.blocks_per_stage,
            bb.global_attention_blocks,
            bb.window_positional_embedding_background_size,
            bb.window_size_per_stage,
        )
        self.neck = _FpnNeck(tower_config.fpn_hidden_size, self.trunk.channel_list)

    def forward(self, x):
        return {"backbone_fpn": self.neck(self.trunk(x))[:-1]}  # scalp=1: drop the stride-32 level


def _original_encoder(tower_config, seed=0):
    torch.manual_seed(seed)
    encoder = _OriginalImageEncoder(tower_config).eval()
    with torch.no_grad():
        for param in encoder.parameters():
            param.normal_(0.0, 0.2)  # pos embeds included: every tensor must reach the tower
    return encoder


def _save_original_checkpoint(encoder, path):
    """Write ``encoder`` as a SAM2 release does: ``{"model": {...}}`` with the other modules' tensors too."""
    state = {f"image_encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}
    state["sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight"] = torch.randn(8, 4)
    state["sam_mask_decoder.conv_s0.weight"] = torch.randn(4, 8, 1, 1)
    state["memory_attention.layers.0.self_attn.q_proj.weight"] = torch.randn(4, 4)
    state["no_mem_embed"] = torch.randn(1, 1, 8)
    torch.save({"model": state}, path)
    return path


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def config():
    return get_preset("tiny").segmentation_config


def _with(config, **changes):
    return AstreaExpertConfig(**{**copy.deepcopy(config.to_dict()), **changes})


def _pixels(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- tests
def test_registered_and_tokens_have_the_grid_shape(config):
    assert TOWER_REGISTRY["sam2"] is Sam2Tower
    tower = Sam2Tower(config)
    tokens = tower(_pixels(2))
    assert tower.grid == (8, 8) and tower.out_dim == 32  # level 0 = stride 4 at 32 px, fpn_hidden_size
    assert tokens.shape == (2, tower.num_tokens, tower.out_dim) == (2, 64, 32)
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_grid_from_config_matches_the_fpn_level(config, size, level):
    tower = Sam2Tower(_with(config, image_size=size, feature_level=level))
    with torch.no_grad():
        fpn = tower.model(pixel_values=_pixels(1, size)).fpn_hidden_states
    assert tower.grid == tuple(fpn[level].shape[-2:]) == (size // 4 >> level,) * 2
    assert tower(_pixels(1, size)).shape == (1, tower.grid[0] * tower.grid[1], 32)


def test_paper_preset_reads_the_stride16_image_embedding():
    paper = get_preset("astrea-13b").segmentation_config
    assert paper.feature_level == 2
    assert Sam2Tower._level_grid(paper.tower_config, paper.image_size, paper.feature_level) == (64, 64)
    assert paper.tower_config.fpn_hidden_size == 256  # 64 x 64 x 256 at 1024 px


def test_feature_level_out_of_range_raises(config):
    with pytest.raises(ValueError, match="feature_level=3"):
        Sam2Tower(_with(config, feature_level=3))


def test_one_image_alone_equals_the_same_image_in_a_batch(config):
    tower = Sam2Tower(config)
    pixels = _pixels(3, seed=1)
    torch.testing.assert_close(tower(pixels[1:2]), tower(pixels)[1:2], rtol=0, atol=1e-5)


def test_frozen_tower_has_no_grad_and_stays_in_eval(config):
    tower = Sam2Tower(config)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.model.training
    assert not tower(_pixels(1)).requires_grad


@pytest.mark.parametrize("shape", [(2, 3, 31, 32), (2, 1, 32, 32), (3, 32, 32), (2, 3, 64, 64)])
def test_wrong_input_shape_raises(config, shape):
    with pytest.raises(ValueError, match="expects pixel_values of shape"):
        Sam2Tower(config)(torch.zeros(shape))


def test_original_checkpoint_loads_with_weights_only_and_matches_the_original_encoder(config, tmp_path, monkeypatch):
    encoder = _original_encoder(config.tower_config)
    path = _save_original_checkpoint(encoder, tmp_path / "sam2.1_hiera_tiny.pt")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    pixels = _pixels(2, seed=3)
    with torch.no_grad():
        reference = encoder(pixels)["backbone_fpn"]
    for level in range(3):
        tower = Sam2Tower(_with(config, feature_level=level))
        tower.load_pretrained(str(path))
        expected = reference[level].flatten(2).transpose(1, 2)
        torch.testing.assert_close(tower(pixels), expected, rtol=0, atol=1e-5)
    assert calls and all(flag is True for flag in calls)


def test_converter_maps_every_encoder_tensor_and_drops_the_rest(config):
    state = {f"image_encoder.{k}": v for k, v in _original_encoder(config.tower_config).state_dict().items()}
    state["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 4)
    converted = convert_original_sam2_state_dict(state)
    assert set(converted) == set(Sam2Tower(config).model.state_dict())
    assert converted["backbone.blocks.3.mlp.proj_in.weight"] is state["image_encoder.trunk.blocks.3.mlp.layers.0.weight"]
    assert converted["neck.convs.1.bias"] is state["image_encoder.neck.convs.1.conv.bias"]


def test_transformers_folders_load_both_vision_model_and_full_sam2_layouts(config, tmp_path):
    from transformers import Sam2Config, Sam2Model, Sam2VisionModel

    torch.manual_seed(4)
    source = Sam2VisionModel(config.tower_config).eval()
    with torch.no_grad():
        source.backbone.pos_embed.normal_()  # zero-initialised otherwise
        expected = source(pixel_values=_pixels(2)).fpn_hidden_states[0].flatten(2).transpose(1, 2)
    source.save_pretrained(tmp_path / "vision")
    full = Sam2Model(
        Sam2Config(
            vision_config=config.tower_config.to_dict(),
            prompt_encoder_config={"hidden_size": 32, "image_size": 32, "patch_size": 16},
            mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
        )
    )
    full.vision_encoder.load_state_dict(source.state_dict())
    full.save_pretrained(tmp_path / "full")
    for folder in ("vision", "full"):
        tower = Sam2Tower(config)
        tower.load_pretrained(str(tmp_path / folder))
        torch.testing.assert_close(tower(_pixels(2)), expected, rtol=0, atol=1e-5)


def test_checkpoint_of_another_architecture_raises_value_error(config, tmp_path):
    deeper = copy.deepcopy(config.tower_config)
    deeper.backbone_config.blocks_per_stage = [1, 2, 2, 1]
    deeper.backbone_config.global_attention_blocks = [4]
    path = _save_original_checkpoint(_original_encoder(deeper), tmp_path / "sam2_deeper.pt")
    with pytest.raises(ValueError, match="do not match the tower's architecture"):
        Sam2Tower(config).load_pretrained(str(path))

    sam1 = {"image_encoder.blocks.0.norm1.weight": torch.ones(4), "image_encoder.neck.0.weight": torch.ones(4, 4, 1, 1)}
    torch.save({"model": sam1}, tmp_path / "sam_vit_b.pt")
    with pytest.raises(ValueError, match="not an original SAM2"):
        Sam2Tower(config).load_pretrained(str(tmp_path / "sam_vit_b.pt"))

    torch.save({"state_dict": {"fc.weight": torch.ones(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a SAM2 image encoder"):
        Sam2Tower(config).load_pretrained(str(tmp_path / "other.pt"))


def test_restore_non_persistent_buffers_keeps_outputs(config):
    tower = Sam2Tower(config)
    pixels = _pixels(2, seed=5)
    expected = tower(pixels)
    buffers = _named_non_persistent_buffers(tower)
    # Hiera + FPN compute their windows and sine encodings on the fly: nothing to restore today.
    assert buffers == []
    with torch.no_grad():
        for _, buffer in buffers:
            buffer.fill_(math.nan if buffer.is_floating_point() else -7)
    tower.restore_non_persistent_buffers()
    torch.testing.assert_close(tower(pixels), expected, rtol=0, atol=0)
