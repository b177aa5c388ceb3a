"""AstreaConfig: presets, serialisation and validation."""

from __future__ import annotations

import copy

import pytest

from astrea_vlm.configuration import PRESETS, AstreaConfig, AstreaExpertConfig, get_preset


def _tiny_dict():
    config = get_preset("tiny").to_dict()
    config.pop("model_type")
    config.pop("transformers_version")
    return config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    config = get_preset(name)
    config.save_pretrained(tmp_path)
    again = AstreaConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert isinstance(again.detection_config, AstreaExpertConfig)
    assert again.expert_order == ["caption", "classification", "detection", "segmentation"]


def test_paper_presets_describe_the_paper_models():
    c13, c34 = get_preset("astrea-13b"), get_preset("astrea-34b")
    assert c13.num_visual_tokens == c34.num_visual_tokens == 576
    assert c13.fusion_top_k == 3 and c13.num_experts == 4
    assert c13.text_config.hidden_size == 5120 and c13.text_config.num_hidden_layers == 40
    assert c34.text_config.hidden_size == 7168 and c34.text_config.num_hidden_layers == 60
    assert c13.caption_config.kind == "siglip" and c13.caption_config.tower_config.hidden_size == 1152
    assert c13.classification_config.kind == "ram_plus"
    assert c13.detection_config.kind == "grounding_dino"
    assert c13.segmentation_config.kind == "sam2"
    # A bare AstreaConfig() is the 13B model, as transformers configs default to their reference model.
    assert AstreaConfig().to_dict() == c13.to_dict()


def test_a_role_can_be_dropped():
    config = get_preset("tiny", segmentation_config=None, expert_order=["caption", "classification", "detection"])
    assert config.num_experts == 3
    assert config.segmentation_config is None


def _mutate(path, value):
    def apply(config):
        target = config
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return config

    return apply


BAD = [
    (("fusion_top_k",), 5, "fusion_top_k"),
    (("fusion_top_k",), 0, "fusion_top_k"),
    (("caption_config", "kind"), "vit_magic", "caption_config.kind"),
    (("num_visual_tokens",), 15, "num_visual_tokens"),
    (("bridge_p",), 1.5, "bridge_p"),
    (("bridge_p",), -0.1, "bridge_p"),
    (("bridge_num_heads",), 5, "bridge_num_heads"),
    (("bridge_gamma",), -1.0, "bridge_gamma"),
    (("moco_dim",), 0, "moco_dim"),
    (("image_token_id",), 10_000, "image_token_id"),
    (("expert_order",), ["caption", "caption", "detection", "segmentation"], "expert_order"),
    (("expert_order",), ["caption", "classification", "detection"], "expert_order"),
    (("expert_order",), ["caption", "classification", "detection", "depth"], "expert_order"),
    (("fusion_router_input",), "audio", "fusion_router_input"),
    (("caption_config", "image_std"), [0.5, 0.0, 0.5], "caption_config.image_std"),
    (("detection_config", "token_source"), "boxes", "detection_config.token_source"),
]


@pytest.mark.parametrize("path, value, field", BAD, ids=[f"{'.'.join(p)}={v}" for p, v, _ in BAD])
def test_invalid_values_raise_value_error_naming_field_and_value(path, value, field):
    config = _mutate(path, value)(_tiny_dict())
    with pytest.raises(ValueError) as error:
        AstreaConfig(**config)
    assert f"`{field}`" in str(error.value)
    assert repr(value) in str(error.value)


def test_query_tokens_cannot_be_resampled_above_the_number_of_queries():
    config = _tiny_dict()
    config["detection_config"]["token_source"] = "queries"
    num_queries = config["detection_config"]["tower_config"]["num_queries"]
    config["num_visual_tokens"] = 64
    assert 64 > num_queries
    with pytest.raises(ValueError, match="num_visual_tokens.*decoder queries"):
        AstreaConfig(**config)


