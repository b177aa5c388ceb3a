"""Bad data is reported by id (never dropped silently); configs and code load safely."""

from __future__ import annotations

import ast
import copy
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from astrea_vlm.configuration import get_preset
from astrea_vlm.configuration.presets import PRESETS
from astrea_vlm.eval.data import load_image, record_images
from astrea_vlm.train import data as D

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ datasets
def _jpeg(path: Path, size=(40, 30)) -> bytes:
    Image.effect_noise(size, 60).convert("RGB").save(path, format="JPEG")
    return path.read_bytes()


def _llava_with_bad_images(tmp_path: Path) -> Path:
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (16, 16), "red").save(images / "good.png")
    data = _jpeg(images / "truncated.jpg")
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (images / "notes.png").write_text("not an image at all")
    (images / "empty.png").write_bytes(b"")

    def record(rid, image):
        return {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}

    records = [record("ok", "good.png"), record("trunc", "truncated.jpg"), record("text", "notes.png"), record("empty", "empty.png")]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_corrupt_images_are_reported_by_id_and_skipped_only_when_asked(tmp_path):
    path = _llava_with_bad_images(tmp_path)
    with pytest.raises(D.InvalidDataError, match="skip_invalid=True") as info:
        D.load_llava(path, tmp_path / "imgs", verify_images="full", log=None)
    assert info.value.report.problems == {"corrupt_image": ["trunc", "text", "empty"]}
    assert info.value.report.records == 4
    logged = []
    dataset, report = D.load_llava(path, tmp_path / "imgs", verify_images="full", skip_invalid=True, log=logged.append)
    assert dataset["image_id"] == ["ok"] and report.kept == 1 and report.dropped == ["trunc", "text", "empty"]
    assert any("corrupt_image" in line and "trunc" in line for line in logged)  # the skip is logged with the ids
    # header-level verification (the default) still catches non-image files, by id
    with pytest.raises(D.InvalidDataError) as info:
        D.load_llava(path, tmp_path / "imgs", log=None)
    assert {"text", "empty"} <= set(info.value.report.problems["corrupt_image"])


def test_eval_loader_names_corrupt_images_and_their_record(tmp_path):
    data = _jpeg(tmp_path / "ok.jpg")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.png").write_text("hello")
    assert load_image("ok.jpg", tmp_path).size == (40, 30)
    for name in ("cut.jpg", "text.png"):
        with pytest.raises(ValueError, match=rf"record 'q7': image '{name}' is corrupt, truncated or not an image"):
            record_images({"id": "q7", "image": name}, tmp_path)
    with pytest.raises(ValueError, match="an embedded image is corrupt"):
        load_image({"bytes": b"\x89PNG\r\n\x1a\nbroken"}, tmp_path)
    with pytest.raises(FileNotFoundError, match="record 'q8'.*missing.png"):
        record_images({"id": "q8", "image": "missing.png"}, tmp_path)
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4)).save(buffer, format="PNG")
    assert load_image({"bytes": buffer.getvalue()}, tmp_path).size == (5, 4)


# ---------------------------------------------------------------------- config validation
def _tiny_text(**changes):
    text = copy.deepcopy(PRESETS["tiny"]()["text_config"])
    text.update(changes)
    return text


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"text_config": _tiny_text(hidden_size=10**9, num_attention_heads=1)}, "text_config / expert sizes"),
        ({"text_config": _tiny_text(vocab_size=10**13)}, "text_config / expert sizes"),
        ({"text_config": _tiny_text(num_hidden_layers=10**9)}, "text_config / expert sizes"),
        ({"num_visual_tokens": 10**8}, "num_visual_tokens"),
        ({"moco_dim": 10**12}, "text_config / expert sizes"),
        ({"fusion_adapter_dim": 10**12}, "text_config / expert sizes"),
        ({"text_config": _tiny_text(hidden_size=-64)}, "text_config.hidden_size"),
    ],
)
def test_absurd_sizes_fail_fast_before_allocation(overrides, field, monkeypatch):
    # Counted, not timed: the check is arithmetic, so refusing the config runs no tensor operation,
    # builds no module and allocates next to nothing (a 10**9-layer config would otherwise build
    # per-layer lists or weights first).
    import tracemalloc

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    modules = []
    module_init = torch.nn.Module.__init__
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *a, **k: modules.append(type(self)) or module_init(self, *a, **k))
    get_preset("tiny")  # warm (imports), so that what is measured is the check alone
    tracemalloc.start()
    try:
        with CountOps(), pytest.raises(ValueError, match=f"invalid `{field}`"):
            get_preset("tiny", **overrides)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert CountOps.ops == [] and modules == []
    assert peak < 16 * 2**20, f"refusing the config allocated {peak / 2**20:.1f} MiB"


def test_real_presets_pass_the_size_checks():
    for name in PRESETS:
        assert get_preset(name).num_visual_tokens > 0


# ------------------------------------------------------------------------------ safe code
def _package_files() -> list[Path]:
    folders = ("astrea_vlm", "configuration", "modeling_astrea", "processing", "train", "eval")
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    problems = []
    for path in _package_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "shelve") for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                func = node.func
                if func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "torch":
                    weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                    if not weights_only or getattr(weights_only[0].value, "value", None) is not True:
                        problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                problems.append(f"{path.name}:{node.lineno} calls {node.func.id}")
    assert len(_package_files()) > 30
    assert problems == []
