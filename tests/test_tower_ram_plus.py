"""Tests of the RAM++ tower (``kind="ram_plus"``), above all loading the ORIGINAL RAM++ checkpoint format.

RAM++'s ``ram_plus_swin_large_14m.pth`` is ``{"model": state_dict}`` of the whole tagging model; its
image encoder sits under ``visual_encoder.`` in the original Microsoft Swin layout. To test the
conversion without the RAM++ package or its 3 GB file, :class:`OriginalSwin` below is a small,
independent re-implementation of that layout and of its forward pass:

* ``layers.{i}.downsample`` (PatchMerging) at the END of stage ``i`` (none after the last stage);
* ``relative_position_index`` and, in shifted blocks, ``attn_mask`` as *persistent* buffers;
* PatchMerging concatenating the 2x2 neighbours in the order (0,0), (1,0), (0,1), (1,1);
* RAM++'s output ``[mean token, grid tokens]`` after the final LayerNorm.

It is written from the Swin paper's definitions, not from timm, so agreement between the tower
(timm layout + timm's ``checkpoint_filter_fn``) and this model checks the conversion end to end.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from astrea_vlm.configuration import get_preset
from astrea_vlm.configuration.configuration_astrea import AstreaExpertConfig
from astrea_vlm.modeling.tower_ram_plus import RamPlusTower
from astrea_vlm.modeling.towers import TOWER_REGISTRY, load_into


# ----------------------------------------------------------------------------------------------
# An independent Swin in the original (Microsoft / RAM++) layout
# ----------------------------------------------------------------------------------------------
def split_windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, w * w, C), windows in raster order per image."""
    b, h, wd, c = x.shape
    x = x.reshape(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def merge_windows(windows: torch.Tensor, w: int, b: int, h: int, wd: int) -> torch.Tensor:
    """Inverse of :func:`split_windows`."""
    c = windows.shape[-1]
    x = windows.reshape(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, c)


def relative_index(w: int) -> torch.Tensor:
    """Index into a ((2w-1)^2, heads) bias table for each pair of positions (a, b) of a window."""
    ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + (w - 1)
    dx = xs[:, None] - xs[None, :] + (w - 1)
    return dy * (2 * w - 1) + dx


def shifted_window_mask(h: int, wd: int, w: int, shift: int) -> torch.Tensor:
    """(num_windows, w*w, w*w) additive mask: -100 between tokens that came from different image
    regions before the cyclic shift, 0 within a region."""
    def regions(n):
        label = torch.zeros(n, dtype=torch.long)
        label[n - w : n - shift] = 1
        label[n - shift :] = 2
        return label

    area = regions(h)[:, None] * 3 + regions(wd)[None, :]  # (H, W) region id
    windows = split_windows(area[None, :, :, None].float(), w)[..., 0]  # (nW, w*w)
    same = windows[:, :, None] == windows[:, None, :]
    return torch.where(same, 0.0, -100.0)


class OriginalAttention(nn.Module):
    def __init__(self, dim: int, heads: int, w: int):
        super().__init__()
        self.heads, self.w = heads, w
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_index(w))  # persistent, as in RAM++
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n_win, n, c = x.shape
        q, k, v = self.qkv(x).reshape(n_win, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q * (c // self.heads) ** -0.5) @ k.transpose(-1, -2)  # (nW*B, heads, n, n)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        scores = scores + bias.reshape(n, n, self.heads).permute(2, 0, 1)
        if mask is not None:
            per_image = mask.shape[0]
            scores = (scores.reshape(-1, per_image, self.heads, n, n) + mask[None, :, None]).reshape(-1, self.heads, n, n)
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n_win, n, c))


class OriginalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, resolution: int, window: int, shifted: bool):
        super().__init__()
        self.resolution = resolution
        # A window at least as large as the map covers it whole, and then nothing is shifted.
        self.window = min(window, resolution)
        self.shift = window // 2 if shifted and resolution > window else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = OriginalAttention(dim, heads, self.window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        mask = shifted_window_mask(resolution, resolution, self.window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask)  # persistent when present, as in RAM++

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C)
        b, length, c = x.shape
        r, w, s = self.resolution, self.window, self.shift
        y = self.norm1(x).reshape(b, r, r, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = merge_windows(self.attn(split_windows(y, w), self.attn_mask), w, b, r, r)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, length, c)
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class OriginalPatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.reshape(b, self.resolution, self.resolution, c)
        neighbours = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(neighbours, -1).reshape(b, -1, 4 * c)))


