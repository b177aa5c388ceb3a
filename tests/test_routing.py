"""Routing that follows the task: what the router reads, per-token routing (eq. 9-10)."""

from __future__ import annotations

import pytest
import torch

from astrea_vlm.modeling.fusion import MoEFusion
from conftest import AstreaModelTester

IMG = 3  # the tiny preset's image_token_id


def _ids(*parts, n_visual=16):
    """Token ids from parts: ints are text tokens, "img" is one image's run of <image> tokens."""
    ids = []
    for part in parts:
        ids += [IMG] * n_visual if part == "img" else [part]
    return torch.tensor([ids])


def _router_inputs(model, **inputs):
    """The (expert features, text features) the fusion was called with."""
    seen = {}
    handle = model.model.fusion.register_forward_hook(lambda module, args, output: seen.update(args=args))
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        handle.remove()
    return seen["args"], out


def test_router_reads_the_mean_embedding_of_the_text_before_each_image():
    tester = AstreaModelTester(fusion_router_input="visual+text", fusion_router_norm=False)  # norm: its own test
    model = tester.model()
    # Sample 0: bos 20 21 <img> 22 23 <img> 24; sample 1: left-padded, bos 30 <img> 31 32 <img> 33.
    first = _ids(1, 20, 21, "img", 22, 23, "img", 24)
    second = _ids(0, 1, 30, "img", 31, 32, "img", 33)
    ids = torch.cat([first, second])
    mask = (ids != 0).long()
    (features, text), out = _router_inputs(model, input_ids=ids, attention_mask=mask, **tester.pixels(4))
    embed = model.get_input_embeddings().weight.detach()

    def mean(tokens):
        return embed[tokens].mean(dim=0)

    expected = torch.stack([mean([1, 20, 21]), mean([1, 20, 21, 22, 23]), mean([1, 30]), mean([1, 30, 31, 32])])
    torch.testing.assert_close(text, expected)
    # ...and the logits are the linear router over [pooled experts, text].
    router = model.model.fusion.router.linear
    pooled = torch.cat([f.mean(dim=1) for f in features] + [expected], dim=-1)
    torch.testing.assert_close(out.router_logits, router(pooled))


def test_routing_is_causal_the_answer_after_the_image_does_not_change_it():
    """Training sees prompt + answer, generation the prompt only: the image must be routed the same."""
    tester = AstreaModelTester(fusion_router_input="visual+text")
    model = tester.model()
    pixels = tester.pixels(1)
    prompt = _ids(1, 20, 21, "img")
    with torch.no_grad():
        at_generation = model(input_ids=prompt, **pixels).router_logits
        in_training = model(input_ids=torch.cat([prompt, torch.tensor([[40, 41, 2]])], dim=1), **pixels).router_logits
        other_question = model(input_ids=_ids(1, 50, 51, "img"), **pixels).router_logits
    torch.testing.assert_close(in_training, at_generation, rtol=0, atol=0)
    assert not torch.allclose(other_question, at_generation)  # same image, other question: other routing


def test_visual_only_router_ignores_the_text():
    tester = AstreaModelTester(fusion_router_input="visual")
    model = tester.model()
    pixels = tester.pixels(1)
    with torch.no_grad():
        a = model(input_ids=_ids(1, 20, 21, "img"), **pixels).router_logits
        b = model(input_ids=_ids(1, 50, 51, "img"), **pixels).router_logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_token_routing_is_eq_9_10_at_every_token_by_hand():
    torch.manual_seed(0)
    experts, batch, tokens, dim, k = 3, 2, 5, 4, 2
    fusion = MoEFusion(experts, dim, 6, top_k=k, use_text=True, per_token=True).eval()
    for adapter in fusion.adapters:  # make the adapters non-trivial (fc2 starts at zero)
        torch.nn.init.normal_(adapter.fc2.weight)
    features = [torch.randn(batch, tokens, dim) for _ in range(experts)]
    text = torch.randn(batch, dim)
    with torch.no_grad():
        out = fusion(features, text)
    assert out.router_probs.shape == out.router_logits.shape == (batch, tokens, experts)
    weight, bias = fusion.router.linear.weight.detach(), fusion.router.linear.bias.detach()
    for b in range(batch):
        for t in range(tokens):
            x = torch.cat([features[i][b, t] for i in range(experts)] + [text[b]])
            logits = weight @ x + bias
            kept = sorted(range(experts), key=lambda i: -float(logits[i]))[:k]
            z = torch.exp(logits[kept] - logits[kept].max())
            with torch.no_grad():
                expected = sum((z[j] / z.sum()) * fusion.adapters[i](features[i][b, t]) for j, i in enumerate(kept))
            torch.testing.assert_close(out.fused[b, t], expected, rtol=1e-5, atol=1e-5)
            assert int((out.router_probs[b, t] > 0).sum()) == k


