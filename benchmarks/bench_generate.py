"""Generation benchmark: prefill latency and decode tokens/s of Astrea against transformers' LLaVA.

Both models share the LLM config and weights, LLaVA's SigLIP is Astrea's caption tower, and both
get the same prompt (``[bos] <image>*N text``), the same image and greedy decoding of exactly
``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``, so no early EOS).

A logits processor stamps both clocks at every step of one ``generate`` call, so a single call
gives both numbers without subtracting two noisy runs:

* prefill latency: call start -> first step's logits (visual side, LLM over the prompt);
* decode tokens/s: 1 / the median time between consecutive stamps, over every decode step of
  every timed call -- the LLM-only steps with generate's own per-step overhead.

Targets (issue F): Astrea decode >= 0.97x LLaVA's tokens/s (the visual features are computed once,
in the prefill), and Astrea prefill <= 1.10 x (the four towers' forward times + LLaVA's prefill).
The script also counts tower forward calls during one ``generate``: each tower must run once.

Run: ``python -m benchmarks.bench_generate [--device cuda --dtype bfloat16] [--repeats N]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
import functools
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402


class StepClock(LogitsProcessor):
    """Records (wall, cpu) time each time generate asks for the next token's scores."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    def __call__(self, input_ids, scores):
        common.synchronize(scores.device)
        self.stamps.append((time.perf_counter(), time.process_time()))
        return scores


def generate_fn(model, inputs: dict, new_tokens: int, record: dict[str, common.Timings], name: str, **generate_kwargs):
    """One greedy generate of ``new_tokens``; adds its prefill and decode-step times to ``record``.

    ``generate_kwargs`` go to ``generate`` (e.g. ``cache_implementation``, ``compile_config``).
    """

    @torch.inference_mode()
    def run():
        clock = StepClock()
        start = (time.perf_counter(), time.process_time())
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            logits_processor=LogitsProcessorList([clock]),
            **generate_kwargs,
        )
        stamps = [start, *clock.stamps]
        for index, kind in enumerate(("wall", "cpu")):
            record[kind].add(f"{name}.prefill", stamps[1][index] - start[index])
            # Every decode step is one sample: the median over all steps shrugs off the odd step
            # another process on the machine slowed down.
            for before, after in zip(stamps[1:], stamps[2:]):
                record[kind].add(f"{name}.decode_step", after[index] - before[index])

    return run


def tower_fn(tower, pixels):
    return torch.inference_mode()(functools.partial(tower, pixels))


def count_tower_calls(astrea, run) -> dict[str, int]:
    """Forward calls of each tower during ``run()``."""
    calls = {role: 0 for role in astrea.model.towers}
    handles = []
    for role, tower in astrea.model.towers.items():

        def hook(module, args, output, role=role):
            calls[role] += 1

        handles.append(tower.register_forward_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def generate_cases(astrea, llava, batch: common.Batch, new_tokens: int, record: dict, names=None) -> dict:
    all_cases = {
        "llava.generate": lambda: generate_fn(llava, batch.llava(), new_tokens, record, "llava"),
        "astrea.generate": lambda: generate_fn(astrea, batch.astrea(), new_tokens, record, "astrea"),
    }
    for role, tower in (astrea.model.towers.items() if astrea is not None else ()):
        all_cases[f"tower.{role}"] = functools.partial(tower_fn, tower, batch.astrea_pixels[role])
    return {name: make() for name, make in all_cases.items() if names is None or name in names}


def main(argv=None) -> dict[str, float]:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=5)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (greedy)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="device memory bandwidth in GB/s (e.g. 3350 for an H100 SXM, 4800 for an H200): prints the "
                             "batch-1 decode bound, every LLM weight read once per token")
    args = parser.parse_args(argv)
    config, astrea, llava, batch = common.astrea_and_llava(args)
    common.print_flops(common.flop_breakdown(astrea, llava, batch), config)

    record = {"wall": common.Timings("wall"), "cpu": common.Timings("cpu")}
    cases = generate_cases(astrea, llava, batch, args.new_tokens, record)
    calls = count_tower_calls(astrea, cases["astrea.generate"])
    print(f"tower forward calls in one generate of {args.new_tokens} tokens: {calls}")
    timings = common.time_side_by_side(cases, args.warmup, args.repeats, args.device)
    common.keep_timed_steps(timings, record, args.repeats, args.new_tokens)
    prompt = batch.input_ids.shape[1]
    print(f"\ngeneration, batch 1, prompt {prompt} tokens, {args.new_tokens} new tokens (scale {args.scale}):")
    common.print_table(timings)

    results = {}
    for stat in ("median", "min"):
        get = getattr(timings["main"], stat)
        decode = {model: 1.0 / get(f"{model}.decode_step") for model in ("astrea", "llava")}
        towers = sum(get(f"tower.{role}") for role in astrea.model.towers)
        budget = 1.10 * (towers + get("llava.prefill"))
        results[f"decode_ratio_{stat}"] = decode["astrea"] / decode["llava"]
        results[f"prefill_over_budget_{stat}"] = get("astrea.prefill") / budget
        print(f"  [{stat}] decode tokens/s: astrea {decode['astrea']:.1f}, llava {decode['llava']:.1f}")
        print(
            f"  [{stat}] prefill ms: astrea {get('astrea.prefill') * 1e3:.1f}, llava {get('llava.prefill') * 1e3:.1f}, "
            f"four towers {towers * 1e3:.1f}; budget 1.10 x (towers + llava) = {budget * 1e3:.1f}"
        )
    print(f"  decode astrea/llava {results['decode_ratio_median']:.3f}x (min-based {results['decode_ratio_min']:.3f}x)  "
          f"{common.verdict(results['decode_ratio_median'], 0.97, higher_is_better=True)}")
    print(f"  prefill astrea/budget {results['prefill_over_budget_median']:.3f}x (min-based {results['prefill_over_budget_min']:.3f}x)  "
          f"{common.verdict(results['prefill_over_budget_median'], 1.0, higher_is_better=False)}")
    print(f"  prefill astrea/llava {timings['main'].median('astrea.prefill') / timings['main'].median('llava.prefill'):.3f}x (info)")
    if args.peak_gbps:
        results.update(decode_bandwidth_bound(astrea, measured=1.0 / timings["main"].median("astrea.decode_step"),
                                              peak_gbps=args.peak_gbps))
    results["tower_calls"] = max(calls.values())
    return results


def decode_bandwidth_bound(astrea, measured: float, peak_gbps: float) -> dict[str, float]:
    """Batch-1 decode is memory-bound: each token reads every LLM weight (and the LM head) once.

    The bound is ``bandwidth / weight bytes`` tokens/s (the KV cache of a short prompt is negligible
    next to the weights); the measured rate over it is the fraction of the bandwidth decoding uses.
    """
    llm = [*astrea.model.language_model.parameters(), *astrea.lm_head.parameters()]
    weight_bytes = sum(p.numel() * p.element_size() for p in llm)
    bound = peak_gbps * 1e9 / weight_bytes
    print(f"  decode bound at {peak_gbps:.0f} GB/s: {bound:.0f} tokens/s ({weight_bytes / 1e6:.1f} MB of LLM weights per token); "
          f"measured {measured:.1f} = {measured / bound:.1%} of it")
    return {"decode_bandwidth_bound": bound, "decode_bandwidth_fraction": measured / bound}


if __name__ == "__main__":
    main()
