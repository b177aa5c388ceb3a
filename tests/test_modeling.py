"""Behaviour of AstreaForConditionalGeneration on the tiny preset."""

from __future__ import annotations

import pytest
import torch

from astrea_vlm.configuration import get_preset
from astrea_vlm.modeling import AstreaForConditionalGeneration, ExpertTower
from conftest import AstreaModelTester


def _inputs(tester, n_images=1, seed=0, n_text=5):
    ids = tester.prompt(n_text=n_text, n_images=n_images, seed=seed)
    return {"input_ids": ids, **tester.pixels(n_images, seed=seed)}


def test_tiny_preset_stays_tiny():
    # What keeps the suite fast is the tiny preset's size, so that is what is checked (counted, not
    # timed: a timing fails on a loaded machine). Today: ~0.76 M parameters, ~17 MFLOP per forward.
    from torch.utils.flop_counter import FlopCounterMode

    tester = AstreaModelTester()
    model = tester.model()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(**_inputs(tester))
    assert torch.isfinite(out.logits).all()
    assert model.num_parameters() < 2_000_000
    assert 0 < counter.get_total_flops() < 50_000_000


def test_forward_shapes_and_values(tester, tiny_model):
    inputs = _inputs(tester)
    with torch.no_grad():
        out = tiny_model(**inputs)
    seq = inputs["input_ids"].shape[1]
    assert out.logits.shape == (1, seq, tester.vocab_size)
    assert out.image_hidden_states.shape == (1, tester.num_visual_tokens, tester.config.hidden_size)
    assert out.router_logits.shape == out.router_probs.shape == (1, tester.config.num_experts)
    assert torch.isfinite(out.logits).all()

    # Values: the logits are exactly the LM over text embeddings with the fused tokens scattered in.
    with torch.no_grad():
        embeds = tiny_model.get_input_embeddings()(inputs["input_ids"]).clone()
        mask = inputs["input_ids"][0] == tester.config.image_token_id
        embeds[0, mask] = out.image_hidden_states[0]
        hidden = tiny_model.model.language_model(inputs_embeds=embeds).last_hidden_state
        expected = tiny_model.lm_head(hidden)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


