"""Grounding-DINO tower: prompt handling, the two token sources, freezing and HF checkpoint loading.

References are transformers' own models built from the same tiny config: ``GroundingDinoModel`` for
the encoder memory and ``GroundingDinoForObjectDetection`` for the query scores (``logits``) and
boxes (``pred_boxes``). Checkpoints are written with ``save_pretrained`` (which stores the legacy
Swin key names the Hub checkpoints use, so ``from_pretrained``'s key conversion is exercised), plus
one simulated transformers-4 Hub layout (all box-head copies and persistent Swin
``relative_position_index`` tensors).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoModel, Sam2VisionModel

from astrea_vlm.configuration import get_preset
from astrea_vlm.configuration.configuration_astrea import AstreaExpertConfig
from astrea_vlm.modeling.tower_grounding_dino import GroundingDinoTower, grounding_dino_level_shapes
from astrea_vlm.modeling.towers import TOWER_REGISTRY, _named_non_persistent_buffers

D_MODEL = 32  # tiny preset


def _with(config, **changes):
    return AstreaExpertConfig(**{**copy.deepcopy(config.to_dict()), **changes})


def _tower_config(config, **changes):
    values = {k: v for k, v in config.tower_config.to_dict().items() if k != "model_type"}
    values.update(changes)
    return GroundingDinoConfig(**values)


def _pixels(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def config():
    return get_preset("tiny").detection_config


@pytest.fixture(scope="module")
def queries_config(config):
    return _with(config, token_source="queries")


def _prompt_kwargs(config, batch):
    ids = torch.tensor([config.prompt_ids] * batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


@pytest.fixture(scope="module")
def checkpoints(config, tmp_path_factory):
    """Random plain and detection models, saved; their reference outputs on fixed pixels."""
    root = tmp_path_factory.mktemp("gdino")
    pixels = _pixels(2, seed=7)
    torch.manual_seed(11)
    detector = GroundingDinoForObjectDetection(config.tower_config).eval()
    with torch.no_grad():  # transformers zero-initialises the box head's last layer; make boxes move
        for param in detector.bbox_embed[0].parameters():
            param.normal_(0.0, 0.3)
        detector_out = detector(pixel_values=pixels, **_prompt_kwargs(config, 2))
    detector.save_pretrained(root / "detector")
    torch.manual_seed(12)
    plain = GroundingDinoModel(config.tower_config).eval()
    with torch.no_grad():
        plain_out = plain(pixel_values=pixels, **_prompt_kwargs(config, 2))
    plain.save_pretrained(root / "plain")
    return {"root": root, "pixels": pixels, "detector": detector_out, "plain": plain_out}


def _level(memory, level, shapes):
    start = sum(h * w for h, w in shapes[:level])
    h, w = shapes[level]
    return memory[:, start : start + h * w]


def _ranked(detector_out):
    """Expected query tokens: last hidden state + box, sorted by the detector's max logit."""
    order = detector_out.logits.amax(-1).argsort(dim=1, descending=True, stable=True)
    tokens = torch.cat([detector_out.last_hidden_state, detector_out.pred_boxes], -1)
    return tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


# --------------------------------------------------------------------------------------- shapes
def test_encoder_tokens_lie_on_the_level_grid(config):
    assert TOWER_REGISTRY["grounding_dino"] is GroundingDinoTower
    tower = GroundingDinoTower(config)
    tokens = tower(_pixels(2))
    assert tower.level_shapes == [(4, 4), (2, 2)] and tower.grid == (4, 4)  # Swin stages 2, 3 at 32 px
    assert tokens.shape == (2, tower.num_tokens, tower.out_dim) == (2, 16, D_MODEL)
    assert torch.isfinite(tokens).all()


def test_query_tokens_have_no_grid_and_carry_a_box(queries_config):
    tower = GroundingDinoTower(queries_config)
    tokens = tower(_pixels(2))
    assert tower.grid is None and tower.num_tokens == queries_config.tower_config.num_queries == 16
    assert tokens.shape == (2, 16, D_MODEL + 4) and tower.out_dim == D_MODEL + 4
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("size", [64, 40])  # 40 px: odd sizes, ceil in patch merging and the extra conv
@pytest.mark.parametrize("level", [0, 1, 2])
def test_grid_from_config_matches_the_encoder_with_an_extra_conv_level(config, size, level):
    tower_config = _tower_config(config, num_feature_levels=3)
    tower = GroundingDinoTower(_with(config, image_size=size, feature_level=level, tower_config=tower_config))
    expected = {64: [(8, 8), (4, 4), (2, 2)], 40: [(5, 5), (3, 3), (2, 2)]}[size]
    assert tower.level_shapes == expected
    _, used = tower._run(_pixels(1, size))  # the spatial shapes the encoder really received
    assert used == expected
    assert tower(_pixels(1, size)).shape == (1, expected[level][0] * expected[level][1], D_MODEL)


