"""`astrea create`: the tiny random folder, and assembling from local checkpoints in the real formats."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GroundingDinoModel, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from astrea_vlm.cli import main
from astrea_vlm.configuration import get_preset
from astrea_vlm.create import assemble, create, write_folder
from astrea_vlm.modeling import AstreaForConditionalGeneration
from astrea_vlm.processing.tokenization import build_byte_level_tokenizer
from test_tower_ram_plus import reference_for, save_ram_plus_checkpoint
from test_tower_sam2 import _original_encoder, _save_original_checkpoint


def _sub(config):
    return {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny pretrained parts written in each real format: HF folders, a RAM++ .pth, a SAM2 .pt."""
    root = tmp_path_factory.mktemp("parts")
    config = get_preset("tiny")
    torch.manual_seed(123)
    llm_config = LlamaConfig(**{**_sub(config.text_config), "vocab_size": 300})  # smaller: <image> rows get added
    llm = LlamaForCausalLM(llm_config).eval()
    llm.save_pretrained(root / "llm")
    build_byte_level_tokenizer(320).save_pretrained(root / "llm")
    siglip = SiglipVisionModel(SiglipVisionConfig(**_sub(config.caption_config.tower_config))).eval()
    siglip.save_pretrained(root / "siglip")
    save_ram_plus_checkpoint(reference_for(config.classification_config, seed=4), root / "ram_plus_swin_large_14m.pth")
    dino = GroundingDinoModel(copy.deepcopy(config.detection_config.tower_config)).eval()
    dino.save_pretrained(root / "gdino")
    _save_original_checkpoint(_original_encoder(config.segmentation_config.tower_config, seed=5), root / "sam2.pt")
    return {
        "llm": llm,
        "siglip": siglip,
        "root": root,
        "towers": {
            "caption": str(root / "siglip"),
            "classification": str(root / "ram_plus_swin_large_14m.pth"),
            "detection": str(root / "gdino"),
            "segmentation": str(root / "sam2.pt"),
        },
    }


def test_create_tiny_writes_a_complete_folder(tmp_path):
    out = tmp_path / "tiny"
    assert main(["create", "--preset", "tiny", "--output", str(out), "--seed", "3"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= names
    assert "modeling_astrea.py" in names and "configuration_astrea.py" in names
    assert (out / "README.md").read_text().startswith("---")
    # Same seed, same weights; the folder reloads.
    model = AstreaForConditionalGeneration.from_pretrained(out)
    torch.manual_seed(3)
    fresh = AstreaForConditionalGeneration(get_preset("tiny"))
    assert torch.equal(model.lm_head.weight, fresh.lm_head.weight)
    with pytest.raises(FileExistsError, match="not empty"):
        create("tiny", out)
    assert main(["create", "--preset", "tiny", "--output", str(out)]) == 2  # the CLI says it in one line


def test_assemble_loads_every_part_from_local_real_format_checkpoints(parts):
    config = get_preset("tiny")
    model, processor = assemble(config, llm=str(parts["root"] / "llm"), towers=parts["towers"])
    # LLM: pretrained rows copied, new rows (<image> etc. beyond 300) at the mean embedding.
    source = parts["llm"].get_input_embeddings().weight
    ours = model.get_input_embeddings().weight
    assert torch.equal(ours[:300], source)
    torch.testing.assert_close(ours[310], source.mean(0))
    assert torch.equal(model.model.language_model.layers[0].self_attn.q_proj.weight, parts["llm"].model.layers[0].self_attn.q_proj.weight)
    # Caption tower: equal outputs to the saved SigLIP.
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = parts["siglip"](pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.model.towers["caption"](pixels), expected)
    assert processor.image_token_id == config.image_token_id
    assert all(not p.requires_grad for t in model.model.towers.values() for p in t.parameters())


def test_write_folder_from_parts_round_trips(parts, tmp_path):
    config = get_preset("tiny")
    folder = write_folder(config, tmp_path / "assembled", llm=str(parts["root"] / "llm"), towers=parts["towers"])
    model = AstreaForConditionalGeneration.from_pretrained(folder)
    assembled, _ = assemble(config, llm=str(parts["root"] / "llm"), towers=parts["towers"])
    for name, tensor in assembled.state_dict().items():
        if name.startswith("model.towers"):
            assert torch.equal(model.state_dict()[name], tensor), name


def test_bad_parts_give_clear_errors(parts, tmp_path):
    config = get_preset("tiny")
    with pytest.raises(ValueError, match="no expert role"):
        assemble(config, towers={"depth": "x"})
    wrong = LlamaForCausalLM(LlamaConfig(**{**_sub(config.text_config), "hidden_size": 32, "intermediate_size": 64}))
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match="hidden_size=32 differs"):
        assemble(config, llm=str(tmp_path / "wrong"), tokenizer=str(parts["root"] / "llm"))
    with pytest.raises(ValueError, match="tiny preset is random"):
        create("tiny", tmp_path / "x", llm="some/llm")
    assert main(["create", "--preset", "tiny", "--output", str(tmp_path / "x"), "--llm", "some/llm"]) == 2
