"""The trust_remote_code export (``astrea_vlm.export``): generated flat code, drift, clean loading.

The central test saves the tiny model (and its processor) with :func:`save_hub_folder` and loads the
folder in a fresh Python process in which ``astrea_vlm`` cannot be imported, through transformers'
Auto classes with ``trust_remote_code=True`` only; its logits, generations, processor outputs and
pipeline answer must equal the in-process ones.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AstreaModelTester
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.dynamic_module_utils import check_imports, get_imports, get_relative_imports

from astrea_vlm import __version__, export
from astrea_vlm.configuration import PRESETS
from astrea_vlm.export import (
    HEADER_MARK,
    ExportError,
    check_remote_code,
    export_remote_code,
    flatten_source,
    render_remote_code,
    save_hub_folder,
    shipped_modules,
)

HAS_PROCESSOR = importlib.util.find_spec("astrea_vlm.processing.processing_astrea") is not None
PROMPT = "<image>\nWhat is in the picture?"
MAX_NEW_TOKENS = 6


def _build_processor(config):
    from astrea_vlm.processing import build_processor

    return build_processor(config)


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))


def _no_timm_tester() -> AstreaModelTester:
    """The tiny preset with its only timm expert (ram_plus) replaced by a second SigLIP expert."""
    caption = copy.deepcopy(PRESETS["tiny"]()["caption_config"])
    tester = AstreaModelTester(classification_config=caption)
    assert all(expert.kind not in ("timm", "ram_plus") for expert in tester.config.expert_configs.values())
    return tester


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The tiny model (+ processor) saved with save_hub_folder, and inputs saved for the subprocess."""
    root = tmp_path_factory.mktemp("hub")
    tester = AstreaModelTester()
    model = tester.model()
    processor = _build_processor(tester.config) if HAS_PROCESSOR else None
    folder = root / "astrea-tiny"
    written = save_hub_folder(model, folder, processor=processor)
    inputs = {"input_ids": tester.prompt(n_images=1), **tester.pixels(1)}
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(root / "inputs.safetensors"))
    _image().save(root / "image.png")
    return {"root": root, "folder": folder, "written": written, "model": model, "processor": processor, "inputs": inputs, "tester": tester}