def test_paper_preset_pyramid_at_800_px():
    paper = get_preset("astrea-13b").detection_config
    shapes = grounding_dino_level_shapes(paper.tower_config, paper.image_size)
    assert shapes == [(100, 100), (50, 50), (25, 25), (13, 13)]
    assert shapes[paper.feature_level] == (50, 50)  # stride 16, as the SAM2 image embedding


def test_invalid_prompt_or_level_raises(config):
    with pytest.raises(ValueError, match="prompt_ids"):
        GroundingDinoTower(_with(config, prompt_ids=None))
    with pytest.raises(ValueError, match="more than the model takes"):
        GroundingDinoTower(_with(config, prompt_ids=[101] + [7] * 9 + [102]))
    with pytest.raises(ValueError, match="vocabulary"):
        GroundingDinoTower(_with(config, prompt_ids=[101, 5000, 102]))
    with pytest.raises(ValueError, match="feature_level=2"):
        GroundingDinoTower(_with(config, feature_level=2))
    with pytest.raises(ValueError, match="fewer than num_queries=16"):  # 2x2 + 1x1 positions at 16 px
        GroundingDinoTower(_with(config, image_size=16))


def test_the_prompt_reaches_the_image_memory(config):
    torch.manual_seed(0)
    tower = GroundingDinoTower(config)
    other = _with(config, prompt_ids=[101, 9, 1012, 102])
    swapped = GroundingDinoTower(other)
    swapped.load_state_dict(tower.state_dict())
    pixels = _pixels(1)
    assert not torch.allclose(tower(pixels), swapped(pixels))  # text-enhanced memory depends on the text


def test_tiny_forward_runs_the_detector_once_and_stays_small(config):
    # Counted, not timed: one GroundingDinoModel forward per tower call whatever the batch, and
    # the work of a batch-2 forward stays tiny (today ~6.6 MFLOP counted by FlopCounterMode).
    from torch.utils.flop_counter import FlopCounterMode

    tower = GroundingDinoTower(config)
    calls = []
    tower.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    flops = {}
    for batch in (1, 2):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            tower(_pixels(batch))
        flops[batch] = counter.get_total_flops()
    assert len(calls) == 2
    assert 0 < flops[2] < 20_000_000
    assert flops[2] == pytest.approx(2 * flops[1], rel=0.05)  # no per-call work beyond the per-image work


# ------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("source", ["encoder", "queries"])
def test_one_image_alone_equals_the_same_image_in_a_batch(config, source):
    torch.manual_seed(0)
    tower = GroundingDinoTower(_with(config, token_source=source))
    pixels = _pixels(3, seed=1)
    torch.testing.assert_close(tower(pixels[1:2]), tower(pixels)[1:2], rtol=0, atol=1e-5)


def test_frozen_tower_has_no_grad_and_stays_in_eval(config):
    tower = GroundingDinoTower(config)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not any(m.training for m in tower.modules())
    assert not tower(_pixels(1)).requires_grad


@pytest.mark.parametrize("shape", [(2, 3, 32, 0), (2, 4, 32, 32), (3, 32, 32)])
def test_wrong_input_shape_raises(config, shape):
    with pytest.raises(ValueError, match="expects pixel_values of shape"):
        GroundingDinoTower(config)(torch.zeros(shape))


def test_square_policy_refuses_other_shapes_and_masks(config):
    square = GroundingDinoTower(_with(config, keep_aspect_ratio=False))
    with pytest.raises(ValueError, match=r"expects pixel_values of shape \(batch, 3, 32, 32\)"):
        square(torch.zeros(2, 3, 32, 31))
    with pytest.raises(ValueError, match="takes no pixel mask"):
        square(torch.zeros(2, 3, 32, 32), torch.ones(2, 32, 32, dtype=torch.long))


def test_queries_are_sorted_by_score_with_boxes_in_unit_square(queries_config):
    torch.manual_seed(3)
    tower = GroundingDinoTower(queries_config)
    with torch.no_grad():
        for param in tower.model.decoder.bbox_embed.parameters():
            param.normal_(0.0, 0.5)
        pixels = _pixels(2, seed=2)
        tokens = tower(pixels)
        out, _ = tower._run(pixels)
    scores = (out.last_hidden_state @ out.encoder_last_hidden_state_text.transpose(1, 2)).amax(-1)
    ranked = scores.sort(dim=1, descending=True).values
    # each returned token is a query (match it back to its score) and the scores fall
    for b in range(2):
        index = torch.cdist(tokens[b, :, :D_MODEL], out.last_hidden_state[b]).argmin(-1)
        torch.testing.assert_close(scores[b, index], ranked[b])
    boxes = tokens[..., D_MODEL:]
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert (boxes[..., 2:] > 0).all()


# ---------------------------------------------------------------------------------- checkpoints
def test_plain_model_folder_gives_the_same_encoder_tokens(config, checkpoints):
    tower = GroundingDinoTower(config)
    tower.load_pretrained(str(checkpoints["root"] / "plain"))
    expected = _level(checkpoints["plain"].encoder_last_hidden_state_vision, 0, tower.level_shapes)
    torch.testing.assert_close(tower(checkpoints["pixels"]), expected, rtol=0, atol=1e-5)


