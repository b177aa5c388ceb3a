"""Which tokens carry L_reg: the labels the trainer really sees, on one concrete chat.

The chat goes through ``astrea align/instruct``'s own stage runner (``run_stage``: its SFT
settings, TRL's dataset preparation and vision collator, with and without the feature cache) and
the labels of the batch handed to the loss are compared with the chat's answers token by token:
exactly the assistant answers and their end-of-sequence tokens are targets; the system prompt, the
user turns, the ``<image>`` tokens, the ``ASSISTANT:`` prefixes and the newlines are not.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from astrea_vlm.train.recipe import load_recipe
from astrea_vlm.train.run import load_model_and_processor
from astrea_vlm.train.stages import run_stage
from astrea_vlm.train.trainer import AstreaSFTTrainer

CHAT = [
    {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "Is it large?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
]


def _dataset():
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = (220, 30, 30)
    image = Image.fromarray(pixels)
    return datasets.Dataset.from_list([{"images": [image], "messages": CHAT}] * 2)


def _recipe(tmp_path, cache: bool):
    body = {
        "model": {"preset": "tiny", "seed": 0},
        "optim": {"per_device_train_batch_size": 2},
        "instruct": {"max_steps": 1, "learning_rate": 1.0e-3, "trainable": ["router", "adapters", "moco_head", "llm"]},
        "output_dir": str(tmp_path / "out"),
        "save_steps": 100,
        "logging_steps": 1,
        "cache": cache,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_recipe(path)


@pytest.mark.parametrize("cache", [False, True])
def test_run_stage_trains_on_the_assistant_answers_only(tmp_path, monkeypatch, cache):
    recipe = _recipe(tmp_path, cache)
    model, processor = load_model_and_processor(recipe)
    seen = []
    compute_loss = AstreaSFTTrainer.compute_loss

    def record(self, model, inputs, *args, **kwargs):
        seen.append({k: v.clone() for k, v in inputs.items() if k in ("input_ids", "labels", "attention_mask")})
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(AstreaSFTTrainer, "compute_loss", record)
    phase = recipe.instruct
    run_stage(model, processor, recipe, phase, phase.trainable, list(model.config.expert_order), _dataset(),
              tmp_path / "out" / "instruct", resume=False, use_moco=True, log=lambda *a: None,
              cache_dir=tmp_path / "cache" if cache else None)
    assert seen, "the trainer never computed a loss"

    tokenizer = processor.tokenizer
    answers = [tokenizer(f" {text}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"] for text in ("red", "no")]
    for ids, labels, attention in zip(seen[0]["input_ids"].tolist(), seen[0]["labels"].tolist(), seen[0]["attention_mask"].tolist()):
        length = sum(attention)
        text = processor.decode(ids[:length])
        assert text.count("<image>") == model.config.num_visual_tokens
        # The positions that should carry loss, found in the token ids: each answer right after its 'ASSISTANT:'.
        prefix = tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
        expected = [-100] * len(ids)
        start = 0
        for answer in answers:
            start = next(t for t in range(start, length) if ids[t : t + len(prefix)] == prefix) + len(prefix)
            assert ids[start : start + len(answer)] == answer, text
            expected[start : start + len(answer)] = answer
            start += len(answer)
        assert labels == expected, [(processor.decode([i]), label != -100) for i, label in zip(ids, labels)]
        assert processor.decode([i for i, label in zip(ids, labels) if label != -100]) == " red</s> no</s>"


def test_image_tokens_never_carry_loss_even_when_the_prompt_does(tmp_path, monkeypatch):
    # With assistant_only_loss=False TRL labels the whole prompt; AstreaSFTTrainer still masks the
    # <image> positions (their "targets" are placeholders, not text) before TRL's loss reads them.
    from trl import SFTConfig, SFTTrainer

    recipe = _recipe(tmp_path, cache=False)
    model, processor = load_model_and_processor(recipe)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, bf16=False,
                     activation_checkpointing=False, report_to=[], assistant_only_loss=False, save_strategy="no",
                     max_length=None, use_cpu=True, disable_tqdm=True)
    trainer = AstreaSFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=processor, use_moco=False)
    seen = []
    base_loss = SFTTrainer.compute_loss

    def record(self, model, inputs, *args, **kwargs):
        seen.append({k: inputs[k].clone() for k in ("input_ids", "labels", "attention_mask")})
        return base_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "compute_loss", record)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.compute_loss(model, dict(batch))
    ids, labels, attention = seen[0]["input_ids"], seen[0]["labels"], seen[0]["attention_mask"]
    image = ids == processor.image_token_id
    assert int(image.sum()) == 2 * model.config.num_visual_tokens
    expected = ids.masked_fill(image | (attention == 0), -100)
    assert torch.equal(labels, expected)
