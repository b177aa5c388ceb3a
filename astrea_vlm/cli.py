"""The ``astrea`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from astrea_vlm.configuration import get_preset
    from astrea_vlm.modeling import AstreaForConditionalGeneration
    from astrea_vlm.processing.image_utils import pixel_values_for_experts

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    config = get_preset(args.preset)
    model = AstreaForConditionalGeneration(config).eval()
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    rng = np.random.default_rng(args.seed)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pixels = pixel_values_for_experts([image], config)
    prompt = [1] + [config.image_token_id] * config.num_visual_tokens + [42, 43, 44]
    input_ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=input_ids, **pixels)
        generated = model.generate(input_ids=input_ids, **pixels, max_new_tokens=args.max_new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start

    print(f"astrea demo: preset {args.preset!r}, {params:,} parameters ({trainable:,} trainable), built in {built:.2f} s")
    print(f"experts (stage order): {', '.join(config.expert_order)}; top-{config.fusion_top_k} fusion; "
          f"{config.num_visual_tokens} visual tokens per image")
    probs = {role: round(float(p), 4) for role, p in zip(config.expert_order, out.router_probs[0])}
    print(f"router probabilities: {json.dumps(probs)}")
    print(f"generated token ids: {generated[0, input_ids.shape[1]:].tolist()}")
    print(f"forward + generate({args.max_new_tokens} tokens) in {elapsed:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="astrea", description="Astrea: a mixture-of-experts VLM with progressive pre-alignment")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a random tiny Astrea and generate (offline)")
    demo.add_argument("--preset", default="tiny")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
