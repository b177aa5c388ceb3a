"""Compiled decoding: static-cache decode tokens/s with ``torch.compile`` against eager, Astrea and LLaVA.

``generate(..., cache_implementation="static")`` with a ``CompileConfig`` compiles the model's
forward for the decode steps (the prefill, which holds the images, runs eagerly). Astrea's decode
steps carry no pixels and no data-dependent branch, so they compile to one graph
(``fullgraph=True``, which raises on any graph break); LLaVA is compiled the same way alongside.

Four cases, same prompt and image, greedy, exactly ``--new-tokens`` tokens, in one process with
rounds interleaved: {astrea, llava} x {eager, compiled}, all with the static cache. Decode
tokens/s = 1 / the median decode step (clock stamps from a logits processor, as in
``bench_generate``). Reported: compiled / eager for each model, and Astrea / LLaVA for each mode;
the compiled graph count of a decode step is checked with dynamo's counters.

Run: ``python -m benchmarks.bench_compile [--device cuda --dtype bfloat16] [--repeats N]``. On CPU
the compile (inductor, C++) takes a few minutes of the warm-up round.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import CompileConfig

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_generate, common  # noqa: E402


def compile_config(device, backend: str = "inductor") -> CompileConfig:
    """Full-graph compilation of the decode steps. ``reduce-overhead`` (CUDA graphs) on CUDA;
    on CPU the default mode, and ``_compile_all_devices`` so that generate compiles there at all."""
    cuda = torch.device(device).type == "cuda"
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode="reduce-overhead" if cuda and backend == "inductor" else None)
    config._compile_all_devices = True
    return config


def decode_graphs(model, inputs: dict, config: CompileConfig) -> dict[str, int]:
    """Graphs dynamo compiles, and graph breaks it meets, over a 3-token static-cache generate."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache_implementation="static", compile_config=config)
    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}


def main(argv=None) -> dict[str, float]:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=5)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (greedy)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor; eager for a quick check)")
    args = parser.parse_args(argv)
    _, astrea, llava, batch = common.astrea_and_llava(args)
    compiled = compile_config(args.device, args.backend)

    graphs = {name: decode_graphs(model, inputs, compiled) for name, model, inputs in (("astrea", astrea, batch.astrea()), ("llava", llava, batch.llava()))}
    for name, found in graphs.items():
        print(f"{name}: {found['graphs']} compiled graph(s), {found['graph_breaks']} graph break(s) in static-cache decoding")

    record = {"wall": common.Timings("wall"), "cpu": common.Timings("cpu")}
    cases = {}
    for name, model, inputs in (("astrea", astrea, batch.astrea()), ("llava", llava, batch.llava())):
        for mode, extra in (("eager", {"disable_compile": True}), ("compiled", {"compile_config": compiled})):
            label = f"{name}.{mode}"
            cases[label] = bench_generate.generate_fn(model, inputs, args.new_tokens, record, label, cache_implementation="static", **extra)
    timings = common.time_side_by_side(cases, args.warmup, args.repeats, args.device)
    common.keep_timed_steps(timings, record, args.repeats, args.new_tokens)
    prompt = batch.input_ids.shape[1]
    print(f"\nstatic-cache generation, batch 1, prompt {prompt} tokens, {args.new_tokens} new tokens (scale {args.scale}, backend {args.backend}):")
    common.print_table(timings, [name for name in timings["main"].samples if name.endswith("decode_step")])

    results = {f"{name}.graphs": found["graphs"] for name, found in graphs.items()}
    results.update({f"{name}.graph_breaks": found["graph_breaks"] for name, found in graphs.items()})
    for stat in ("median", "min"):
        get = getattr(timings["main"], stat)
        rate = {label: 1.0 / get(f"{label}.decode_step") for label in cases}
        for name in ("astrea", "llava"):
            results[f"{name}.compiled/eager_{stat}"] = rate[f"{name}.compiled"] / rate[f"{name}.eager"]
        for mode in ("eager", "compiled"):
            results[f"astrea/llava.{mode}_{stat}"] = rate[f"astrea.{mode}"] / rate[f"llava.{mode}"]
        print(f"  [{stat}] decode tokens/s: " + ", ".join(f"{label} {value:.1f}" for label, value in rate.items()))
    print(
        f"  compiled/eager: astrea {results['astrea.compiled/eager_median']:.3f}x, llava {results['llava.compiled/eager_median']:.3f}x; "
        f"astrea/llava: eager {results['astrea/llava.eager_median']:.3f}x, compiled {results['astrea/llava.compiled_median']:.3f}x (medians)"
    )
    return results


if __name__ == "__main__":
    main()
