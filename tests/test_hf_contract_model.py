"""The transformers model contract: what transformers' common tests found missing (issue 17, items 1-10).

Each test pins one behaviour that every model inside transformers has and that users reach through
the public API: loading kwargs and return shapes, tuple outputs, meta-device construction,
``get_image_features``, ``inputs_embeds``, attention implementations, parallel plans, the config
round trip, the compiled decode step and strict tower loading. The float32 forward of the existing
paths must not change: the new paths are checked for bit-identical logits against them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import AstreaModelTester
from PIL import Image
from transformers import AutoConfig, SiglipVisionConfig, SiglipVisionModel

from astrea_vlm.configuration import AstreaConfig, get_preset
from astrea_vlm.modeling import AstreaForConditionalGeneration, AstreaModel
from astrea_vlm.modeling.tower_hf_vision import HFVisionTower


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model saved with save_pretrained, and inputs with two images."""
    tester = AstreaModelTester()
    model = tester.model()
    folder = tmp_path_factory.mktemp("contract") / "tiny"
    model.save_pretrained(folder)
    ids = torch.cat([tester.prompt(n_images=1, seed=1), tester.prompt(n_images=1, seed=2)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **tester.pixels(2)}
    with torch.no_grad():
        logits = model(**inputs).logits
    return {"tester": tester, "model": model, "folder": folder, "inputs": inputs, "logits": logits}


# ----------------------------------------------------------------------------- 1: loading kwargs
def test_from_pretrained_passes_output_loading_info_through(saved):
    model, info = AstreaForConditionalGeneration.from_pretrained(saved["folder"], output_loading_info=True)
    assert isinstance(model, AstreaForConditionalGeneration)
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys"}
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**saved["inputs"]).logits, saved["logits"], rtol=0, atol=0)
    # The backbone class takes the same path (base_model_prefix "model": the weights load into it).
    backbone, info = AstreaModel.from_pretrained(saved["folder"], output_loading_info=True)
    assert isinstance(backbone, AstreaModel) and not info["missing_keys"]


# ------------------------------------------------------------------------------ 2: tuple outputs
def test_return_dict_false_gives_the_outputs_as_a_tuple_in_field_order(saved):
    model, inputs = saved["model"], saved["inputs"]
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        backbone_tuple = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for expected, got in zip(as_dict.to_tuple(), as_tuple):
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[0], saved["logits"], rtol=0, atol=0)  # logits first: no labels, no loss
    torch.testing.assert_close(model.lm_head(backbone_tuple[0]), saved["logits"], rtol=0, atol=0)  # last_hidden_state
    # The config's return_dict=False has the same effect, and the language model still sees dict outputs.
    config = copy.deepcopy(model.config)
    config.return_dict = False
    other = AstreaForConditionalGeneration(config).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(**inputs)[0], saved["logits"], rtol=0, atol=0)


# ------------------------------------------------------------------------- 3: meta-device build
def test_meta_device_build_then_init_weights_rebuilds_every_non_persistent_buffer(saved):
    reference = saved["model"]
    with torch.device("meta"):
        model = AstreaForConditionalGeneration(copy.deepcopy(reference.config))
    model.to_empty(device="cpu")
    model.init_weights()  # what accelerate's init_empty_weights / big-model loading do
    fresh = dict(reference.named_buffers())
    rebuilt = dict(model.named_buffers())
    assert sorted(fresh) == sorted(rebuilt)
    wrong = [name for name in fresh if not torch.equal(fresh[name], rebuilt[name])]
    assert not wrong, f"buffers not rebuilt by init_weights(): {wrong}"
    assert any("relative_position_index" in name for name in fresh) and any("attn_mask" in name for name in fresh)
    model.load_state_dict(reference.state_dict())  # the persistent state, as a checkpoint would give it
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**saved["inputs"]).logits, saved["logits"], rtol=0, atol=0)


