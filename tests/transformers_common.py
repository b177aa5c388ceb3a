"""transformers' own common test mixins, from the transformers source distribution.

Every model inside transformers passes ``ModelTesterMixin``, ``ConfigTester`` and
``ProcessorTesterMixin`` (``tests/test_*_common.py`` of the transformers repository). The wheel does
not ship them; the source distribution on the package registry does. :func:`load` fetches that sdist
once with pip (``pip download --no-deps --no-binary :all: transformers==<installed version>``),
unpacks only its ``tests/`` into a cache folder and imports the common modules from there under
their own package name (:data:`PACKAGE`), without putting anything on ``sys.path``; nothing of it is
copied into this repository.

The sdist's ``tests/`` lacks four modules the common files import; :func:`load` registers stand-ins:

* ``generation/test_utils.py``: ``GenerationTesterMixin`` is our own
  :class:`generation_checks.GenerationChecks` (greedy, sample, beam, assisted, static cache, compile);
* ``exporters/test_export.py``: ``ExportTesterMixin`` (``torch.export`` / ONNX round trips) is an
  empty class, so those tests do not run;
* ``utils/test_configuration_utils.py``: ``config_common_kwargs`` is read only by a
  ``ConfigTester`` check that returns early for composite configs such as ``AstreaConfig``;
* ``utils/fetch_hub_objects_for_ci.py``: ``url_to_local_path`` maps the test images' URLs to
  images written into the cache folder (the Hub is not reachable from the tests).

Where it is cached: ``$ASTREA_TRANSFORMERS_TESTS`` if set (a folder holding an unpacked ``tests/``,
e.g. for offline machines), else ``~/.cache/astrea-vlm/transformers-<version>-tests``.
When the registry cannot be reached and nothing is cached, the tests that need the mixins are
skipped with a reason that says so and how to provide them; with ``ASTREA_REQUIRE_TRANSFORMERS_TESTS=1``
(set by CI) that is an error instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import zlib
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
VERSION = transformers.__version__
REQUIRED = os.environ.get("ASTREA_REQUIRE_TRANSFORMERS_TESTS", "") not in ("", "0")

_loaded: types.SimpleNamespace | None = None
_failure: str | None = None


class Unavailable(RuntimeError):
    """The sdist's tests could not be found or fetched; the message says why and what to do."""


def cache_dir() -> Path:
    configured = os.environ.get("ASTREA_TRANSFORMERS_TESTS")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "astrea-vlm" / f"transformers-{VERSION}-tests"


def _fetch(target: Path) -> None:
    """pip-download the sdist of the installed transformers and unpack its ``tests/`` to ``target/tests``."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=900):
        if (target / "tests" / "test_modeling_common.py").is_file():
            return  # another process fetched it meanwhile
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                       "--disable-pip-version-check", "-q", f"transformers=={VERSION}", "-d", scratch]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise Unavailable(f"`{' '.join(command[2:])}` did not finish in 10 minutes") from None
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise Unavailable(f"`{' '.join(command[2:-2])}` failed: {last}")
            archive = next(Path(scratch).glob("transformers-*.tar.gz"))
            unpacked = Path(scratch) / "unpacked"
            prefix = f"transformers-{VERSION}/tests/"
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
                if not any(m.name == prefix + "test_modeling_common.py" for m in members):
                    raise Unavailable(f"the transformers {VERSION} sdist has no tests/test_modeling_common.py")
                tar.extractall(unpacked, members=members, filter="data")
            (unpacked / prefix / "__init__.py").touch()  # the tests are a package (relative imports)
            staged = Path(scratch) / "staged"
            staged.mkdir()
            shutil.move(str(unpacked / prefix), str(staged / "tests"))
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(staged), str(target))


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that submodules can be registered under it
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


class _ExportTesterMixinNotShipped:
    """Stand-in for ``tests/exporters/test_export.py::ExportTesterMixin``, which the sdist lacks."""


def _test_image_path(root: Path, url: str) -> str:
    """A local image standing in for a test image URL: same file name, deterministic content."""
    import numpy as np
    from PIL import Image

    name = url.rsplit("/", 1)[-1]
    if not name.lower().endswith((".png", ".jpg", ".jpeg")):
        return url  # videos and audio: Astrea's processor reads neither, the tests using them skip
    path = root / "fixtures" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path)
    return str(path)


def load() -> types.SimpleNamespace:
    """The common test modules, as ``.modeling``, ``.configuration`` and ``.processing``.

    Raises :class:`Unavailable` (with the reason) when the sdist's tests can be neither found nor fetched.
    """
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if _failure is not None:
        raise Unavailable(_failure)
    root = cache_dir()
    try:
        if not (root / "tests" / "test_modeling_common.py").is_file():
            if os.environ.get("ASTREA_TRANSFORMERS_TESTS"):
                raise Unavailable(f"ASTREA_TRANSFORMERS_TESTS={root} holds no tests/test_modeling_common.py")
            _fetch(root)
    except Unavailable as error:
        _failure = (
            f"transformers {VERSION}'s common test mixins are not available: {error}. They come from the transformers "
            f"sdist on the package registry; run with the registry reachable once (they are cached in {root}), or "
            f"unpack the sdist's tests/ into a folder and set ASTREA_TRANSFORMERS_TESTS to it"
        )
        raise Unavailable(_failure) from None

    from generation_checks import GenerationChecks

    tests = root / "tests"
    _module(PACKAGE + ".exporters")
    _module(PACKAGE + ".exporters.test_export", ExportTesterMixin=_ExportTesterMixinNotShipped)
    _module(PACKAGE + ".generation")
    _module(PACKAGE + ".generation.test_utils", GenerationTesterMixin=GenerationChecks)
    _module(PACKAGE + ".utils")
    _module(PACKAGE + ".utils.test_configuration_utils", config_common_kwargs={})
    _module("fetch_hub_objects_for_ci", url_to_local_path=lambda url, **_: _test_image_path(root, url))
    spec = importlib.util.spec_from_file_location(PACKAGE, tests / "__init__.py", submodule_search_locations=[str(tests)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    for name in ("exporters", "generation", "utils"):
        setattr(package, name, sys.modules[f"{PACKAGE}.{name}"])
    _loaded = types.SimpleNamespace(
        modeling=importlib.import_module(PACKAGE + ".test_modeling_common"),
        configuration=importlib.import_module(PACKAGE + ".test_configuration_common"),
        processing=importlib.import_module(PACKAGE + ".test_processing_common"),
        root=root,
    )
    return _loaded


def load_or_skip() -> types.SimpleNamespace:
    """:func:`load`, or a module-level pytest skip naming the reason (an error when CI requires the mixins)."""
    import pytest

    try:
        return load()
    except Unavailable as error:
        if REQUIRED:
            raise
        pytest.skip(str(error), allow_module_level=True)
