"""Feature cache for progressive pre-alignment: frozen expert features computed once per image.

Paper §3.1.2: "we create a cache C for each model, used to record the features of each image ...
avoids recomputing feature representations from previous tasks". The experts' towers are frozen
for the whole of training, and after stage k the projector of expert k is frozen too, so their
outputs are pure functions of the image: :class:`FeatureCache` computes them once and stores them
on disk, and :class:`CachedFeatureCollator` puts them in every training batch in place of pixels.

What is cached (``kind``)
-------------------------
* ``"tower"``: the expert's tower tokens resampled to ``num_visual_tokens``,
  ``AstreaModel.get_tower_tokens(role, pixels)``, ``(n_views, N, D_i)`` per image. The model takes
  them as ``tower_features={role: tokens}`` and skips the tower only (the projector still runs
  and can train).
* ``"projected"``: the output ``C_i`` of the expert's (frozen) projector on those tokens,
  ``(n_views, N, D)``. The model takes them as ``expert_features={role: C_i}`` and skips the tower
  and the projector.

An image with AnyRes tiling is several views; its entry holds all of them, and a lookup
concatenates the images' views in order, exactly as ``AstreaProcessor`` orders
``pixel_values_<role>``. Features are stored in the dtype the module produced (float32 for the
tiny preset, bfloat16 for a bf16 model), so cached and uncached forwards see the same numbers.

Keys: nothing stale can be read
-------------------------------
An entry is found by ``(group, image hash)``. The **image hash** is the sha256 of the decoded RGB
pixels plus the size (``to_pil_rgb``, the processor's own decoding: EXIF rotation applied,
transparency on white) -- not of the file bytes, so a re-encoded or renamed file is the same
image and an in-memory PIL image hashes like its file. The **group** (:class:`CacheKey`,
``group_id`` a sha256) is everything else the features depend on:

* the expert ``role`` and the ``kind``;
* the **preprocessing fingerprint**: the expert's image spec in the ``AstreaImageProcessor``
  (``size``, ``image_mean``, ``image_std``, ``resample``), the view settings
  (``image_grid_pinpoints``, ``tile_size``, ``max_image_pixels``), ``num_visual_tokens`` and a
  format version (bumped whenever this module's semantics change);
* the **weights fingerprint**: sha256 of the tower's state dict (every tensor's name, dtype, shape
  and bytes) plus its class and config (minus fields that cannot change its output: paths,
  ``transformers_version``, dtype -- the state dict's dtypes count instead -- ...); for
  ``"projected"`` also the projector's state dict and structure (``repr``).

A lookup recomputes the key from the model and processor it is given. A changed tower, projector or
processor gives another group; if the cache only holds that role and kind under other
fingerprints, the lookup raises :class:`StaleFeaturesError` naming what changed (e.g. "the tower
weights (cached 3f2a..., model now 9c01...)" or "preprocessing image_mean [...] -> [...]"), and
images missing from the group raise :class:`MissingFeaturesError` naming them. Both are
``KeyError`` subclasses. Features are never silently recomputed or silently wrong.

Fingerprints are cheap to recompute per batch: a full hash runs once per module and is memoised
per (module id, version key), where the version key is the module's description and every
tensor's ``(name, data_ptr, _version, dtype, shape, device)``. In-place updates (optimizer steps,
``load_state_dict``, ``p.add_`` under ``no_grad``) bump autograd's ``_version`` and replacing a
tensor changes its ``data_ptr``, so both invalidate the memo. Writes through ``p.data`` bypass
version counters: after such an edit call :func:`clear_fingerprint_memo`. Hashing is about
1 GB/s (the four paper towers: a few seconds, once).

On-disk format, and why memory-mapped
-------------------------------------
::

    root/index.json                          {"format", "version", "groups": {group_id: {"role", "kind",
                                              "dir", "preprocessing": {...}, "weights": {...}, "created"}}}
    root/<role>.<kind>.<group_id[:16]>/
        index.json                           {"group", "shape": [N, D], "dtype", "shards": [names],
                                              "images": {image_hash: [shard number, n_views]}}
        shard-<uuid>.safetensors             one tensor per image, named by its hash, (n_views, N, D);
                                              metadata: format, group, role, kind

Reads use safetensors ``safe_open``, which memory-maps the shard: a lookup reads only the bytes of
the images of the batch, the OS page cache holds the hot part and is shared by every dataloader
worker and process on the node, opening is instant whatever the size, and the cache can be far
larger than RAM (the paper's 558k pre-alignment images x 576 tokens x 1024 dims x 2 bytes is
~660 GB per expert). Shard handles are kept open per process (an LRU of 64), and
every shard's metadata is checked against its group when opened. Index files are re-read when they
change on disk, so a cache built by another process is seen without reopening.

Crash safety: a build writes each shard to a temporary file in the group folder, fsyncs it, and
then -- holding an ``fcntl`` lock on ``root/.lock`` -- renames it into place and rewrites the group
index (temporary file + fsync + ``os.replace``). An index therefore only ever names complete
shards; a kill leaves at worst a temporary file or an unindexed shard, which the next build of that
group deletes (temporaries of dead processes only), and the images not yet indexed are computed
again. Several processes may build into one cache at once (e.g. one per rank on disjoint images).

How training uses it
--------------------
Stage k of the progressive pre-alignment (``model.model.set_alignment_stage(role_k)``) trains
expert k's projector and bridge; the bridge reads the earlier experts' ``C_i``:

* before stage k: ``cache.build(model, processor, images, roles=[role_k], kind="tower")``;
* during stage k: ``CachedFeatureCollator(base, cache, model, processor, tower_roles=[role_k],
  projected_roles=[role_1, ..., role_{k-1}])``: the batch gets ``tower_features`` (expert k's frozen
  tower tokens: its projector trains on them) and ``expert_features`` (the earlier experts' ``C_i``
  for the residual bridge), and their ``pixel_values_<role>`` are removed, so no tower runs;
* after stage k: ``cache.build(..., roles=[role_k], kind="projected")`` -- read from the stage's
  cached tower tokens (``use_tower_cache=True``), so only the projector runs.

Instruction tuning (towers frozen, projectors training) uses ``tower_roles=`` all experts.
The collator takes the base collator's batch (TRL's ``DataCollatorForVisionLanguageModeling``:
examples with an ``images`` list, or one ``image``) and adds the features of every image of the
batch in order. It computes the fingerprints when it is built, and refuses roles whose modules
still require gradients (cached features of a module that trains would go stale at the first
step); per batch it re-checks the cheap version key while the model lives in the same process.

``astrea cache build --model DIR --data PATH --output CACHE_DIR [--roles caption,...]
[--kind tower|projected] [--batch-size N]`` builds a cache from a saved folder; ``--data`` is read
by :func:`load_image_list` (a JSON / JSONL list of image paths or records with ``image`` /
``images`` relative to the file, a ``datasets`` folder with an ``images`` or ``image`` column, or
a folder of image files).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import io
import itertools
import json
import os
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "astrea-feature-cache"
FORMAT_VERSION = 1
KINDS = ("tower", "projected")
#: Where each kind goes in the model's forward.
BATCH_KEYS = {"tower": "tower_features", "projected": "expert_features"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Config fields that cannot change a module's output (or whose effect the state dict already
# carries): leaving them out keeps a reloaded model's fingerprint equal to the original's.
_IGNORED_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "pretrained", "dtype", "torch_dtype", "architectures",
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "frozen", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "_commit_hash",
    "use_cache", "auto_map",
})


# ----------------------------------------------------------------------------------- errors
class FeatureCacheError(KeyError):
    """Base class: the cache cannot give the requested features (a ``KeyError`` with a readable message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingFeaturesError(FeatureCacheError):
    """Some images (``.missing``: their names) have no features in the group of the current fingerprints."""

    def __init__(self, message: str, missing: Sequence[str] = ()):
        super().__init__(message)
        self.missing = list(missing)


class StaleFeaturesError(FeatureCacheError):
    """The cache holds this role and kind only for other fingerprints (``.differences``: what changed)."""

    def __init__(self, message: str, differences: Sequence[str] = ()):
        super().__init__(message)
        self.differences = list(differences)


# ------------------------------------------------------------------------------ fingerprints
def _rgb(image):
    from ..processing.image_processing_astrea import to_pil_rgb

    return to_pil_rgb(image)


def image_hash(image) -> str:
    """sha256 (hex) of an image's decoded RGB pixels and size (any input ``AstreaProcessor`` accepts)."""
    rgb = _rgb(image)
    digest = hashlib.sha256(f"astrea-rgb:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _clean_config(value):
    if isinstance(value, dict):
        return {k: _clean_config(v) for k, v in sorted(value.items()) if k not in _IGNORED_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_clean_config(v) for v in value]
    return value


def _describe_module(module: nn.Module) -> str:
    """What, besides the state dict, fixes a module's output: its class and config (or its repr)."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        body: Any = _clean_config(config.to_dict())
    else:
        body = repr(module)
    extra = {name: getattr(module, name) for name in ("kind", "grid", "out_dim") if hasattr(module, name)}
    return json.dumps({"class": type(module).__name__, "config": body, **extra}, sort_keys=True, default=str)


def _version_key(module: nn.Module, description: str):
    try:
        tensors = tuple(
            (name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape), str(t.device))
            for name, t in module.state_dict(keep_vars=True).items()
        )
    except RuntimeError:  # inference tensors have no version counter: never memoise
        return None
    return description, tensors


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


_WEIGHTS_MEMO: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str]] = weakref.WeakKeyDictionary()


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's description (class, config or repr) and state dict (names, dtypes, shapes, bytes).

    Memoised per module and version key (see the module docstring), so calling it every batch is cheap.
    """
    description = _describe_module(module)
    key = _version_key(module, description)
    memo = _WEIGHTS_MEMO.get(module)
    if key is not None and memo is not None and memo[0] == key:
        return memo[1]
    digest = hashlib.sha256(description.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint {type(module).__name__}: {name} is on the meta device")
        digest.update(_tensor_bytes(tensor))
    fingerprint = digest.hexdigest()
    if key is not None:
        _WEIGHTS_MEMO[module] = (key, fingerprint)
    return fingerprint


def clear_fingerprint_memo() -> None:
    """Forget memoised weights fingerprints (needed only after writes through ``param.data``)."""
    _WEIGHTS_MEMO.clear()


def find_backbone(model: nn.Module) -> nn.Module:
    """The ``AstreaModel`` inside ``model`` (itself, ``AstreaForConditionalGeneration``, PEFT-wrapped, remote code)."""
    if type(model).__name__ == "AstreaModel":
        return model
    for module in model.modules():
        if type(module).__name__ == "AstreaModel":
            return module
    raise ValueError(f"no AstreaModel inside the {type(model).__name__} given to the feature cache")


def _image_processor(processor):
    image_processor = getattr(processor, "image_processor", processor)
    if not hasattr(image_processor, "experts") or not hasattr(image_processor, "pixels_for_views"):
        raise TypeError(f"expected an AstreaProcessor or AstreaImageProcessor, got {type(processor).__name__}")
    return image_processor


def preprocessing_spec(model: nn.Module, processor, role: str) -> dict[str, Any]:
    """Everything on the pixel side that an expert's features depend on (part of :class:`CacheKey`)."""
    backbone = find_backbone(model)
    image_processor = _image_processor(processor)
    if role not in image_processor.experts:
        raise ValueError(f"the processor has no image spec for expert {role!r}; it has {sorted(image_processor.experts)}")
    num_visual_tokens = int(backbone.config.num_visual_tokens)
    processor_tokens = getattr(processor, "num_visual_tokens", num_visual_tokens)
    if processor_tokens != num_visual_tokens:
        raise ValueError(f"the processor makes {processor_tokens} visual tokens per view but the model {num_visual_tokens}")
    spec = image_processor.experts[role]
    pinpoints = image_processor.image_grid_pinpoints
    return {
        "format_version": FORMAT_VERSION,
        "image_processor": type(image_processor).__name__,
        "size": int(spec["size"]),
        "image_mean": [float(v) for v in spec["image_mean"]],
        "image_std": [float(v) for v in spec["image_std"]],
        "resample": spec["resample"],
        "num_visual_tokens": num_visual_tokens,
        "image_grid_pinpoints": [list(p) for p in pinpoints] if pinpoints else None,
        "tile_size": int(image_processor.tile_size) if pinpoints else None,
        "max_image_pixels": int(image_processor.max_image_pixels),
    }


@dataclass(frozen=True)
class CacheKey:
    """The group an expert's cached features belong to: role, kind and every fingerprint they depend on."""

    role: str
    kind: str
    preprocessing: dict[str, Any] = field(compare=False, hash=False)
    weights: dict[str, str] = field(compare=False, hash=False)
    group_id: str = ""

    @property
    def dirname(self) -> str:
        return f"{self.role}.{self.kind}.{self.group_id[:16]}"


def cache_key(model: nn.Module, processor, role: str, kind: str = "tower") -> CacheKey:
    """The :class:`CacheKey` of ``role``'s ``kind`` features for this model and processor (cheap: memoised hashes)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}")
    backbone = find_backbone(model)
    if role not in backbone.towers:
        raise ValueError(f"the model has no expert {role!r}; its experts are {list(backbone.towers)}")
    preprocessing = preprocessing_spec(backbone, processor, role)
    weights = {"tower": weights_fingerprint(backbone.towers[role])}
    if kind == "projected":
        weights["projector"] = weights_fingerprint(backbone.projectors[role])
    payload = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "role": role, "kind": kind,
                          "preprocessing": preprocessing, "weights": weights}, sort_keys=True)
    return CacheKey(role, kind, preprocessing, weights, hashlib.sha256(payload.encode()).hexdigest())


def _differences(cached: dict[str, Any], key: CacheKey) -> list[str]:
    found = []
    for part, label in (("tower", "the tower weights"), ("projector", "the projector weights")):
        old, new = cached.get("weights", {}).get(part), key.weights.get(part)
        if old != new and (old or new):
            found.append(f"{label} (cached {str(old)[:12]}..., model now {str(new)[:12]}...)")
    old_pre = cached.get("preprocessing", {})
    for name in sorted(set(old_pre) | set(key.preprocessing)):
        if old_pre.get(name) != key.preprocessing.get(name):
            found.append(f"preprocessing {name} {old_pre.get(name)!r} -> {key.preprocessing.get(name)!r}")
    return found


# ------------------------------------------------------------------------------- file helpers
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any, compact: bool = False) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            if compact:
                json.dump(data, handle, separators=(",", ":"))
            else:
                json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: single writer assumed
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _stat_signature(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _chunks(iterable: Iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _image_label(image, index: int, names: Sequence[str] | None = None) -> str:
    """How errors name an image: its id when given, else its path, else its position."""
    if names is not None:
        return str(names[index])
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"#{index}"


# ------------------------------------------------------------------------------------ cache
class FeatureCache:
    """Frozen expert features on disk (see the module docstring for keys, format and staleness).

    Args:
        root: the cache folder (created on the first build).
        shard_max_bytes: a build writes a shard whenever this many bytes of one group are buffered
            (and at its end); smaller shards lose less work to a crash, larger ones mean fewer files.
        max_open_shards: memory-mapped shard handles kept open per process.
    """

    def __init__(self, root: str | os.PathLike, *, shard_max_bytes: int = 1 << 30, max_open_shards: int = 64):
        self.root = Path(root)
        self.shard_max_bytes = int(shard_max_bytes)
        self.max_open_shards = int(max_open_shards)
        self._json_cache: dict[Path, tuple[Any, Any]] = {}
        self._handles: OrderedDict[Path, Any] = OrderedDict()
        self._handles_pid = os.getpid()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"

    def __getstate__(self):  # picklable for dataloader workers: handles are reopened there
        state = self.__dict__.copy()
        state["_handles"], state["_json_cache"] = OrderedDict(), {}
        return state

    # ---------------------------------------------------------------------------- index
    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def _read_json(self, path: Path, default=None):
        signature = _stat_signature(path)
        if signature is None:
            return default
        cached = self._json_cache.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        data = json.loads(path.read_text(encoding="utf-8"))
        self._json_cache[path] = (signature, data)
        return data

    def _top(self) -> dict[str, Any]:
        data = self._read_json(self.index_path)
        if data is None:
            return {"format": FORMAT, "version": FORMAT_VERSION, "groups": {}}
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.index_path} is not a version-{FORMAT_VERSION} {FORMAT} index "
                f"(format {data.get('format')!r}, version {data.get('version')!r}); use a new cache folder"
            )
        return data

    def groups(self) -> dict[str, dict[str, Any]]:
        """``group_id -> {"role", "kind", "dir", "preprocessing", "weights", "created"}`` of every group on disk."""
        return dict(self._top()["groups"])

    def _group_index(self, meta: dict[str, Any]) -> dict[str, Any]:
        return self._read_json(self.root / meta["dir"] / "index.json", default={"shards": [], "images": {}})

    def _group_meta(self, key: CacheKey) -> dict[str, Any]:
        groups = self._top()["groups"]
        meta = groups.get(key.group_id)
        if meta is not None:
            return meta
        others = sorted((g for g in groups.values() if g["role"] == key.role and g["kind"] == key.kind),
                        key=lambda g: g.get("created", ""))
        if not others:
            raise MissingFeaturesError(
                f"the feature cache {self.root} holds no {key.kind} features of expert {key.role!r}; build them "
                f"with FeatureCache.build(..., roles=[{key.role!r}], kind={key.kind!r}) or `astrea cache build`"
            )
        differences = _differences(others[-1], key)
        raise StaleFeaturesError(
            f"stale feature cache: {self.root} holds {key.kind} features of expert {key.role!r} only for other "
            f"fingerprints; changed since they were built: {'; '.join(differences) or 'the format'}. "
            f"Rebuild them (FeatureCache.build / `astrea cache build`) for the current model and processor",
            differences,
        )

    # --------------------------------------------------------------------------- reading
    def _handle(self, path: Path, group_id: str):
        from safetensors import safe_open

        if self._handles_pid != os.getpid():  # forked: do not share the parent's handles
            self._handles, self._handles_pid = OrderedDict(), os.getpid()
        handle = self._handles.get(path)
        if handle is not None:
            self._handles.move_to_end(path)
            return handle
        try:
            handle = safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise MissingFeaturesError(f"shard {path} named by the cache index is missing; rebuild the cache") from None
        metadata = handle.metadata() or {}
        if metadata.get("group") != group_id or metadata.get("format") != f"{FORMAT}/{FORMAT_VERSION}":
            raise StaleFeaturesError(f"shard {path} belongs to group {metadata.get('group')!r}, not {group_id!r}; rebuild the cache")
        self._handles[path] = handle
        while len(self._handles) > self.max_open_shards:
            self._handles.popitem(last=False)
        return handle

    def lookup_hashes(self, key: CacheKey, hashes: Sequence[str], names: Sequence[str] | None = None) -> torch.Tensor:
        """Features of images given by :func:`image_hash`, views concatenated in order: ``(n_views, N, D)``.

        Raises :class:`StaleFeaturesError` / :class:`MissingFeaturesError` (``names`` label the images).
        """
        meta = self._group_meta(key)
        index = self._group_index(meta)
        entries = index["images"]
        missing = [f"{_image_label(None, i, names)} (sha256 {h[:12]})" for i, h in enumerate(hashes) if h not in entries]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise MissingFeaturesError(
                f"{len(missing)} of {len(hashes)} image(s) have no {key.kind} features of expert {key.role!r} in "
                f"{self.root} for the current fingerprints: {shown}; build them first (FeatureCache.build)",
                missing,
            )
        shape, dtype = index.get("shape"), getattr(torch, index.get("dtype") or "float32")
        if not hashes:
            return torch.empty((0, *(shape or (0, 0))), dtype=dtype)
        group_dir = self.root / meta["dir"]
        tensors = []
        for digest in hashes:
            shard_number, n_views = entries[digest]
            tensor = self._handle(group_dir / index["shards"][shard_number], key.group_id).get_tensor(digest)
            if tuple(tensor.shape) != (n_views, *shape):
                raise StaleFeaturesError(f"{digest} in {group_dir} has shape {tuple(tensor.shape)}, expected {(n_views, *shape)}")
            tensors.append(tensor)
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    def lookup(self, model: nn.Module, processor, images: Sequence, role: str, kind: str = "tower",
               image_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Cached ``kind`` features of ``role`` for ``images``, views concatenated in order: ``(n_views, N, D)``.

        Raises :class:`StaleFeaturesError` when the model's or processor's fingerprints changed since the
        build, :class:`MissingFeaturesError` naming the images (``image_ids``, else paths / positions)
        that were never built.
        """
        images = list(images)
        return self.lookup_hashes(cache_key(model, processor, role, kind), [image_hash(i) for i in images],
                                  [_image_label(image, i, image_ids) for i, image in enumerate(images)])

    def missing(self, model: nn.Module, processor, images: Sequence, role: str, kind: str = "tower") -> list[int]:
        """Positions of the images without features for the current fingerprints (all of them for a stale group)."""
        images = list(images)
        key = cache_key(model, processor, role, kind)
        meta = self._top()["groups"].get(key.group_id)
        if meta is None:
            return list(range(len(images)))
        entries = self._group_index(meta)["images"]
        return [i for i, image in enumerate(images) if image_hash(image) not in entries]

    def contains(self, model: nn.Module, processor, images: Sequence, role: str, kind: str = "tower") -> bool:
        """Whether every image has up-to-date ``kind`` features of ``role``."""
        return not self.missing(model, processor, images, role, kind)

    # -------------------------------------------------------------------------- building
    def _register(self, keys: Sequence[CacheKey]) -> None:
        """Add the groups to the top index, and clean their folders of leftovers of killed builds (under the lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.root / ".lock"):
            self._remove_dead_temporaries(self.root)
            self._json_cache.pop(self.index_path, None)
            top = self._top()
            changed = False
            for key in keys:
                group_dir = self.root / key.dirname
                group_dir.mkdir(exist_ok=True)
                if key.group_id not in top["groups"]:
                    top["groups"][key.group_id] = {
                        "role": key.role, "kind": key.kind, "dir": key.dirname, "preprocessing": key.preprocessing,
                        "weights": key.weights, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    }
                    changed = True
                self._clean(group_dir, top["groups"][key.group_id])
            if changed or not self.index_path.exists():
                _write_json_atomic(self.index_path, top)

    @staticmethod
    def _remove_dead_temporaries(folder: Path) -> None:
        for path in folder.glob(".tmp-*"):
            pid = path.name.split("-")[1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                path.unlink(missing_ok=True)

    def _clean(self, group_dir: Path, meta: dict[str, Any]) -> None:
        self._remove_dead_temporaries(group_dir)
        self._json_cache.pop(group_dir / "index.json", None)
        listed = set(self._group_index(meta)["shards"])
        for path in group_dir.glob("*.safetensors"):
            if path.name not in listed and not path.name.startswith(".tmp-"):  # live builders' temporaries stay
                path.unlink(missing_ok=True)  # renamed by a build killed before it indexed the shard

    def _flush(self, key: CacheKey, buffer: dict[str, torch.Tensor]) -> None:
        """Write ``buffer`` (hash -> features) as one shard, then index it atomically."""
        from safetensors.torch import save_file

        if not buffer:
            return
        group_dir = self.root / key.dirname
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        tmp = group_dir / f".tmp-{os.getpid()}-{name}"
        metadata = {"format": f"{FORMAT}/{FORMAT_VERSION}", "group": key.group_id, "role": key.role, "kind": key.kind}
        try:
            save_file(buffer, str(tmp), metadata=metadata)
            _fsync(tmp)
            with _file_lock(self.root / ".lock"):
                index_path = group_dir / "index.json"
                self._json_cache.pop(index_path, None)
                index = self._read_json(index_path, default=None) or {"group": key.group_id, "shards": [], "images": {}}
                first = next(iter(buffer.values()))
                shape, dtype = list(first.shape[1:]), str(first.dtype).removeprefix("torch.")
                if index.get("shape") not in (None, shape) or index.get("dtype") not in (None, dtype):
                    raise ValueError(f"features {shape} {dtype} do not match the group's {index.get('shape')} {index.get('dtype')}")
                index["shape"], index["dtype"] = shape, dtype
                os.replace(tmp, group_dir / name)
                index["shards"].append(name)
                number = len(index["shards"]) - 1
                for digest, tensor in buffer.items():
                    index["images"][digest] = [number, int(tensor.shape[0])]
                _write_json_atomic(index_path, index, compact=True)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        buffer.clear()

    def build(self, model: nn.Module, processor, images: Iterable, roles: Sequence[str] | str | None = None,
              kind: str = "tower", batch_size: int = 8, progress: bool = True, *, use_tower_cache: bool = True,
              total: int | None = None) -> dict[str, Any]:
        """Compute and store the ``kind`` features of ``roles`` (default: every expert) for ``images``.

        Images already cached for the current fingerprints are skipped (so is a second copy of the same
        pixels); the others go through the tower (and projector) ``batch_size`` at a time, in eval mode
        without gradients, on the modules' device. With ``kind="projected"`` and ``use_tower_cache``,
        tower tokens already in the cache are read instead of recomputed. Shows a tqdm bar when
        ``progress``. Returns ``{"images", "computed": {role: n}, "skipped": {role: n}, "shards", "seconds"}``.
        """
        start = time.perf_counter()
        backbone = find_backbone(model)
        roles = list(backbone.expert_order) if roles is None else [roles] if isinstance(roles, str) else list(roles)
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        keys = {role: cache_key(backbone, processor, role, kind) for role in roles}
        tower_keys = {role: cache_key(backbone, processor, role, "tower") for role in roles} if kind == "projected" else {}
        self._register(list(keys.values()))
        image_processor = _image_processor(processor)
        if total is None and hasattr(images, "__len__"):
            total = len(images)
        from tqdm.auto import tqdm

        stats = {"images": 0, "computed": dict.fromkeys(roles, 0), "skipped": dict.fromkeys(roles, 0), "shards": 0}
        buffers: dict[str, dict[str, torch.Tensor]] = {role: {} for role in roles}
        buffered_bytes = dict.fromkeys(roles, 0)
        modules = [backbone.towers[r] for r in roles] + ([backbone.projectors[r] for r in roles] if kind == "projected" else [])
        modes = [m.training for m in modules]
        bar = tqdm(total=total, unit="img", desc=f"astrea cache {kind} [{','.join(roles)}]", disable=not progress)
        try:
            for module in modules:
                module.eval()
            for chunk in _chunks(images, batch_size):
                decoded = [_rgb(image) for image in chunk]
                digests = [image_hash(image) for image in decoded]
                for role in roles:
                    done = self._group_index(self._top()["groups"][keys[role].group_id])["images"]
                    todo: dict[str, Any] = {}
                    for digest, image in zip(digests, decoded):
                        if digest in done or digest in buffers[role] or digest in todo:
                            stats["skipped"][role] += 1
                        else:
                            todo[digest] = image
                    if not todo:
                        continue
                    features = self._compute(backbone, image_processor, role, kind, todo, tower_keys.get(role) if use_tower_cache else None)
                    for digest, tensor in features.items():
                        buffers[role][digest] = tensor
                        buffered_bytes[role] += tensor.numel() * tensor.element_size()
                    stats["computed"][role] += len(todo)
                    if buffered_bytes[role] >= self.shard_max_bytes:
                        self._flush(keys[role], buffers[role])
                        buffered_bytes[role], stats["shards"] = 0, stats["shards"] + 1
                stats["images"] += len(chunk)
                bar.update(len(chunk))
                bar.set_postfix(computed=sum(stats["computed"].values()), skipped=sum(stats["skipped"].values()), refresh=False)
            for role in roles:
                if buffers[role]:
                    self._flush(keys[role], buffers[role])
                    stats["shards"] += 1
        finally:
            bar.close()
            for module, mode in zip(modules, modes):
                module.train(mode)
        stats["seconds"] = round(time.perf_counter() - start, 3)
        return stats

    @torch.no_grad()
    def _compute(self, backbone, image_processor, role: str, kind: str, todo: dict[str, Any],
                 tower_key: CacheKey | None) -> dict[str, torch.Tensor]:
        """Features of the images in ``todo`` (hash -> RGB image): hash -> ``(n_views, N, D)`` CPU tensor."""
        reuse: dict[str, torch.Tensor] = {}
        if tower_key is not None and tower_key.group_id in self._top()["groups"]:
            cached = self._group_index(self._top()["groups"][tower_key.group_id])["images"]
            hits = [d for d in todo if d in cached]
            if hits:
                tokens = self.lookup_hashes(tower_key, hits)
                sizes = [cached[d][1] for d in hits]
                reuse = dict(zip(hits, tokens.split(sizes)))
        compute = [d for d in todo if d not in reuse]
        tokens_by_digest: dict[str, torch.Tensor] = dict(reuse)
        if compute:
            restricted = copy.copy(image_processor)  # pixels of this expert only, by the processor's own code
            restricted.experts = {role: image_processor.experts[role]}
            views = [restricted.image_views(todo[d]) for d in compute]
            pixels = restricted.pixels_for_views([v for item in views for v in item])[f"pixel_values_{role}"]
            tower = backbone.towers[role]
            device = next(tower.parameters(), torch.empty(0)).device
            tokens = backbone.get_tower_tokens(role, pixels.to(device))
            tokens_by_digest.update(zip(compute, tokens.split([len(v) for v in views])))
        out = {}
        digests = list(todo)
        if kind == "projected":
            projector = backbone.projectors[role]
            dtype = projector.layers[0].weight.dtype
            batch = [tokens_by_digest[d] for d in digests]
            device = projector.layers[0].weight.device
            projected = projector(torch.cat(batch).to(device=device, dtype=dtype))
            tokens_by_digest = dict(zip(digests, projected.split([len(t) for t in batch])))
        for digest in digests:
            out[digest] = tokens_by_digest[digest].detach().to("cpu").contiguous().clone()
        return out


# --------------------------------------------------------------------------------- collator
def _example_images(example: dict[str, Any]) -> list:
    images = example.get("images")
    if images is None and example.get("image") is not None:
        images = [example["image"]]
    return list(images or [])


class CachedFeatureCollator:
    """Wraps a VLM collator: cached features in, the cached roles' pixels out.

    Calls ``base_collator(examples)`` (TRL-style: each example has an ``images`` list, or an
    ``image``), then looks up the features of every image of the batch, in order, and sets
    ``batch["tower_features"] = {role: (n_views, N, D_i)}`` for ``tower_roles`` and
    ``batch["expert_features"] = {role: C_i}`` for ``projected_roles``, removing their
    ``pixel_values_<role>``. ``processor`` is the processor the base collator uses.

    Fingerprints are computed here, once; the modules of the cached roles must be frozen (no
    parameter requires grad: tower for ``tower_roles``, tower and projector for ``projected_roles``).
    With ``check_versions`` the cheap version key is re-checked per batch while the model is alive
    in this process (in spawned dataloader workers the construction-time fingerprints are used).
    A stale or missing image raises :class:`StaleFeaturesError` / :class:`MissingFeaturesError`.
    """

    def __init__(self, base_collator, cache: FeatureCache, model: nn.Module, processor,
                 tower_roles: Sequence[str] = (), projected_roles: Sequence[str] = (), *, check_versions: bool = True):
        self.base_collator = base_collator
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        self.processor = processor
        self.tower_roles, self.projected_roles = list(tower_roles), list(projected_roles)
        overlap = set(self.tower_roles) & set(self.projected_roles)
        if overlap:
            raise ValueError(f"roles {sorted(overlap)} are in both tower_roles and projected_roles; pick one kind per role")
        backbone = find_backbone(model)
        for kind, roles in (("tower", self.tower_roles), ("projected", self.projected_roles)):
            for role in roles:
                if role not in backbone.towers:
                    raise ValueError(f"the model has no expert {role!r}; its experts are {list(backbone.towers)}")
                parts = {"tower": backbone.towers[role]}
                if kind == "projected":
                    parts["projector"] = backbone.projectors[role]
                for part, module in parts.items():
                    training = [name for name, p in module.named_parameters() if p.requires_grad]
                    if training:
                        raise ValueError(
                            f"cannot cache the {kind} features of expert {role!r}: its {part} is not frozen "
                            f"({len(training)} parameter(s) require grad, e.g. {training[0]}); cached features of a "
                            f"module that trains go stale at the first step -- freeze it or use "
                            f"{'tower_roles' if kind == 'projected' else 'pixels'} for it"
                        )
        self.keys = {(role, kind): cache_key(backbone, processor, role, kind)
                     for kind, roles in (("tower", self.tower_roles), ("projected", self.projected_roles)) for role in roles}
        self._model_ref = weakref.ref(backbone) if check_versions else None
        self._versions = None  # the tensor versions ``keys`` was last computed at (None: recompute at the next batch)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_model_ref"], state["_versions"] = None, None
        return state

    @staticmethod
    def _tensor_versions(backbone: nn.Module, role: str, kind: str):
        """Storage and in-place version of every tensor the ``kind`` features of ``role`` depend on."""
        modules = [backbone.towers[role]] + ([backbone.projectors[role]] if kind == "projected" else [])
        try:
            return tuple((t.data_ptr(), t._version) for module in modules for t in itertools.chain(module.parameters(), module.buffers()))
        except RuntimeError:  # inference tensors have no version counter
            return None

    def _current_keys(self) -> dict[tuple[str, str], CacheKey]:
        backbone = self._model_ref() if self._model_ref is not None else None
        if backbone is not None:
            # The full key (config and weights fingerprint) is recomputed only when a tensor was
            # written or replaced since the last batch: hashing configs every batch cost ~10 ms a step.
            versions = {(role, kind): self._tensor_versions(backbone, role, kind) for role, kind in self.keys}
            if versions != self._versions or None in versions.values():
                self.keys = {(role, kind): cache_key(backbone, self.processor, role, kind) for role, kind in self.keys}
                self._versions = versions
        return self.keys

    def _batch_views(self, batch) -> int | None:
        """Views in the batch, from its ``<image>`` tokens (None when the processor does not say how many a view has)."""
        token_id, per_view = getattr(self.processor, "image_token_id", None), getattr(self.processor, "num_visual_tokens", None)
        if token_id is None or not per_view or "input_ids" not in batch:
            return None
        return int((torch.as_tensor(batch["input_ids"]) == token_id).sum()) // per_view

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [_example_images(example) for example in examples]  # before the base collator mutates them
        names = [str(example.get("image_id", f"example {i}")) + (f" image {j}" if len(imgs) > 1 else "")
                 for i, (example, imgs) in enumerate(zip(examples, images)) for j in range(len(imgs))]
        cached_roles = self.tower_roles + self.projected_roles
        # An AstreaProcessor can leave the cached experts' pixels out instead of resizing and
        # normalising every image for them only to have them dropped here.
        skipping = getattr(self.processor, "skip_pixels", None)
        with skipping(cached_roles) if skipping is not None else contextlib.nullcontext():
            batch = self.base_collator(examples)
        flat = [image for item in images for image in item]
        if not flat:
            return batch
        hashes = [image_hash(image) for image in flat]
        views = self._batch_views(batch)
        for (role, kind), key in self._current_keys().items():
            features = self.cache.lookup_hashes(key, hashes, names)
            pixels = batch.pop(f"pixel_values_{role}", None)
            n_views = pixels.shape[0] if pixels is not None else views
            if n_views is not None and n_views != features.shape[0]:
                raise ValueError(
                    f"the batch has {n_views} views of expert {role!r} but the cache gives {features.shape[0]}: "
                    f"the base collator's images are not the examples' `images` in order"
                )
            target = batch.get(BATCH_KEYS[kind]) or {}
            batch[BATCH_KEYS[kind]] = {**target, role: features}
        return batch


# ------------------------------------------------------------------------------ data + CLI
def _resolve_image(value, base: Path):
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            from PIL import Image

            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        return str(path if path.is_absolute() else base / path)
    if value is None:
        raise ValueError("an image entry is empty")
    return value  # PIL image, array, tensor


def _record_images(record, base: Path) -> list:
    if isinstance(record, (str, os.PathLike)):
        return [_resolve_image(record, base)]
    if isinstance(record, dict):
        if record.get("images") is not None:
            return [_resolve_image(v, base) for v in record["images"]]
        if "image" in record:
            return [] if record["image"] is None else [_resolve_image(record["image"], base)]
    raise ValueError(f"a --data record must be an image path or a dict with 'image' or 'images', got {str(record)[:80]!r}")


def load_image_list(path: str | os.PathLike) -> list:
    """The images named by a ``--data`` file or folder, in order (paths stay paths: read lazily).

    * ``.json``: a list (or ``{"data" | "records" | "images": [...]}``) of image paths or records with
      ``image`` (a path, or a ``datasets`` ``{"bytes", "path"}`` dict) or ``images`` (a list);
    * ``.jsonl``: one such path (a JSON string) or record per line;
    * a ``datasets`` folder (``save_to_disk``): its ``images`` (list) or ``image`` column, every split;
    * any other folder: its image files (``.png``, ``.jpg``, ...), sorted by name.

    Relative paths are relative to the data file (or folder).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no --data at {path}")
    if path.is_dir():
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any((path / m).is_file() for m in markers):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            splits = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
            images = []
            for split in splits:
                column = "images" if "images" in split.column_names else "image" if "image" in split.column_names else None
                if column is None:
                    raise ValueError(f"{path} has no 'images' or 'image' column (columns: {split.column_names})")
                for value in split[column]:
                    images.extend(_record_images({column: value}, path))
            return images
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no image files and is not a `datasets` folder")
        return [str(p) for p in files]
    base = path.parent
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(records, dict):
            found = next((records[k] for k in ("data", "records", "images") if isinstance(records.get(k), list)), None)
            if found is None:
                raise ValueError(f"{path}: expected a list, or a dict with the list under 'data', 'records' or 'images'")
            records = found
    else:
        raise ValueError(f"--data {path}: use a .json / .jsonl file, a `datasets` folder or a folder of images")
    return [image for record in records for image in _record_images(record, base)]


def build_from_folder(model_dir: str | os.PathLike, data: str | os.PathLike, output: str | os.PathLike,
                      roles: Sequence[str] | None = None, kind: str = "tower", batch_size: int = 8,
                      device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``astrea cache build``: load a saved Astrea folder and its processor, cache ``--data``'s images."""
    from ..modeling import AstreaForConditionalGeneration
    from ..processing import AstreaProcessor

    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not an Astrea folder (no config.json); write one with `astrea create`")
    model = AstreaForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    processor = AstreaProcessor.from_pretrained(str(model_dir))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    images = load_image_list(data)
    stats = FeatureCache(output).build(model, processor, images, roles=roles, kind=kind, batch_size=batch_size,
                                       progress=progress)
    stats["output"] = str(output)
    return stats


__all__ = [
    "BATCH_KEYS",
    "KINDS",
    "CacheKey",
    "CachedFeatureCollator",
    "FeatureCache",
    "FeatureCacheError",
    "MissingFeaturesError",
    "StaleFeaturesError",
    "build_from_folder",
    "cache_key",
    "clear_fingerprint_memo",
    "find_backbone",
    "image_hash",
    "load_image_list",
    "preprocessing_spec",
    "weights_fingerprint",
]