def test_detection_folder_gives_the_same_encoder_tokens(config, checkpoints):
    tower = GroundingDinoTower(config)
    tower.load_pretrained(str(checkpoints["root"] / "detector"))
    expected = _level(checkpoints["detector"].encoder_last_hidden_state_vision, 0, tower.level_shapes)
    torch.testing.assert_close(tower(checkpoints["pixels"]), expected, rtol=0, atol=1e-5)


def test_detection_folder_gives_the_detectors_ranked_queries_and_boxes(queries_config, checkpoints):
    tower = GroundingDinoTower(queries_config)
    tower.load_pretrained(str(checkpoints["root"] / "detector"))
    expected = _ranked(checkpoints["detector"])
    torch.testing.assert_close(tower(checkpoints["pixels"]), expected, rtol=0, atol=1e-5)
    # the box head matters: the boxes are not just the reference points
    assert not torch.allclose(expected[..., D_MODEL:], checkpoints["detector"].init_reference_points, atol=1e-2)


def test_legacy_hub_layout_loads(config, queries_config, checkpoints, tmp_path):
    """transformers-4 Hub files stored every tied box-head copy and Swin's relative_position_index."""
    state = load_file(checkpoints["root"] / "detector" / "model.safetensors")
    layers = queries_config.tower_config.decoder_layers
    for key in [k for k in state if k.startswith("bbox_embed.0.")]:
        for i in range(layers):
            state[key.replace("bbox_embed.0.", f"bbox_embed.{i}.")] = state[key].clone()
            state["model.decoder." + key.replace("bbox_embed.0.", f"bbox_embed.{i}.")] = state[key].clone()
    for stage in range(len(config.tower_config.backbone_config.depths)):
        key = f"model.backbone.conv_encoder.model.encoder.layers.{stage}.blocks.0.attention.self.relative_position_index"
        state[key] = torch.zeros(4, 4, dtype=torch.long)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((checkpoints["root"] / "detector" / "config.json").read_text())

    encoder = GroundingDinoTower(config)
    encoder.load_pretrained(str(tmp_path))
    expected = _level(checkpoints["detector"].encoder_last_hidden_state_vision, 0, encoder.level_shapes)
    torch.testing.assert_close(encoder(checkpoints["pixels"]), expected, rtol=0, atol=1e-5)
    queries = GroundingDinoTower(queries_config)
    queries.load_pretrained(str(tmp_path))
    torch.testing.assert_close(queries(checkpoints["pixels"]), _ranked(checkpoints["detector"]), rtol=0, atol=1e-5)


def test_queries_mode_refuses_a_checkpoint_without_box_head(queries_config, checkpoints):
    with pytest.raises(ValueError, match="no box head"):
        GroundingDinoTower(queries_config).load_pretrained(str(checkpoints["root"] / "plain"))


def test_checkpoint_of_another_architecture_raises_value_error(config, tmp_path):
    GroundingDinoModel(_tower_config(config, d_model=64)).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="other shapes than the tower"):
        GroundingDinoTower(config).load_pretrained(str(tmp_path / "wide"))
    Sam2VisionModel(get_preset("tiny").segmentation_config.tower_config).save_pretrained(tmp_path / "sam2")
    with pytest.raises(ValueError, match="do not match the tower's Grounding-DINO"):
        GroundingDinoTower(config).load_pretrained(str(tmp_path / "sam2"))


def test_query_mode_state_has_no_shared_tensors(queries_config):
    """An Astrea checkpoint must be writable by save_pretrained, which refuses undeclared shared tensors."""
    state = GroundingDinoTower(queries_config).state_dict()
    pointers = [t.data_ptr() for t in state.values() if t.numel()]
    assert len(pointers) == len(set(pointers))


@pytest.mark.parametrize("source", ["encoder", "queries"])
def test_restore_non_persistent_buffers_after_garbage(config, source):
    torch.manual_seed(0)
    tower = GroundingDinoTower(_with(config, token_source=source))
    pixels = _pixels(2, seed=4)
    expected = tower(pixels)
    buffers = _named_non_persistent_buffers(tower)
    names = {name.rsplit(".", 1)[-1] for name, _ in buffers}
    assert {"special_tokens", "relative_position_index", "position_ids"} <= names
    with torch.no_grad():
        for _, buffer in buffers:
            buffer.fill_(float("nan") if buffer.is_floating_point() else 3)
    tower.restore_non_persistent_buffers()
    torch.testing.assert_close(tower(pixels), expected, rtol=0, atol=0)


def test_gradient_checkpointing_input_grad_hooks_do_not_break_the_tower(config):
    """`enable_input_require_grads` hooks every sub-model's input embeddings (see the tower)."""
    from transformers.modeling_utils import PreTrainedModel

    tower = GroundingDinoTower(config)
    PreTrainedModel.enable_input_require_grads(tower.model)
    assert tower(_pixels(1)).shape == (1, 16, D_MODEL)
