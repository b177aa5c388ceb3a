"""What per-token routing costs against per-image routing (``fusion_routing``, paper eq. 9-10).

Two Astrea models with the same weights (the router's input width does not depend on the routing)
differ only in ``fusion_routing``. Measured: the fusion's forward FLOPs per sample (router +
adapters as executed: with per-token routing an adapter runs on every image one of whose tokens
chose it), and the time of an instruction-tuning training step (router, adapters and LLM train;
the paper's instruct stage) and of a batch-1 prefill, side by side, as ratios token / image.

Run: ``python -m benchmarks.bench_routing [--scale matched|smoke] [--repeats N] [--batch-size 2]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.bench_train_step import make_step  # noqa: E402


def build(scale: str, routing: str, device, dtype):
    config = common.astrea_config(scale)
    config.fusion_routing = routing
    return common.build_astrea(config, device=device, dtype=dtype)


def main(argv=None) -> dict[str, float]:
    parser = common.base_parser(__doc__.split("\n\n")[0], repeats=5)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    common.setup(args)
    dtype = common.DTYPES[args.dtype]
    models = {routing: build(args.scale, routing, args.device, dtype) for routing in ("image", "token")}
    batch = common.make_batch(models["image"].config, args.batch_size, args.device, dtype)
    single = common.make_batch(models["image"].config, 1, args.device, dtype, seed=1)
    results: dict[str, float] = {}

    with torch.no_grad():
        for routing, model in models.items():
            backbone = model.model
            tokens = {role: backbone.get_tower_tokens(role, batch.astrea_pixels[role]) for role in backbone.towers}
            features = backbone.get_expert_features(tower_features=tokens)
            bridged = backbone.fuse_expert_features(features).bridged_features
            inputs = [bridged[role] for role in backbone.expert_order]
            text = torch.zeros_like(inputs[0][:, 0])
            results[f"fusion_gflop_per_sample.{routing}"] = common.count_flops(lambda: backbone.fusion(inputs, text)) / args.batch_size / 1e9
            llm = common.count_flops(lambda: backbone.language_model(inputs_embeds=backbone.get_input_embeddings()(batch.input_ids)))
            results[f"fusion_share_of_llm.{routing}"] = results[f"fusion_gflop_per_sample.{routing}"] * 1e9 * args.batch_size / llm

    steps = {}
    for routing, model in models.items():
        backbone = model.model
        trainable = [backbone.fusion, backbone.language_model, model.lm_head]
        steps[f"train-step.{routing}"] = make_step(model, batch.astrea(with_labels=True), trainable)
    timings = common.time_side_by_side(steps, args.warmup, args.repeats, args.device)
    print("instruction-tuning step (router + adapters + LLM train):")
    common.print_table(timings)
    results["train_step_token_over_image"] = common.ratios(timings, "train-step.token", "train-step.image")[0]

    prefill = {}
    for routing, model in models.items():
        model.eval()

        def run(model=model):
            with torch.no_grad():
                return model(**single.astrea())

        prefill[f"prefill.{routing}"] = run
    timings = common.time_side_by_side(prefill, args.warmup, args.repeats, args.device)
    print("batch-1 prefill (towers, projectors, bridges, fusion, LLM):")
    common.print_table(timings)
    results["prefill_token_over_image"] = common.ratios(timings, "prefill.token", "prefill.image")[0]
    for key, value in results.items():
        print(f"  {key:<40}{value:10.4f}")
    return results


if __name__ == "__main__":
    main()
