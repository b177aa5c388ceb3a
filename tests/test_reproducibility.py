"""Same seed, same machine, same numbers: two runs of the demo pipeline give bit-identical weights
and answers, also across processes with different hash seeds (``astrea demo`` twice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from astrea_vlm.demo import run_demo
from astrea_vlm.train.reproducibility import reproducible

# The demo recipe (world LLM, the question before the image) at toy size; run here and in a subprocess.
MAKE_SETTINGS = '''
import dataclasses
from astrea_vlm.demo import DemoSettings
from astrea_vlm.train.schedule import load_recipe


def make_settings(output):
    recipe = load_recipe("demo")
    return DemoSettings(
        output=str(output), test_size=2, warmup_steps={"caption": 2, "classification": 1, "detection": 1, "segmentation": 2},
        max_new_tokens=12, skip_untrained_eval=True, roundtrip=False,
        recipe_overrides={
            "data": {**recipe.data, "train_size": 6, "max_objects": 3},
            "align": dataclasses.replace(recipe.align, max_steps=1),
            "instruct": dataclasses.replace(recipe.instruct, max_steps=4),
            "save_steps": 100,
        },
    )
'''


def test_two_runs_give_bit_identical_weights_and_answers(tmp_path):
    namespace: dict = {}
    exec(MAKE_SETTINGS, namespace)
    summary = run_demo(namespace["make_settings"](tmp_path / "a"), log=lambda *a: None)
    # the second run in another process, with another hash seed (orders of sets of strings)
    code = MAKE_SETTINGS + "\nimport sys\nfrom astrea_vlm.demo import run_demo\nrun_demo(make_settings(sys.argv[1]), log=lambda *a: None)\n"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = (load_file(str(tmp_path / run / "train" / "final" / "model.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, different[:5]
    # the runs trained (so the comparison is about more than the initial weights)
    untrained = load_file(str(tmp_path / "a" / "untrained" / "model.safetensors"))
    assert any(not torch.equal(untrained[key], a[key]) for key in a if ".projectors." in key)
    answers = [json.loads((tmp_path / run / "eval" / "astrea" / "results.json").read_text())["samples"] for run in ("a", "b")]
    assert [s["prediction"] for s in answers[0]] == [s["prediction"] for s in answers[1]]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["table"] == summary["table"]


def test_reproducible_fixes_threads_seeds_and_restores_the_state():
    def state():
        return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())

    before = state()
    with reproducible(7, threads=1):
        assert state() == (1, True, True)  # an op with no deterministic kernel warns (see the module)
        x = torch.rand(3)
    with reproducible(7, threads=1):
        assert torch.equal(torch.rand(3), x)
    assert state() == before
    with pytest.raises(ValueError, match="threads=0: use at least 1"):
        with reproducible(0, threads=0):
            pass
