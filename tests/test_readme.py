"""The README's usage example and the `astrea demo` command run as shown."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    usage = README.read_text().split("## Usage", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", usage, re.S)


def test_readme_folder_workflow_runs(tmp_path, monkeypatch, capsys):
    from astrea_vlm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["create", "--preset", "tiny", "--output", "astrea-tiny"]) == 0
    load, peft = _python_blocks()[:2]
    namespace: dict = {}
    exec(compile(load, str(README), "exec"), namespace)
    assert "'role': 'assistant'" in capsys.readouterr().out
    exec(compile(peft, str(README), "exec"), namespace)
    assert "trainable params" in capsys.readouterr().out


def test_readme_usage_example_runs(capsys):
    block = _python_blocks()[2]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    out, inputs = namespace["out"], namespace["inputs"]
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)
    printed = capsys.readouterr().out
    assert "tensor([[" in printed  # the router probabilities


def test_readme_commands_are_the_ci_commands():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = 'pip install -e ".[dev]" && python -m pytest -q'
    assert test_command in text and test_command in ci
    assert "pip install -e . && astrea demo" in text


def test_demo_command_prints_routing_and_tokens(capsys):
    from astrea_vlm.cli import main

    torch.manual_seed(0)
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "router probabilities" in printed
    ids = re.search(r"generated token ids: \[(.*)\]", printed).group(1).split(",")
    assert len(ids) == 4
    # Deterministic: a second run prints the same tokens.
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    assert re.search(r"generated token ids: \[(.*)\]", capsys.readouterr().out).group(1).split(",") == ids
