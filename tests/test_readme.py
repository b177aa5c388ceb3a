"""The README's usage example, its shell blocks and the `astrea demo` command run as shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
    # CI reaches the package registry, so transformers' common mixins must run there: a fetch failure
    # is an error, not the skip that an offline clone gets (tests/transformers_common.py).
    required = "export ASTREA_REQUIRE_TRANSFORMERS_TESTS=1"
    assert required in ci and ci.index(required) < ci.index(test_command)
    assert "ASTREA_REQUIRE_TRANSFORMERS_TESTS=1" in text
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
    assert seen[0].threads == demo.DemoSettings().threads  # a fixed thread count: the same seed gives the same tables
    assert main(["demo", "--threads", "1"]) == 0 and seen[2].threads == 1


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from astrea_vlm.cli import main

    assert main(["align", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("astrea align: error: no recipe file") and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("order: [caption, caption]\n")
    assert main(["instruct", "--recipe", str(bad)]) == 2
    assert "must list each expert role once" in capsys.readouterr().err


# ------------------------------------------------------------------------------ shell blocks
# Each ```bash block runs in bash as written; the commands it may use are shell functions that
# record their arguments, then are checked: `astrea` by the real parser (`create --preset tiny`
# runs for real), `pip` against pyproject's extras and constraints.txt, `accelerate launch` by its
# config file and the parser, `torchrun` by the parser. Anything else -- a stray line after a broken `\`, a `<placeholder>`
# read as a redirection -- makes bash fail, as it would for a user pasting the block.
_SHELL_STUBS = """
set -euo pipefail
record() { local a; for a in "$@"; do printf '%s\\x1f' "$a"; done >> "$RECORD"; printf '\\x1e' >> "$RECORD"; }
astrea() { record astrea "$@"; }
pip() { record pip "$@"; }
python() { record python "$@"; }
accelerate() { record accelerate "$@"; }
torchrun() { record torchrun "$@"; }
lmms-eval() { record lmms-eval "$@"; }
"""


def _shell_blocks():
    return re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)


def _run_shell_block(block: str, tmp_path: Path) -> list[list[str]]:
    import subprocess

    record = tmp_path / "record"
    record.write_text("")
    done = subprocess.run(["bash", "-c", _SHELL_STUBS + block], cwd=README.parent, capture_output=True, text=True,
                          env={"RECORD": str(record), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, f"README block fails in bash:\n{block}\n{done.stderr}"
    return [call.split("\x1f")[:-1] for call in record.read_text().split("\x1e")[:-1]]


def _check_astrea(argv: list[str], tmp_path: Path) -> None:
    from astrea_vlm.cli import build_parser, main

    build_parser().parse_args(argv)  # SystemExit(2) on an unknown or missing option
    if argv[:3] == ["create", "--preset", "tiny"]:
        import os

        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert main(argv) == 0
        finally:
            os.chdir(cwd)
        assert (tmp_path / argv[argv.index("--output") + 1] / "config.json").is_file()


def _check_pip(argv: list[str], extras: set[str]) -> None:
    """``pip install -e ".[extra]" -c FILE``: FILE is that extra's constraints file and its pins
    satisfy every requirement of the extra (else pip refuses, or the pins do not hold what was tested)."""
    import importlib.util

    from packaging.utils import canonicalize_name

    spec = importlib.util.spec_from_file_location("ci_constraints", README.parent / ".ci" / "constraints.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    extra = re.fullmatch(r"\.\[(\w+)\]", argv[2]) if len(argv) == 5 else None
    assert argv[:2] == ["install", "-e"] and argv[3] == "-c" and extra and extra.group(1) in extras, argv
    lmms = extra.group(1) == tool.LMMS_EXTRA
    path = tool.LMMS_CONSTRAINTS if lmms else tool.CONSTRAINTS
    assert argv[4] == path.name, f"{argv}: the [{extra.group(1)}] extra's tested set is {path.name}"
    pins = tool.read_pins(path)
    for req in tool.direct_requirements((extra.group(1),)):
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), (argv, str(req))


def test_readme_shell_blocks_run(tmp_path):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    calls = [call for block in _shell_blocks() for call in _run_shell_block(block, tmp_path)]
    assert calls, "no ```bash blocks found"
    tools = set()
    for name, *argv in calls:
        tools.add(name)
        if name == "astrea":
            _check_astrea(argv, tmp_path)
        elif name == "pip":
            _check_pip(argv, extras)
        elif name == "python":
            assert argv == ["-m", "pytest", "-q"], argv
        elif name == "accelerate":
            assert argv[:2] == ["launch", "--config_file"] and (README.parent / argv[2]).is_file(), argv
            assert argv[3:5] == ["-m", "astrea_vlm.cli"], argv
            _check_astrea(argv[5:], tmp_path)
        elif name == "torchrun":
            module = argv.index("-m")
            assert argv[module + 1] == "astrea_vlm.cli" and "--nproc_per_node" in argv[:module], argv
            _check_astrea(argv[module + 2:], tmp_path)
        elif name == "lmms-eval":
            assert argv[:2] == ["--model", "astrea"], argv
            assert "astrea" in project["entry-points"]["lmms_eval.models"]
    assert {"astrea", "pip", "python", "accelerate", "torchrun", "lmms-eval"} <= tools


def test_a_broken_line_continuation_fails_the_shell_check(tmp_path):
    """The check catches what broke the 13B example: a `\\` followed by a comment ends the command."""
    broken = "astrea create --preset tiny --output x \\     # a comment\n    --seed 1\n"
    with pytest.raises(AssertionError, match="fails in bash"):
        _run_shell_block(broken, tmp_path)
    with pytest.raises(AssertionError, match="fails in bash"):
        _run_shell_block("lmms-eval --model astrea --tasks <task>\n", tmp_path)
