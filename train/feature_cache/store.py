"""The on-disk store of cached features: memory-mapped safetensors shards, crash-safe writes.

Layout, crash safety and staleness rules: ``docs/feature_cache.md``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import json
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import TEMPORARY_PREFIX, fsync_file, remove_dead_temporaries, temporary_path, write_json_atomic
from ..sharding import barrier, is_rank_zero, is_sharded
from .keys import FORMAT, FORMAT_VERSION, CacheKey, astrea_image_processor, cache_key, find_backbone, image_hash, rgb_image


def _same_on_every_rank(todo: dict[str, Any], by_digest: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's ``todo`` (digest -> image) on every rank (images from each rank's own ``by_digest``)."""
    import torch.distributed as dist

    chosen = [list(todo)]
    dist.broadcast_object_list(chosen, src=0)
    return {digest: by_digest[digest] for digest in chosen[0]}


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
            remove_dead_temporaries(self.root)
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
                write_json_atomic(self.index_path, top)

    def _clean(self, group_dir: Path, meta: dict[str, Any]) -> None:
        remove_dead_temporaries(group_dir)
        self._json_cache.pop(group_dir / "index.json", None)
        listed = set(self._group_index(meta)["shards"])
        for path in group_dir.glob("*.safetensors"):
            if path.name not in listed and not path.name.startswith(TEMPORARY_PREFIX):  # live builders' temporaries stay
                path.unlink(missing_ok=True)  # renamed by a build killed before it indexed the shard

    def _flush(self, key: CacheKey, buffer: dict[str, torch.Tensor]) -> None:
        """Write ``buffer`` (hash -> features) as one shard, then index it atomically."""
        from safetensors.torch import save_file

        if not buffer:
            return
        group_dir = self.root / key.dirname
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        tmp = temporary_path(group_dir / name)
        metadata = {"format": f"{FORMAT}/{FORMAT_VERSION}", "group": key.group_id, "role": key.role, "kind": key.kind}
        try:
            save_file(buffer, str(tmp), metadata=metadata)
            fsync_file(tmp)
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
                write_json_atomic(index_path, index, compact=True)
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
        # A model sharded with FSDP2 computes collectively: every rank runs the same images through
        # the towers, rank 0 decides which (its view of the cache) and alone writes.
        sharded = is_sharded(backbone)
        writer = not sharded or is_rank_zero()
        keys = {role: cache_key(backbone, processor, role, kind) for role in roles}
        tower_keys = {role: cache_key(backbone, processor, role, "tower") for role in roles} if kind == "projected" else {}
        if writer:
            self._register(list(keys.values()))
        if sharded:
            barrier()
        image_processor = astrea_image_processor(processor)
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
                decoded = [rgb_image(image) for image in chunk]
                digests = [image_hash(image) for image in decoded]
                for role in roles:
                    todo: dict[str, Any] = {}
                    if writer:
                        done = self._group_index(self._top()["groups"][keys[role].group_id])["images"]
                        for digest, image in zip(digests, decoded):
                            if not (digest in done or digest in buffers[role] or digest in todo):
                                todo[digest] = image
                    if sharded:
                        todo = _same_on_every_rank(todo, dict(zip(digests, decoded)))
                    stats["skipped"][role] += len(chunk) - len(todo)
                    if not todo:
                        continue
                    features = self._compute(backbone, image_processor, role, kind, todo, tower_keys.get(role) if use_tower_cache else None)
                    stats["computed"][role] += len(todo)
                    if not writer:
                        continue
                    for digest, tensor in features.items():
                        buffers[role][digest] = tensor
                        buffered_bytes[role] += tensor.numel() * tensor.element_size()
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
        if sharded:
            barrier()  # nobody reads the cache before rank 0 has written it
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
            batch = restricted.pixels_for_views([v for item in views for v in item])
            pixels, mask = batch[f"pixel_values_{role}"], batch.get(f"pixel_mask_{role}")
            tower = backbone.towers[role]
            device = next(tower.parameters(), torch.empty(0)).device
            tokens = backbone.get_tower_tokens(role, pixels.to(device), None if mask is None else mask.to(device))
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
