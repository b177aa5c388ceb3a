"""Mixed precision: every forward path is dtype-consistent under autocast and with bf16/fp16 weights.

TRL's ``SFTConfig`` defaults to ``bf16=True``, which on a CPU runs the model under bf16 autocast
with float32 weights; paper-scale training runs bf16 weights on GPUs. The float32 path must stay
bit-identical to the equations' direct implementation (the demo's numbers come from it).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import AstreaModelTester
from safetensors.torch import load_file

LOW = [torch.bfloat16, torch.float16]


def _trainable_model(tester: AstreaModelTester, dtype=torch.float32, stage=None):
    """The tiny model with every module of every stage trainable, towers included."""
    model = tester.model()
    for tower in model.model.towers.values():
        tower.config.frozen = False
    model.requires_grad_(True)
    model.model.set_alignment_stage(stage)
    return model.to(dtype).train()


def _batch(tester: AstreaModelTester):
    ids = torch.cat([tester.prompt(seed=0), tester.prompt(seed=1)])
    return ids, tester.pixels(2)


def _forward_backward(model, ids, pixels, autocast_dtype=None, **extra):
    torch.manual_seed(5)  # the bridges' Bernoulli draws
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(input_ids=ids, labels=ids, **pixels, **extra)
    out.loss.backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@functools.lru_cache(maxsize=None)
def _float32_reference(stage):
    """The float32 forward/backward every low-precision run is compared with (computed once per stage)."""
    tester = AstreaModelTester()
    return _forward_backward(_trainable_model(tester, stage=stage), *_batch(tester))


@pytest.fixture(scope="module")
def float32_outputs():
    """Float32 logits of the batch and of the generate prompt, and the cached features, computed once."""
    tester = AstreaModelTester()
    model = tester.model()
    ids, pixels = _batch(tester)
    with torch.no_grad():
        inputs = {role: pixels[f"pixel_values_{role}"] for role in model.model.expert_order}
        return {
            "logits": model(input_ids=ids, **pixels).logits,
            "prompt_logits": model(input_ids=tester.prompt(), **tester.pixels(1)).logits[:, -1],
            "expert_features": model.model.get_expert_features(inputs),
            "tower_tokens": model.model.get_tower_tokens("segmentation", inputs["segmentation"]),
        }


def _cosine(a: dict, b: dict) -> float:
    names = sorted(a)
    return float(F.cosine_similarity(torch.cat([a[n].flatten() for n in names]), torch.cat([b[n].flatten() for n in names]), dim=0))


# ----------------------------------------------------------------------- float32 is unchanged
def _reference_bridge(bridge, current, previous, generator=None):
    """Eq. 2-4 written out directly, in the order of operations of the original float32 code."""
    batch, n, dim = current.shape
    query = bridge.q_proj(bridge.residual_query(previous, generator))

    def heads(x):
        return x.view(batch, -1, bridge.num_heads, bridge.head_dim).transpose(1, 2)

    attended = F.scaled_dot_product_attention(heads(query), heads(bridge.k_proj(current)), heads(bridge.v_proj(current)))
    return current + torch.tanh(bridge.gate) * bridge.o_proj(attended.transpose(1, 2).reshape(batch, n, dim))


def _reference_fusion(fusion, features, text_features=None):
    """Eq. 9-10 written out directly, in the order of operations of the original float32 code."""
    logits = fusion.router(features, text_features).float()
    probs = fusion.route(logits)
    fused = torch.zeros_like(features[0])
    for index, (adapter, feature) in enumerate(zip(fusion.adapters, features)):
        rows = probs[:, index].nonzero(as_tuple=True)[0]
        if rows.numel():
            fused = fused.index_add(0, rows, probs[rows, index].to(feature.dtype)[:, None, None] * adapter(feature[rows]))
    return fused


@pytest.mark.parametrize("training", [False, True])
def test_float32_forward_is_bit_identical_to_the_direct_equations(tester, training):
    model = tester.model(seed=1)
    for bridge in model.model.bridges.values():  # an open gate, so the bridges change the features
        bridge.gate.data.fill_(0.7)
    model.train(training)
    ids, pixels = _batch(tester)
    backbone = model.model
    with torch.no_grad():
        torch.manual_seed(3)
        logits = model(input_ids=ids, **pixels).logits
        torch.manual_seed(3)
        features = backbone.get_expert_features({role: pixels[f"pixel_values_{role}"] for role in backbone.expert_order})
        bridged = [features[role] if k == 0 else _reference_bridge(backbone.bridges[role], features[role], [features[r] for r in backbone.expert_order[:k]])
                   for k, role in enumerate(backbone.expert_order)]
        embeds = backbone.get_input_embeddings()(ids)
        # the default router also reads the text before each image (eq. 9 given the question)
        text = backbone.instruction_features(embeds, None, ids == model.config.image_token_id)
        fused = _reference_fusion(backbone.fusion, bridged, text)
        embeds = embeds.masked_scatter((ids == model.config.image_token_id)[..., None], fused.reshape(-1, fused.shape[-1]))
        expected = model.lm_head(backbone.language_model(inputs_embeds=embeds).last_hidden_state)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, expected)


# --------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("stage", [None, "detection"], ids=["fusion", "alignment"])
@pytest.mark.parametrize("autocast_dtype", LOW, ids=["bf16", "fp16"])
def test_autocast_forward_backward_of_the_full_model(tester, autocast_dtype, stage):
    reference, reference_grads = _float32_reference(stage)
    out, grads = _forward_backward(_trainable_model(tester, stage=stage), *_batch(tester), autocast_dtype)
    assert out.logits.dtype == autocast_dtype  # the LM head ran in low precision
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=1e-2)
    assert set(grads) == set(reference_grads)  # the same modules learn, towers included
    assert any(name.startswith("model.towers.") for name in grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    assert _cosine(grads, reference_grads) > 0.99


@pytest.mark.parametrize("weights_dtype", LOW, ids=["bf16", "fp16"])
def test_low_precision_weights_forward_backward(tester, weights_dtype):
    reference, reference_grads = _float32_reference(None)
    out, grads = _forward_backward(_trainable_model(tester, dtype=weights_dtype), *_batch(tester))
    assert out.logits.dtype == weights_dtype
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=1e-2)
    assert set(grads) == set(reference_grads)
    assert _cosine(grads, reference_grads) > 0.99


@pytest.mark.parametrize("weights_dtype,autocast_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                          (torch.bfloat16, None)], ids=["fp32+bf16-autocast", "fp32+fp16-autocast", "bf16"])
def test_cached_features_mix_with_fresh_ones_in_low_precision(tester, float32_outputs, weights_dtype, autocast_dtype):
    """The feature cache holds float32 ``C_i`` / tower tokens; fresh experts run in low precision."""
    ids, pixels = _batch(tester)
    model = tester.model().to(weights_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        mixed = model(input_ids=ids, pixel_values_classification=pixels["pixel_values_classification"],
                      pixel_values_detection=pixels["pixel_values_detection"],
                      expert_features={"caption": float32_outputs["expert_features"]["caption"]},
                      tower_features={"segmentation": float32_outputs["tower_tokens"]}).logits
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), float32_outputs["logits"], atol=3e-2, rtol=0)


@pytest.mark.parametrize(
    "weights_dtype,autocast_dtype,use_cache",
    [(torch.float32, torch.bfloat16, True), (torch.float32, torch.bfloat16, False), (torch.float32, torch.float16, True),
     (torch.bfloat16, None, True), (torch.float16, None, False)],
    ids=["bf16-autocast", "bf16-autocast-no-kv-cache", "fp16-autocast", "bf16-weights", "fp16-weights-no-kv-cache"],
)
def test_generate_in_low_precision(tester, float32_outputs, weights_dtype, autocast_dtype, use_cache):
    model = tester.model().to(weights_dtype)
    prompt, pixels = tester.prompt(), tester.pixels(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model.generate(input_ids=prompt, **pixels, max_new_tokens=3, do_sample=False, use_cache=use_cache,
                             output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (1, prompt.shape[1] + 3)
    assert all(bool(torch.isfinite(step).all()) for step in out.logits)
    torch.testing.assert_close(out.logits[0].float(), float32_outputs["prompt_logits"], atol=3e-2, rtol=0)  # the prefill step


# ------------------------------------------------------------------------------ TRL, bf16=True
def test_sft_trainer_with_bf16_trains_under_autocast(tmp_path):
    from trl import SFTConfig

    from astrea_vlm.configuration import get_preset
    from astrea_vlm.modeling import AstreaForConditionalGeneration
    from astrea_vlm.processing import build_processor
    from astrea_vlm.train.distributed_check import textured_colour_dataset
    from astrea_vlm.train.stages import configure_stage
    from astrea_vlm.train.trainer import AstreaSFTTrainer

    config = get_preset("tiny")
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config)
    configure_stage(model, ["router", "adapters", "moco_head", "llm"], list(config.expert_order))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, bf16=True,
                     logging_steps=1, report_to=[], assistant_only_loss=True, save_strategy="no", max_length=None,
                     use_cpu=True, seed=0, disable_tqdm=True)
    trainer = AstreaSFTTrainer(model=model, args=args, train_dataset=textured_colour_dataset(16), processing_class=build_processor(config))
    dtypes = []
    handle = model.model.fusion.register_forward_hook(lambda module, inputs, output: dtypes.append(output.fused.dtype))
    trainer.train()
    handle.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # autocast really ran the fusion in bf16
    history = trainer.state.log_history
    losses = [h["loss_reg"] for h in history if "loss_reg" in h] + [h["loss_moco"] for h in history if "loss_moco" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert any(".fusion.router." in n for n in changed) and any(".language_model." in n for n in changed)


def test_trl_sft_cli_with_trl_defaults_trains_and_reloads_in_the_pipeline(tmp_path):
    """``trl sft --use_cpu`` (TRL's defaults: bf16 autocast, gradient checkpointing) on a tiny folder."""
    from trl import SFTConfig

    from astrea_vlm.create import create
    from astrea_vlm.train.distributed_check import textured_colour_dataset

    assert SFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16  # what "TRL's defaults" means here
    folder = create("tiny", tmp_path / "tiny", seed=0)
    (tmp_path / "data").mkdir()
    textured_colour_dataset(8).to_parquet(str(tmp_path / "data" / "train.parquet"))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    trl = shutil.which("trl", path=os.path.dirname(sys.executable)) or shutil.which("trl")  # TRL's console script
    assert trl, "the `trl` command is not installed (pip install -e '.[train]')"
    cmd = [trl, "sft", "--model_name_or_path", str(folder), "--dataset_name", str(tmp_path / "data"),
           "--trust_remote_code", "--use_cpu", "--max_steps", "3", "--per_device_train_batch_size", "2",
           "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["log_history"] if "loss" in h)
    trained, start = load_file(str(out / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert not torch.equal(trained["lm_head.weight"], start["lm_head.weight"])
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"] == \
        "modeling_astrea.AstreaForConditionalGeneration"

    # A fresh process that never imports astrea_vlm: the folder's own code answers.
    done = subprocess.run([sys.executable, "-c", PIPELINE_CHILD, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["module"].startswith("transformers_modules.") and not child["astrea_vlm_imported"]
    assert child["lm_head_sum"] == pytest.approx(float(trained["lm_head.weight"].double().sum()), rel=1e-6)
    assert isinstance(child["answer"], str)


PIPELINE_CHILD = """
import json, sys
from PIL import Image
from transformers import pipeline
pipe = pipeline("image-text-to-text", model=sys.argv[1], trust_remote_code=True)
image = Image.new("RGB", (32, 32), (220, 30, 30))
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour is it?"}]}]
answer = pipe(text=messages, max_new_tokens=3, return_full_text=False)[0]["generated_text"]
print(json.dumps({"module": type(pipe.model).__module__, "astrea_vlm_imported": "astrea_vlm" in sys.modules,
                  "lm_head_sum": float(pipe.model.lm_head.weight.double().sum()), "answer": answer}))
"""
