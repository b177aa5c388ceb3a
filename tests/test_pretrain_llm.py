"""The world LLM (astrea_vlm.train.pretrain_llm): symbolic scenes, its training loop, loading it
into an Astrea model, and the shipped weights doing what the README says they do."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from astrea_vlm.train import pretrain_llm as pl
from astrea_vlm.train.synthetic import make_split


@pytest.fixture(scope="module")
def scenes():
    return make_split("pretrain-test", 24, seed=5, image_size=64, min_objects=2, max_objects=4)


@pytest.fixture(scope="module")
def processor():
    from astrea_vlm.processing import build_processor

    from astrea_vlm.configuration import get_preset

    return build_processor(get_preset("tiny", text_config={"vocab_size": 1024}), tokenizer=pl.load_world_tokenizer())


def test_cell_coverage_partitions_every_cell(scenes):
    for scene in scenes[:6]:
        cover = pl.cell_coverage(scene)
        assert cover.shape == (len(scene.objects) + 1, 16)
        np.testing.assert_allclose(cover.sum(0), 1.0, atol=1e-6)  # visible masks do not overlap
        # Each object's coverage, times a cell's pixels, adds up to its visible area.
        np.testing.assert_allclose(cover[:-1].sum(1) * (64 * 64 / 16), [o.area for o in scene.objects], rtol=1e-5)
        # The cell holding an object's centroid is covered by it.
        for k, obj in enumerate(scene.objects):
            x, y = obj.centroid
            cell = int(y // 16) * 4 + int(x // 16)
            if obj.mask[int(y), int(x)]:
                assert cover[k, cell] > 0


def test_symbolic_tokens_are_the_coverage_weighted_word_embeddings(scenes, processor):
    tokenizer = processor.tokenizer
    scene = scenes[0]
    corpus = pl.WorldCorpus([scene], processor, with_stages=False)
    table = torch.randn(len(tokenizer), 8)
    slots = corpus.slots(table, torch.tensor([0]))[0]
    cover = torch.from_numpy(pl.cell_coverage(scene))
    words = pl.scene_words(scene, tokenizer)
    expected = pl.symbolic_tokens(table, cover, words)
    torch.testing.assert_close(slots, expected, rtol=1e-5, atol=1e-5)
    # By hand for one object-covered cell: coverage * (colour + shape) + background share * tag.
    from astrea_vlm.train.synthetic import BACKGROUNDS

    cell = int(np.argmax(cover[0].numpy()))
    e = lambda word: table[torch.tensor(pl.word_ids(tokenizer, word))].mean(0)  # noqa: E731
    by_hand = sum(cover[i, cell] * (e(o.colour) + e(o.shape)) for i, o in enumerate(scene.objects))
    by_hand = by_hand + cover[-1, cell] * e(BACKGROUNDS[scene.background][1])
    torch.testing.assert_close(slots[cell], by_hand, rtol=1e-5, atol=1e-5)


def test_encode_row_labels_only_the_answer(scenes, processor):
    corpus = pl.WorldCorpus(scenes[:2], processor, with_stages=False)
    tokenizer = processor.tokenizer
    for row in corpus.qa:
        assert row.input_ids.count(processor.image_token_id) == 16
        answer = tokenizer.decode([t for t in row.labels if t >= 0], skip_special_tokens=True).strip()
        qa = next(q for q in scenes[int(row.scene)].qa if q["question_type"] == row.question_type)
        assert answer == qa["answer"]
        first = next(i for i, t in enumerate(row.labels) if t >= 0)
        assert all(t == -100 for t in row.labels[:first]) and row.labels[first:] == row.input_ids[first:]


def test_row_loss_is_the_mean_over_rows_of_each_rows_answer_loss(scenes, processor):
    """The LM head runs on the labelled positions only; the loss is the one of the full logits."""
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(pl.world_text_config(1024))
    corpus = pl.WorldCorpus(scenes[:6], processor, with_stages=False, image_position="after")
    batch = pl.embed_rows(model, corpus, corpus.qa, processor.image_token_id)
    loss = pl.row_loss(model, batch)
    logits = model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    per_row = [F.cross_entropy(logits[i][labels[i] != -100], labels[i][labels[i] != -100]) for i in range(len(labels))]
    torch.testing.assert_close(loss, torch.stack(per_row).mean(), rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(loss, model.lm_head.weight)
    expected, = torch.autograd.grad(torch.stack(per_row).mean(), model.lm_head.weight)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)


def test_pretraining_twice_gives_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    settings = pl.PretrainSettings(scenes=24, steps=4, batch_size=8, validation_scenes=8, vocab_size=400, log_every=3, eval_every=0)
    for run in ("a", "b"):
        pl.pretrain_world_llm(settings, output=tmp_path / run, log=lambda *_: None)
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "pretrain.json").read_text())["settings"]["threads"] == 1


def test_pretraining_continues_from_a_world_llm_folder(tmp_path):
    """init_from: the base's tokenizer and weights are the start (a run of 0 effective learning rate
    keeps them), its pretrain.json is kept as continued_from; a vocabulary mismatch is named."""
    from safetensors.torch import load_file

    small = dict(scenes=24, batch_size=8, validation_scenes=8, vocab_size=400, log_every=3, eval_every=0)
    pl.pretrain_world_llm(pl.PretrainSettings(steps=4, **small), output=tmp_path / "base", log=lambda *_: None)
    frozen = pl.PretrainSettings(steps=1, learning_rate=0.0, init_from=str(tmp_path / "base"), **small)
    summary = pl.pretrain_world_llm(frozen, output=tmp_path / "same", log=lambda *_: None)
    base, same = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("base", "same"))
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert (tmp_path / "same" / "tokenizer.json").read_text() == (tmp_path / "base" / "tokenizer.json").read_text()
    assert summary["continued_from"]["settings"]["steps"] == 4 and "continued_from" in (tmp_path / "same" / "pretrain.json").read_text()
    assert "It continued a run of 4 steps" in (tmp_path / "same" / "README.md").read_text()
    moved = pl.pretrain_world_llm(dataclasses.replace(frozen, steps=2, learning_rate=1e-2), output=tmp_path / "moved", log=lambda *_: None)
    assert moved["loss"] and any(not torch.equal(base[k], v) for k, v in load_file(str(tmp_path / "moved" / "model.safetensors")).items())
    with pytest.raises(ValueError, match="400-word embedding and vocab_size is 512"):
        pl.pretrain_world_llm(dataclasses.replace(frozen, vocab_size=512), output=tmp_path / "bad", log=lambda *_: None)


def test_pretraining_lowers_the_loss_and_loads_into_astrea(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from astrea_vlm.modeling import AstreaForConditionalGeneration
    from astrea_vlm.configuration import get_preset
    from astrea_vlm.train.run import start_from_world_llm

    settings = pl.PretrainSettings(scenes=24, steps=60, batch_size=16, validation_scenes=8, vocab_size=400, log_every=10)
    summary = pl.pretrain_world_llm(settings, output=tmp_path, log=lambda *_: None)
    losses = [point["loss"] for point in summary["loss"]]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    saved = json.loads((tmp_path / "pretrain.json").read_text())
    assert saved["settings"]["steps"] == 60 and set(saved["symbolic_accuracy"]) == {
        "counting", "colour", "existence", "relative_position", "grounding", "multiple_choice"}

    # Astrea started from the world LLM computes exactly the pretrained LLM's logits on text.
    model = AstreaForConditionalGeneration(get_preset("tiny", text_config={"vocab_size": 400})).eval()
    tokenizer = start_from_world_llm(model, str(tmp_path))
    assert len(tokenizer) <= 400 and tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    llama = LlamaForCausalLM(pl.world_text_config(400)).eval()
    llama.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    ids = torch.tensor([tokenizer("Is there a red circle in the image? yes")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llama(input_ids=ids).logits)


def test_loading_a_world_llm_of_another_size_names_the_fix(tmp_path):
    from astrea_vlm.modeling import AstreaForConditionalGeneration
    from astrea_vlm.configuration import get_preset

    model = AstreaForConditionalGeneration(get_preset("tiny", text_config={"vocab_size": 512}))
    with pytest.raises(ValueError, match="vocab_size"):
        pl.load_world_llm(model, pl.SHIPPED)
    with pytest.raises(FileNotFoundError, match="astrea pretrain-llm"):
        pl.load_world_llm(model, tmp_path)


def test_shipped_world_llm_reads_symbolic_scenes_and_not_without_them(processor):
    """The shipped weights answer look-up questions about held-out symbolic scenes, and fall to
    chance when each question is shown another scene (so the answers come from the scene)."""
    from transformers import LlamaForCausalLM
    from safetensors.torch import load_file

    meta = json.loads((pl.SHIPPED / "pretrain.json").read_text())
    llama = LlamaForCausalLM(pl.world_text_config(meta["settings"]["vocab_size"])).eval()
    llama.load_state_dict(load_file(str(pl.SHIPPED / "model.safetensors")))
    scenes = make_split("pretrain-shipped-check", 48, seed=7, image_size=64, min_objects=2, max_objects=4)
    corpus = pl.WorldCorpus(scenes, processor, with_stages=False, image_position=meta["settings"]["image_position"])
    seen = pl.evaluate_symbolic(llama, corpus, processor, processor.image_token_id)
    assert seen["existence"] >= 0.8 and seen["colour"] >= 0.8, seen
    # ...under the current chat template: weights pretrained under another layout lose the look-ups
    # first (grounding 0.012, relative position 0.652 on 256 scenes before they were adapted; 0.820, 0.812 after)
    assert seen["grounding"] >= 0.65 and seen["relative_position"] >= 0.65, seen
    # Same questions, each shown the next scene's symbolic tokens.
    shifted = pl.WorldCorpus(scenes, processor, with_stages=False, image_position=meta["settings"]["image_position"])
    shifted.index, shifted.value = corpus.index.roll(1, 0), corpus.value.roll(1, 0)
    blind = pl.evaluate_symbolic(llama, shifted, processor, processor.image_token_id)
    assert blind["existence"] <= 0.7 and blind["colour"] <= 0.5, blind


def test_demo_recipe_starts_from_the_world_llm_and_aligns_against_it_frozen():
    from safetensors.torch import load_file

    from astrea_vlm.demo import DemoSettings, build_demo_model
    from astrea_vlm.train.run import load_model_and_processor
    from astrea_vlm.train.recipe import load_recipe

    recipe = load_recipe("demo")
    assert recipe.model["llm"] == "world" and recipe.data["image_position"] == "after"
    assert "llm" not in recipe.align.trainable  # the paper's pre-alignment: the LLM is frozen
    shipped = load_file(str(pl.SHIPPED / "model.safetensors"))
    world_vocab = pl.load_world_tokenizer().get_vocab()
    for model, processor in (load_model_and_processor(recipe),
                             build_demo_model(recipe, DemoSettings(warmup_steps=0), train_scenes=[], log=lambda *a: None)):
        torch.testing.assert_close(model.lm_head.weight, shipped["lm_head.weight"])
        torch.testing.assert_close(model.model.language_model.layers[1].mlp.down_proj.weight,
                                   shipped["model.layers.1.mlp.down_proj.weight"])
        assert processor.tokenizer.get_vocab() == world_vocab


def test_cli_pretrain_llm_passes_its_flags(monkeypatch, tmp_path, capsys):
    from astrea_vlm.cli import main

    seen = []
    monkeypatch.setattr(pl, "pretrain_world_llm", lambda settings, output: seen.append((settings, output)) or {"seconds": 1.0})
    assert main(["pretrain-llm", "--output", str(tmp_path), "--scenes", "10", "--steps", "3"]) == 0
    settings, output = seen[0]
    assert (settings.scenes, settings.steps, settings.seed, settings.threads, output) == (10, 3, pl.PRETRAIN_SEED, 1, str(tmp_path))
    assert main(["pretrain-llm", "--output", str(tmp_path), "--threads", "2"]) == 0 and seen[1][0].threads == 2
    assert seen[1][0].init_from is None and seen[1][0].learning_rate == pl.PretrainSettings().learning_rate
    assert main(["pretrain-llm", "--output", str(tmp_path), "--init-from", "base", "--learning-rate", "5e-4"]) == 0
    assert (seen[2][0].init_from, seen[2][0].learning_rate) == ("base", 5e-4)
    assert "astrea pretrain-llm: wrote" in capsys.readouterr().out
