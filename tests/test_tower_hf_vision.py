"""Generic transformers towers (siglip, hf_vision) and the token resampler."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config

from astrea_vlm.configuration import AstreaExpertConfig, get_preset
from astrea_vlm.modeling import build_tower, resample_tokens


def _clip_expert():
    tower = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    return AstreaExpertConfig(kind="hf_vision", image_size=32, tower_config=tower.to_dict())


def test_siglip_tower_shapes_values_and_freezing():
    config = get_preset("tiny").caption_config
    torch.manual_seed(0)
    tower = build_tower(config)
    images = torch.randn(3, 3, 32, 32)
    tokens = tower(images)
    assert tower.grid == (4, 4) and tokens.shape == (3, 16, 32)
    torch.testing.assert_close(tower(images[1:2]), tokens[1:2], rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training
    with pytest.raises(ValueError, match=r"expects pixel_values of shape \(batch, 3, 32, 32\)"):
        tower(torch.randn(1, 3, 16, 16))


def test_hf_vision_drops_prefix_tokens_and_reads_the_configured_layer():
    expert = _clip_expert()
    torch.manual_seed(0)
    tower = build_tower(expert)
    images = torch.randn(2, 3, 32, 32)
    tokens = tower(images)
    assert tokens.shape == (2, 16, 32)  # the CLS token is gone
    reference = tower.model(pixel_values=images, output_hidden_states=True).hidden_states[-1][:, 1:]
    torch.testing.assert_close(tokens, reference)

    expert.feature_layer = -2
    torch.testing.assert_close(tower(images), tower.model(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:])


def test_dinov2_with_register_tokens_keeps_only_the_patch_grid():
    dino = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    tower = build_tower(AstreaExpertConfig(kind="hf_vision", image_size=32, tower_config=dino.to_dict()))
    assert tower(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_hf_vision_loads_an_hf_folder(tmp_path):
    expert = _clip_expert()
    torch.manual_seed(1)
    source = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in expert.tower_config.to_dict().items() if k not in ("model_type", "transformers_version")})).eval()
    source.save_pretrained(tmp_path)
    tower = build_tower(expert)
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(tower(images), source(pixel_values=images).last_hidden_state[:, 1:])
    tower.load_pretrained(str(tmp_path))
    torch.testing.assert_close(tower(images), source(pixel_values=images).last_hidden_state[:, 1:])
    assert not any(p.requires_grad for p in tower.parameters())


def test_resample_identity_pool_and_interpolate():
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    assert torch.equal(resample_tokens(tokens, (4, 4), 16), tokens)
    pooled = resample_tokens(tokens, (4, 4), 4)
    grid = tokens.view(2, 4, 4, 3)
    expected = grid[:, :2, :2].mean(dim=(1, 2))  # top-left 2x2 block
    torch.testing.assert_close(pooled[:, 0], expected)
    up = resample_tokens(tokens, (4, 4), 64)
    assert up.shape == (2, 64, 3)
    torch.testing.assert_close(up.mean(dim=1), tokens.mean(dim=1), rtol=0.05, atol=0.5)
    # query tokens (no grid): the first N (highest-scoring) are kept
    assert torch.equal(resample_tokens(tokens, None, 5), tokens[:, :5])
    with pytest.raises(ValueError, match="expected a 4x4 grid"):
        resample_tokens(tokens[:, :15], (4, 4), 4)
