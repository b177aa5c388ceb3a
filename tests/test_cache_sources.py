"""`astrea cache build` reads the data training reads: a recipe's `data:` section, COCO and LLaVA JSON.

The last test builds a cache from a recipe, points the recipe's `cache_dir` at it, and trains:
the alignment stages find every frozen tower's tokens there (nothing is computed again).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from astrea_vlm.cli import main
from astrea_vlm.configuration import get_preset
from astrea_vlm.train.feature_cache import FeatureCache
from astrea_vlm.train.recipe import load_recipe


def _photos(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for index, name in enumerate(names):
        image = Image.fromarray(rng.integers(0, 256, (20 + 4 * index, 28, 3), dtype=np.uint8))
        image.save(folder / name)
        images.append(image)
    return images


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from astrea_vlm.create import write_folder

    folder = tmp_path_factory.mktemp("model") / "tiny"
    write_folder(get_preset("tiny"), folder)
    return folder


def _model(folder):
    from astrea_vlm.modeling import AstreaForConditionalGeneration
    from astrea_vlm.processing import AstreaProcessor

    return AstreaForConditionalGeneration.from_pretrained(folder).eval(), AstreaProcessor.from_pretrained(folder)


def _coco(tmp_path):
    images = _photos(tmp_path / "coco" / "train2017", ["a.png", "b.png", "c.png"])
    entries = [{"id": i, "file_name": name, "width": im.width, "height": im.height}
               for i, (name, im) in enumerate(zip(["a.png", "b.png", "c.png"], images), start=1)]
    captions = {"images": entries, "annotations": [{"id": 10 + i, "image_id": i, "caption": f"picture {i}"} for i in (1, 2, 3)]}
    instances = {"images": entries, "categories": [{"id": 1, "name": "dog"}],
                 "annotations": [{"id": 20, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25}]}
    (tmp_path / "coco" / "captions_train2017.json").write_text(json.dumps(captions))
    (tmp_path / "coco" / "instances_train2017.json").write_text(json.dumps(instances))
    return images


@pytest.mark.parametrize("annotations", ["captions", "instances"])
def test_coco_json_with_its_image_folder(tmp_path, tiny_folder, capsys, annotations):
    images = _coco(tmp_path)
    data = tmp_path / "coco" / f"{annotations}_train2017.json"
    cache = tmp_path / "cache"
    assert main(["cache", "build", "--model", str(tiny_folder), "--data", str(data), "--images",
                 str(tmp_path / "coco" / "train2017"), "--output", str(cache), "--roles", "caption"]) == 0
    assert 'computed {"caption": 3}' in capsys.readouterr().out
    model, processor = _model(tiny_folder)
    assert FeatureCache(cache).contains(model, processor, images, "caption")


def test_coco_json_without_its_image_folder_says_so(tmp_path, tiny_folder, capsys):
    _coco(tmp_path)
    assert main(["cache", "build", "--model", str(tiny_folder), "--data", str(tmp_path / "coco" / "captions_train2017.json"),
                 "--output", str(tmp_path / "cache")]) == 2
    assert "pass --images DIR" in capsys.readouterr().err


def test_llava_json_with_its_image_folder(tmp_path, tiny_folder, capsys):
    images = _photos(tmp_path / "llava_images" / "coco", ["x.png", "y.png"])
    records = [
        {"id": "1", "image": "coco/x.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]},
        {"id": "2", "image": "coco/y.png", "conversations": [{"from": "human", "value": "<image>\nAnd?"}, {"from": "gpt", "value": "B."}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]},
    ]
    data = tmp_path / "llava_instruct.json"
    data.write_text(json.dumps(records))
    assert main(["cache", "build", "--model", str(tiny_folder), "--data", str(data), "--images", str(tmp_path / "llava_images"),
                 "--output", str(tmp_path / "cache"), "--roles", "detection"]) == 0
    assert 'computed {"detection": 2}' in capsys.readouterr().out
    model, processor = _model(tiny_folder)
    assert FeatureCache(tmp_path / "cache").contains(model, processor, images, "detection")


def test_recipe_data_section_with_coco(tmp_path, tiny_folder, capsys):
    images = _coco(tmp_path)
    recipe = tmp_path / "coco.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_folder)},
        "data": {"source": "coco", "images": str(tmp_path / "coco" / "train2017"),
                 "coco_captions": str(tmp_path / "coco" / "captions_train2017.json")},
        "output_dir": str(tmp_path / "run"),
    }))
    assert main(["cache", "build", "--recipe", str(recipe), "--roles", "segmentation"]) == 0
    out = capsys.readouterr().out
    assert 'computed {"segmentation": 3}' in out and str(tmp_path / "run" / "feature_cache") in out
    model, processor = _model(tiny_folder)
    assert FeatureCache(tmp_path / "run" / "feature_cache").contains(model, processor, images, "segmentation")


def test_training_reads_a_cache_built_from_its_recipe(tmp_path, capsys):
    from astrea_vlm.train.run import run_align

    cache = tmp_path / "prebuilt"
    body = {
        "model": {"preset": "tiny", "seed": 0},
        "data": {"source": "synthetic", "train_size": 6, "image_size": 40, "seed": 0, "max_objects": 3},
        "optim": {"per_device_train_batch_size": 3},
        "align": {"max_steps": 1, "learning_rate": 2.0e-3, "trainable": ["projector", "bridge"]},
        "output_dir": str(tmp_path / "run"),
        "save_steps": 100,
        "cache_dir": str(cache),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    assert load_recipe(path).feature_cache_dir() == cache
    assert main(["cache", "build", "--recipe", str(path)]) == 0
    built = capsys.readouterr().out
    assert '"caption": 6' in built and str(cache) in built  # six distinct scenes, every expert
    lines: list[str] = []
    run_align(load_recipe(path), log=lines.append)
    towers = [line for line in lines if line.startswith("feature cache (tower")]
    assert towers and all(" 0 computed" in line for line in towers), towers
    assert not (tmp_path / "run" / "feature_cache").exists()