# -------------------------------------------------------------------------- 4: get_image_features
def test_get_image_features_takes_processor_pixel_keys_and_returns_the_transformers_layout(saved):
    model, inputs, tester = saved["model"], saved["inputs"], saved["tester"]
    pixels = {key: value for key, value in inputs.items() if key.startswith("pixel_values_")}
    with torch.no_grad():
        # The default router also reads the text before each image; the forward computes it so.
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        image_mask = inputs["input_ids"] == tester.config.image_token_id
        pixels["text_features"] = model.model.instruction_features(embeds, inputs.get("attention_mask"), image_mask)
        features = model.get_image_features(**pixels)
        full = model.model(**inputs)
        as_tuple = model.get_image_features(**pixels, return_dict=False)
        with_states = model.get_image_features(**pixels, output_hidden_states=True)
    n, width = tester.num_visual_tokens, tester.config.hidden_size
    assert features.last_hidden_state.shape == (2, n, width)
    torch.testing.assert_close(features.last_hidden_state, full.image_hidden_states, rtol=0, atol=0)
    assert len(features.pooler_output) == 2 and all(p.shape == (n, width) for p in features.pooler_output)
    torch.testing.assert_close(torch.stack(features.pooler_output), features.last_hidden_state, rtol=0, atol=0)
    assert features.hidden_states is None and features.attentions is None  # only when asked
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], features.last_hidden_state, rtol=0, atol=0)
    # Hidden states: the first expert's tower (SigLIP here: embeddings + one per layer).
    first = tester.config.expert_order[0]
    siglip = model.model.towers[first].model
    with torch.no_grad():
        expected = siglip(pixel_values=pixels[f"pixel_values_{first}"], output_hidden_states=True).hidden_states
    assert len(with_states.hidden_states) == tester.config.caption_config.tower_config.num_hidden_layers + 1
    for got, want in zip(with_states.hidden_states, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert with_states.expert_hidden_states[first] is with_states.hidden_states
    torch.testing.assert_close(with_states.last_hidden_state, features.last_hidden_state, rtol=0, atol=0)
    # The dict form that the package's own callers use is the same call.
    with torch.no_grad():
        by_dict = model.model.get_image_features(
            pixel_values={key[len("pixel_values_"):]: value for key, value in pixels.items() if key.startswith("pixel_values_")},
            text_features=pixels["text_features"],
        )
    torch.testing.assert_close(by_dict.fused, features.last_hidden_state, rtol=0, atol=0)


def test_get_image_features_attentions_of_the_first_tower_when_asked(saved):
    model = copy.deepcopy(saved["model"])
    model.set_attn_implementation("eager")
    pixels = {key: value for key, value in saved["inputs"].items() if key.startswith("pixel_values_")}
    with torch.no_grad():
        out = model.get_image_features(**pixels, output_attentions=True)
    layers = saved["tester"].config.caption_config.tower_config.num_hidden_layers
    assert len(out.attentions) == layers
    heads = saved["tester"].config.caption_config.tower_config.num_attention_heads
    assert out.attentions[0].shape[:2] == (2, heads)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones_like(out.attentions[0].sum(-1)))


# ------------------------------------------------------------------------------ 5: inputs_embeds
@pytest.mark.parametrize("router_input", ["visual", "visual+text"])
def test_inputs_embeds_with_images_matches_input_ids_bit_for_bit(router_input):
    tester = AstreaModelTester(fusion_router_input=router_input)
    model = tester.model()
    ids = torch.cat([tester.prompt(n_images=1, seed=3), tester.prompt(n_images=1, seed=4)])
    inputs = {"attention_mask": torch.ones_like(ids), **tester.pixels(2)}
    with torch.no_grad():
        by_ids = model(input_ids=ids, **inputs)
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), **inputs)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, rtol=0, atol=0)
    torch.testing.assert_close(by_embeds.router_probs, by_ids.router_probs, rtol=0, atol=0)
    # The image positions are found by the <image> embedding: one position too few is refused.
    embeds = model.get_input_embeddings()(ids)
    embeds[0, 1] += 1.0  # the first <image> row no longer equals the <image> embedding
    with pytest.raises(ValueError, match="<image> tokens but 2 image"):
        model(inputs_embeds=embeds, **inputs)


# ----------------------------------------------------------------------- 6: attention kernels
def _real_batch(config):
    from astrea_vlm.processing import build_processor

    processor = build_processor(config)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)), Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))]
    return processor(images=images, text=["<image>\nWhat is in the picture?", "<image>\nHow many shapes are there?"])


def test_sdpa_reaches_every_tower_that_has_it_and_matches_eager(saved):
    folder = saved["folder"]
    sdpa = AstreaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa").eval()
    eager = AstreaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    towers = sdpa.model.towers
    assert sdpa.model.language_model.config._attn_implementation == "sdpa"
    assert towers["caption"].model.config._attn_implementation == "sdpa"  # SigLIP
    assert towers["segmentation"].model.config._attn_implementation == "sdpa"  # SAM2
    assert towers["detection"].model.config._attn_implementation == "eager"  # Grounding-DINO has no SDPA: its default
    assert towers["detection"].model.text_backbone.config._attn_implementation == "sdpa"  # ... but its BERT has
    assert towers["detection"].model.backbone.conv_encoder.model.config._attn_implementation == "sdpa"  # ... and its Swin
    assert all(module.config._attn_implementation == "eager" for module in eager.modules() if hasattr(module, "_supports_sdpa") and hasattr(module, "config"))
    batch = _real_batch(sdpa.config)
    real = batch["attention_mask"].bool()  # left padding: rows of pad queries are not outputs
    assert not real.all()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**batch).logits[real], eager(**batch).logits[real], rtol=1e-4, atol=1e-5)
    # Switching at run time follows the same rule, and back.
    eager.set_attn_implementation("sdpa")
    assert eager.model.towers["detection"].model.config._attn_implementation == "eager"
    assert eager.model.language_model.config._attn_implementation == "sdpa"
    eager.set_attn_implementation("eager")
    assert eager.model.language_model.config._attn_implementation == "eager"


