"""PEFT LoRA on AstreaForConditionalGeneration (tiny preset): targeting, training, saving, merging, generate.

PEFT matches a ``target_modules`` *list* by name suffix, and Astrea has ``q_proj``/``k_proj`` modules
outside the LLM (the residual bridges' F_q/F_k and the SigLIP/Grounding-DINO towers), so LLM-only
LoRA needs a regex string, which PEFT ``fullmatch``es against each module name.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from torch import nn

from astrea_vlm.modeling import AstreaForConditionalGeneration
from conftest import AstreaModelTester

#: LoRA on the LLM's attention projections only.
LLM_ATTENTION = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
#: LoRA on every linear layer of the LLM's decoder blocks.
LLM_ALL = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
#: LoRA on the MoE fusion: the router's linear layer and every adapter's two layers.
FUSION = r".*fusion\.(router\.linear|adapters\.\d+\.(fc1|fc2))"
#: Training target. The tiny preset's LM head is random with std 0.02 and reads RMS-normalised
#: states, so its logits stay within about +-1.5 whatever the decoder does: a frozen head caps how
#: far the loss can fall. A LoRA on ``lm_head`` (a real checkpoint's head would not need it) lifts that.
TRAIN_TARGETS = LLM_ALL + "|lm_head"

LR = 5e-3
STEPS = 15
ANSWER_LEN = 4


def _fusion_modules(config) -> list[str]:
    return ["fusion.router", *(f"fusion.adapters.{i}" for i in range(config.num_experts))]


def _strip(name: str) -> str:
    """PeftModel module name -> name in the bare AstreaForConditionalGeneration."""
    return name.removeprefix("base_model.model.")


def _lora_names(peft_model) -> set[str]:
    return {_strip(name) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


def _trainable(peft_model) -> list[str]:
    return [_strip(name) for name, p in peft_model.named_parameters() if p.requires_grad]


def _batch(tester: AstreaModelTester) -> dict[str, torch.Tensor]:
    """Two samples of <bos> <image>x16 + 8 text tokens; the last ANSWER_LEN tokens are the answer."""
    ids = torch.cat([tester.prompt(n_text=8, seed=1), tester.prompt(n_text=8, seed=2)])
    pixels = [tester.pixels(1, seed=1), tester.pixels(1, seed=2)]
    labels = ids.clone()
    labels[:, :-ANSWER_LEN] = -100
    return {"input_ids": ids, **{k: torch.cat([p[k] for p in pixels]) for k in pixels[0]}, "labels": labels}


def _without_labels(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _prompt_only(batch):
    """The batch cut before the answer (for generate)."""
    inputs = _without_labels(batch)
    inputs["input_ids"] = inputs["input_ids"][:, :-ANSWER_LEN]
    return inputs


# --------------------------------------------------------------------------- targeting
def test_regex_targets_only_the_language_model(tester):
    model = tester.model()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLM_ATTENTION))

    layers = tester.config.text_config.num_hidden_layers
    expected = {
        f"model.language_model.layers.{i}.self_attn.{proj}"
        for i in range(layers)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert _lora_names(peft_model) == expected

    # The bridges' F_q/F_k and the towers' attention projections share the names but stay plain.
    backbone = peft_model.base_model.model.model
    for role, bridge in backbone.bridges.items():
        for proj in (bridge.q_proj, bridge.k_proj, bridge.v_proj, bridge.o_proj):
            assert type(proj) is nn.Linear, role
    tower_projs = [m for n, m in backbone.towers.named_modules() if n.endswith(("q_proj", "k_proj"))]
    assert tower_projs and all(type(m) is nn.Linear for m in tower_projs)

    # Only LoRA parameters train, all of them inside the LLM.
    trainable = _trainable(peft_model)
    assert trainable and all(".lora_" in n and n.startswith("model.language_model.") for n in trainable)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == lora_params


def test_a_suffix_list_would_also_hit_the_bridges_and_the_towers(tester):
    # Why the regex: PEFT suffix-matches a list, which reaches every q_proj/k_proj of the model.
    peft_model = get_peft_model(tester.model(), LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    names = _lora_names(peft_model)
    assert {f"model.bridges.{role}.q_proj" for role in tester.config.expert_order[1:]} <= names
    assert any(n.startswith("model.towers.") for n in names)


@pytest.mark.parametrize("how", ["lora", "modules_to_save"])
def test_router_and_adapters_can_be_made_trainable(tester, how):
    config = tester.config
    model = tester.model()
    if how == "lora":
        lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=f"{LLM_ATTENTION}|{FUSION}")
    else:
        lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=LLM_ATTENTION, modules_to_save=_fusion_modules(config))
    peft_model = get_peft_model(model, lora_config)
    fusion = peft_model.base_model.model.model.fusion

    if how == "lora":
        names = _lora_names(peft_model)
        assert "model.fusion.router.linear" in names
        assert {f"model.fusion.adapters.{i}.{fc}" for i in range(config.num_experts) for fc in ("fc1", "fc2")} <= names
        assert not any(n.startswith(("model.towers.", "model.projectors.", "model.bridges.")) for n in names)
    else:
        assert isinstance(fusion.router, ModulesToSaveWrapper)
        assert all(isinstance(adapter, ModulesToSaveWrapper) for adapter in fusion.adapters)

    trainable = _trainable(peft_model)
    assert any(n.startswith("model.fusion.router.") for n in trainable)
    for i in range(config.num_experts):
        assert any(n.startswith(f"model.fusion.adapters.{i}.") for n in trainable), i
    assert all(n.startswith(("model.language_model.", "model.fusion.")) for n in trainable)

    # A backward pass reaches the router and exactly the adapters the router kept.
    batch = _batch(tester)
    out = peft_model(**batch)
    out.loss.backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)

    assert has_grad(fusion.router)
    kept = (out.router_probs > 0).any(dim=0)
    for i, adapter in enumerate(fusion.adapters):
        assert has_grad(adapter) == bool(kept[i]), f"adapter {i}"


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained():
    """LoRA on the whole LLM (+ lm_head), router and adapters in modules_to_save, trained a few steps."""
    tester = AstreaModelTester()
    base = tester.model()
    frozen = {name: (param, param.detach().clone()) for name, param in base.named_parameters()}
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TRAIN_TARGETS,
        modules_to_save=_fusion_modules(tester.config),
    )
    peft_model = get_peft_model(base, lora_config)
    batch = _batch(tester)

    def eval_loss():
        peft_model.eval()
        with torch.no_grad():
            return peft_model(**batch).loss.item()

    initial = eval_loss()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    peft_model.train()
    torch.manual_seed(0)  # the bridges' Bernoulli draws
    for _ in range(STEPS):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    final = eval_loss()
    return SimpleNamespace(tester=tester, model=peft_model, batch=batch, frozen=frozen, initial=initial, final=final)


@pytest.fixture(scope="module")
def merged(trained):
    return copy.deepcopy(trained.model).merge_and_unload().eval()


def test_training_lowers_the_loss_and_leaves_the_base_weights_untouched(trained):
    assert trained.final < 0.6 * trained.initial, (trained.initial, trained.final)

    # Every parameter of the base model is still the model's own, frozen and bit-identical.
    live = {id(p) for p in trained.model.parameters()}
    for name, (param, before) in trained.frozen.items():
        assert id(param) in live, name
        assert not param.requires_grad, name
        assert torch.equal(param, before), name

    # ...while the adapters moved: LoRA B matrices (zero at init) and the router/adapter copies.
    lora_b = [p for n, p in trained.model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    router = trained.model.base_model.model.model.fusion.router
    assert not torch.equal(router.modules_to_save["default"].linear.weight, router.original_module.linear.weight)


def test_adapter_save_and_reload_on_a_fresh_base_gives_equal_logits(trained, tmp_path):
    # PEFT would also save lm_head's frozen base weight ("embedding layers found in target_modules");
    # it is unchanged, so the adapter leaves it out.
    trained.model.save_pretrained(tmp_path, save_embedding_layers=False)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["target_modules"] == TRAIN_TARGETS
    assert set(saved_config["modules_to_save"]) == set(_fusion_modules(trained.tester.config))

    # The file holds the adapter only: LoRA matrices and the trained router/adapters.
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(".lora_" in k or ".fusion." in k for k in keys)
    assert not any(".towers." in k or ".projectors." in k or ".bridges." in k for k in keys)

    reloaded = PeftModel.from_pretrained(trained.tester.model(), tmp_path).eval()
    inputs = _without_labels(trained.batch)
    trained.model.eval()
    with torch.no_grad():
        expected = trained.model(**inputs).logits
        got = reloaded(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_merge_and_unload_matches_the_adapter_and_round_trips(trained, merged, tmp_path):
    assert type(merged) is AstreaForConditionalGeneration
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in merged.modules())

    inputs = _without_labels(trained.batch)
    trained.model.eval()
    with torch.no_grad():
        adapter_logits = trained.model(**inputs).logits
        merged_logits = merged(**inputs).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-5)

    merged.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert not any("lora_" in k or "base_layer" in k or "modules_to_save" in k or "original_module" in k for k in keys)
    reloaded = AstreaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reloaded_logits = reloaded(**inputs).logits
    torch.testing.assert_close(reloaded_logits, merged_logits, rtol=0, atol=0)


def test_generate_through_peft_equals_the_merged_model(trained, merged):
    inputs = _prompt_only(trained.batch)
    peft_model = trained.model.eval()
    towers = peft_model.base_model.model.model.towers
    calls = {role: 0 for role in towers}
    hooks = [
        tower.register_forward_hook(lambda module, args, output, role=role: calls.__setitem__(role, calls[role] + 1))
        for role, tower in towers.items()
    ]
    try:
        with torch.no_grad():
            adapted = peft_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    # PEFT's own prepare_inputs_for_generation keeps Astrea's: the towers run in the prefill only.
    assert calls == {role: 1 for role in towers}
    with torch.no_grad():
        from_merged = merged.generate(**inputs, max_new_tokens=6, do_sample=False)
        with peft_model.disable_adapter():
            plain = peft_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert adapted.shape == (2, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(adapted, from_merged)
    assert not torch.equal(adapted, plain)  # the adapter is active during generate


def test_gradient_checkpointing_with_lora_gives_the_same_loss_and_gradients(tester):
    batch = _batch(tester)
    results = []
    for checkpointing in (False, True):
        peft_model = get_peft_model(tester.model(), LoraConfig(r=4, lora_alpha=8, target_modules=LLM_ALL, init_lora_weights="gaussian"))
        if checkpointing:
            peft_model.gradient_checkpointing_enable()  # TRL's default
        peft_model.train()
        loss = peft_model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)
    assert any(g.abs().sum() > 0 for g in results[1][1].values())