def test_per_token_model_reports_per_token_probabilities():
    tester = AstreaModelTester(fusion_routing="token")
    model = tester.model()
    with torch.no_grad():
        out = model(input_ids=_ids(1, 20, "img"), **tester.pixels(1))
    assert out.router_probs.shape == (1, tester.num_visual_tokens, tester.config.num_experts)
    torch.testing.assert_close(out.router_probs.sum(-1), torch.ones(1, tester.num_visual_tokens))
    # Tokens of one image may choose different experts.
    assert len({tuple((row > 0).tolist()) for row in out.router_probs[0]}) > 1


@pytest.mark.parametrize("field, value", [("fusion_routing", "sample")])
def test_invalid_routing_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AstreaModelTester(**{field: value})


def test_jitter_changes_which_experts_are_kept_not_their_weights():
    """Noisy top-k: noise picks the kept set in training; the weights are the clean logits' softmax."""
    fusion = MoEFusion(4, 4, 4, top_k=2, use_text=False, jitter=1.0)
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0]])
    scores = torch.tensor([[0.0, 5.0, 0.0, 4.0]])  # noise that keeps experts 1 and 3
    probs = fusion.route(logits, scores)
    z = torch.tensor([2.0, -1.0]).exp()
    torch.testing.assert_close(probs, torch.tensor([[0.0, float(z[0] / z.sum()), 0.0, float(z[1] / z.sum())]]))

    torch.manual_seed(0)
    features = [torch.randn(64, 3, 4) * (1 + i) for i in range(4)]
    fusion.eval()
    with torch.no_grad():
        clean = fusion(features).router_probs
        torch.testing.assert_close(fusion(features).router_probs, clean, rtol=0, atol=0)  # eval: no noise
    fusion.train()
    with torch.no_grad():
        noisy = fusion(features).router_probs
    assert not torch.equal(noisy > 0, clean > 0)
    # The last-ranked expert of an image, dropped without noise, is sometimes kept with it, so it
    # gets a gradient; where noise keeps the clean set, the weights are the clean ones.
    assert ((clean == 0) & (noisy > 0)).any(dim=0).all()
    same = ((noisy > 0) == (clean > 0)).all(dim=-1)
    torch.testing.assert_close(noisy[same], clean[same])


def test_selection_bias_changes_which_experts_are_kept_not_their_weights():
    fusion = MoEFusion(4, 4, 4, top_k=2, use_text=False)
    torch.manual_seed(0)
    features = [torch.randn(16, 3, 4) for _ in range(4)]
    with torch.no_grad():
        logits = fusion.router(features).float()
        fusion.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
        probs = fusion(features).router_probs
    # Expert 3 is always kept; the other slot goes to the best of experts 0-2 by logit, and the two
    # kept experts' weights are the softmax of their logits (the bias plays no part in them).
    other = logits[:, :3].argmax(dim=-1)
    for row in range(16):
        kept = [int(other[row]), 3]
        expected = torch.zeros(4)
        expected[kept] = logits[row, kept].softmax(dim=-1)
        torch.testing.assert_close(probs[row], expected)
    assert (logits.argsort(dim=-1, descending=True)[:, :2] != 3).all(dim=-1).any()  # some rows did change


def test_text_selects_off_the_image_chooses_the_experts_the_instruction_weighs_them():
    torch.manual_seed(0)
    features = [torch.randn(16, 3, 4) for _ in range(4)]
    text = torch.randn(16, 4)
    fusion = MoEFusion(4, 4, 4, top_k=2, use_text=True, normalize=True, text_selects=False)
    with torch.no_grad():
        fusion.router.linear.weight[:, 16:] *= 30.0  # an instruction strong enough to change the top-2
    logits = fusion.router(features, text)
    visual = fusion.router(features, None)  # the instruction part left out (zeros)
    probs = fusion(features, text).router_probs
    kept = visual.topk(2, dim=-1).indices
    expected = torch.zeros_like(logits).scatter(-1, kept, logits.gather(-1, kept).softmax(dim=-1))
    torch.testing.assert_close(probs, expected)
    assert not torch.equal(kept.sort(dim=-1).values, logits.topk(2, dim=-1).indices.sort(dim=-1).values)
    # The instruction still moves the weights, so it is still trained through them.
    probs.pow(2).sum().backward()
    assert fusion.router.linear.weight.grad[:, 16:].abs().sum() > 0
    assert AstreaModelTester(fusion_router_text_selects=False).model().model.fusion.text_selects is False


