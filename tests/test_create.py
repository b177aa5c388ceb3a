"""`astrea create`: the tiny random folder, and assembling from local checkpoints in the real formats."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GroundingDinoModel, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from astrea_vlm.cli import main
from astrea_vlm.configuration import get_preset
from astrea_vlm.create import assemble, create, write_assembled, write_folder
from astrea_vlm.parts import PartsError
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
    """The part-by-part writer (meta model, one part in memory) gives the in-memory assembly's weights."""
    config = get_preset("tiny")
    folder = write_assembled(config, tmp_path / "assembled", llm=str(parts["root"] / "llm"), towers=parts["towers"],
                             dtype=torch.float32, max_shard_bytes=300_000, log=lambda *a: None)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 6 and shards == sorted(p.name for p in folder.glob("model-*.safetensors"))
    model, info = AstreaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assembled, _ = assemble(config, llm=str(parts["root"] / "llm"), towers=parts["towers"])
    state = model.state_dict()
    assert set(state) == set(assembled.state_dict())
    for name, tensor in assembled.state_dict().items():
        if name.startswith(("model.towers", "model.language_model", "lm_head")):
            assert torch.equal(state[name], tensor), name
    # Astrea's new modules start as a fresh model's would: zero-initialised adapter outputs, closed gates.
    assert all(torch.equal(state[f"model.fusion.adapters.{i}.fc2.weight"], torch.zeros_like(state[f"model.fusion.adapters.{i}.fc2.weight"]))
               for i in range(4))
    assert all(float(bridge.gate.detach()) == config.bridge_gate_init for bridge in model.model.bridges.values())
    std = float(state["model.projectors.caption.layers.0.weight"].std())
    assert std == pytest.approx(config.text_config.initializer_range, rel=0.2)
    # write_folder with every part uses the same writer: one shard per part at the default shard size.
    single = write_folder(config, tmp_path / "single", llm=str(parts["root"] / "llm"), towers=parts["towers"])
    assert len(set(json.loads((single / "model.safetensors.index.json").read_text())["weight_map"].values())) == 6
    assert json.loads((single / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"] == \
        "modeling_astrea.AstreaForConditionalGeneration"
    reloaded = AstreaForConditionalGeneration.from_pretrained(single)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_missing_parts_are_all_named_with_their_flags_before_anything_is_built(parts, tmp_path):
    towers = {**parts["towers"], "segmentation": str(tmp_path / "missing" / "sam2.pt"), "detection": "org/not-cached"}
    out = tmp_path / "out"
    with pytest.raises(PartsError) as error:
        create("astrea-13b", out, llm="./no-such-llm", towers=towers)
    message = str(error.value)
    assert "--llm: ./no-such-llm does not exist" in message
    assert f"--segmentation: {tmp_path / 'missing' / 'sam2.pt'} does not exist" in message
    assert "--detection: org/not-cached is not in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE=1)" in message
    assert "pass --detection ./path/to/folder" in message
    assert "--caption" not in message and "--classification" not in message  # those local parts are fine
    assert not out.exists()
    # A damaged checkpoint is named too.
    broken = tmp_path / "broken.pt"
    broken.write_bytes(Path(parts["towers"]["segmentation"]).read_bytes()[:1000])
    with pytest.raises(PartsError, match="--segmentation: .*broken.pt"):
        create("astrea-13b", out, llm=str(parts["root"] / "llm"), towers={**parts["towers"], "segmentation": str(broken)})
    assert not out.exists()


OFFLINE_CHILD = """
import json, resource, sys
from astrea_vlm.cli import main
rc = main(["create", "--preset", "astrea-13b", "--output", sys.argv[1]])
print(json.dumps({"rc": rc, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "modeling_imported": "astrea_vlm.modeling" in sys.modules}))
"""


def test_offline_create_of_a_paper_preset_fails_early_naming_every_flag(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", OFFLINE_CHILD, str(tmp_path / "x")], env=env, capture_output=True, text=True,
                          timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 2 and "Traceback" not in done.stderr
    for flag in ("--llm", "--caption", "--classification", "--detection", "--segmentation"):
        assert f"  {flag}: " in done.stderr and f"pass {flag} ./path/to/" in done.stderr
    assert "lmsys/vicuna-13b-v1.5 is not in the local Hugging Face cache and the Hub is offline" in done.stderr
    assert not result["modeling_imported"]  # it failed before any model code was loaded, let alone built
    assert result["maxrss"] < 4 * 1024**3
    assert not (tmp_path / "x").exists()


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
