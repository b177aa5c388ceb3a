"""Training data (astrea_vlm.train.data): text forms, COCO / tags / LLaVA loaders, malformed-record
reports, cumulative pre-alignment stages in any order, and rows that TRL's VLM collator accepts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from astrea_vlm.train import data as D
from astrea_vlm.train import synthetic as syn

# ====================================================================== text forms and geometry


def test_box_text_is_the_0_1000_integer_grid():
    assert D.format_box((0.1, 0.25, 0.4, 0.5)) == "[100, 250, 400, 500]"
    assert D.format_box((0.0, 0.0004, 0.9996, 1.2)) == "[0, 0, 1000, 1000]"
    assert D.format_box((0.0005, 0.0015, 0.5, 1)) == "[1, 2, 500, 1000]"  # half rounds up
    assert D.parse_labelled_boxes("red circle [100, 250, 400, 500]; blue star [0, 1, 2, 3]") == [
        ("red circle", (0.1, 0.25, 0.4, 0.5)),
        ("blue star", (0.0, 0.001, 0.002, 0.003)),
    ]
    assert D.parse_boxes("dog [100, 100, 400, 500]") == [(0.1, 0.1, 0.4, 0.5)]  # eval's reader agrees
    with pytest.raises(ValueError, match="four finite numbers"):
        D.format_box((0.1, 0.2, 0.3))


def test_rle_uncompressed_and_compressed_round_trip():
    mask = np.zeros((5, 4), bool)
    mask[1:3, 1:3] = True
    mask[4, 3] = True
    rle = D.rle_encode(mask)
    # column-major, zeros first: col0 (5) + col1 row0 -> 6 zeros; col1 rows 1-2 -> 2 ones; col1 rows 3-4 + col2 row0
    # -> 3 zeros; col2 rows 1-2 -> 2 ones; col2 rows 3-4 + col3 rows 0-3 -> 6 zeros; col3 row4 -> 1 one
    assert rle == {"size": [5, 4], "counts": [6, 2, 3, 2, 6, 1]}
    assert np.array_equal(D.rle_decode(rle), mask)
    assert D.rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]
    # pycocotools' string code, by hand: 3 -> '3', 202 -> 'Z6' (two 5-bit groups), deltas from counts[i-2] after i=2
    assert D.rle_counts_to_string([3, 2, 5]) == "325"
    assert D.rle_counts_to_string([202]) == "Z6"
    assert D.rle_counts_to_string([5, 5, 3, 2]) == "553M"  # 2 - 5 = -3 -> 'M' (sign bit 0x10)
    for counts in ([3, 2, 5], [202], [5, 5, 3, 2], [0, 4], rle["counts"], [1000, 37, 120000, 5, 0, 77]):
        assert D.rle_string_to_counts(D.rle_counts_to_string(counts)) == counts
    compressed = {"size": [5, 4], "counts": D.rle_counts_to_string(rle["counts"])}
    assert np.array_equal(D.rle_decode(compressed), mask)
    with pytest.raises(ValueError, match="sum to"):
        D.rle_decode({"size": [5, 4], "counts": [6, 2]})


def test_mask_polygons_follow_pixel_edges_and_simplify_to_the_budget():
    mask = np.zeros((6, 8), bool)
    mask[1:5, 2:4] = True  # an L: a 4x2 column and a 1x3 foot
    mask[4, 4:7] = True
    (poly,) = D.mask_to_polygons(mask)
    assert poly == [(2.0, 1.0), (4.0, 1.0), (4.0, 4.0), (7.0, 4.0), (7.0, 5.0), (2.0, 5.0)]
    assert D.polygon_area(poly) == mask.sum()
    # largest component first
    mask[0, 7] = True
    assert [len(p) for p in D.mask_to_polygons(mask)] == [6, 4]
    circle = np.hypot(*np.mgrid[-20:21, -20:21]) <= 18
    outline = D.mask_to_polygons(circle)[0]
    assert len(outline) > 40
    simple = D.simplify_polygon(outline, max_vertices=8)
    assert len(simple) == 8 and all(p in outline for p in simple)
    assert D.simplify_polygon([(0, 0), (10, 0), (10, 10), (0, 10)], max_vertices=8) == [(0, 0), (10, 0), (10, 10), (0, 10)]
    assert D.polygon_text([(0, 0), (10, 0), (10, 10), (0, 10)], 20, 40) == "(0,0) (500,0) (500,250) (0,250)"


# ====================================================================== hand-built COCO fixture
CAPTIONS = {
    1: ["A dog and a cat on grass.", "Two pets outside."],
    2: ["Two animals on a wall."],
    3: ["An empty field."],
}
FILES = {1: ("a.png", 200, 100), 2: ("b.png", 40, 20), 3: ("c.png", 30, 30)}


def _rle_rect(h, w, rows, cols):
    mask = np.zeros((h, w), bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return D.rle_encode(mask)["counts"]


def _write_coco(folder, images=None, caption_anns=None, instance_anns=None, categories=None, tags=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    for image_id, (name, w, h) in FILES.items():
        Image.new("RGB", (w, h), (image_id * 60, 90, 120)).save(folder / "img" / name)
    if images is None:
        images = [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h) in FILES.items()]
    if caption_anns is None:
        caption_anns, k = [], 10
        for image_id, texts in CAPTIONS.items():
            for text in texts:
                k += 1
                caption_anns.append({"id": k, "image_id": image_id, "caption": text})
    if categories is None:
        categories = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    if instance_anns is None:
        instance_anns = [
            # the cat is listed first but lies lower: reading order puts the dog first
            {"id": 102, "image_id": 1, "category_id": 2, "bbox": [100, 60, 50, 30], "area": 750,
             "segmentation": [[100, 60, 150, 60, 125, 90]]},
            {"id": 101, "image_id": 1, "category_id": 1, "bbox": [20, 10, 60, 40], "area": 2400,
             "segmentation": [[20, 10, 80, 10, 80, 50, 20, 50]]},
            # uncompressed RLE (crowd-style), rows 2-5, cols 10-19 of a 20x40 image
            {"id": 201, "image_id": 2, "category_id": 2, "bbox": [10, 2, 10, 4], "iscrowd": 1,
             "segmentation": {"size": [20, 40], "counts": _rle_rect(20, 40, (2, 6), (10, 20))}},
            # compressed RLE string, rows 10-14, cols 30-34
            {"id": 202, "image_id": 2, "category_id": 1, "bbox": [30, 10, 5, 5], "iscrowd": 1,
             "segmentation": {"size": [20, 40], "counts": D.rle_counts_to_string(_rle_rect(20, 40, (10, 15), (30, 35)))}},
        ]
    if tags is None:
        tags = {"a.png": ["dog", "cat", "grass"], "b.png": "cat | dog | wall", "c.png": []}
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": caption_anns}))
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": instance_anns, "categories": categories}))
    (folder / "tags.json").write_text(json.dumps(tags))
    return folder


def _load(folder, **kwargs):
    kwargs.setdefault("log", None)
    return D.load_coco(folder / "img", captions=folder / "captions.json", instances=folder / "instances.json",
                       tags=folder / "tags.json", **kwargs)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    folder = _write_coco(tmp_path_factory.mktemp("coco"))
    return folder, _load(folder)


LINES = {
    1: {
        "caption": "Caption: A dog and a cat on grass.",
        "classification": "Tags: dog, cat, grass",
        "detection": "Boxes: dog [100, 100, 400, 500]; cat [500, 600, 750, 900]",
        "segmentation": "Masks: dog: (100,100) (400,100) (400,500) (100,500); cat: (500,600) (750,600) (625,900)",
    },
    2: {
        "caption": "Caption: Two animals on a wall.",
        "classification": "Tags: cat, dog, wall",
        "detection": "Boxes: cat [250, 100, 500, 300]; dog [750, 500, 875, 750]",
        "segmentation": "Masks: cat: (250,100) (500,100) (500,300) (250,300); dog: (750,500) (875,500) (875,750) (750,750)",
    },
    3: {
        "caption": "Caption: An empty field.",
        "classification": "Tags: none",
        "detection": "Boxes: none",
        "segmentation": "Masks: none",
    },
}


def test_coco_source_loads_captions_tags_boxes_polygons_and_rle(coco):
    folder, source = coco
    assert source.report.ok and source.report.kept == 3
    assert source.stages == D.STAGES
    first = source.images[0]
    assert (first.image_id, first.width, first.height) == ("1", 200, 100)
    assert first.image == str(folder / "img" / "a.png")  # a path: decoded lazily by datasets
    assert first.captions == CAPTIONS[1]


@pytest.mark.parametrize(
    "order, stages",
    [
        ("default", [["caption"], ["classification"], ["detection"], ["segmentation"]]),
        (["segmentation", "detection", "classification", "caption"], [["segmentation"], ["detection"], ["classification"], ["caption"]]),
        ("cap_all", [["caption"], ["classification", "detection", "segmentation"]]),
        (["caption", "all"], [["caption"], ["classification", "detection", "segmentation"]]),
        ("all", [["caption", "classification", "detection", "segmentation"]]),
    ],
)
def test_stage_targets_are_cumulative_in_the_order_given(coco, order, stages):
    _, source = coco
    assert D.normalise_order(order) == [tuple(s) for s in stages]
    seen: list[str] = []
    for k, own in enumerate(stages):
        seen += own
        ds = D.build_stage_dataset(source, k, order)
        assert ds.column_names == ["messages", "images", "image_id", "stage"]
        assert ds["image_id"] == ["1", "2", "3"] and set(ds["stage"]) == {"+".join(own)}
        for row in ds:
            user, assistant = row["messages"]
            assert user["role"] == "user" and user["content"][0]["type"] == "image"
            assert user["content"][1] == {"type": "text", "text": ", ".join(D.STAGE_WORDS[r] for r in seen)}
            expected = "\n".join(LINES[int(row["image_id"])][r] for r in seen)
            assert assistant == {"role": "assistant", "content": [{"type": "text", "text": expected}]}
            assert len(row["images"]) == 1 and isinstance(row["images"][0], Image.Image)


def test_stage_dataset_exact_rows_for_the_paper_example(coco):
    _, source = coco
    row = D.build_stage_dataset(source, 1, "default")[0]
    assert row["messages"][0]["content"][1]["text"] == "caption, recognition"
    assert row["messages"][1]["content"][0]["text"] == "Caption: A dog and a cat on grass.\nTags: dog, cat, grass"
    rev = D.build_stage_dataset(source, 1, "reverse")[0]
    assert rev["messages"][0]["content"][1]["text"] == "segmentation, detection"
    assert rev["messages"][1]["content"][0]["text"] == f"{LINES[1]['segmentation']}\n{LINES[1]['detection']}"
    every = D.build_stage_dataset(source, 0, "default", caption_mode="all")
    assert every["image_id"] == ["1", "1", "2", "3"]
    assert every[1]["messages"][1]["content"][0]["text"] == "Caption: Two pets outside."
    assert D.build_stage_dataset(source, 2, "default", max_objects=1)[0]["messages"][1]["content"][0]["text"].endswith(
        "Boxes: dog [100, 100, 400, 500]"
    )


def test_bad_orders_and_missing_labels_raise(coco, tmp_path):
    _, source = coco
    for bad in (["caption", "detection"], ["caption", "caption", "detection", "segmentation", "classification"], "sideways"):
        with pytest.raises(ValueError):
            D.normalise_order(bad)
    with pytest.raises(IndexError):
        D.build_stage_dataset(source, 4, "default")
    captions_only = D.load_coco(coco[0] / "img", captions=coco[0] / "captions.json", log=None)
    assert captions_only.stages == ("caption",)
    with pytest.raises(ValueError, match=r"no labels for stage\(s\) \['classification'\]"):
        D.build_stage_dataset(captions_only, 1, "default")
    # without a tag file, tags are the instance category names
    no_tags = D.load_coco(coco[0] / "img", captions=coco[0] / "captions.json", instances=coco[0] / "instances.json", log=None)
    assert [i.tags for i in no_tags.images] == [["cat", "dog"], ["cat", "dog"], []]


def test_tag_records_in_list_form(tmp_path):
    folder = _write_coco(tmp_path, tags=[{"file_name": "a.png", "tags": ["x"]}, {"image": "b.png", "tags": "y | z"},
                                         {"image_id": 3, "tags": ["w"]}])
    assert [i.tags for i in _load(folder).images] == [["x"], ["y", "z"], ["w"]]


# ====================================================================== malformed records
def test_every_malformed_record_kind_is_reported_with_its_id(tmp_path):
    good = [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h) in FILES.items()]
    images = good + [
        {"id": 5, "file_name": "missing.png", "width": 10, "height": 10},
        {"id": 6, "file_name": "corrupt.png", "width": 10, "height": 10},
        {"id": 7, "file_name": "a.png", "width": 300, "height": 100},
        {"id": 8, "width": 10, "height": 10},
        {"id": 9, "file_name": "c.png", "width": "30", "height": 30},
        {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
    ]
    captions = [{"id": 11, "image_id": 1, "caption": "ok"}, {"id": 21, "image_id": 2, "caption": "ok"},
                {"id": 31, "image_id": 3, "caption": "ok"}, {"id": 32, "image_id": 2},
                {"id": 33, "image_id": 2, "caption": 5}, {"id": 34, "image_id": 99, "caption": "who?"}]
    captions += [{"id": 40 + i, "image_id": i, "caption": "x"} for i in (5, 6, 7)]
    rle_bad = {"size": [20, 40], "counts": [5, 5]}
    instances = [
        {"id": 301, "image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 10], "segmentation": [[0, 0, 1, 0, 1, 1]]},
        {"id": 302, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 10], "segmentation": [[1, 1, 2, 2]]},
        {"id": 303, "image_id": 2, "category_id": 42, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 1, 0, 1, 1]]},
        {"id": 304, "image_id": 2, "category_id": 1, "bbox": "0 0 5 5", "segmentation": [[0, 0, 1, 0, 1, 1]]},
        {"id": 305, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": rle_bad},
        {"id": 306, "image_id": 2, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]]},
        {"id": 307, "image_id": 77, "category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 1, 0, 1, 1]]},
        {"id": 308, "image_id": 3, "category_id": 2, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]},
    ]
    folder = _write_coco(tmp_path, images=images, caption_anns=captions, instance_anns=instances,
                         tags={"a.png": ["dog"], "b.png": ["cat"], "c.png": ["field"], "missing.png": [], "corrupt.png": 3})
    (folder / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")

    with pytest.raises(ValueError) as info:
        _load(folder)
    report = info.value.report
    message = str(info.value)
    expected = {
        "missing_image_file": [5],
        "corrupt_image": [6],
        "image_size_mismatch": [7],
        "missing_field": [8, 32, 8, 306],  # image 8 (in both files), caption 32, annotation 306
        "wrong_type": [9, 33, 9, 304, "corrupt.png"],  # image 9's width, caption 33, bbox 304, a tag list
        "duplicate_id": [1, 1],
        "unknown_image": [34, 307],
        "unknown_category": [303],
        "bad_bbox": [301],
        "bad_polygon": [302],
        "bad_rle": [305],
        "missing_labels": [6],  # its tags have the wrong type, so it has none
    }
    assert report.problems == expected
    assert report.counts == {kind: len(ids) for kind, ids in expected.items()}
    for kind, ids in expected.items():
        assert f"{kind}: {len(ids)}" in message
    assert "skip_invalid=True" in message and "bbox [0, 0, -5, 10] has non-positive size" in message

    printed = []
    skipped = _load(folder, skip_invalid=True, log=printed.append)
    assert skipped.report.problems == expected and printed == [skipped.report.summary()]
    assert [i.image_id for i in skipped.images] == ["3"]  # every image with a problem is dropped whole
    assert skipped.report.dropped == [1, 2, 5, 6, 7]
    assert [(o.category, o.box) for o in skipped.images[0].objects] == [("cat", (1 / 30, 1 / 30, 0.2, 0.2))]


def test_image_checks_by_level(tmp_path):
    folder = _write_coco(tmp_path)
    (folder / "img" / "b.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt_image: 1 -- 2"):
        _load(folder)
    assert _load(folder, verify_images=False).report.ok  # existence only
    # a truncated JPEG passes PIL's verify() but not a full decode
    Image.new("RGB", (40, 20), "white").save(folder / "img" / "b.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(folder / "img" / "full.jpg")
    data = (folder / "img" / "full.jpg").read_bytes()
    (folder / "img" / "a.png").write_bytes(data[: len(data) // 2])
    assert _load(folder).report.ok
    with pytest.raises(ValueError, match="corrupt_image: 1 -- 1 "):
        _load(folder, verify_images="full")


# ====================================================================== LLaVA conversations
def _write_llava(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 24), "red").save(tmp_path / "imgs" / "one.png")
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "imgs" / "two.png")
    records = [
        {"id": "r1", "image": "one.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No."}]},
        {"id": "r2", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
        {"id": 3, "image": ["one.png", "two.png"], "conversations": [
            {"from": "human", "value": "Compare <image> with\n<image>"}, {"from": "gpt", "value": "Red, blue."}]},
        {"id": "bad-file", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]},
        {"id": "bad-marker", "image": "one.png", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}]},
        {"id": "bad-order", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "bad-missing"},
        {"id": "bad-type", "conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]},
        {"id": "bad-speaker", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_conversations_convert_to_trl_rows(tmp_path):
    path = _write_llava(tmp_path)
    with pytest.raises(ValueError) as info:
        D.load_llava(path, tmp_path / "imgs", log=None)
    assert info.value.report.problems == {
        "missing_image_file": ["bad-file"],
        "image_marker_mismatch": ["bad-marker"],
        "bad_conversation": ["bad-order", "bad-speaker"],
        "missing_field": ["bad-missing"],
        "wrong_type": ["bad-type"],
    }
    ds, report = D.load_llava(path, tmp_path / "imgs", skip_invalid=True, log=None)
    assert report.kept == 3 and report.dropped == ["bad-file", "bad-marker", "bad-order", "bad-missing", "bad-type", "bad-speaker"]
    assert ds["image_id"] == ["r1", "r2", "3"] and set(ds["question_type"]) == {"conversation"}
    first = ds[0]
    assert first["messages"] == [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it big?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
    ]
    assert [im.size for im in first["images"]] == [(32, 24)]
    assert ds[1]["images"] == []
    assert [p["type"] for p in ds[2]["messages"][0]["content"]] == ["text", "image", "text", "image"]
    assert [p["text"] for p in ds[2]["messages"][0]["content"]] == ["Compare", None, "with", None]
    assert [im.size for im in ds[2]["images"]] == [(32, 24), (20, 20)]


# ====================================================================== synthetic source, QA rows, recipe entry points
@pytest.fixture(scope="module")
def scenes():
    return syn.make_split("train", 12, seed=3)


def test_synthetic_stage_rows_match_the_scene(scenes):
    source = D.source_from_scenes(scenes)
    ds = D.build_stage_dataset(source, 3, "default", max_vertices=6)
    for scene, row in zip(scenes, ds):
        assert row["image_id"] == scene.image_id
        assert np.array_equal(np.asarray(row["images"][0]), np.asarray(scene.image))  # PNG storage is lossless
        caption, tags, boxes, masks = row["messages"][1]["content"][0]["text"].split("\n")
        assert caption == f"Caption: {scene.caption}" and tags == f"Tags: {', '.join(scene.tags)}"
        parsed = D.parse_labelled_boxes(boxes[len("Boxes: "):])
        assert sorted(c for c, _ in parsed) == sorted(scene.categories)
        expected = sorted((o.category, D.format_box(o.box)) for o in scene.objects)
        assert sorted((c, D.format_box(b)) for c, b in parsed) == expected
        assert masks.startswith("Masks: ") and masks.count("(") <= 6 * len(scene.objects)
    # image_position="after": the same rows with the instruction first (the demo's layout).
    after = D.build_stage_dataset(source, 3, "default", max_vertices=6, image_position="after")
    for before_row, after_row in zip(ds, after):
        assert after_row["messages"][0]["content"] == before_row["messages"][0]["content"][::-1]
        assert after_row["messages"][0]["content"][1]["type"] == "image"
        assert after_row["messages"][1] == before_row["messages"][1]
    reverse = D.build_stage_dataset(scenes, 1, "reverse")
    assert reverse[0]["messages"][1]["content"][0]["text"].split("\n")[0].startswith("Masks: ")
    assert reverse[0]["messages"][1]["content"][0]["text"].split("\n")[1].startswith("Boxes: ")


def test_qa_rows_are_single_turn_with_question_types(scenes):
    ds = D.build_qa_dataset(scenes)
    assert len(ds) == len(scenes) * len(syn.question_types)
    assert ds.column_names == ["messages", "images", "image_id", "question_type"]
    row = ds[4]
    qa = scenes[0].qa[4]
    assert row["question_type"] == qa["question_type"] == "grounding"
    # the user turn is the fixed `astrea eval` prompt of the grounding metric around the object phrase
    assert row["messages"][0]["content"][1]["text"] == (
        f"Please provide the bounding box coordinate of the region this sentence describes: the {qa['target']}\n"
        "Answer with the box as [x1, y1, x2, y2], integers on a 0-1000 grid."
    )
    assert row["messages"][1]["content"][0]["text"] == qa["answer"]
    native = D.build_qa_dataset(scenes[:1], prompts="native")
    assert native[4]["messages"][0]["content"][1]["text"] == qa["question"]
    mc = ds[5]["messages"][0]["content"][1]["text"]
    assert mc.count("\nA. ") == 1 and mc.endswith("Answer with the option's letter from the given choices directly.")
    assert len(D.build_qa_dataset(scenes, ["colour", "counting"])) == 2 * len(scenes)


def test_recipe_entry_points(tmp_path):
    cfg = {"source": "synthetic", "train_size": 6, "validation_size": 4, "image_size": 48, "seed": 2}
    ds = D.stage_dataset(cfg, 1, [["caption", "classification"], "detection", "segmentation"], split="train")
    assert len(ds) == 6 and ds[0]["images"][0].size == (48, 48)
    assert ds[0]["messages"][0]["content"][1]["text"] == "caption, recognition, detection"
    assert ds["image_id"][0] == "train-2-00000"
    assert D.stage_dataset(cfg, 0, "default", split="validation")["image_id"][0] == "validation-2-00000"
    instruct = D.instruct_dataset(cfg)
    assert len(instruct) == 6 * len(syn.question_types)
    llava = _write_llava(tmp_path)
    records = json.loads(llava.read_text())[:3]
    llava.write_text(json.dumps(records))
    mixed = D.instruct_dataset({**cfg, "instruct": str(llava), "instruct_images": str(tmp_path / "imgs")})
    assert len(mixed) == len(instruct) + 3 and mixed["question_type"][-1] == "conversation"
    with pytest.raises(ValueError, match="unknown key"):
        D.stage_dataset({"source": "synthetic", "trian_size": 3}, 0)


# ====================================================================== TRL
@pytest.fixture(scope="module")
def processor():
    from astrea_vlm.configuration import get_preset
    from astrea_vlm.processing import build_processor

    return build_processor(get_preset("tiny"))


def _rows(scenes):
    stage = D.build_stage_dataset(scenes[:2], 2, "default")
    qa = D.build_qa_dataset(scenes[:1])
    return [stage[0], stage[1], qa[3], qa[5]]


def test_rows_render_through_the_processor_chat_template(scenes, processor):
    from trl.data_utils import prepare_multimodal_messages

    for row in _rows(scenes):
        messages = prepare_multimodal_messages(row["messages"], images=row["images"])
        out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                            return_assistant_tokens_mask=True)
        ids = out["input_ids"][0]
        assert int((ids == processor.image_token_id).sum()) == processor.num_visual_tokens == 16
        answer = row["messages"][1]["content"][0]["text"]
        assert processor.decode(ids[out["assistant_masks"][0].bool()]) == f" {answer}</s>"
        assert out["pixel_values_caption"].shape[0] == 1


@pytest.mark.parametrize("assistant_only_loss", [True, False])
def test_rows_go_through_trls_vlm_collator(scenes, processor, assistant_only_loss):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=assistant_only_loss)
    rows = _rows(scenes)
    batch = collator([dict(r) for r in rows])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["pixel_values_detection"].shape[0] == len(rows)
    for ids, labels, mask, row in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], rows):
        assert int((ids == processor.image_token_id).sum()) == 16
        answer = row["messages"][1]["content"][0]["text"]
        trained = ids[labels != -100]
        if assistant_only_loss:
            assert processor.decode(trained) == f" {answer}</s>"
            assert not (trained == processor.image_token_id).any()
        else:
            assert (labels[mask == 1] == ids[mask == 1]).all() and (labels[mask == 0] == -100).all()


def test_llava_rows_mask_every_answer_turn(tmp_path, processor):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    ds, _ = D.load_llava(_write_llava(tmp_path), tmp_path / "imgs", skip_invalid=True, log=None)
    batch = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)([dict(r) for r in ds])
    counts = [(ids == processor.image_token_id).sum().item() for ids in batch["input_ids"]]
    assert counts == [16, 0, 32]
    assert processor.decode(batch["input_ids"][0][batch["labels"][0] != -100]) == " A red square.</s> No.</s>"


def test_targets_are_shortened_to_fit_the_models_context(processor):
    scenes = syn.make_split("train", 16, seed=11)
    budget = 400
    messages = []
    ds = D.build_stage_dataset(scenes, 3, "default", processor=processor, max_length=budget, log=messages.append)
    assert len(ds) == len(scenes) and messages and "shortened to fit 400 tokens" in messages[0]
    length = D.sequence_length_fn(processor, D.stage_instruction(D.STAGES), (64, 64))
    assert max(length(row["messages"][1]["content"][0]["text"]) for row in ds) <= budget
    with pytest.raises(ValueError, match="do not fit 200 tokens"):
        D.build_stage_dataset(scenes, 3, "default", processor=processor, max_length=200, log=None)
    kept = D.build_stage_dataset(scenes, 3, "default", processor=processor, max_length=200, skip_invalid=True, log=None)
    assert len(kept) < len(scenes)


def test_image_position_orders_the_user_turn_the_same_in_training_rows_and_evaluation(scenes):
    from astrea_vlm.eval.runner import user_turn

    before = D.build_qa_dataset(scenes[:1])[0]["messages"][0]["content"]
    after = D.build_qa_dataset(scenes[:1], image_position="after")[0]["messages"][0]["content"]
    assert [p["type"] for p in before] == ["image", "text"] and [p["type"] for p in after] == ["text", "image"]
    assert after[0]["text"] == before[1]["text"]
    assert [p["type"] for p in user_turn("q", 1, "after")[0]["content"]] == ["text", "image"]
    assert [p["type"] for p in user_turn("q", 2)[0]["content"]] == ["image", "image", "text"]
    with pytest.raises(ValueError, match="image_position"):
        D.build_qa_dataset(scenes[:1], image_position="middle")


def test_each_scene_image_is_stored_once_per_dataset_and_decodes_to_the_same_pixels(scenes):
    from astrea_vlm.train.stages import dataset_images

    ds = D.build_qa_dataset(scenes)
    assert len(ds) > len(scenes)  # several questions per scene share its image
    for row in ds.select(range(0, len(ds), 5)):
        scene = next(s for s in scenes if s.image_id == row["image_id"])
        assert np.array_equal(np.asarray(row["images"][0].convert("RGB")), np.asarray(scene.image.convert("RGB")))
    distinct = dataset_images(ds)
    assert len(distinct) == len(scenes)  # the feature cache decodes each scene once
    originals = {np.asarray(s.image.convert("RGB")).tobytes() for s in scenes}
    assert {np.asarray(i.convert("RGB")).tobytes() for i in distinct} == originals


def test_synthetic_source_is_shared_by_the_stages_of_a_run():
    first = D.synthetic_source("train", 3, seed=5, image_size=[48, 48], max_objects=3)
    assert D.synthetic_source("train", 3, seed=5, image_size=(48, 48), max_objects=3) is first
    assert D.synthetic_source("train", 3, seed=6, image_size=48, max_objects=3) is not first