def test_text_only_forward_equals_the_plain_llm(tester, tiny_model):
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        out = tiny_model(input_ids=ids)
        expected = tiny_model.lm_head(tiny_model.model.language_model(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(out.logits, expected)
    assert out.router_probs is None


def test_several_images_per_sample_use_their_own_features(tester, tiny_model):
    inputs = _inputs(tester, n_images=2)
    with torch.no_grad():
        out = tiny_model(**inputs)
        # The router also reads the text before each image: give the first image its own.
        embeds = tiny_model.get_input_embeddings()(inputs["input_ids"])
        image_mask = inputs["input_ids"] == tester.config.image_token_id
        text = tiny_model.model.instruction_features(embeds, inputs.get("attention_mask"), image_mask)
        first = tiny_model.model.get_image_features(
            pixel_values={role: inputs[f"pixel_values_{role}"][:1] for role in tester.config.expert_order},
            text_features=text[:1],
        )
    n = tester.num_visual_tokens
    assert out.image_hidden_states.shape == (2, n, tester.config.hidden_size)
    torch.testing.assert_close(out.image_hidden_states[:1], first.fused, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.image_hidden_states[0], out.image_hidden_states[1])


def test_loss_backward_reaches_trainable_modules_but_not_frozen_towers(tester):
    model = tester.model().train()
    for bridge in model.model.bridges.values():  # a nonzero gate lets gradients reach F_q/F_k/F_v/F_o
        torch.nn.init.constant_(bridge.gate, 0.5)
        bridge.p = 1.0  # keep every residual term, so no query is all-zero by chance
    inputs = _inputs(tester)
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    backbone = model.model
    for role in tester.config.expert_order:
        assert has_grad(backbone.projectors[role]), role
        assert all(p.grad is None for p in backbone.towers[role].parameters()), role
        assert not backbone.towers[role].training, f"frozen {role} tower left eval mode"
    for role, bridge in backbone.bridges.items():
        assert has_grad(bridge.q_proj) and has_grad(bridge.k_proj) and bridge.gate.grad.abs() > 0, role
    assert has_grad(backbone.fusion.router)
    kept = out.router_probs[0] > 0
    for index, adapter in enumerate(backbone.fusion.adapters):
        assert has_grad(adapter) == bool(kept[index]), f"adapter {index}"


def test_loss_is_on_answer_tokens_only(tester, tiny_model):
    inputs = _inputs(tester)
    ids = inputs["input_ids"]
    labels = ids.clone()
    labels[:, :-3] = -100  # only the last three tokens are the answer
    with torch.no_grad():
        out = tiny_model(**inputs, labels=labels)
    logits = out.logits[0, -4:-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, -3:])
    torch.testing.assert_close(out.loss, expected)


def test_the_model_loss_is_the_lm_loss_on_the_labels_given_and_returns_the_balancing_term():
    """As in LLaVA, the labels' builder masks <image> positions; the trainer adds the training terms."""
    tester = AstreaModelTester()
    model = tester.model()
    inputs = _inputs(tester)
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = model(**inputs, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)  # <image> positions included: nothing is masked here
    assert out.load_balance_loss > 0


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_router_keeps_exactly_k_experts_and_probabilities_sum_to_one(top_k):
    tester = AstreaModelTester(fusion_top_k=top_k)
    model = tester.model()
    inputs = {**tester.pixels(3)}
    with torch.no_grad():
        visual = model.model.get_image_features(
            pixel_values={role: inputs[f"pixel_values_{role}"] for role in tester.config.expert_order}
        )
    probs, logits = visual.router_probs, visual.router_logits
    assert ((probs > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    # The kept experts are the top-k logits, weighted by a softmax over the kept logits only.
    kept = logits.topk(top_k, dim=-1)
    torch.testing.assert_close(probs.gather(-1, kept.indices), kept.values.softmax(-1))


def test_bridge_with_zero_gate_equals_projector_only_path(tester, tiny_model):
    pixels = tester.pixels(2)
    pixel_values = {role: pixels[f"pixel_values_{role}"] for role in tester.config.expert_order}
    model = tiny_model
    assert all(b.gate.item() == 0.0 for b in model.model.bridges.values())
    with torch.no_grad():
        visual = model.model.get_image_features(pixel_values=pixel_values)
        for role in tester.config.expert_order:
            torch.testing.assert_close(visual.bridged_features[role], visual.expert_features[role], rtol=0, atol=0)
        # ...and the fused output equals fusing the projector outputs directly.
        direct = model.model.fusion([visual.expert_features[r] for r in tester.config.expert_order])
        torch.testing.assert_close(visual.fused, direct.fused)

        # A nonzero gate changes the later experts' features (the first expert has no bridge).
        bridge = model.model.bridges[tester.config.expert_order[1]]
        try:
            bridge.gate.fill_(0.7)
            gated = model.model.get_image_features(pixel_values=pixel_values)
        finally:
            bridge.gate.fill_(0.0)
    first, second = tester.config.expert_order[:2]
    torch.testing.assert_close(gated.bridged_features[first], visual.bridged_features[first])
    assert not torch.allclose(gated.bridged_features[second], visual.bridged_features[second])


def test_bridge_samples_bernoulli_in_training_and_uses_expectation_in_eval(tester):
    from astrea_vlm.modeling import ResidualBridge

    bridge = ResidualBridge(8, 2, gamma=2.0, p=0.5)
    previous = [torch.ones(64, 1, 8), 3 * torch.ones(64, 1, 8)]
    bridge.eval()
    torch.testing.assert_close(bridge.residual_query(previous), torch.full((64, 1, 8), 2.0 * 0.5 * 4))
    bridge.train()
    query = bridge.residual_query(previous, torch.Generator().manual_seed(0))[:, 0, 0]
    # Each image gets gamma * (p1 * 1 + p2 * 3) with p_i in {0, 1}: values in {0, 2, 6, 8}, all four seen.
    assert set(query.tolist()) == {0.0, 2.0, 6.0, 8.0}


def test_precomputed_expert_features_equal_the_pixel_path(tester, tiny_model):
    inputs = _inputs(tester)
    with torch.no_grad():
        out = tiny_model(**inputs)
        features = tiny_model.model.get_expert_features(
            {role: inputs[f"pixel_values_{role}"] for role in tester.config.expert_order}
        )
        cached = tiny_model(input_ids=inputs["input_ids"], expert_features=features)
        # Mixed: the caption expert from pixels, the rest from the cache.
        caption = tester.config.expert_order[0]
        mixed = tiny_model(
            input_ids=inputs["input_ids"],
            **{f"pixel_values_{caption}": inputs[f"pixel_values_{caption}"]},
            expert_features={r: f for r, f in features.items() if r != caption},
        )
        towers = {role: tiny_model.model.get_tower_tokens(role, inputs[f"pixel_values_{role}"]) for role in tester.config.expert_order}
        from_tower_cache = tiny_model(input_ids=inputs["input_ids"], tower_features=towers)
    torch.testing.assert_close(cached.logits, out.logits)
    torch.testing.assert_close(mixed.logits, out.logits)
    torch.testing.assert_close(from_tower_cache.logits, out.logits)


def test_generate_with_and_without_cache_is_identical(tester, tiny_model):
    inputs = _inputs(tester, seed=3)
    with torch.no_grad():
        cached = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)


def test_generate_runs_each_tower_once_per_call(tester, tiny_model):
    calls = {role: 0 for role in tester.config.expert_order}
    hooks = []
    for role, tower in tiny_model.model.towers.items():
        def hook(module, args, output, role=role):
            calls[role] += 1
        hooks.append(tower.register_forward_hook(hook))
    try:
        with torch.no_grad():
            tiny_model.generate(**_inputs(tester), max_new_tokens=6, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {role: 1 for role in tester.config.expert_order}


def test_left_padded_batch_generates_the_same_tokens_as_each_sample_alone(tester, tiny_model):
    a = tester.prompt(n_text=3, seed=1)[0]
    b = tester.prompt(n_text=9, seed=2)[0]
    pixels_a, pixels_b = tester.pixels(1, seed=1), tester.pixels(1, seed=2)
    pad = b.shape[0] - a.shape[0]
    ids = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), a]), b])
    mask = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones_like(a)]), torch.ones_like(b)])
    pixels = {k: torch.cat([pixels_a[k], pixels_b[k]]) for k in pixels_a}
    with torch.no_grad():
        batch = tiny_model.generate(input_ids=ids, attention_mask=mask, **pixels, max_new_tokens=6, do_sample=False)
        alone_a = tiny_model.generate(input_ids=a[None], **pixels_a, max_new_tokens=6, do_sample=False)
        alone_b = tiny_model.generate(input_ids=b[None], **pixels_b, max_new_tokens=6, do_sample=False)
    assert torch.equal(batch[0, -6:], alone_a[0, -6:])
    assert torch.equal(batch[1, -6:], alone_b[0, -6:])