# ------------------------------------------------------------------------------ clean child
_CHILD = r'''
import importlib.abc, json, os, socket, sys

MODE, OUT, FOLDERS = sys.argv[1], sys.argv[2], sys.argv[3:]
BLOCKED = {"astrea_vlm"} | ({"timm"} if MODE == "no_timm" else set())


class _Hidden(importlib.abc.MetaPathFinder):
    """Wraps a finder so that the BLOCKED packages look uninstalled (no finder returns a spec)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find_spec = getattr(self.finder, "find_spec", None)
        return find_spec(name, path, target) if find_spec is not None else None

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


socket.socket.connect = _no_network
socket.create_connection = _no_network

report, tensors = {}, {}
for name in sorted(BLOCKED):
    try:
        __import__(name)
    except ImportError as error:
        report[f"{name}_import_error"] = str(error)
    else:
        raise SystemExit(f"{name} is importable in the clean subprocess")

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText


def qualname(obj):
    return f"{type(obj).__module__}.{type(obj).__name__}"


request = json.load(open(os.path.join(OUT, "request.json")))
inputs = load_file(os.path.join(OUT, "inputs.safetensors"))
folder = FOLDERS[0]

if MODE == "full":
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    report["config_class"] = qualname(config)
    report["expert_config_classes"] = {role: qualname(cfg) for role, cfg in config.expert_configs.items()}
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    report["model_class"] = qualname(model)
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    report["backbone_class"] = qualname(backbone)
    with torch.no_grad():
        tensors["logits"] = model(**inputs).logits
        tensors["last_hidden_state"] = backbone(**inputs).last_hidden_state
    tensors["generated"] = model.generate(**inputs, max_new_tokens=request["max_new_tokens"], do_sample=False)

    # The transformers contract through the remote code (issue 17): loading kwargs and return
    # shapes, SDPA on the towers that have it, tuple outputs, and a meta-device build.
    sdpa, info = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, output_loading_info=True, attn_implementation="sdpa")
    report["loading_info_missing"] = sorted(info["missing_keys"])
    report["sdpa_implementations"] = {
        "llm": sdpa.model.language_model.config._attn_implementation,
        "caption": sdpa.model.towers["caption"].model.config._attn_implementation,
        "detection": sdpa.model.towers["detection"].model.config._attn_implementation,
    }
    with torch.no_grad():
        tensors["sdpa_logits"] = sdpa.eval()(**inputs).logits
        tensors["tuple_logits"] = model(**inputs, return_dict=False)[0]
    with torch.device("meta"):
        meta_built = type(model)(config)
    meta_built.to_empty(device="cpu")
    meta_built.init_weights()
    meta_built.load_state_dict(model.state_dict())
    with torch.no_grad():
        tensors["meta_logits"] = meta_built.eval()(**inputs).logits

    # A remote-code model saves its own (flat) code: the re-saved folder loads the same way.
    resaved = os.path.join(OUT, "resaved")
    model.save_pretrained(resaved)
    reloaded = AutoModelForImageTextToText.from_pretrained(resaved, trust_remote_code=True).eval()
    with torch.no_grad():
        tensors["resaved_logits"] = reloaded(**inputs).logits

    if os.path.isfile(os.path.join(folder, "processor_config.json")):
        from PIL import Image
        from transformers import AutoImageProcessor, AutoProcessor, pipeline

        image = Image.open(os.path.join(OUT, "image.png"))
        image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        report["image_processor_class"] = qualname(image_processor)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        report["processor_class"] = qualname(processor)
        batch = processor(images=[image], text=request["prompt"])
        tensors.update({f"processor.{key}": value for key, value in batch.items()})
        tensors["processor_generated"] = model.generate(**batch, max_new_tokens=request["max_new_tokens"], do_sample=False)
        pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        report["pipeline_model_class"] = qualname(pipe.model)
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
        answer = pipe(text=messages, max_new_tokens=request["max_new_tokens"], do_sample=False)
        report["pipeline_answer"] = answer[0]["generated_text"][-1]["content"]

elif MODE == "no_timm":
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    report["model_class"] = qualname(model)
    with torch.no_grad():
        tensors["logits"] = model(**inputs).logits
    try:
        AutoModelForImageTextToText.from_pretrained(FOLDERS[1], trust_remote_code=True)
    except ImportError as error:
        report["timm_folder_error"] = str(error)
    else:
        report["timm_folder_error"] = None

save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "result.safetensors"))
json.dump(report, open(os.path.join(OUT, "report.json"), "w"))
'''


def _run_child(mode: str, workdir: Path, folders: list[Path], inputs: dict, request: dict | None = None):
    out = workdir / f"out_{mode}"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(out / "inputs.safetensors"))
    (out / "request.json").write_text(json.dumps(request or {"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS}))
    if (workdir / "image.png").is_file():
        shutil.copy(workdir / "image.png", out / "image.png")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "hf_modules"))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(out), *map(str, folders)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # generous: a loaded 2-core machine can take minutes to import torch and transformers
    )
    assert proc.returncode == 0, f"clean subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "report.json").read_text()), load_file(str(out / "result.safetensors")), out


@pytest.fixture(scope="module")
def remote(hub):
    report, tensors, out = _run_child("full", hub["root"], [hub["folder"]], hub["inputs"])
    return {"report": report, "tensors": tensors, "out": out}


# ------------------------------------------------------------------------------- generated code
def test_export_ships_every_source_under_a_flat_name():
    files = render_remote_code()
    modeling_dir = Path(importlib.util.find_spec("astrea_vlm.modeling.towers").origin).parent
    expected = {
        "configuration_astrea.py",
        "astrea_presets.py",
        "modeling_astrea.py",
        "astrea_towers.py",
        "astrea_projector.py",
        "astrea_bridge.py",
        "astrea_fusion.py",
    } | {f"astrea_{path.name}" for path in modeling_dir.glob("tower_*.py")}
    if HAS_PROCESSOR:
        expected |= {"processing_astrea.py", "image_processing_astrea.py"}
    assert expected <= set(files)
    assert {item.filename for item in shipped_modules()} == set(files)
    for name, text in files.items():
        assert "/" not in name and name.endswith(".py")
        first = text.splitlines()[0]
        assert first.startswith(HEADER_MARK) and __version__ in first and "DO NOT EDIT" in first, name


