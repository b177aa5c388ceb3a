"""Find the pretrained parts of a paper preset before anything is built (``astrea create``).

Every part -- the LLM, its tokenizer, the four expert towers -- is a local path or a Hub id
(``org/repo``, or ``org/repo/file`` for a single checkpoint file). :func:`resolve_parts` turns each
into a local file or folder and checks it, and raises one :class:`PartsError` that names every part
it could not get (the command-line flag, the source, what was tried, and what to do) when any is
missing. Nothing is downloaded until every part is known to be available, and nothing is built
before that: a user offline learns it within seconds, not after a 30 GB assembly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: Files of a transformers model folder on the Hub that ``astrea create`` needs.
FOLDER_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
#: Pickled weights, fetched only from a repo that has no safetensors.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "*.model", "*.tiktoken", "vocab*", "merges.txt"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class PartsError(ValueError):
    """Some parts could not be found; the message names each one and the flag that takes a local path."""


@dataclass
class Part:
    name: str  # "llm", "tokenizer" or an expert role
    flag: str  # the `astrea create` option that takes it
    source: str  # what the preset or the user gave
    what: str  # "folder" (a transformers folder) or "weights" (a file, or a folder holding one)
    path: Path | None = None  # the local file or folder, once resolved
    repo_id: str | None = None
    filename: str | None = None
    patterns: list[str] = field(default_factory=list)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    truthy = {"1", "ON", "YES", "TRUE"}
    return constants.HF_HUB_OFFLINE or any(os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_local(source: str) -> bool:
    """A path rather than a Hub id: it starts like one, or its first component exists here."""
    if source.startswith((".", "/", "~")) or os.sep != "/" and os.sep in source:
        return True
    first = source.split("/")[0]
    return source.count("/") >= 1 and Path(first).exists()


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def check_local(part: Part) -> str | None:
    """What is wrong with ``part.path`` (a problem sentence), or None."""
    from .modeling.checkpoint_files import CorruptCheckpointError, check_safetensors_file, check_torch_zip_file

    path = part.path
    if path.is_dir():
        if part.name == "tokenizer":
            return None if any(path.glob("tokenizer*")) or any(path.glob("*.model")) else f"{path} holds no tokenizer files"
        if part.what == "folder" and not (path / "config.json").is_file():
            return f"{path} is not a transformers folder (no config.json)"
        if not _has_weights(path):
            return f"{path} holds no weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})"
        return None
    if part.what == "folder":
        return f"{path} is a file; the {part.name} needs a transformers folder (config.json + weights)"
    try:
        if path.suffix == ".safetensors":
            check_safetensors_file(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            check_torch_zip_file(path)
    except CorruptCheckpointError as error:
        return str(error)
    return None


def _from_cache(part: Part) -> Path | None:
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    if part.filename:
        found = try_to_load_from_cache(part.repo_id, part.filename)
        return Path(found) if isinstance(found, str) else None
    try:
        folder = Path(snapshot_download(part.repo_id, local_files_only=True, allow_patterns=part.patterns))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None
    return folder if folder.is_dir() and any(folder.iterdir()) else None


def _download_hint(part: Part) -> str:
    what = f"{part.repo_id} {part.filename}" if part.filename else part.repo_id
    kind = "file" if part.filename else "folder"
    return f"download it (`hf download {what}`) and pass {part.flag} ./path/to/{kind}"


def resolve_parts(parts: list[Part], log=print) -> list[Part]:
    """Resolve and check every part (see the module docstring); download only when all are available."""
    from huggingface_hub import HfApi

    problems: list[str] = []
    to_download: list[tuple[Part, list[str]]] = []
    offline = hub_offline()
    unreachable: str | None = "offline (HF_HUB_OFFLINE=1)" if offline else None
    for part in parts:
        if Path(os.path.expanduser(part.source)).exists() or _looks_local(part.source):
            part.path = Path(os.path.expanduser(part.source))
            if not part.path.exists():
                problems.append(f"{part.flag}: {part.source} does not exist (it is a local path); pass the "
                                f"{'folder' if part.what == 'folder' else 'file or folder'} that holds the {part.name}")
                continue
            problem = check_local(part)
            if problem:
                problems.append(f"{part.flag}: {problem}")
            continue
        pieces = part.source.split("/")
        part.repo_id, part.filename = "/".join(pieces[:2]), "/".join(pieces[2:]) or None
        part.patterns = TOKENIZER_PATTERNS if part.name == "tokenizer" else FOLDER_PATTERNS
        part.path = _from_cache(part)
        if part.path is not None:
            problem = check_local(part)
            if problem is None:
                continue
            part.path = None  # an incomplete cached copy: fetch it again
        if unreachable is None:
            try:
                files = HfApi().list_repo_files(part.repo_id)
            except Exception as error:  # noqa: BLE001 -- any failure to reach the Hub is reported the same way
                name = type(error).__name__
                if "RepositoryNotFound" in name or "GatedRepo" in name:
                    problems.append(f"{part.flag}: the Hub has no (accessible) repo {part.repo_id} ({name}); pass {part.flag} ./path")
                    continue
                unreachable = f"unreachable ({name}: {str(error).splitlines()[0][:120]})"
            else:
                if part.filename and part.filename not in files:
                    problems.append(f"{part.flag}: the Hub repo {part.repo_id} has no file {part.filename}; pass {part.flag} ./path")
                    continue
                patterns = part.patterns
                if not part.filename and part.name != "tokenizer" and not any(f.endswith(".safetensors") for f in files):
                    patterns = patterns + PICKLE_PATTERNS
                to_download.append((part, patterns))
                continue
        problems.append(f"{part.flag}: {part.source} is not in the local Hugging Face cache and the Hub is {unreachable}; "
                        f"{_download_hint(part)}")
    if problems:
        raise PartsError("cannot assemble the model; every part takes a local path:\n  " + "\n  ".join(problems))
    for part, patterns in to_download:
        from huggingface_hub import hf_hub_download, snapshot_download

        log(f"downloading {part.source} ({part.flag})")
        part.path = Path(hf_hub_download(part.repo_id, part.filename) if part.filename
                         else snapshot_download(part.repo_id, allow_patterns=patterns))
        problem = check_local(part)
        if problem:
            raise PartsError(f"{part.flag}: downloaded {part.source}, but {problem}")
    return parts


__all__ = ["Part", "PartsError", "check_local", "hub_offline", "resolve_parts"]
