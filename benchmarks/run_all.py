"""Run every benchmark (generation, training step, memory) and print the ratios against the targets.

Run from the repository root: ``python -m benchmarks.run_all [--device cuda --dtype bfloat16]
[--repeats N] [--peak-tflops 989]``. On a 2-core CPU with one thread it takes about five minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_generate, bench_memory, bench_train_step, common  # noqa: E402

TARGETS = {
    # name: (target, higher is better)
    "decode astrea/llava tokens/s": (0.97, True),
    "prefill astrea / 1.10 x (towers + llava)": (1.0, False),
    "train step astrea-cached / llava": (1.10, False),
    "train step astrea-live / llava": (1.35, False),
    "stage 4 earlier-live / cached (tower-heavy)": (3.0, True),
}


def main(argv=None) -> dict[str, float]:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth (GB/s) for the decode bound")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    shared = ["--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    shared += ["--threads", str(args.threads), "--scale", args.scale]

    print("=" * 30, "generation", "=" * 30)
    generate = bench_generate.main([*shared, "--new-tokens", str(args.new_tokens),
                                    *(["--peak-gbps", str(args.peak_gbps)] if args.peak_gbps else [])])
    print("\n" + "=" * 30, "training step", "=" * 30)
    train_args = [*shared, "--batch-size", str(args.batch_size)]
    if args.peak_tflops:
        train_args += ["--peak-tflops", str(args.peak_tflops)]
    train = bench_train_step.main(train_args)
    if not args.skip_memory:
        print("\n" + "=" * 30, "memory", "=" * 30)
        stage4_scale = "smoke" if args.scale == "smoke" else "tower-heavy"
        bench_memory.main([*shared, "--batch-size", str(args.batch_size), "--new-tokens", str(args.new_tokens), "--stage4-scale", stage4_scale])

    heavy = "smoke" if args.scale == "smoke" else "tower-heavy"
    measured = {
        "decode astrea/llava tokens/s": generate["decode_ratio_median"],
        "prefill astrea / 1.10 x (towers + llava)": generate["prefill_over_budget_median"],
        "train step astrea-cached / llava": train["astrea-cached/llava"],
        "train step astrea-live / llava": train["astrea-live/llava"],
        "stage 4 earlier-live / cached (tower-heavy)": train.get(f"stage4[{heavy}] earlier-live/cached", float("nan")),
    }
    print("\n" + "=" * 30, "summary (medians)", "=" * 30)
    for name, value in measured.items():
        target, higher = TARGETS[name]
        print(f"  {name:<46}{value:7.3f}  {common.verdict(value, target, higher)}")
    print(f"  towers run per generate: {generate['tower_calls']} (must be 1)")
    return measured


if __name__ == "__main__":
    main()