def test_export_is_deterministic_and_matches_the_saved_folder(hub, tmp_path):
    assert render_remote_code() == render_remote_code()
    again = export_remote_code(tmp_path / "again")
    for path in again:
        assert path.read_bytes() == (hub["folder"] / path.name).read_bytes(), path.name
    assert {p.name for p in hub["written"]} == {p.name for p in again}
    assert check_remote_code(hub["folder"]) == []


def _absolute_imports(text: str, resolve) -> str:
    """Rewrite every ``from <module> import`` line start with ``resolve(dots, module)`` (test-side, regex)."""
    return re.sub(
        r"^(\s*)from\s+(\.+)([\w.]*)\s+import\b",
        lambda m: f"{m.group(1)}from {resolve(m.group(2), m.group(3))} import",
        text,
        flags=re.MULTILINE,
    )


def test_generated_code_is_the_package_source_up_to_the_import_lines():
    """Fails whenever a generated file differs from its package source other than by the import rewrite."""
    shipped = shipped_modules()
    by_flat = {item.flat_name: item.module for item in shipped}
    files = render_remote_code()
    for item in shipped:
        generated = files[item.filename]
        head = export.header(item)
        assert generated.startswith(head)
        body = generated[len(head) :]
        source = item.source.read_text(encoding="utf-8")
        package = item.module.rpartition(".")[0]

        def from_source(dots, module, package=package):
            return importlib.util.resolve_name(dots + module, package)

        def from_generated(dots, module, name=item.filename):
            assert dots == "." and module in by_flat, f"{name}: `from {dots}{module}` is not a flat sibling import"
            return by_flat[module]

        assert _absolute_imports(body, from_generated) == _absolute_imports(source, from_source), item.filename
        # Only import lines differ.
        changed = [(a, b) for a, b in zip(source.splitlines(), body.splitlines()) if a != b]
        assert len(source.splitlines()) == len(body.splitlines())
        assert all(re.match(r"\s*from \.", b) for _, b in changed), changed


def test_generated_files_only_import_flat_siblings_and_installed_packages(hub):
    folder = hub["folder"]
    code_files = sorted(folder.glob("*.py"))
    stems = {path.stem for path in code_files}
    for path in code_files:
        assert set(get_relative_imports(path)) <= stems, path.name
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in stems, (path.name, node.lineno)
        imports = get_imports(path)  # transformers' check: imports outside `try:` must be installed
        assert "astrea_vlm" not in imports, path.name
        assert "timm" not in imports, f"{path.name}: timm is optional and must be imported inside try:"
        assert set(check_imports(path)) <= stems


# ------------------------------------------------------------------------------ rewriting rules
FLAT = {
    "astrea_vlm.configuration.configuration_astrea": "configuration_astrea",
    "astrea_vlm.configuration.presets": "astrea_presets",
    "astrea_vlm.modeling.towers": "astrea_towers",
    "astrea_vlm.modeling.tower_grounding_dino": "astrea_tower_grounding_dino",
}


def test_flatten_source_rewrites_only_the_module_of_relative_imports():
    source = (
        '"""Doc mentioning from ..configuration import nothing."""\n'
        "from __future__ import annotations\n"
        "import torch\n"
        "from ..configuration.configuration_astrea import (\n"
        "    AstreaConfig,  # a comment\n"
        "    AstreaExpertConfig,\n"
        ")\n"
        "from .towers import ExpertTower as Base  # trailing\n"
        "\n"
        "def f():\n"
        "    from ..configuration.presets import paper_13b_parts\n"
        "    from .tower_grounding_dino import GroundingDinoTower  # noqa: F401\n"
        "    return paper_13b_parts, Base\n"
    )
    expected = (
        source.replace("from ..configuration.configuration_astrea import (", "from .configuration_astrea import (")
        .replace("from .towers import", "from .astrea_towers import")
        .replace("from ..configuration.presets import", "from .astrea_presets import")
        .replace("from .tower_grounding_dino import", "from .astrea_tower_grounding_dino import")
    )
    assert flatten_source(source, "astrea_vlm.modeling.fake", FLAT) == expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("from ..train.trainer import AstreaTrainer\n", "astrea_vlm.train.trainer"),
        ("from ..configuration import AstreaConfig\n", "astrea_vlm.configuration"),
        ("import astrea_vlm\n", "absolutely"),
        ("from astrea_vlm.modeling import AstreaModel\n", "absolutely"),
        ("try:\n    import astrea_vlm.modeling\nexcept ImportError:\n    pass\n", "absolutely"),
        ("from . import towers\n", "cannot be flattened"),
        ("def f():\n    from .helpers import x\n", "astrea_vlm.modeling.helpers"),
    ],
)
def test_flatten_source_refuses_imports_the_folder_cannot_satisfy(source, message):
    with pytest.raises(ExportError, match=re.escape(message)):
        flatten_source(source, "astrea_vlm.modeling.fake", FLAT)


