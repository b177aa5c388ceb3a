"""Shared fixtures: tiny random Astrea models and inputs (no network, no downloads)."""

from __future__ import annotations

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# tests/mutation/ is a slow tool run by hand (its README section says how), not part of the suite.
collect_ignore = ["mutation"]

try:  # hypothesis' default 200 ms deadline per example is a wall-clock assertion: off for the whole suite
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("astrea", deadline=None)
    _hypothesis_settings.load_profile("astrea")
except ImportError:  # hypothesis is a [dev] dependency; the fuzz tests skip without it
    pass


class AstreaModelTester:
    """ModelTester-style helper: a tiny config and matching inputs.

    Token ids: 0 pad, 1 bos, 2 eos, ``config.image_token_id`` (3) the <image> placeholder; text
    tokens are drawn from [10, vocab).
    """

    def __init__(self, **overrides):
        from astrea_vlm.configuration import get_preset

        self.config = get_preset("tiny", **overrides)
        self.num_visual_tokens = self.config.num_visual_tokens
        self.vocab_size = self.config.text_config.vocab_size

    def pixels(self, n_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {
            f"pixel_values_{role}": torch.randn(n_images, 3, cfg.image_size, cfg.image_size, generator=generator)
            for role, cfg in self.config.expert_configs.items()
        }

    def prompt(self, n_text: int = 5, n_images: int = 1, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        ids = [1]
        for _ in range(n_images):
            ids += [self.config.image_token_id] * self.num_visual_tokens
            ids += torch.randint(10, self.vocab_size, (n_text,), generator=generator).tolist()
        return torch.tensor([ids])

    def model(self, seed: int = 0):
        from astrea_vlm.modeling import AstreaForConditionalGeneration

        torch.manual_seed(seed)
        return AstreaForConditionalGeneration(self.config).eval()


@pytest.fixture
def tester():
    return AstreaModelTester()


@pytest.fixture(scope="module")
def tiny_model():
    return AstreaModelTester().model()


def pytest_configure(config):
    # Marks used by transformers' common test mixins (tests/transformers_common.py loads them).
    for mark in ("torch_compile_test", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "accelerate_tests"):
        config.addinivalue_line("markers", f"{mark}: a transformers common-test mark")


# Skip reasons that name something this machine lacks (a GPU, flash-attn, a package, RUN_SLOW, the
# transformers sdist's tests offline): the mixins skip those for LLaVA too, so they pass the check below.
_ENVIRONMENT_SKIP = re.compile(
    r"^(test requires |test is slow|.*not supported on |.*is not installed|.*common test mixins are not available)", re.IGNORECASE
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A transformers common-mixin test class lists every test that may skip, with the reason, in
    ``expected_skips`` (name pattern -> why); any other skip of that class fails, so that a contract
    test can neither be skipped silently nor start skipping after a change."""
    outcome = yield
    report = outcome.get_result()
    expected = getattr(getattr(item, "cls", None), "expected_skips", None)
    if expected is None or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if _ENVIRONMENT_SKIP.match(reason) or any(re.fullmatch(pattern, item.name) for pattern in expected):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"{item.name} skipped ({reason}), but {item.cls.__name__}.expected_skips does not list it: "
        "make it run, or list it there with the architectural reason"
    )