def test_a_folder_saved_before_the_selection_bias_loads_with_plain_top_k(tmp_path):
    from safetensors.torch import load_file, save_file

    from astrea_vlm.modeling import AstreaForConditionalGeneration

    tester = AstreaModelTester()
    model = tester.model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert torch.equal(weights.pop("model.fusion.selection_bias"), torch.zeros(tester.config.num_experts))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})  # as written before the bias existed
    reloaded, info = AstreaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(reloaded.model.fusion.selection_bias, torch.zeros(tester.config.num_experts))


def test_default_router_reads_the_instruction_rms_normalised():
    config = AstreaModelTester().config
    assert config.fusion_router_input == "visual+text" and config.fusion_router_norm


def test_router_norm_makes_routing_independent_of_each_part_scale():
    torch.manual_seed(0)
    features = [torch.randn(2, 3, 4) for _ in range(3)]
    text = torch.randn(2, 4)
    scaled = [features[0] * 50.0, *features[1:]]
    normed = MoEFusion(3, 4, 4, top_k=2, use_text=True, normalize=True)
    plain = MoEFusion(3, 4, 4, top_k=2, use_text=True)
    plain.load_state_dict(normed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(normed.router(scaled, text * 0.1), normed.router(features, text), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(plain.router(scaled, text), plain.router(features, text))
        # By hand: each pooled part divided by its root mean square, then the linear layer.
        parts = [f.mean(dim=1) for f in features] + [text]
        x = torch.cat([p / p.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() for p in parts], dim=-1)
        torch.testing.assert_close(normed.router(features, text), normed.router.linear(x))


def test_text_scale_multiplies_the_normalised_instruction_and_its_effect_on_the_logits():
    torch.manual_seed(0)
    features = [torch.randn(2, 3, 4) for _ in range(3)]
    question, other = torch.randn(2, 4), torch.randn(2, 4) * 7.0
    full = MoEFusion(3, 4, 4, top_k=2, use_text=True, normalize=True)
    gentle = MoEFusion(3, 4, 4, top_k=2, use_text=True, normalize=True, text_scale=0.25)
    gentle.load_state_dict(full.state_dict())

    def rms(part):
        return part / part.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    with torch.no_grad():
        # By hand: the pooled experts as before, the normalised instruction times 0.25.
        x = torch.cat([rms(f.mean(dim=1)) for f in features] + [0.25 * rms(question)], dim=-1)
        torch.testing.assert_close(gentle.router(features, question), gentle.router.linear(x))
        # Changing the question moves the logits a quarter as far as at scale 1 (same weights).
        moved_full = full.router(features, other) - full.router(features, question)
        moved_gentle = gentle.router(features, other) - gentle.router(features, question)
        assert moved_full.abs().max() > 0.05
        torch.testing.assert_close(moved_gentle, 0.25 * moved_full)


def test_text_scale_reaches_the_router_from_the_config():
    model = AstreaModelTester(fusion_router_text_scale=0.3).model()
    assert model.model.fusion.router.text_scale == 0.3
    assert AstreaModelTester().config.fusion_router_text_scale == 1.0


@pytest.mark.parametrize("field, value", [("fusion_router_jitter", -0.1), ("fusion_router_text_scale", 0.0), ("fusion_router_text_scale", -1.0)])
def test_invalid_jitter_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AstreaModelTester(**{field: value})


def test_demo_recipe_routes_on_the_instruction_without_rms_normalisation():
    """The demo's choice on validation (README, "Routing"): the question in, each part as it is."""
    from astrea_vlm.configuration import get_preset
    from astrea_vlm.train.recipe import load_recipe

    demo = load_recipe("demo")
    config = get_preset(demo.model["preset"], **demo.model["overrides"])
    assert config.fusion_router_input == "visual+text" and not config.fusion_router_norm
    assert get_preset("tiny").fusion_router_norm  # the config's default is unchanged