def test_tower_config_must_match_the_kind():
    config = _tiny_dict()
    config["caption_config"]["tower_config"] = copy.deepcopy(config["segmentation_config"]["tower_config"])
    with pytest.raises(ValueError, match="caption_config.tower_config.model_type"):
        AstreaConfig(**config)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="astrea-13b"):
        get_preset("astrea-7b")


def test_a_partial_text_config_is_refused_instead_of_silently_becoming_a_7b_llama():
    config = _tiny_dict()
    config["text_config"] = {"model_type": "llama", "vocab_size": 320}
    with pytest.raises(ValueError, match="`text_config`.*incomplete.*hidden_size"):
        AstreaConfig(**config)


def test_preset_overrides_merge_nested_dicts_and_replace_everything_else():
    from astrea_vlm.configuration import merge_overrides

    base = {"text_config": {"hidden_size": 64, "vocab_size": 320}, "fusion_top_k": 3, "segmentation_config": {"kind": "sam2"}}
    merged = merge_overrides(base, {"text_config": {"vocab_size": 1024}, "fusion_top_k": 2, "segmentation_config": None})
    assert merged == {"text_config": {"hidden_size": 64, "vocab_size": 1024}, "fusion_top_k": 2, "segmentation_config": None}
    assert base["text_config"]["vocab_size"] == 320  # neither input is modified

    # get_preset uses the same merge: one field of the LLM config changes, the preset's others stay
    tiny = get_preset("tiny")
    wider = get_preset("tiny", text_config={"vocab_size": 1024})
    assert wider.text_config.vocab_size == 1024
    assert {k: v for k, v in wider.text_config.to_dict().items() if k != "vocab_size"} == \
        {k: v for k, v in tiny.text_config.to_dict().items() if k != "vocab_size"}
    assert get_preset("tiny", segmentation_config=None, expert_order=["caption", "classification", "detection"]).num_experts == 3


def test_a_new_tower_kind_is_one_class_and_one_registration():
    """The registry is the only list of kinds: the configuration's checks and the factory read it."""
    from astrea_vlm.modeling import TOWER_REGISTRY, build_tower
    from astrea_vlm.modeling.tower_hf_vision import HFVisionTower
    from astrea_vlm.modeling.towers import register_tower

    tiny = get_preset("tiny").caption_config.to_dict()
    with pytest.raises(ValueError, match="unknown expert kind"):
        AstreaExpertConfig(**{**tiny, "kind": "toy_queries"})

    @register_tower("toy_queries")
    class ToyQueriesTower(HFVisionTower):
        tower_model_types = ("siglip_vision_model",)

        @classmethod
        def tokens_on_grid(cls, config):
            return False

    try:
        config = AstreaExpertConfig(**{**tiny, "kind": "toy_queries"})
        assert config.is_grid is False  # read from the class, no table to edit
        assert isinstance(build_tower(config), ToyQueriesTower)
        with pytest.raises(ValueError, match="needs a tower_config of model_type"):
            AstreaExpertConfig(**{**get_preset("tiny").segmentation_config.to_dict(), "kind": "toy_queries"})
    finally:
        TOWER_REGISTRY.pop("toy_queries", None)


def test_training_settings_of_older_configs_load_with_a_warning_and_are_not_kept(tmp_path):
    """moco_* and fusion_load_balance_coef moved to AstreaSFTConfig; folders saved before still load."""
    import json

    old = get_preset("tiny").to_dict()
    old.update({"moco_mu": 0.3, "moco_queue_size": 64, "fusion_load_balance_coef": 0.05})
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.warns(FutureWarning, match=r"\['fusion_load_balance_coef', 'moco_mu', 'moco_queue_size'\] are training settings now"):
        config = AstreaConfig.from_pretrained(tmp_path)
    assert config.moco_dim == 32 and not hasattr(config, "moco_mu") and "moco_queue_size" not in config.to_dict()
