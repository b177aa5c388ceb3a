"""Training-step benchmark: Astrea with live towers, Astrea reading cached features, and LLaVA.

One step is ``loss = model(**batch).loss; loss.backward(); AdamW.step(); zero_grad()`` on a fixed
batch, with the trainable set of the stage being measured:

* instruction tuning (``instruct``): Astrea trains the router, the fusion adapters and the LLM
  (towers, projectors and bridges frozen, the recipe default); LLaVA trains its projector and the
  LLM (vision tower frozen). ``astrea-cached`` passes ``expert_features`` (the frozen projectors'
  ``C_i``, what ``FeatureCache(kind="projected")`` stores), ``astrea-cached-tower`` passes
  ``tower_features`` (``kind="tower"``: the projectors still run).
* pre-alignment stage 4 (``stage4``, ``set_alignment_stage("segmentation")``): the segmentation
  projector and bridge train, the LLM is frozen. ``live`` runs all four towers; ``earlier-live``
  recomputes the three earlier towers but takes the segmentation tower tokens from the cache;
  ``cached`` is what ``CachedFeatureCollator`` feeds the stage (earlier experts' ``C_i`` plus the
  segmentation tower tokens: no tower runs). The cache's gain is ``earlier-live / cached``.

Run: ``python -m benchmarks.bench_train_step [--device cuda --dtype bfloat16] [--repeats N]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

EARLIER = ("caption", "classification", "detection")


def _optimizer(params) -> torch.optim.Optimizer:
    # The paper's AdamW settings; a small lr keeps the random models finite over many steps.
    return torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.98), weight_decay=0.05)


def make_step(model, inputs: dict, trainable: list[torch.nn.Module]) -> Callable[[], float]:
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    model.train()  # towers stay in eval mode (ExpertTower.train), like in training
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad])

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@torch.no_grad()
def cached_features(astrea, batch: common.Batch, roles, kind: str) -> dict[str, torch.Tensor]:
    """What the feature cache would hand the model for ``roles``: tower tokens or projector outputs."""
    backbone = astrea.model
    if kind == "tower":
        return {role: backbone.get_tower_tokens(role, batch.astrea_pixels[role]) for role in roles}
    pixels = {role: batch.astrea_pixels[role] for role in roles}
    features = {}
    for role in roles:  # one role at a time: get_expert_features walks active_roles
        tokens = backbone.get_tower_tokens(role, pixels[role])
        features[role] = backbone.projectors[role](tokens)
    return features


def instruct_cases(astrea, llava, batch: common.Batch, names=None) -> dict[str, Callable]:
    """Instruction-tuning steps; ``astrea`` or ``llava`` may be None when ``names`` does not need it."""
    names = names or ("llava", "astrea-live", "astrea-cached", "astrea-cached-tower")
    ids = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    if astrea is not None:
        backbone = astrea.model
        backbone.set_alignment_stage(None)
        astrea_trainable = [backbone.fusion.router, backbone.fusion.adapters, backbone.language_model, astrea.lm_head]
    cases = {}
    for name in names:
        if name == "llava":
            trainable = [llava.model.multi_modal_projector, llava.model.language_model, llava.lm_head]
            cases[name] = make_step(llava, batch.llava(with_labels=True), trainable)
        elif name == "astrea-live":
            cases[name] = make_step(astrea, batch.astrea(with_labels=True), astrea_trainable)
        elif name == "astrea-cached":
            features = cached_features(astrea, batch, backbone.expert_order, "projected")
            cases[name] = make_step(astrea, {**ids, "expert_features": features}, astrea_trainable)
        elif name == "astrea-cached-tower":
            tokens = cached_features(astrea, batch, backbone.expert_order, "tower")
            cases[name] = make_step(astrea, {**ids, "tower_features": tokens}, astrea_trainable)
        else:
            raise ValueError(f"unknown instruct case {name!r}")
    return cases


def stage4_cases(astrea, batch: common.Batch, names=None) -> dict[str, Callable]:
    names = names or ("stage4-live", "stage4-earlier-live", "stage4-cached")
    backbone = astrea.model
    backbone.set_alignment_stage("segmentation")
    trainable = [backbone.projectors["segmentation"], backbone.bridges["segmentation"]]
    ids = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    cases = {}
    for name in names:
        if name == "stage4-live":
            inputs = batch.astrea(with_labels=True)
        elif name == "stage4-earlier-live":
            inputs = {
                **ids,
                **{f"pixel_values_{role}": batch.astrea_pixels[role] for role in EARLIER},
                "tower_features": cached_features(astrea, batch, ["segmentation"], "tower"),
            }
        elif name == "stage4-cached":
            inputs = {
                **ids,
                "expert_features": cached_features(astrea, batch, EARLIER, "projected"),
                "tower_features": cached_features(astrea, batch, ["segmentation"], "tower"),
            }
        else:
            raise ValueError(f"unknown stage-4 case {name!r}")
        cases[name] = make_step(astrea, inputs, trainable)
    return cases


def step_flops(step: Callable) -> float:
    """FLOPs of one training step as executed (forward + backward; frozen towers forward only)."""
    return common.count_flops(step)


def run_instruct(args, batch_size: int) -> dict[str, float]:
    dtype = common.DTYPES[args.dtype]
    config = common.astrea_config(args.scale)
    astrea = common.build_astrea(config, args.device, dtype)
    llava = common.build_llava(config, astrea, args.device, dtype)
    batch = common.make_batch(config, batch_size, args.device, dtype)
    common.print_flops(common.flop_breakdown(astrea, llava, batch), config)
    cases = instruct_cases(astrea, llava, batch)
    flops = {name: step_flops(step) for name, step in cases.items()}
    timings = common.time_side_by_side(cases, args.warmup, args.repeats, args.device)
    print(f"\ntraining step, instruction tuning, batch {batch_size} (scale {args.scale}):")
    common.print_table(timings)
    results = {}
    for name in cases:
        achieved = flops[name] / timings["main"].median(name) / 1e12
        mfu = f", MFU {achieved / args.peak_tflops:.1%} of {args.peak_tflops:g}" if args.peak_tflops else ""
        print(f"  {name:<22} step {flops[name] / 1e9:8.2f} GFLOP, {achieved * 1e3:8.1f} GFLOP/s ({timings['main'].clock} time){mfu}")
    for name, target in (("astrea-cached", 1.10), ("astrea-cached-tower", None), ("astrea-live", 1.35)):
        ratio, ratio_min = common.ratios(timings, name, "llava")
        results[f"{name}/llava"] = ratio
        check = common.verdict(ratio, target, higher_is_better=False) if target else "(info)"
        print(f"  {name + ' / llava':<34}{ratio:6.3f}x (min {ratio_min:.3f}x)  {check}")
    return results


def run_stage4(args, scale: str, batch_size: int, target: float | None) -> dict[str, float]:
    dtype = common.DTYPES[args.dtype]
    config = common.astrea_config(scale)
    astrea = common.build_astrea(config, args.device, dtype)
    batch = common.make_batch(config, batch_size, args.device, dtype)
    tower_flops = {role: common.count_flops(lambda: tower(batch.astrea_pixels[role])) / batch_size for role, tower in astrea.model.towers.items()}
    cases = stage4_cases(astrea, batch)
    timings = common.time_side_by_side(cases, args.warmup, args.repeats, args.device)
    earlier = sum(tower_flops[r] for r in EARLIER) / 1e9
    print(f"\ntraining step, pre-alignment stage 4 (segmentation), batch {batch_size}, scale {scale} "
          f"(earlier towers {earlier:.2f} GFLOP/sample, all towers {sum(tower_flops.values()) / 1e9:.2f}):")
    common.print_table(timings)
    gain, gain_min = common.ratios(timings, "stage4-earlier-live", "stage4-cached")
    full, full_min = common.ratios(timings, "stage4-live", "stage4-cached")
    check = common.verdict(gain, target, higher_is_better=True) if target else "(info)"
    print(f"  {'earlier-live / cached':<34}{gain:6.3f}x (min {gain_min:.3f}x)  {check}")
    print(f"  {'live / cached':<34}{full:6.3f}x (min {full_min:.3f}x)  (info: no cache at all)")
    return {f"stage4[{scale}] earlier-live/cached": gain, f"stage4[{scale}] live/cached": full}


def add_arguments(parser) -> None:
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak (dense, this dtype) for MFU, e.g. 989 for H100/H200 bf16")
    parser.add_argument("--skip-stage4", action="store_true")


def main(argv=None) -> dict[str, float]:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=5)
    add_arguments(parser)
    args = parser.parse_args(argv)
    common.setup(args)
    results = run_instruct(args, args.batch_size)
    if not args.skip_stage4:
        heavy = "smoke" if args.scale == "smoke" else "tower-heavy"
        results.update(run_stage4(args, args.scale, args.batch_size, target=None))
        if heavy != args.scale:
            results.update(run_stage4(args, heavy, args.batch_size, target=3.0))
    return results


if __name__ == "__main__":
    main()