def test_a_refused_attention_switch_changes_no_config(saved):
    """An unknown name raises, as in transformers, and every config -- the expert wrappers and the timm
    tower's, which no sub-model owns, included -- keeps its implementation (transformers' mixin checks it)."""
    model = copy.deepcopy(saved["model"])
    model.set_attn_implementation("sdpa")
    configs = [model.config, *[config for expert in model.config.expert_configs.values() for config in (expert, expert.tower_config)]]
    configs += [module.config for module in model.modules() if hasattr(module, "_supports_sdpa") and hasattr(module, "config")]
    before = [config._attn_implementation for config in configs]
    assert "sdpa" in before and "eager" in before  # Grounding-DINO
    with pytest.raises(ValueError, match='attn_implementation="foo"'):
        model.set_attn_implementation("foo")
    assert [config._attn_implementation for config in configs] == before


def test_flash_attention_request_reaches_the_llm_not_grounding_dino(saved):
    """Without the flash-attn package the LLM's own check refuses it -- not Grounding-DINO's."""
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available() and torch.cuda.is_available():
        model = AstreaForConditionalGeneration.from_pretrained(saved["folder"], attn_implementation="flash_attention_2", dtype=torch.bfloat16)
        assert model.model.language_model.config._attn_implementation == "flash_attention_2"
        assert model.model.towers["detection"].model.config._attn_implementation == "eager"
        return
    with pytest.raises(ImportError, match="[Ff]lash"):
        AstreaForConditionalGeneration.from_pretrained(saved["folder"], attn_implementation="flash_attention_2")


# -------------------------------------------------------------------------------- 7: parallel plans
def test_tensor_parallel_plan_covers_the_tied_head_and_the_llm(saved):
    model = saved["model"]
    plan = model.tp_plan
    assert plan["lm_head"] == "colwise_gather_output"
    llm_entries = {key: value for key, value in plan.items() if key.startswith("model.language_model.")}
    assert llm_entries["model.language_model.layers.*.self_attn.q_proj"] == "colwise"
    assert llm_entries["model.language_model.layers.*.self_attn.o_proj"] == "rowwise"
    names = [name for name, _ in model.named_parameters()]
    import re

    for pattern in plan:
        regex = re.compile(pattern.replace(".", r"\.").replace("*", r"\d+"))
        assert any(regex.match(name) for name in names), f"tp plan entry {pattern} matches no parameter"
    assert model.pp_plan["lm_head"] == (["hidden_states"], ["logits"])


# --------------------------------------------------------------------------- 8: config round trip
@pytest.mark.parametrize("build", [AstreaConfig, lambda: get_preset("tiny")], ids=["default", "tiny"])
def test_config_save_and_reload_is_equal(build, tmp_path):
    config = build()
    assert "_name_or_path" not in config.text_config.to_dict() or not config.text_config._name_or_path
    config.save_pretrained(tmp_path)
    assert AstreaConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    text = AutoConfig.for_model(**config.text_config.to_dict())
    assert text.to_dict() == config.text_config.to_dict()
    # Each role's expert config class reads its own entry of the saved config.json (ConfigTester's
    # composite check); one class for all four roles would read whichever entry came last.
    for role in config.expert_order:
        expert_class = AstreaConfig.sub_configs[f"{role}_config"]
        loaded = expert_class.from_pretrained(tmp_path).to_dict()
        saved = config.to_dict()[f"{role}_config"]
        loaded.pop("transformers_version", None), saved.pop("transformers_version", None)
        assert loaded == saved, role


# ----------------------------------------------------------------------- 10: strict tower loading
def _siglip_expert(tmp_path, drop: str | None = None, extra: bool = False):
    tower_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    source = SiglipVisionModel(tower_config)
    source.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    if drop is not None:
        state = {key: value for key, value in state.items() if drop not in key}
    if extra:
        state["vision_model.head.extra.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    expert = get_preset("tiny").caption_config
    return HFVisionTower(copy.deepcopy(expert)), source


def test_hf_vision_tower_loads_a_complete_checkpoint_exactly(tmp_path):
    tower, source = _siglip_expert(tmp_path)
    tower.load_pretrained(str(tmp_path))
    for (name, got), (_, want) in zip(tower.model.state_dict().items(), source.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", ["missing", "unexpected"])
def test_hf_vision_tower_refuses_missing_or_unexpected_weights_by_name(tmp_path, case):
    tower, _ = _siglip_expert(tmp_path, drop="layers.1.mlp" if case == "missing" else None, extra=case == "unexpected")
    expected = "layers.1.mlp" if case == "missing" else "extra"
    with pytest.raises(ValueError, match=rf"(?s){case}.*{expected}"):
        tower.load_pretrained(str(tmp_path))
