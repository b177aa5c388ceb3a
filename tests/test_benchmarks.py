"""Smoke test of the benchmark harness (benchmarks/): it builds, runs and reports on a minimal config.

Benchmarks are not timed tests: this only checks that the scripts work (slow: run with -m slow).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow

SMOKE = ["--scale", "smoke", "--repeats", "1", "--warmup", "0", "--threads", "1"]


def test_matched_configs_share_llm_and_caption_tower():
    from benchmarks import common

    config = common.astrea_config("smoke")
    astrea = common.build_astrea(config)
    llava = common.build_llava(config, astrea)
    assert llava.config.text_config.num_hidden_layers == config.text_config.num_hidden_layers
    assert llava.config.vision_config.hidden_size == config.caption_config.tower_config.hidden_size
    batch = common.make_batch(config, 1)
    flops = common.flop_breakdown(astrea, llava, batch)
    assert flops["llava.tower"] == pytest.approx(flops["tower.caption"])  # same tower, same cost
    assert flops["llm"] > 0 and flops["towers"] > 0


def test_generate_benchmark_runs_towers_once(capsys):
    from benchmarks import bench_generate

    results = bench_generate.main([*SMOKE, "--new-tokens", "3"])
    assert results["tower_calls"] == 1  # visual features come from the prefill only
    assert results["decode_ratio_median"] > 0
    assert "decode astrea/llava" in capsys.readouterr().out


def test_train_step_benchmark_runs_every_case():
    from benchmarks import bench_train_step

    results = bench_train_step.main([*SMOKE, "--batch-size", "1"])
    assert {"astrea-live/llava", "astrea-cached/llava", "stage4[smoke] earlier-live/cached"} <= set(results)
    assert all(value > 0 for value in results.values())


def test_memory_benchmark_child_reports_a_peak():
    from benchmarks import bench_memory

    results = bench_memory.main([*SMOKE, "--batch-size", "1", "--new-tokens", "2", "--stage4-scale", "smoke",
                                 "--cases", "generate.astrea,train.astrea-cached"])
    for row in results.values():
        assert row["peak"] >= row["before"] > 0


def test_compile_benchmark_compiles_static_cache_decoding_to_one_graph():
    from benchmarks import bench_compile

    # The eager backend traces with dynamo as inductor does (fullgraph=True raises on a graph break).
    results = bench_compile.main([*SMOKE, "--new-tokens", "3", "--backend", "eager"])
    assert results["astrea.graphs"] == 1 and results["astrea.graph_breaks"] == 0
    assert results["llava.graphs"] == 1 and results["llava.graph_breaks"] == 0
    assert results["astrea.compiled/eager_median"] > 0 and results["llava.compiled/eager_median"] > 0


def test_routing_benchmark_counts_more_fusion_work_per_token():
    from benchmarks import bench_routing

    results = bench_routing.main([*SMOKE, "--batch-size", "1"])
    # per token, the router reads every token and an adapter runs wherever one token keeps it
    assert results["fusion_gflop_per_sample.token"] > results["fusion_gflop_per_sample.image"] > 0
    assert results["train_step_token_over_image"] > 0 and results["prefill_token_over_image"] > 0