class OriginalStage(nn.Module):
    def __init__(self, dim, depth, heads, resolution, window, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(OriginalBlock(dim, heads, resolution, window, i % 2 == 1) for i in range(depth))
        self.downsample = OriginalPatchMerging(dim, resolution) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class OriginalSwin(nn.Module):
    """Swin in the RAM++ layout; ``forward`` returns RAM++'s ``[mean token, grid tokens]``."""

    def __init__(self, img_size, embed_dim, depths, num_heads, window_size, patch_size=4):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        resolution, dim, last = img_size // patch_size, embed_dim, len(depths) - 1
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stages.append(OriginalStage(dim, depth, heads, resolution, window_size, downsample=i < last))
            if i < last:
                resolution, dim = resolution // 2, dim * 2
        self.layers = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.norm(self.patch_embed.proj(images).flatten(2).transpose(1, 2))
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(1, keepdim=True), x], dim=1)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def tiny_expert(**model_args) -> AstreaExpertConfig:
    """The tiny preset's classification expert, optionally with other Swin ``model_args``."""
    config = get_preset("tiny").classification_config
    if not model_args:
        return config
    data = config.to_dict()
    data["tower_config"]["model_args"].update(model_args)
    return AstreaExpertConfig(**data)


def reference_for(config: AstreaExpertConfig, seed: int, **overrides) -> OriginalSwin:
    args = dict(config.tower_config.model_args, **overrides)
    model = OriginalSwin(args["img_size"], args["embed_dim"], args["depths"], args["num_heads"], args["window_size"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if isinstance(dict(model.named_modules())[name.rsplit(".", 1)[0]], nn.LayerNorm):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif name.endswith("relative_position_bias_table"):
                param.copy_(noise)  # large, so that a wrong index would change the output clearly
            else:
                param.copy_(noise * (param[0].numel() ** -0.5))
    return model.eval()


def save_ram_plus_checkpoint(model: OriginalSwin, path) -> None:
    """Write ``{"model": ...}`` like ram_plus_swin_large_14m.pth: the encoder under ``visual_encoder.``
    plus the tagging model's other (here fake, small) tensors."""
    state = {"visual_encoder." + k: v for k, v in model.state_dict().items()}
    state.update(
        {
            "tagging_head.encoder.layer.0.crossattention.self.query.weight": torch.randn(8, 8),
            "tagging_head.weight": torch.randn(4, 8),
            "label_embed": torch.randn(12, 8),
            "image_proj.weight": torch.randn(8, model.norm.normalized_shape[0]),
            "image_proj.bias": torch.randn(8),
            "wordvec_proj.weight": torch.randn(8, 8),
            "fc.weight": torch.randn(1, 8),
            "reweight_scale": torch.tensor(2.65),
        }
    )
    torch.save({"model": state}, path)


def pixels(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
def test_registered():
    assert TOWER_REGISTRY["ram_plus"] is RamPlusTower


def test_tiny_tower_shapes_and_batch_invariance():
    config = tiny_expert()
    tower = RamPlusTower(config)
    assert tower.grid == (4, 4) and tower.num_tokens == 16 and tower.out_dim == 32
    x = pixels(3)
    tokens = tower(x)
    assert tokens.shape == (3, tower.grid[0] * tower.grid[1], tower.out_dim)
    assert torch.isfinite(tokens).all()
    torch.testing.assert_close(tower(x[2:3])[0], tokens[2], atol=1e-5, rtol=1e-5)


def test_frozen_and_input_validation():
    tower = RamPlusTower(tiny_expert())
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.model.training
    with pytest.raises(ValueError, match=r"expects pixel_values of shape \(batch, 3, 32, 32\)"):
        tower(torch.zeros(2, 3, 48, 48))
    with pytest.raises(ValueError):
        tower(torch.zeros(3, 32, 32))


def test_reference_model_is_the_original_layout():
    """The reference really has the RAM++ key layout the conversion must handle."""
    keys = set(reference_for(tiny_expert(depths=[2, 2]), seed=0).state_dict())
    assert "layers.0.downsample.reduction.weight" in keys and "layers.1.downsample.reduction.weight" not in keys
    assert "layers.0.blocks.0.attn.relative_position_index" in keys
    assert "layers.0.blocks.1.attn_mask" in keys  # shifted block (8x8 map, window 4)
    assert "layers.1.blocks.1.attn_mask" not in keys  # 4x4 map = one window: no shift, no mask


@pytest.mark.parametrize("depths", [[1, 1], [2, 2]], ids=["tiny-preset", "shifted-windows"])
def test_loads_original_ram_plus_checkpoint(tmp_path, depths):
    config = tiny_expert(depths=depths)
    reference = reference_for(config, seed=1)
    path = tmp_path / "ram_plus_swin_large_14m.pth"
    save_ram_plus_checkpoint(reference, path)

    tower = RamPlusTower(config)
    x = pixels(2)
    before = tower(x)
    tower.load_pretrained(str(path))

    with torch.no_grad():
        expected = reference(x)
    tokens = tower(x)
    assert not torch.allclose(tokens, before)
    torch.testing.assert_close(tokens, expected[:, 1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens.mean(1), expected[:, 0], atol=1e-5, rtol=1e-4)  # RAM++'s CLS = mean
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training

    # A folder holding the released file name is found as well.
    other = RamPlusTower(config)
    other.load_pretrained(str(tmp_path))
    torch.testing.assert_close(other(x), tokens)


def test_wrong_architecture_is_named(tmp_path):
    config = tiny_expert()
    deeper = tmp_path / "deeper.pth"
    save_ram_plus_checkpoint(reference_for(config, seed=2, depths=[3, 2]), deeper)
    with pytest.raises(ValueError, match=r"do not match the tower's architecture.*layers\.0\.blocks\.2"):
        RamPlusTower(config).load_pretrained(str(deeper))

    wider = tmp_path / "wider.pth"
    save_ram_plus_checkpoint(reference_for(config, seed=2, embed_dim=24), wider)
    with pytest.raises(ValueError, match="other shapes than the tower"):
        RamPlusTower(config).load_pretrained(str(wider))

    not_ram = tmp_path / "not_ram.pth"
    torch.save({"model": {"tagging_head.weight": torch.zeros(2, 2), "label_embed": torch.zeros(3, 2)}}, not_ram)
    with pytest.raises(ValueError, match="no RAM\\+\\+ image encoder: no `visual_encoder.\\*` keys"):
        RamPlusTower(config).load_pretrained(str(not_ram))


def test_missing_file_is_a_clear_error(tmp_path):
    tower = RamPlusTower(tiny_expert())
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor a Hub id"):
        tower.load_pretrained(str(tmp_path / "ram_plus_swin_large_14m.pth"))
    with pytest.raises(FileNotFoundError, match="ram_plus_swin_large_14m.pth"):
        tower.load_pretrained(str(tmp_path))  # a folder without the checkpoint


def test_non_swin_architecture_is_rejected():
    data = tiny_expert().to_dict()
    data["tower_config"]["architecture"] = "resnet18"
    data["tower_config"]["model_args"] = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
    with pytest.raises(ValueError, match="needs a timm Swin Transformer"):
        RamPlusTower(AstreaExpertConfig(**data))


@pytest.mark.parametrize("depths", [[1, 1], [2, 2]], ids=["tiny-preset", "shifted-windows"])
def test_restore_non_persistent_buffers(tmp_path, depths):
    config = tiny_expert(depths=depths)
    path = tmp_path / "ram.pth"
    save_ram_plus_checkpoint(reference_for(config, seed=3), path)
    tower = RamPlusTower(config)
    tower.load_pretrained(str(path))
    x = pixels(2)
    reference = tower(x)
    garbage = [b for m in tower.modules() for n, b in m._buffers.items() if n in m._non_persistent_buffers_set and b is not None]
    assert any(not b.is_floating_point() for b in garbage)  # relative_position_index
    assert (depths == [2, 2]) == any(b.is_floating_point() for b in garbage)  # attn_mask of the shifted block
    with torch.no_grad():
        for buffer in garbage:
            buffer.copy_(torch.zeros_like(buffer) if not buffer.is_floating_point() else torch.randn_like(buffer) * 50)
    assert not torch.allclose(tower(x), reference)
    tower.restore_non_persistent_buffers()
    torch.testing.assert_close(tower(x), reference)


def test_paper_config_is_ram_plus_swin_large():
    """astrea-13b's classification expert is RAM++'s Swin-L@384, and the original RAM++ key layout
    converts onto it key for key, shape for shape (all on the meta device: nothing is allocated or
    downloaded)."""
    config = get_preset("astrea-13b").classification_config
    with torch.device("meta"):
        tower = RamPlusTower(config)
        original = OriginalSwin(384, 192, [2, 2, 18, 2], [6, 12, 24, 48], 12)
    swin = tower.model
    assert tower.grid == (12, 12) and tower.num_tokens == 144 and tower.out_dim == 1536
    assert swin.embed_dim == 192 and [len(s.blocks) for s in swin.layers] == [2, 2, 18, 2]
    assert [s.blocks[0].attn.num_heads for s in swin.layers] == [6, 12, 24, 48]
    assert all(b.window_size == (12, 12) for s in swin.layers for b in s.blocks)
    num_params = sum(p.numel() for p in tower.parameters())
    assert num_params == sum(p.numel() for p in original.parameters())
    assert 190e6 < num_params < 200e6  # Swin-L without classifier: 195.2M

    state = {"visual_encoder." + k: v for k, v in original.state_dict().items()}
    state["label_embed"] = torch.empty(4, 4, device="meta")
    converted = tower.convert_state_dict(state, source="ram_plus_swin_large_14m.pth")
    own = swin.state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    load_into(swin, converted, "ram_plus_swin_large_14m.pth")
