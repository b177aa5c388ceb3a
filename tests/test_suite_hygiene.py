"""The suite itself: nothing in it can fail because the machine is busy.

No test reads a wall clock (what must stay fast is counted -- calls, FLOPs, allocations -- or
measured as a ratio in ``benchmarks/``), hypothesis has no per-example deadline, and launches
never use a fixed port (two runs of the suite on one machine would share it).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"time", "perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "process_time", "time_ns"}


def _test_sources() -> list[Path]:
    return sorted(p for p in TESTS.glob("*.py"))


def test_no_test_reads_a_wall_clock():
    found = []
    for path in _test_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("time", "timeit"):
                found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                          if node.module == "timeit" or a.name in CLOCKS]
            if isinstance(node, ast.Import) and any(a.name == "timeit" for a in node.names):
                found.append(f"{path.name}:{node.lineno} import timeit")
            if (isinstance(node, ast.Attribute) and node.attr in CLOCKS and isinstance(node.value, ast.Name)
                    and node.value.id == "time"):
                found.append(f"{path.name}:{node.lineno} time.{node.attr}")
    assert len(_test_sources()) > 20
    assert found == [], "count work or move the timing to benchmarks/ (as a ratio): " + ", ".join(found)


def test_hypothesis_has_no_deadline_in_this_suite():
    from hypothesis import settings

    assert settings().deadline is None  # conftest's profile: a loaded machine must not fail an example


def test_launches_use_a_free_port():
    fixed = []
    for path in [*_test_sources(), TESTS.parent / "train" / "distributed_check.py"]:
        for match in re.finditer(r"""(--main_process_port|--master_port|--master-port)["']?\s*[,= ]\s*["']?(\d+)""", path.read_text()):
            if match.group(2) != "0":
                fixed.append(f"{path.name}: {match.group(0)}")
    assert fixed == [], "pass port 0 (accelerate picks a free one): " + ", ".join(fixed)
