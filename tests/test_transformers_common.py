"""How ``transformers_common`` behaves when transformers' sdist tests cannot be had.

Offline, the mixin tests are skipped with a reason that says why and how to provide them; under
``ASTREA_REQUIRE_TRANSFORMERS_TESTS=1`` (CI, where the registry is reachable) the same failure is an
error, so that CI can never pass with the mixins silently skipped. No network: pip is replaced.
"""

from __future__ import annotations

import subprocess

import pytest
import transformers_common


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """``transformers_common`` with nothing loaded and a cache folder of its own under ``tmp_path``."""
    monkeypatch.setattr(transformers_common, "_loaded", None)
    monkeypatch.setattr(transformers_common, "_failure", None)
    monkeypatch.delenv("ASTREA_TRANSFORMERS_TESTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _unreachable_registry(monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies the requirement\n")

    monkeypatch.setattr(transformers_common.subprocess, "run", fake_run)
    return calls


def test_unreachable_registry_skips_with_the_reason_and_the_fix(fresh, monkeypatch):
    calls = _unreachable_registry(monkeypatch)
    monkeypatch.setattr(transformers_common, "REQUIRED", False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        transformers_common.load_or_skip()
    reason = str(skipped.value)
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert f"transformers=={transformers_common.VERSION}" in calls[0]
    assert "Could not find a version" in reason  # pip's own last line
    assert "ASTREA_TRANSFORMERS_TESTS" in reason and str(fresh / ".cache" / "astrea-vlm") in reason
    # The failure is remembered: the next module does not run pip again.
    with pytest.raises(transformers_common.Unavailable):
        transformers_common.load()
    assert len(calls) == 1


def test_ci_turns_the_skip_into_an_error(fresh, monkeypatch):
    _unreachable_registry(monkeypatch)
    monkeypatch.setattr(transformers_common, "REQUIRED", True)
    # pytest's skip is a BaseException: caught here too, so that a skip fails this test instead of skipping it.
    with pytest.raises(BaseException) as raised:
        transformers_common.load_or_skip()
    assert raised.type is transformers_common.Unavailable, raised.type
    assert "common test mixins are not available" in str(raised.value)


def test_a_configured_folder_without_the_tests_is_reported_not_fetched(fresh, monkeypatch):
    calls = _unreachable_registry(monkeypatch)
    monkeypatch.setenv("ASTREA_TRANSFORMERS_TESTS", str(fresh / "empty"))
    with pytest.raises(transformers_common.Unavailable, match="holds no tests/test_modeling_common.py"):
        transformers_common.load()
    assert calls == []