def test_export_fails_loudly_when_a_shipped_file_imports_an_unshipped_module(monkeypatch, tmp_path):
    fake = tmp_path / "fake_root.py"
    fake.write_text("from ..configuration import AstreaConfig\n")
    original = export._source_path
    monkeypatch.setattr(export, "_root_modules", lambda: ["astrea_vlm.modeling.fake_root"])
    monkeypatch.setattr(export, "_source_path", lambda m: fake if m == "astrea_vlm.modeling.fake_root" else original(m))
    with pytest.raises(ExportError, match=r"imports `astrea_vlm\.configuration`, which is not shipped"):
        shipped_modules()


def test_check_remote_code_reports_drift_and_export_removes_stale_files(hub, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(hub["folder"], folder)
    assert check_remote_code(folder) == []
    (folder / "astrea_fusion.py").write_text((folder / "astrea_fusion.py").read_text() + "# edited\n")
    (folder / "astrea_bridge.py").unlink()
    (folder / "astrea_old.py").write_text(f"{HEADER_MARK} from astrea-vlm 0.0.1 (`astrea_vlm.modeling.old`). DO NOT EDIT.\n")
    (folder / "user_code.py").write_text("x = 1\n")
    problems = check_remote_code(folder)
    assert any(p.startswith("astrea_fusion.py: differs") for p in problems)
    assert "astrea_bridge.py: missing" in problems
    assert any(p.startswith("astrea_old.py") for p in problems)
    assert export.main([str(folder), "--check"]) == 1
    export_remote_code(folder)
    assert check_remote_code(folder) == []
    assert not (folder / "astrea_old.py").exists() and (folder / "user_code.py").exists()


def test_saved_folder_declares_the_auto_map(hub):
    config = json.loads((hub["folder"] / "config.json").read_text())
    expected = {
        "AutoConfig": "configuration_astrea.AstreaConfig",
        "AutoModel": "modeling_astrea.AstreaModel",
        "AutoModelForImageTextToText": "modeling_astrea.AstreaForConditionalGeneration",
    }
    if HAS_PROCESSOR:
        expected |= {
            "AutoProcessor": "processing_astrea.AstreaProcessor",
            "AutoImageProcessor": "image_processing_astrea.AstreaImageProcessor",
        }
        processor_config = json.loads((hub["folder"] / "processor_config.json").read_text())
        assert processor_config["auto_map"]["AutoProcessor"] == "processing_astrea.AstreaProcessor"
        assert processor_config["image_processor"]["auto_map"] == {"AutoImageProcessor": "image_processing_astrea.AstreaImageProcessor"}
    assert config["auto_map"] == expected
    assert (hub["folder"] / "model.safetensors").is_file()
    for ref in expected.values():
        module, name = ref.split(".")
        assert re.search(rf"^class {name}\b", (hub["folder"] / f"{module}.py").read_text(), flags=re.MULTILINE)


# ------------------------------------------------------------------------------- safety scan
_FORBIDDEN_MODULES = {"subprocess", "socket", "urllib", "urllib3", "requests", "http", "httpx", "aiohttp", "ftplib", "smtplib", "multiprocessing", "pickle", "marshal"}
_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "breakpoint"}
_FORBIDDEN_OS_CALLS = {"system", "popen", "execv", "execve", "execl", "execvp", "spawnv", "spawnl", "fork", "startfile"}
#: Weight loading from a Hub id happens only when a user explicitly assembles a model from
#: pretrained parts (``tower.load_pretrained``), never while a saved folder loads.
_HUB_ACCESS = {"hf_hub_download", "snapshot_download", "from_pretrained"}
_HUB_ALLOWED_IN = {"load_pretrained", "resolve_weights_file", "from_pretrained"}


