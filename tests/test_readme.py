"""The README's usage example and the `astrea demo` command run as shown."""

from __future__ import annotations

import re
from pathlib import Path


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
    test_command = 'pip install -e ".[dev]" -c constraints.txt && python -m pytest -q'
    assert test_command in text and test_command in ci
    assert 'pip install -e ".[demo]" -c constraints.txt && astrea demo' in text
    assert (README.parent / "constraints.txt").is_file()


def test_demo_command_line_reaches_run_demo_with_its_settings(monkeypatch):
    """`astrea demo` (the README's first command) runs `run_demo`; the full run is tests/test_demo.py's slow test."""
    import astrea_vlm.demo as demo
    from astrea_vlm.cli import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda settings: seen.append(settings) or {})
    assert main(["demo", "--output", "somewhere", "--seed", "2"]) == 0
    assert seen[0].output == "somewhere" and seen[0].seed == 2 and seen[0].recipe == "demo"
    assert seen[0].warmup_steps == demo.DemoSettings().warmup_steps
    assert main(["demo", "--warmup-steps", "0"]) == 0 and seen[1].warmup_steps == 0


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from astrea_vlm.cli import main

    assert main(["align", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("astrea align: error: no recipe file") and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("order: [caption, caption]\n")
    assert main(["instruct", "--recipe", str(bad)]) == 2
    assert "must list each expert role once" in capsys.readouterr().err
