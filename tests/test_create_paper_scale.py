"""`astrea create` at paper scale: full-size towers in their release formats, in bounded memory (slow).

The test writes random checkpoints with the paper presets' full tower shapes, each in the format
its release uses -- SigLIP SO400M and Grounding-DINO (Swin-B) as transformers folders, RAM++
Swin-L as ``ram_plus_swin_large_14m.pth`` (``{"model": ...}`` with the tagging decoder's tensors,
the 233,835 x 512 label embedding included), SAM2.1 Hiera-L as ``sam2.1_hiera_large.pt`` -- and a
mid-size LLM (TinyLlama's 1.1B shape, sharded bfloat16 safetensors). ``astrea create``'s writer
then runs in a child process whose peak resident memory is measured: it must stay within 1.2x of
the largest part plus Astrea's new modules (in the output dtype), on top of the process's memory
before the assembly starts. About 7 GB of checkpoints and 5 GB of output are written to the temp
folder; the peak of this test's own process is about 2 GB.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import GroundingDinoModel, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from astrea_vlm.configuration import get_preset
from astrea_vlm.configuration.presets import paper_13b_parts
from astrea_vlm.processing.tokenization import build_byte_level_tokenizer
from test_tower_ram_plus import reference_for
from test_tower_sam2 import _original_encoder, _save_original_checkpoint

pytestmark = pytest.mark.slow

#: TinyLlama-1.1B's shape: the mid-size LLM (the largest part).
LLM_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000}


def _config():
    """The astrea-13b preset (full-size towers) around the mid-size LLM; <image> is the byte-level tokenizer's id 3."""
    text = {**paper_13b_parts()["text_config"], **LLM_SHAPE, "vocab_size": 32064, "max_position_embeddings": 2048}
    return get_preset("astrea-13b", text_config=text, image_token_id=3)


def _sub(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}


def _write_parts(root, config) -> dict[str, str]:
    """Full-size random checkpoints, one at a time (each is freed before the next is built)."""
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(**_sub(config.caption_config.tower_config)))
    siglip.save_pretrained(root / "siglip-so400m")  # float32, as the release
    del siglip
    gc.collect()

    swin_l = {"img_size": 384, "embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12}
    swin = reference_for(config.classification_config, seed=1, **swin_l)
    state = {"visual_encoder." + k: v for k, v in swin.state_dict().items()}
    state["label_embed"] = torch.randn(4585 * 51, 512)  # RAM++'s tag-description embeddings: read by no tower
    state["tagging_head.encoder.layer.0.crossattention.self.query.weight"] = torch.randn(768, 768)
    torch.save({"model": state}, root / "ram_plus_swin_large_14m.pth")
    del swin, state
    gc.collect()

    dino = GroundingDinoModel(copy.deepcopy(config.detection_config.tower_config))
    dino.save_pretrained(root / "grounding-dino-base")
    del dino
    gc.collect()

    _save_original_checkpoint(_original_encoder(config.segmentation_config.tower_config, seed=2), root / "sam2.1_hiera_large.pt")
    gc.collect()

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        llm = LlamaForCausalLM(LlamaConfig(**{**_sub(config.text_config), **LLM_SHAPE, "tie_word_embeddings": False}))
    finally:
        torch.set_default_dtype(previous)
    llm.save_pretrained(root / "llm", max_shard_size="1GB")
    build_byte_level_tokenizer(320).save_pretrained(root / "llm")
    del llm
    gc.collect()
    return {"caption": str(root / "siglip-so400m"), "classification": str(root / "ram_plus_swin_large_14m.pth"),
            "detection": str(root / "grounding-dino-base"), "segmentation": str(root / "sam2.1_hiera_large.pt")}


CHILD = """
import json, re, resource, sys
import torch
from transformers import AutoModelForCausalLM, GroundingDinoModel, Sam2VisionModel, SiglipVisionModel  # noqa: F401
import timm  # noqa: F401
from astrea_vlm.create import write_assembled
import test_create_paper_scale as t

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

args = json.loads(sys.argv[1])
before = rss()
write_assembled(t._config(), args["output"], llm=args["llm"], towers=args["towers"], dtype=torch.bfloat16, log=lambda *a: None)
print(json.dumps({"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_paper_scale_assembly_peak_memory_is_the_largest_part_plus_new_modules(tmp_path):
    from astrea_vlm.create import NEW_MODULES, ShardWriter, meta_model

    config = _config()
    towers = _write_parts(tmp_path, config)
    output = tmp_path / "astrea"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    args = json.dumps({"output": str(output), "llm": str(tmp_path / "llm"), "towers": towers})
    done = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, timeout=3600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])

    model = meta_model(config, torch.bfloat16)
    sizes = ShardWriter(output, model, ["new", *config.expert_order, "llm"]).part_bytes
    largest = max(size for part, size in sizes.items() if part != "new")
    bound = 1.2 * (largest + sizes["new"])
    assembly = measured["peak"] - measured["before"]
    report = (f"assembly peak {assembly / 1e9:.2f} GB (process {measured['peak'] / 1e9:.2f} GB, {measured['before'] / 1e9:.2f} GB "
              f"before), parts {json.dumps({k: round(v / 1e9, 3) for k, v in sizes.items()})} GB, bound {bound / 1e9:.2f} GB")
    print(report)
    assert assembly <= bound, report
    assert sizes["llm"] == largest and sum(sizes.values()) > 2 * largest  # the whole model would not fit the bound

    # The folder is complete: every planned tensor is in a shard, and the shards are the index's.
    index = json.loads((output / "model.safetensors.index.json").read_text())
    expected = {k for k in model.state_dict()}
    assert set(index["weight_map"]) == expected
    assert len(set(index["weight_map"].values())) >= 6  # one part per shard at least
    # Spot checks against the sources: a SAM2 Hiera weight, RAM++'s Swin patch embedding, the LLM.
    sam2 = torch.load(towers["segmentation"], weights_only=True, mmap=True)["model"]
    ram = torch.load(towers["classification"], weights_only=True, mmap=True)["model"]
    checks = {
        "model.towers.segmentation.model.backbone.blocks.30.attn.qkv.weight": sam2["image_encoder.trunk.blocks.30.attn.qkv.weight"],
        "model.towers.classification.model.patch_embed.proj.weight": ram["visual_encoder.patch_embed.proj.weight"],
    }
    llm_shard = json.loads((tmp_path / "llm" / "model.safetensors.index.json").read_text())["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    with safe_open(str(tmp_path / "llm" / llm_shard), "pt") as f:
        checks["model.language_model.layers.0.mlp.up_proj.weight"] = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    for key, source in checks.items():
        with safe_open(str(output / index["weight_map"][key]), "pt") as f:
            assert torch.equal(f.get_tensor(key), source.to(torch.bfloat16)), key
    assert {key.split(".")[1] for key in index["weight_map"] if key.startswith("model.") and ".towers." not in key
            and ".language_model." not in key} == set(NEW_MODULES)
    config_json = json.loads((output / "config.json").read_text())
    assert config_json["dtype"] == "bfloat16" and config_json["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_astrea.")
