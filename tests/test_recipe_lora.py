"""A recipe's ``lora:`` block: every LoraConfig field, clear errors, adapter-only and merged results.

The end-to-end test trains the tiny recipe's instruction stage with LoRA and ``save: both``, then
loads ``<output>/aligned`` with ``PeftModel.from_pretrained(base, <output>/adapter)`` -- the way a
user loads a published adapter -- and checks that it computes the merged ``<output>/final``
model's logits, and that the adapter matters (the base alone computes others).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import PeftModel

from astrea_vlm.train.lora import DEFAULT_TARGET_MODULES, lora_fields, parse_lora
from astrea_vlm.train.recipe import load_recipe

LLM_ATTENTION = r".*language_model.*\.(q_proj|v_proj)"


def _recipe(tmp_path, lora, **extra):
    body = {
        "model": {"preset": "tiny", "seed": 0},
        "data": {"source": "synthetic", "train_size": 8, "image_size": 48, "seed": 0, "max_objects": 3},
        "optim": {"per_device_train_batch_size": 4},
        "align": {"max_steps": 1, "learning_rate": 2.0e-3, "trainable": ["projector", "bridge"]},
        "instruct": {"max_steps": 3, "learning_rate": 1.0e-2, "trainable": ["router", "adapters", "moco_head", "llm"],
                     "lora": lora},
        "output_dir": str(tmp_path / "out"),
        "save_steps": 100,
        "logging_steps": 1,
        "cache": True,
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


# ----------------------------------------------------------------------------------- parsing
def test_every_lora_config_field_is_taken(tmp_path):
    lora = {"r": 4, "alpha": 8, "lora_dropout": 0.1, "target_modules": LLM_ATTENTION, "modules_to_save": ["lm_head"],
            "bias": "lora_only", "use_rslora": True, "init_lora_weights": "gaussian", "save": "adapter"}
    phase = load_recipe(_recipe(tmp_path, lora)).instruct
    assert phase.lora == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": LLM_ATTENTION,
                          "modules_to_save": ["lm_head"], "bias": "lora_only", "use_rslora": True,
                          "init_lora_weights": "gaussian", "save": "adapter"}
    assert {"target_modules", "lora_dropout", "modules_to_save", "layers_to_transform", "use_dora"} <= set(lora_fields())


def test_defaults_are_llm_only_and_merged():
    assert parse_lora({}) == {"r": 16, "lora_alpha": 32, "target_modules": DEFAULT_TARGET_MODULES, "save": "merged"}
    assert parse_lora(None) is None


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"r": 4, "dropout": 0.1}, r"unknown field\(s\) \['dropout'\].*lora_dropout"),
        ({"alpha": 8, "lora_alpha": 16}, "both 'alpha' and 'lora_alpha'"),
        ({"save": "zip"}, r"save='zip': choose one of \['merged', 'adapter', 'both'\]"),
        ({"r": 0}, r"lora.r=0: the LoRA rank is a positive integer"),
        ({"lora_dropout": 1.5}, r"lora_dropout=1.5: a dropout probability"),
        ({"layers_to_transform": [0]}, "peft.LoraConfig refuses.*`layers_to_transform` cannot be used"),
        ([4, 8], "must be a mapping of LoraConfig fields"),
    ],
)
def test_bad_lora_blocks_are_refused_naming_the_field(tmp_path, lora, message):
    with pytest.raises(ValueError, match=message) as error:
        load_recipe(_recipe(tmp_path, lora))
    assert "instruct.lora" in str(error.value)


def test_lora_outside_instruction_tuning_is_refused(tmp_path):
    path = _recipe(tmp_path, None, align={"max_steps": 1, "trainable": ["projector"], "lora": {"r": 4}})
    with pytest.raises(ValueError, match="align.lora: LoRA is for instruction tuning"):
        load_recipe(path)


# ---------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from astrea_vlm.train.run import run_instruct

    tmp_path = tmp_path_factory.mktemp("lora")
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": LLM_ATTENTION, "save": "both"}
    lines: list[str] = []
    final = run_instruct(load_recipe(_recipe(tmp_path, lora)), log=lines.append)
    return tmp_path / "out", final, lines


def _batch(folder):
    from PIL import Image

    from astrea_vlm.processing import AstreaProcessor

    processor = AstreaProcessor.from_pretrained(folder)
    image = Image.new("RGB", (48, 48), (200, 40, 40))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=prompt, return_tensors="pt")


def test_adapter_folder_on_the_aligned_base_is_the_merged_model(trained):
    from astrea_vlm.modeling import AstreaForConditionalGeneration

    out, final, lines = trained
    assert final == out / "final"
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == LLM_ATTENTION and config["lora_dropout"] == 0.05 and config["r"] == 4
    assert config["base_model_name_or_path"] == str((out / "aligned").resolve())
    # The groups instruction tuning trained besides the LLM travel with the adapter.
    assert {"model.fusion.router", "model.moco_head", *(f"model.fusion.adapters.{i}" for i in range(4))} <= set(config["modules_to_save"])
    assert any("LoRA adapter written to" in line for line in lines)

    batch = _batch(out / "aligned")
    base = AstreaForConditionalGeneration.from_pretrained(out / "aligned").eval()
    with torch.no_grad():
        before = base(**batch).logits
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    merged = AstreaForConditionalGeneration.from_pretrained(final).eval()
    with torch.no_grad():
        with_adapter = loaded(**batch).logits
        reference = merged(**batch).logits
    torch.testing.assert_close(with_adapter, reference, rtol=0, atol=1e-5)
    assert float((with_adapter - before).abs().max()) > 1e-3  # the adapter changes the model


def test_adapter_only_writes_no_merged_folder(tmp_path):
    from astrea_vlm.train.run import run_instruct

    recipe = load_recipe(_recipe(tmp_path, {"r": 2, "target_modules": LLM_ATTENTION, "save": "adapter"},
                                 instruct={"max_steps": 1, "trainable": ["router", "llm"],
                                           "lora": {"r": 2, "target_modules": LLM_ATTENTION, "save": "adapter"}}))
    result = run_instruct(recipe, log=lambda line: None)
    out = tmp_path / "out"
    assert result == out / "adapter" and (result / "adapter_model.safetensors").is_file()
    assert not (out / "final").exists()
    config = json.loads((result / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.fusion.router"]
