"""Peak memory of each benchmark case, each in its own process.

A process's peak RSS never goes down, so one process per case is the only honest way to give each
case its own peak on CPU. The child builds only the model its case needs (and, for the cached
cases, the features the cache would hold), then resets the peak -- ``/proc/self/clear_refs`` on
Linux, ``torch.cuda.reset_peak_memory_stats`` on CUDA -- and runs the case twice (a training step
allocates its gradients and AdamW state on the first run). Reported per case:

* ``before``: resident memory once the model (and cached features) exist -- the weights, mostly;
* ``peak``: the high-water mark while the case runs (max RSS on CPU, max allocated on CUDA);
* ``added``: ``peak - before`` -- activations, gradients, optimizer state, KV cache.

Run: ``python -m benchmarks.bench_memory [--device cuda --dtype bfloat16]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_generate, bench_train_step, common  # noqa: E402

CASES = (
    "generate.llava",
    "generate.astrea",
    "train.llava",
    "train.astrea-live",
    "train.astrea-cached",
    "stage4.stage4-live",
    "stage4.stage4-cached",
)
MORE_CASES = ("train.astrea-cached-tower", "stage4.stage4-earlier-live")


# A fixed glibc mmap threshold: freed tensors above it go back to the OS at once, so RSS follows
# the live tensors. With the default (dynamic) threshold, a freed large block raises the threshold
# and later tensors stay in the heap, and the peak depends on allocation order more than on need.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def _reset_peak(device) -> bool:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak RSS (VmHWM, ru_maxrss) to the current RSS
        return True
    except OSError:
        return False


def _resident_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return common.current_rss_mb()


def child(args) -> dict:
    """Build and run one case in this process; return its memory numbers."""
    group, name = args.child.split(".", 1)
    dtype = common.DTYPES[args.dtype]
    scale = args.scale if group != "stage4" else args.stage4_scale
    config = common.astrea_config(scale)
    import_mb = common.current_rss_mb()
    needs_llava = name == "llava"
    astrea = None if needs_llava else common.build_astrea(config, args.device, dtype)
    llava = common.build_llava(config, None, args.device, dtype) if needs_llava else None
    if group == "generate":
        batch = common.make_batch(config, 1, args.device, dtype)
        record = {"wall": common.Timings("wall"), "cpu": common.Timings("cpu")}
        run = bench_generate.generate_cases(astrea, llava, batch, args.new_tokens, record, names=[f"{name}.generate"])[f"{name}.generate"]
    elif group == "train":
        batch = common.make_batch(config, args.batch_size, args.device, dtype)
        run = bench_train_step.instruct_cases(astrea, llava, batch, names=[name])[name]
    else:
        batch = common.make_batch(config, args.batch_size, args.device, dtype)
        run = bench_train_step.stage4_cases(astrea, batch, names=[name])[name]
    common.free()
    reset = _reset_peak(args.device)
    before = _resident_mb(args.device)
    for _ in range(2):
        run()
    peak = common.peak_memory_mb(args.device)
    return {"case": args.child, "scale": scale, "import": import_mb, "before": before, "peak": peak, "reset": reset}


def run_all(args) -> dict[str, dict]:
    cases = args.cases.split(",") if args.cases else CASES
    common_args = ["--device", args.device, "--dtype", args.dtype, "--scale", args.scale, "--threads", str(args.threads)]
    common_args += ["--batch-size", str(args.batch_size), "--new-tokens", str(args.new_tokens), "--stage4-scale", args.stage4_scale]
    results = {}
    for case in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_memory", "--child", case, *common_args],
            capture_output=True,
            text=True,
            cwd=common.ROOT,
            env=CHILD_ENV,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory case {case} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[case] = json.loads(lines[-1])
    kind = "max allocated" if torch.device(args.device).type == "cuda" else "max RSS"
    print(f"\npeak memory per case ({kind}, MiB; each case in its own process; train batch {args.batch_size}):")
    print(f"  {'case':<30}{'scale':<13}{'before':>10}{'peak':>10}{'added':>10}")
    for case, r in results.items():
        note = "" if r["reset"] else "  (peak since process start: reset unavailable)"
        print(f"  {case:<30}{r['scale']:<13}{r['before']:10.1f}{r['peak']:10.1f}{r['peak'] - r['before']:10.1f}{note}")
    if torch.device(args.device).type != "cuda":
        print(f"  (python + torch + transformers alone: ~{min(r['import'] for r in results.values()):.0f} MiB RSS, included in 'before')")
    return results


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], repeats=1)
    parser.add_argument("--batch-size", type=int, default=2, help="training batch (generation uses 1)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--stage4-scale", default="tower-heavy", choices=common.SCALES)
    parser.add_argument("--cases", default=None, help=f"comma-separated subset; default {','.join(CASES)}; also {','.join(MORE_CASES)}")
    parser.add_argument("--child", default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        from transformers.utils import logging

        logging.set_verbosity_error()
        print(json.dumps(child(args)))
        return None
    common.setup(args)
    return run_all(args)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
