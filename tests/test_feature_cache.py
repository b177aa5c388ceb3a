"""FeatureCache / CachedFeatureCollator / `astrea cache build` on the tiny preset (see astrea_vlm.train.feature_cache)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from astrea_vlm.configuration import get_preset
from astrea_vlm.modeling import AstreaForConditionalGeneration
from astrea_vlm.processing import build_processor
from astrea_vlm.cli import load_image_list
from astrea_vlm.train import feature_cache as fc
from astrea_vlm.train.feature_cache import (
    CachedFeatureCollator,
    FeatureCache,
    MissingFeaturesError,
    StaleFeaturesError,
    cache_key,
    image_hash,
)
from PIL import Image

ROLES = ["caption", "classification", "detection", "segmentation"]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 24 + i, 3), dtype=np.uint8)) for i in range(n)]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    config = get_preset("tiny")
    return AstreaForConditionalGeneration(config).eval(), build_processor(config)


@pytest.fixture(scope="module")
def setup():
    return _model()


def _count_tower_calls(model) -> tuple[dict[str, int], list]:
    calls = dict.fromkeys(model.model.towers, 0)
    handles = []
    for role, tower in model.model.towers.items():
        def hook(module, args, output, role=role):
            calls[role] += 1
        handles.append(tower.register_forward_hook(hook))
    return calls, handles


def _text_inputs(processor, images):
    inputs = processor(images=images, text=[f"<image> describe {i}" for i in range(len(images))], return_tensors="pt")
    return inputs, {k: v for k, v in inputs.items() if not k.startswith(("pixel_values_", "pixel_mask_"))}


# --------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("kind", ["tower", "projected"])
def test_cached_features_give_the_logits_of_pixels(setup, tmp_path, kind):
    model, processor = setup
    images = _images(4)
    cache = FeatureCache(tmp_path / "cache")
    cache.build(model, processor, images, kind=kind, batch_size=len(images), progress=False)
    inputs, text_only = _text_inputs(processor, images)
    features = {role: cache.lookup(model, processor, images, role, kind) for role in ROLES}
    assert features["caption"].shape == ((4, 16, 32) if kind == "tower" else (4, 16, 64))
    calls, handles = _count_tower_calls(model)
    with torch.no_grad():
        reference = model(**inputs)
        cached = model(**text_only, **{fc.BATCH_KEYS[kind]: features})
    for handle in handles:
        handle.remove()
    assert calls == dict.fromkeys(ROLES, 1)  # the reference forward only: the cached one runs no tower
    torch.testing.assert_close(cached.logits, reference.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached.router_probs, reference.router_probs, atol=1e-6, rtol=0)


def test_alignment_stage_mixes_projected_earlier_experts_and_tower_tokens(setup, tmp_path):
    model, processor = setup
    images = _images(3)
    cache = FeatureCache(tmp_path)
    cache.build(model, processor, images, roles=["caption", "classification"], kind="projected", batch_size=3, progress=False)
    cache.build(model, processor, images, roles=["detection"], kind="tower", batch_size=3, progress=False)
    inputs, text_only = _text_inputs(processor, images)
    model.model.set_alignment_stage("detection")
    try:
        with torch.no_grad():
            reference = model(**inputs).logits
            cached = model(
                **text_only,
                expert_features={r: cache.lookup(model, processor, images, r, "projected") for r in ["caption", "classification"]},
                tower_features={"detection": cache.lookup(model, processor, images, "detection")},
            ).logits
    finally:
        model.model.set_alignment_stage(None)
    torch.testing.assert_close(cached, reference, atol=1e-6, rtol=0)


def test_anyres_views_are_cached_per_image_in_processor_order(setup, tmp_path):
    model, _ = setup
    processor = build_processor(model.config, image_grid_pinpoints=[[32, 64], [64, 32]], tile_size=32)
    images = _images(2)
    cache = FeatureCache(tmp_path)
    cache.build(model, processor, images, roles=["caption"], batch_size=1, progress=False)
    pixels = processor.image_processor(images)["pixel_values_caption"]
    assert pixels.shape[0] == 6  # each image: itself + 2 tiles
    with torch.no_grad():
        expected = model.model.get_tower_tokens("caption", pixels)
    torch.testing.assert_close(cache.lookup(model, processor, images[::-1], "caption"),
                               torch.cat([expected[3:], expected[:3]]), atol=1e-6, rtol=0)
    with pytest.raises(StaleFeaturesError, match="image_grid_pinpoints"):  # tiling is part of the preprocessing key
        cache.lookup(model, build_processor(model.config), images, "caption")


# ------------------------------------------------------------------------------- recompute
def test_build_twice_does_not_recompute(setup, tmp_path):
    model, processor = setup
    images = _images(5)
    cache = FeatureCache(tmp_path)
    calls, handles = _count_tower_calls(model)
    try:
        first = cache.build(model, processor, images + [images[0].copy()], roles=["caption", "segmentation"], batch_size=2,
                            progress=False)
        assert first["computed"] == {"caption": 5, "segmentation": 5} and first["skipped"]["caption"] == 1  # duplicate pixels
        assert calls == {"caption": 3, "classification": 0, "detection": 0, "segmentation": 3}
        again = cache.build(model, processor, images, roles=["caption", "segmentation"], batch_size=2, progress=False)
        assert again["computed"] == {"caption": 0, "segmentation": 0} and again["shards"] == 0
        assert calls["caption"] == 3 and calls["segmentation"] == 3
        more = _images(2, seed=1)
        grown = FeatureCache(tmp_path).build(model, processor, images + more, roles=["caption"], batch_size=8, progress=False)
        assert grown["computed"] == {"caption": 2} and calls["caption"] == 4
        # projected features reuse the cached tower tokens: only the projector runs
        projected = cache.build(model, processor, images + more, roles=["caption"], kind="projected", progress=False)
        assert projected["computed"] == {"caption": 7} and calls["caption"] == 4
    finally:
        for handle in handles:
            handle.remove()
    pixels = processor.image_processor(images + more)["pixel_values_caption"]
    with torch.no_grad():
        expected = model.model.projectors["caption"](model.model.get_tower_tokens("caption", pixels))
    torch.testing.assert_close(cache.lookup(model, processor, images + more, "caption", "projected"), expected, atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------- staleness
def test_changed_tower_weight_is_stale(tmp_path):
    model, processor = _model()
    images = _images(2)
    cache = FeatureCache(tmp_path)
    for kind in ("tower", "projected"):
        cache.build(model, processor, images, roles=["caption", "classification"], kind=kind, progress=False)
    param = next(model.model.towers["caption"].parameters())
    original = param.detach().clone()
    with torch.no_grad():
        param.add_(0.01)
    for kind in ("tower", "projected"):
        with pytest.raises(StaleFeaturesError, match="tower weights") as error:
            cache.lookup(model, processor, images, "caption", kind)
        assert isinstance(error.value, KeyError) and "caption" in str(error.value)
        assert not cache.contains(model, processor, images, "caption", kind)
        assert cache.contains(model, processor, images, "classification", kind)  # other experts unaffected
    with torch.no_grad():  # undone: the features are valid again
        param.copy_(original)
    torch.testing.assert_close(cache.lookup(model, processor, images, "caption"), cache.lookup(model, processor, images, "caption"))
    patch = model.model.towers["caption"].model.embeddings.patch_embedding  # a replaced tensor is noticed too
    patch.weight = torch.nn.Parameter(patch.weight.detach() * 2, requires_grad=False)
    with pytest.raises(StaleFeaturesError):
        cache.lookup(model, processor, images, "caption")


def test_weights_changed_through_data_need_clearing_the_memo(tmp_path):
    model, processor = _model()
    cache = FeatureCache(tmp_path)
    cache.build(model, processor, _images(1), roles=["caption"], progress=False)
    next(model.model.towers["caption"].parameters()).data.mul_(1.5)  # bypasses autograd's version counter
    fc.clear_fingerprint_memo()
    with pytest.raises(StaleFeaturesError):
        cache.lookup(model, processor, _images(1), "caption")


def test_changed_projector_weight_is_stale_only_for_projected(tmp_path):
    model, processor = _model()
    images = _images(2)
    cache = FeatureCache(tmp_path)
    for kind in ("tower", "projected"):
        cache.build(model, processor, images, roles=["detection"], kind=kind, progress=False)
    with torch.no_grad():
        model.model.projectors["detection"].layers[2].bias.add_(1.0)
    with pytest.raises(StaleFeaturesError, match="projector weights") as error:
        cache.lookup(model, processor, images, "detection", "projected")
    assert "tower weights" not in str(error.value)
    cache.lookup(model, processor, images, "detection", "tower")  # tower tokens do not depend on the projector


@pytest.mark.parametrize(("field", "value"), [("size", 48), ("image_mean", [0.4, 0.5, 0.6]), ("image_std", [0.3, 0.3, 0.3]),
                                              ("resample", "bilinear")])
def test_changed_processor_is_stale(setup, tmp_path, field, value):
    model, processor = setup
    images = _images(2)
    cache = FeatureCache(tmp_path)
    cache.build(model, processor, images, roles=["caption"], progress=False)
    changed = copy.deepcopy(processor)
    changed.image_processor.experts["caption"][field] = value
    with pytest.raises(StaleFeaturesError, match=f"preprocessing {field}") as error:
        cache.lookup(model, changed, images, "caption")
    assert error.value.differences == [f"preprocessing {field} {processor.image_processor.experts['caption'][field]!r} -> {value!r}"]
    torch.testing.assert_close(cache.lookup(model, processor, images, "caption"),
                               cache.lookup(model, copy.deepcopy(processor), images, "caption"))


def test_missing_images_and_roles_are_named(setup, tmp_path):
    model, processor = setup
    images = _images(3)
    cache = FeatureCache(tmp_path)
    with pytest.raises(MissingFeaturesError, match="no tower features of expert 'caption'"):
        cache.lookup(model, processor, images, "caption")
    cache.build(model, processor, images[:2], roles=["caption"], progress=False)
    with pytest.raises(KeyError) as error:
        cache.lookup(model, processor, images, "caption", image_ids=["a", "b", "c"])
    assert isinstance(error.value, MissingFeaturesError) and error.value.missing == [f"c (sha256 {image_hash(images[2])[:12]})"]
    assert "1 of 3 image(s)" in str(error.value)
    assert cache.missing(model, processor, images, "caption") == [2]
    assert cache.missing(model, processor, images, "caption", "projected") == [0, 1, 2]


def test_image_hash_is_of_decoded_pixels_not_file_bytes(tmp_path):
    image = _images(1)[0]
    image.save(tmp_path / "a.png")
    image.save(tmp_path / "b.png", compress_level=0)
    image.convert("RGBA").save(tmp_path / "c.png")
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    digests = {image_hash(x) for x in (image, tmp_path / "a.png", str(tmp_path / "b.png"), tmp_path / "c.png", np.asarray(image))}
    assert len(digests) == 1
    assert image_hash(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) not in digests
    flat = Image.new("RGB", (6, 4), "red")
    assert image_hash(flat) != image_hash(Image.new("RGB", (4, 6), "red"))  # same bytes, other size


def test_reloaded_model_and_processor_keep_their_keys(setup, tmp_path):
    model, processor = setup
    from astrea_vlm.processing import AstreaProcessor

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AstreaForConditionalGeneration.from_pretrained(tmp_path)
    reprocessor = AstreaProcessor.from_pretrained(tmp_path)
    for role in ROLES:
        for kind in fc.KINDS:
            assert cache_key(reloaded, reprocessor, role, kind).group_id == cache_key(model, processor, role, kind).group_id


# ------------------------------------------------------------------------------ the files
def test_files_are_safetensors_with_a_json_index_read_memory_mapped(setup, tmp_path):
    from safetensors import safe_open

    model, processor = setup
    images = _images(4)
    writer = FeatureCache(tmp_path, shard_max_bytes=1)  # one shard per batch
    writer.build(model, processor, images, roles=["caption"], batch_size=2, progress=False)
    top = json.loads((tmp_path / "index.json").read_text())
    assert top["format"] == "astrea-feature-cache" and top["version"] == 1
    (group_id, meta), = top["groups"].items()
    assert meta["role"] == "caption" and meta["kind"] == "tower" and meta["preprocessing"]["size"] == 32
    assert set(meta["weights"]) == {"tower"}
    index = json.loads((tmp_path / meta["dir"] / "index.json").read_text())
    assert index["shape"] == [16, 32] and index["dtype"] == "float32" and len(index["shards"]) == 2
    assert set(index["images"]) == {image_hash(i) for i in images}
    files = sorted(p.name for p in (tmp_path / meta["dir"]).iterdir())
    assert files == sorted(index["shards"] + ["index.json"])
    for name in index["shards"]:
        with safe_open(str(tmp_path / meta["dir"] / name), framework="pt") as shard:
            assert shard.metadata()["group"] == group_id and len(list(shard.keys())) == 2

    reader = pickle.loads(pickle.dumps(FeatureCache(tmp_path)))  # a fresh object (as in a dataloader worker)
    got = reader.lookup(model, processor, images[::-1], "caption")
    assert len(reader._handles) == 2  # shards opened with safe_open (mmap), kept open
    pixels = processor.image_processor(images[::-1])["pixel_values_caption"]
    with torch.no_grad():
        torch.testing.assert_close(got, model.model.get_tower_tokens("caption", pixels), atol=1e-6, rtol=0)
    more = _images(1, seed=3)
    writer.build(model, processor, more, roles=["caption"], progress=False)
    assert reader.contains(model, processor, images + more, "caption")  # index changes are seen without reopening


def test_a_killed_build_leaves_no_corrupt_shard(tmp_path, monkeypatch):
    from safetensors import safe_open

    model, processor = _model()
    images = _images(6)
    cache = FeatureCache(tmp_path, shard_max_bytes=1)
    calls = {"n": 0}

    def die(module, args, output):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")

    handle = model.model.towers["caption"].register_forward_hook(die)
    with pytest.raises(KeyboardInterrupt):
        cache.build(model, processor, images, roles=["caption"], batch_size=1, progress=False)
    handle.remove()
    (meta,) = cache.groups().values()
    group_dir = tmp_path / meta["dir"]
    index = json.loads((group_dir / "index.json").read_text())
    assert len(index["images"]) == 3 and not [p for p in group_dir.iterdir() if p.name.startswith(".tmp-")]
    for name in index["shards"]:
        with safe_open(str(group_dir / name), framework="pt") as shard:
            assert all(shard.get_tensor(k).shape == (1, 16, 32) for k in shard.keys())  # noqa: SIM118 (safe_open)

    # a crash while writing a shard: the partial temporary file is removed
    import safetensors.torch  # FeatureCache imports save_file at each flush

    def partial_save(tensors, path, metadata=None):
        with open(path, "wb") as out:
            out.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", partial_save)
    with pytest.raises(OSError, match="disk full"):
        cache.build(model, processor, images, roles=["caption"], batch_size=1, progress=False)
    monkeypatch.undo()
    assert not [p for p in group_dir.iterdir() if p.name.startswith(".tmp-")]

    # leftovers of a SIGKILL: a temporary file of a dead process, a shard renamed but never indexed
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    (group_dir / f".tmp-{dead}-shard-x.safetensors").write_bytes(b"partial")
    (group_dir / "shard-orphan.safetensors").write_bytes(b"not indexed")
    live = group_dir / f".tmp-{os.getpid()}-shard-being-written.safetensors"  # another live builder's: kept
    live.write_bytes(b"in progress")
    stats = cache.build(model, processor, images, roles=["caption"], batch_size=1, progress=False)
    assert live.exists()
    live.unlink()
    assert stats["computed"] == {"caption": 3} and stats["skipped"] == {"caption": 3}
    assert sorted(p.name for p in group_dir.iterdir()) == sorted(json.loads((group_dir / "index.json").read_text())["shards"]
                                                                 + ["index.json"])
    pixels = processor.image_processor(images)["pixel_values_caption"]
    with torch.no_grad():
        expected = model.model.get_tower_tokens("caption", pixels)
    torch.testing.assert_close(FeatureCache(tmp_path).lookup(model, processor, images, "caption"), expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ collator
def _examples(images):
    def row(imgs, text):
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}]
        return {"messages": [{"role": "user", "content": content},
                             {"role": "assistant", "content": [{"type": "text", "text": f"answer to {text}"}]}],
                "images": list(imgs)}

    return [row(images[:1], "what is it?"), row(images[1:3], "compare them"), row(images[3:4], "colours?")]


@pytest.mark.parametrize("stage", [None, "detection"])
def test_collator_swaps_pixels_for_cached_features(tmp_path, stage):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    model, processor = _model()
    images = _images(4)
    cache = FeatureCache(tmp_path)
    if stage is None:
        tower_roles, projected_roles = ROLES, []
    else:
        model.model.set_alignment_stage(stage)
        tower_roles, projected_roles = [stage], ["caption", "classification"]
        for role in projected_roles:
            model.model.projectors[role].requires_grad_(False)
    cache.build(model, processor, images, roles=tower_roles, kind="tower", batch_size=4, progress=False)
    if projected_roles:
        cache.build(model, processor, images, roles=projected_roles, kind="projected", batch_size=4, progress=False)
    base = DataCollatorForVisionLanguageModeling(processor)
    collator = CachedFeatureCollator(base, cache, model, processor, tower_roles=tower_roles, projected_roles=projected_roles)
    collator = pickle.loads(pickle.dumps(collator))  # as sent to a spawned dataloader worker
    reference = base(copy.deepcopy(_examples(images)))
    processed_roles = []
    pixels_for_views = collator.processor.image_processor.pixels_for_views

    def recording(views, return_tensors="pt", roles=None):
        processed_roles.append(list(roles) if roles is not None else ROLES)
        return pixels_for_views(views, return_tensors, roles)

    collator.processor.image_processor.pixels_for_views = recording
    batch = collator(copy.deepcopy(_examples(images)))
    # the cached experts' pixels were never computed, and the processor is back to normal afterwards
    assert processed_roles == [[role for role in ROLES if role not in tower_roles + projected_roles]]
    assert collator.processor._skipped_pixel_roles == frozenset()
    for role in tower_roles + projected_roles:
        assert f"pixel_values_{role}" not in batch
    assert set(batch["tower_features"]) == set(tower_roles)
    assert set(batch.get("expert_features", {})) == set(projected_roles)
    assert batch["tower_features"][tower_roles[0]].shape[0] == 4
    calls, handles = _count_tower_calls(model)
    with torch.no_grad():
        want = model(**reference)
        got = model(**batch)
    for handle in handles:
        handle.remove()
    active = ROLES if stage is None else ROLES[: ROLES.index(stage) + 1]
    assert calls == {role: int(role in active) for role in ROLES}  # the cached forward ran no tower
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)
    assert torch.equal(batch["labels"], reference["labels"])


def test_collator_refuses_modules_that_train_and_stale_batches(tmp_path):
    model, processor = _model()
    images = _images(2)
    cache = FeatureCache(tmp_path)
    cache.build(model, processor, images, roles=["caption"], kind="projected", progress=False)

    def base(examples):
        return processor(images=[e["images"] for e in examples], text=["<image>"] * len(examples), return_tensors="pt")

    with pytest.raises(ValueError, match="projector is not frozen"):
        CachedFeatureCollator(base, cache, model, processor, projected_roles=["caption"])
    model.model.projectors["caption"].requires_grad_(False)
    collator = CachedFeatureCollator(base, str(tmp_path), model, processor, projected_roles=["caption"])
    examples = [{"images": [image], "image_id": f"img{i}"} for i, image in enumerate(images)]
    assert collator(examples)["expert_features"]["caption"].shape == (2, 16, 64)
    def one_image_only(examples):  # a base collator that loses an image: 1 view against 2 cached
        return processor(images=[examples[0]["images"]], text=["<image>"], return_tensors="pt")

    with pytest.raises(ValueError, match="1 views of expert 'caption' but the cache gives 2"):
        CachedFeatureCollator(one_image_only, cache, model, processor, projected_roles=["caption"])(examples)
    with torch.no_grad():
        model.model.projectors["caption"].layers[0].weight.mul_(2)
    with pytest.raises(StaleFeaturesError, match="projector weights"):  # re-checked per batch
        collator(examples)
    cache.build(model, processor, images, roles=["caption"], kind="tower", progress=False)
    with pytest.raises(MissingFeaturesError, match=r"1 of 2 image\(s\).*: new \(sha256"):
        CachedFeatureCollator(base, cache, model, processor, tower_roles=["caption"])(
            [examples[0], {"images": _images(1, seed=9), "image_id": "new"}])


# ----------------------------------------------------------------------------------- CLI
def test_cli_cache_build_on_a_written_folder(tmp_path, capsys):
    from astrea_vlm.processing import AstreaProcessor

    from astrea_vlm.cli import main
    from astrea_vlm.create import write_folder

    write_folder(get_preset("tiny"), tmp_path / "model")
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    images = _images(3)
    for i, image in enumerate(images):
        image.save(tmp_path / "data" / "imgs" / f"{i}.png")
    data = tmp_path / "data" / "images.json"
    data.write_text(json.dumps(["imgs/0.png", {"image": "imgs/1.png"}, {"images": ["imgs/2.png", "imgs/0.png"]}]))
    assert main(["cache", "build", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(tmp_path / "cache"),
                 "--roles", "caption,segmentation", "--batch-size", "2"]) == 0
    out = capsys.readouterr()
    assert "100%" in out.err and "4/4" in out.err and "img/s" in out.err  # the tqdm progress bar
    assert 'computed {"caption": 3, "segmentation": 3}' in out.out
    model = AstreaForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    processor = AstreaProcessor.from_pretrained(tmp_path / "model")
    cache = FeatureCache(tmp_path / "cache")
    paths = [tmp_path / "data" / "imgs" / f"{i}.png" for i in range(3)]
    pixels = processor.image_processor(paths)["pixel_values_segmentation"]
    with torch.no_grad():
        expected = model.model.get_tower_tokens("segmentation", pixels)
    torch.testing.assert_close(cache.lookup(model, processor, images, "segmentation"), expected, atol=1e-6, rtol=0)
    assert not cache.contains(model, processor, images, "detection")

    jsonl = tmp_path / "data" / "more.jsonl"
    jsonl.write_text('"imgs/0.png"\n{"image": "imgs/1.png"}\n')
    assert main(["cache", "build", "--model", str(tmp_path / "model"), "--data", str(jsonl), "--output", str(tmp_path / "cache"),
                 "--roles", "caption", "--kind", "projected"]) == 0
    assert cache.contains(model, processor, images[:2], "caption", "projected")


def test_load_image_list_formats(tmp_path):
    import datasets

    images = _images(2)
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(images):
        image.save(tmp_path / "imgs" / f"{i}.png")
    assert load_image_list(tmp_path / "imgs") == [str(tmp_path / "imgs" / "0.png"), str(tmp_path / "imgs" / "1.png")]
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"image": "imgs/1.png"}, {"image": None}]}))
    assert load_image_list(tmp_path / "d.json") == [str(tmp_path / "imgs" / "1.png")]
    ds = datasets.Dataset.from_dict({"images": [[str(tmp_path / "imgs" / "0.png")], []]},
                                    features=datasets.Features({"images": datasets.List(datasets.Image())}))
    ds.save_to_disk(str(tmp_path / "ds"))
    loaded = load_image_list(tmp_path / "ds")
    assert len(loaded) == 1 and image_hash(loaded[0]) == image_hash(images[0])
    with pytest.raises(ValueError, match="must be an image path"):
        (tmp_path / "bad.json").write_text(json.dumps([{"file": "x"}]))
        load_image_list(tmp_path / "bad.json")
    assert os.path.isdir(tmp_path / "ds")
