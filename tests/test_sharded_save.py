"""Saving a model whose parameters are FSDP2 shards (`fully_shard`): a full state dict, Astrea's classes.

One process with a gloo group of one: the parameters are DTensors as under any FSDP2 run, which is
what broke the plain save (rank-local storages). Multi-process training is not covered here.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from conftest import AstreaModelTester

from astrea_vlm.export import save_hub_folder
from astrea_vlm.modeling import AstreaForConditionalGeneration
from astrea_vlm.processing import build_processor


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fully_sharded_model_saves_a_full_folder_that_reloads_to_the_same_logits(tmp_path, process_group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    tester = AstreaModelTester()
    model = tester.model(seed=4)
    inputs = {"input_ids": tester.prompt(), **tester.pixels(1)}
    with torch.no_grad():
        expected = model(**inputs).logits
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert type(model).__name__ != "AstreaForConditionalGeneration"  # FSDP2's generated subclass

    save_hub_folder(model, tmp_path / "saved", processor=build_processor(tester.config))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["AstreaForConditionalGeneration"]
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_astrea.AstreaForConditionalGeneration"
    reloaded, info = AstreaForConditionalGeneration.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, expected, atol=1e-5, rtol=0)
