"""pyproject declares ranges (tested lower bound, next major upper bound); constraints.txt pins the tested closure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _constraints_tool():
    spec = importlib.util.spec_from_file_location("ci_constraints", ROOT / ".ci" / "constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bounds_constraints_and_environment_agree():
    """No exact pin in pyproject; every direct dependency's lower bound is its pin in constraints.txt,
    its upper bound the next major; every installed package of the closure is pinned at its version."""
    tool = _constraints_tool()
    assert tool.problems() == []


def test_core_dependencies_are_ranges_not_pins():
    tool = _constraints_tool()
    requirements = {req.name.lower(): req for req in tool.direct_requirements()}
    assert str(requirements["torch"].specifier) in ("<3,>=2.15.0", ">=2.15.0,<3")
    assert not any(s.operator == "==" for req in requirements.values() for s in req.specifier)
    pins = tool.read_pins()
    for name in ("torch", "torchvision", "transformers", "trl", "peft", "accelerate", "datasets", "timm"):
        assert name in pins and Requirement(f"{name}=={pins[name]}")  # a well-formed exact pin


def test_problems_name_a_drifted_pin_and_a_missing_package(tmp_path, monkeypatch):
    tool = _constraints_tool()
    text = tool.CONSTRAINTS.read_text()
    drifted = text.replace("\ntorch==", "\ntorch==0.0.1+").replace("\naccelerate==", "\n# accelerate==")
    monkeypatch.setattr(tool, "CONSTRAINTS", tmp_path / "constraints.txt")
    tool.CONSTRAINTS.write_text(drifted)
    found = "\n".join(tool.problems())
    assert "lower bound must be the tested version" in found and "torch" in found
    assert "accelerate (installed" in found and "not pinned" in found