def _scan(tree: ast.AST) -> list[str]:
    problems = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            if name.partition(".")[0] in _FORBIDDEN_MODULES:
                problems.append(f"line {node.lineno}: imports {name}")
            if name.partition(".")[0] == "huggingface_hub" and function not in _HUB_ALLOWED_IN:
                problems.append(f"line {node.lineno}: imports huggingface_hub in {function}")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in _FORBIDDEN_CALLS:
                problems.append(f"line {node.lineno}: calls {func.id}")
            if isinstance(func, ast.Attribute):
                if isinstance(func.value, ast.Name) and func.value.id == "os" and func.attr in _FORBIDDEN_OS_CALLS:
                    problems.append(f"line {node.lineno}: calls os.{func.attr}")
                if func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "torch":
                    if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords):
                        problems.append(f"line {node.lineno}: torch.load without weights_only=True")
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in _HUB_ACCESS and function not in _HUB_ALLOWED_IN:
                problems.append(f"line {node.lineno}: {name} in {function}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return problems


def test_exported_code_has_no_network_eval_exec_or_subprocess_use(hub):
    for path in sorted(hub["folder"].glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert _scan(ast.parse(text)) == [], path.name


def test_safety_scan_catches_what_it_forbids():
    bad = "import subprocess\nfrom urllib.request import urlopen\neval('1')\nimport os\nos.system('x')\ntorch.load(p)\ndef forward():\n    hf_hub_download('a', 'b')\n"
    assert len(_scan(ast.parse(bad))) == 6


# ------------------------------------------------------------------------ clean-process loading
def test_remote_load_runs_without_astrea_vlm(remote):
    report = remote["report"]
    assert "astrea_vlm" in report["astrea_vlm_import_error"]
    for key in ("config_class", "model_class", "backbone_class"):
        assert report[key].startswith("transformers_modules."), report[key]
    assert report["config_class"].endswith("configuration_astrea.AstreaConfig")
    assert report["model_class"].endswith("modeling_astrea.AstreaForConditionalGeneration")
    assert report["backbone_class"].endswith("modeling_astrea.AstreaModel")
    # The expert sub-configs (model_type astrea_expert) resolve to the shipped class too.
    assert set(report["expert_config_classes"]) == {"caption", "classification", "detection", "segmentation"}
    for role, qualname in report["expert_config_classes"].items():
        assert qualname.startswith("transformers_modules.") and qualname.endswith(f"configuration_astrea.Astrea{role.title()}ExpertConfig")


def test_remote_model_matches_the_in_process_model(hub, remote):
    model, inputs, tensors = hub["model"], hub["inputs"], remote["tensors"]
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = model.model(**inputs).last_hidden_state
    torch.testing.assert_close(tensors["logits"], logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(tensors["last_hidden_state"], hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(tensors["resaved_logits"], logits, atol=1e-6, rtol=0)
    generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert torch.equal(tensors["generated"], generated)
    resaved = sorted((remote["out"] / "resaved").glob("*.py"))
    assert "modeling_astrea.py" in {path.name for path in resaved}
    for path in resaved:  # transformers' own custom_object_save copied the generated files unchanged
        assert path.read_bytes() == (hub["folder"] / path.name).read_bytes(), path.name


def test_remote_code_keeps_the_transformers_contract_in_a_fresh_process(hub, remote):
    """``output_loading_info``, ``return_dict=False``, ``attn_implementation="sdpa"`` and a meta-device
    build + ``init_weights()`` all work through the exported code, without astrea_vlm installed."""
    report, tensors = remote["report"], remote["tensors"]
    with torch.no_grad():
        logits = hub["model"](**hub["inputs"]).logits
    assert report["loading_info_missing"] == []
    torch.testing.assert_close(tensors["tuple_logits"], logits, atol=1e-6, rtol=0)
    assert report["sdpa_implementations"] == {"llm": "sdpa", "caption": "sdpa", "detection": "eager"}
    torch.testing.assert_close(tensors["sdpa_logits"], logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tensors["meta_logits"], logits, atol=1e-6, rtol=0)


@pytest.mark.skipif(not HAS_PROCESSOR, reason="processing/processing_astrea.py not written yet")
def test_remote_processor_and_pipeline_match_in_process(hub, remote):
    from transformers import pipeline

    report, tensors = remote["report"], remote["tensors"]
    assert report["processor_class"].startswith("transformers_modules.")
    assert report["processor_class"].endswith("processing_astrea.AstreaProcessor")
    assert report["image_processor_class"].endswith("image_processing_astrea.AstreaImageProcessor")
    assert report["pipeline_model_class"].startswith("transformers_modules.")
    model, processor = hub["model"], hub["processor"]
    image = Image.open(hub["root"] / "image.png")
    batch = processor(images=[image], text=PROMPT)
    for key, value in batch.items():
        assert torch.equal(tensors[f"processor.{key}"], value), key
    generated = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert torch.equal(tensors["processor_generated"], generated)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    answer = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert report["pipeline_answer"] == answer[0]["generated_text"][-1]["content"]


_TOKENIZER_CHILD = r'''
import contextlib, io, logging, sys
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

folder = sys.argv[1]
for trust in (True, None):
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # transformers' warnings go to its own logger
    hf_logging.get_logger().addHandler(handler)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    hf_logging.get_logger().removeHandler(handler)
    print(repr((trust, type(tokenizer).__name__, tokenizer("<image> hi")["input_ids"], out.getvalue())))
'''


@pytest.mark.skipif(not HAS_PROCESSOR, reason="processing/processing_astrea.py not written yet")
def test_autotokenizer_needs_trust_remote_code_as_the_readme_says(hub):
    """transformers 5.23's AutoTokenizer loads the folder's config first; its model type is remote code.

    With ``trust_remote_code=True`` (what the README and the model card say) the tokenizer loads
    without a prompt or a warning. Without it, transformers asks "run custom code? [y/N]" (answered
    no here: stdin is closed) and warns about the config -- pinned, so that the docs are revisited if
    a later transformers stops reading the config.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(hub["root"] / "hf_modules_tokenizer"))
    proc = subprocess.run(
        [sys.executable, "-c", _TOKENIZER_CHILD, str(hub["folder"])],
        cwd=hub["root"], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trusted, untrusted = (ast.literal_eval(line) for line in proc.stdout.strip().splitlines()[-2:])
    expected = hub["processor"].tokenizer("<image> hi")["input_ids"]
    assert trusted[1] == type(hub["processor"].tokenizer).__name__ and trusted[2] == expected
    assert "custom code" not in trusted[3] and "model of type" not in trusted[3]
    assert untrusted[2] == expected
    assert "run the custom code" in untrusted[3] and "model of type `astrea`" in untrusted[3]


def test_missing_optional_package_fails_only_for_the_towers_that_need_it(hub, tmp_path):
    tester = _no_timm_tester()
    model = tester.model()
    no_timm = tmp_path / "astrea-no-timm"
    save_hub_folder(model, no_timm)
    inputs = {"input_ids": tester.prompt(n_images=1), **tester.pixels(1)}
    report, tensors, _ = _run_child("no_timm", tmp_path, [no_timm, hub["folder"]], inputs)
    assert "timm" in report["timm_import_error"]
    # A config without timm experts loads and runs where timm is missing ...
    assert report["model_class"].startswith("transformers_modules.")
    with torch.no_grad():
        torch.testing.assert_close(tensors["logits"], model(**inputs).logits, atol=1e-6, rtol=0)
    # ... and one with a RAM++ (timm) expert names the missing package and the expert.
    error = report["timm_folder_error"]
    assert error is not None, "loading a ram_plus folder without timm should raise ImportError"
    assert "`timm`" in error and "pip install timm" in error and "ram_plus" in error
