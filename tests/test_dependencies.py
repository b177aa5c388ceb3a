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
    """In the file this environment is checked against (constraints-lmms.txt where lmms-eval is installed)."""
    tool = _constraints_tool()
    attribute = "LMMS_CONSTRAINTS" if tool.lmms_environment() else "CONSTRAINTS"
    path = getattr(tool, attribute)
    drifted = path.read_text().replace("\ntorch==", "\ntorch==0.0.1+").replace("\naccelerate==", "\n# accelerate==")
    monkeypatch.setattr(tool, attribute, tmp_path / path.name)
    (tmp_path / path.name).write_text(drifted)
    found = "\n".join(tool.problems())
    assert "lower bound must be the tested version 0.0.1+" in found and "torch" in found
    assert f"{path.name}: accelerate (installed" in found and "not pinned" in found


def test_the_lmms_extra_has_its_own_tested_set_with_filelock_3():
    """lmms-eval 0.7.3 patches filelock._api (gone in filelock 4): the [lmms] extra bounds filelock
    below 4 and its pins live in constraints-lmms.txt; constraints.txt (filelock 4) cannot satisfy it."""
    from packaging.utils import canonicalize_name

    tool = _constraints_tool()
    lmms = {canonicalize_name(r.name): r for r in tool.direct_requirements(("lmms",))}
    main, pins = tool.read_pins(tool.CONSTRAINTS), tool.read_pins(tool.LMMS_CONSTRAINTS)
    assert all(r.specifier.contains(pins[name]) for name, r in lmms.items())
    assert not lmms["filelock"].specifier.contains(main["filelock"])
    assert "lmms-eval" not in main and pins["lmms-eval"] == "0.7.3"
    assert "lmms-eval" not in {canonicalize_name(r.name) for r in tool.direct_requirements(tool.extras_of(False))}
