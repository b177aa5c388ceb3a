"""The ``astrea`` command line: --version, help with defaults, a light --help, eval's output folder."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from astrea_vlm import __version__
from astrea_vlm.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, name: str = "astrea"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _options():
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield name, parser, action


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"astrea {__version__}"


def test_every_option_has_help_that_states_its_default():
    seen = 0
    for command, parser, action in _options():
        seen += 1
        where = f"{command} {action.option_strings[0]}"
        assert action.help and len(action.help) > 10, f"{where} has no help"
        shown = parser._get_formatter()._get_help_string(action) % {"default": action.default}
        if action.required or isinstance(action, (argparse._VersionAction, argparse._StoreTrueAction)):
            continue
        assert "default" in shown, f"{where}: its help must state the default"
        if action.default is not None:
            assert str(action.default) in shown, where
    assert seen > 35


def test_help_numbers_are_the_settings_defaults():
    """Defaults that live in a dataclass are written in the help: they must be the dataclass's."""
    from astrea_vlm.demo import DemoSettings
    from astrea_vlm.train.pretrain_llm import PretrainSettings

    parsers = dict(_parsers(build_parser()))
    pretrain = {a.dest: a.help for a in parsers["astrea pretrain-llm"]._actions}
    for field in ("scenes", "steps", "seed"):
        assert f"(default: {getattr(PretrainSettings(), field)}, PretrainSettings.{field})" in pretrain[field]
    demo = {a.dest: a for a in parsers["astrea demo"]._actions}
    defaults = DemoSettings()
    for field in ("recipe", "output", "seed", "test_size"):
        assert demo[field].default == getattr(defaults, field), field
    steps = defaults.warmup_steps
    assert (f"caption and segmentation {steps['caption']}, classification and detection {steps['classification']}"
            in demo["warmup_steps"].help)
    assert steps["caption"] == steps["segmentation"] and steps["classification"] == steps["detection"]


def test_help_imports_neither_torch_nor_transformers():
    """`astrea --help` stays fast by importing little: counted in modules, not timed."""
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        "from astrea_vlm.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['eval', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    imported = json.loads(out.strip().splitlines()[-1])
    roots = {name.split(".")[0] for name in imported}
    assert not roots & {"torch", "transformers", "numpy", "PIL", "datasets", "trl", "safetensors", "huggingface_hub"}, roots
    assert len(imported) < 40, imported  # argparse, astrea_vlm and astrea_vlm.cli, a few stdlib helpers


def test_eval_default_output_is_outside_the_model_folder(tmp_path, monkeypatch):
    from astrea_vlm.eval.runner import default_output

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "demo" / "train" / "final").mkdir(parents=True)
    assert default_output("outputs/demo/train/final", "qa") == Path("outputs/eval/demo/train/final/qa")
    assert default_output(str(tmp_path / "outputs/demo/train/final"), "qa") == Path("outputs/eval/demo/train/final/qa")
    (tmp_path / "mine").mkdir()
    assert default_output("mine", "vqa") == Path("outputs/eval/mine/vqa")
    elsewhere = tmp_path.parent / "elsewhere-model"
    elsewhere.mkdir(exist_ok=True)
    assert default_output(elsewhere, "caption") == Path("outputs/eval/elsewhere-model/caption")
    assert default_output("org/astrea-13b", "qa") == Path("outputs/eval/org/astrea-13b/qa")  # a Hub id


def test_parser_is_the_one_main_runs(monkeypatch):
    """`main` parses with `build_parser`, so what the README test parses is what runs."""
    import astrea_vlm.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda settings: seen.append(dataclasses.asdict(settings)) or {})
    args = build_parser().parse_args(["demo", "--seed", "3"])
    assert main(["demo", "--seed", "3"]) == 0 and seen[0]["seed"] == args.seed == 3