def test_save_and_reload_gives_equal_logits_from_safetensors(tester, tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    reloaded = AstreaForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = _inputs(tester, seed=5)
    with torch.no_grad():
        expected = tiny_model(**inputs).logits
        got = reloaded(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for module in reloaded.modules():
        if isinstance(module, ExpertTower):
            assert not any(p.requires_grad for p in module.parameters())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tester):
    inputs = _inputs(tester)
    results = []
    for checkpointing in (False, True):
        model = tester.model(seed=1).train()
        model.config.bridge_p = 1.0
        for bridge in model.model.bridges.values():
            bridge.p = 1.0  # deterministic residual sampling for the comparison
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        results.append((loss.detach(), model.model.projectors["caption"].layers[0].weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_sdpa_is_the_default_attention(tiny_model):
    assert tiny_model.config._attn_implementation == "sdpa"
    assert tiny_model.model.language_model.config._attn_implementation == "sdpa"


def test_hf_attributes_used_by_accelerate_peft_and_trl(tiny_model):
    assert tiny_model.base_model_prefix == "model"
    assert tiny_model.base_model is tiny_model.model
    assert tiny_model.get_input_embeddings() is tiny_model.model.language_model.embed_tokens
    assert tiny_model.get_output_embeddings() is tiny_model.lm_head
    assert "ResidualBridge" in tiny_model._no_split_modules
    assert tiny_model.supports_gradient_checkpointing


@pytest.mark.parametrize(
    "make_inputs, message",
    [
        (lambda t: {"input_ids": t.prompt(n_images=2), **t.pixels(1)}, "<image> tokens"),
        (lambda t: {"input_ids": t.prompt(), **{k: v for k, v in list(t.pixels(1).items())[:2]}}, "no input for the"),
        (lambda t: {"input_ids": t.prompt()}, "no pixel values"),
        (lambda t: {"input_ids": t.prompt(), **{k: v[..., :16, :16] for k, v in t.pixels(1).items()}}, "expects pixel_values of shape"),
    ],
)
def test_inconsistent_inputs_raise_a_clear_value_error(tester, tiny_model, make_inputs, message):
    with pytest.raises(ValueError, match=message):
        with torch.no_grad():
            tiny_model(**make_inputs(tester))


def test_a_reverse_stage_order_moves_the_bridges():
    order = ["segmentation", "detection", "classification", "caption"]
    tester = AstreaModelTester(expert_order=order)
    model = tester.model()
    assert list(model.model.bridges.keys()) == order[1:]
    with torch.no_grad():
        out = model(**_inputs(tester))
    assert torch.isfinite(out.logits).all()


def test_paper_preset_builds_on_the_meta_device_with_the_published_sizes():
    config = get_preset("astrea-13b")
    with torch.device("meta"):
        model = AstreaForConditionalGeneration(config)
    llm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert 12.9e9 < llm < 13.1e9  # Vicuna-13B
    for role, tower in model.model.towers.items():
        assert tower.num_tokens > 0
    assert model.model.towers["caption"].grid == (27, 27)  # SigLIP SO400M/14 at 384 px


def test_auto_classes_resolve_astrea_in_process(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    tiny_model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "AstreaConfig"
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(model, AstreaForConditionalGeneration)


def test_alignment_stage_feeds_one_experts_bridged_features_and_needs_only_earlier_experts(tester):
    model = tester.model()
    order = tester.config.expert_order
    pixels = tester.pixels(1)
    ids = tester.prompt()
    model.model.set_alignment_stage(order[1])
    try:
        needed = {f"pixel_values_{r}": pixels[f"pixel_values_{r}"] for r in order[:2]}
        with torch.no_grad():
            out = model(input_ids=ids, **needed)
            visual = model.model.get_image_features(pixel_values={r: pixels[f"pixel_values_{r}"] for r in order[:2]})
        assert out.router_probs is None
        torch.testing.assert_close(out.image_hidden_states, visual.bridged_features[order[1]])
        assert set(visual.expert_features) == set(order[:2])
        with pytest.raises(ValueError, match="unknown expert role"):
            model.model.set_alignment_stage("depth")
    finally:
        model.model.set_alignment_stage(None)
    with torch.no_grad():
        assert model(input_ids=ids, **pixels).router_probs is not None
