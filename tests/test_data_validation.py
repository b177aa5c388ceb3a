"""Bad data is refused by name: boxes and polygons outside their image, degenerate boxes, JSON/YAML
syntax errors naming the file, hints in the syntax of where the user writes, reports shown once."""

from __future__ import annotations

import json

import pytest
import yaml

from astrea_vlm.cli import main
from astrea_vlm.geometry import clip_polygon, polygon_area
from astrea_vlm.train import data as D
from test_train_data import _load, _write_coco

# c.png is 30x30 (image 3); the default fixture's images 1 and 2 stay valid.
SQUARE = [[1, 1, 6, 1, 6, 6]]


def _coco_with(tmp_path, *annotations):
    from test_train_data import _write_coco as write

    folder = write(tmp_path / "coco")
    instances = json.loads((folder / "instances.json").read_text())
    instances["annotations"] += [{"image_id": 3, "category_id": 2, "segmentation": SQUARE, **a} for a in annotations]
    (folder / "instances.json").write_text(json.dumps(instances))
    return folder


def test_a_box_wholly_outside_its_image_is_a_named_record_error(tmp_path):
    folder = _coco_with(tmp_path, {"id": 401, "bbox": [500, 500, 50, 50]})
    with pytest.raises(D.InvalidDataError) as info:
        _load(folder)
    assert info.value.report.problems == {"box_outside_image": [401]}
    assert "bbox [500, 500, 50, 50] lies wholly outside the 30x30 image" in str(info.value)
    printed = []
    skipped = _load(folder, skip_invalid=True, log=printed.append)
    assert [i.image_id for i in skipped.images] == ["1", "2"]  # the image is skipped, and counted
    assert skipped.report.counts == {"box_outside_image": 1} and skipped.report.dropped == [3]
    assert printed == [skipped.report.summary()] and "box_outside_image: 1 -- 401" in printed[0]
    rows = D.build_stage_dataset(skipped, 2, "default", log=None)
    assert not any("1000, 1000, 1000, 1000" in str(m) for m in rows["messages"])


def test_a_box_partly_outside_is_clipped_and_counted(tmp_path):
    folder = _coco_with(tmp_path, {"id": 402, "bbox": [20, 24, 20, 20], "segmentation": [[20, 24, 40, 24, 40, 44, 20, 44]]})
    source = _load(folder)
    assert source.report.ok and source.report.clipped == {"bbox": [402], "polygon": [402]}
    objects = {o.category: o for o in next(i for i in source.images if i.image_id == "3").objects}
    cat = objects["cat"]
    assert cat.box == pytest.approx((20 / 30, 24 / 30, 1.0, 1.0))  # [20, 24, 30, 30] in pixels
    assert set(cat.polygon) == {(20.0, 24.0), (30.0, 24.0), (30.0, 30.0), (20.0, 30.0)}  # the square's inside part
    assert abs(polygon_area(cat.polygon)) == 60.0
    summary = source.report.summary()
    assert "no problems" in summary and "clipped to the image (bbox, partly outside): 1 -- 402" in summary
    # boxes inside the image are not counted as clipped
    assert 101 not in source.report.clipped["bbox"]


@pytest.mark.parametrize("bbox, detail", [
    ([30, 5, 5, 5], "has zero width once clipped to the 30x30 image"),
    ([5, -4, 5, 4], "has zero height once clipped to the 30x30 image"),
])
def test_a_box_with_no_area_inside_the_image_is_an_error(tmp_path, bbox, detail):
    folder = _coco_with(tmp_path, {"id": 403, "bbox": bbox})
    with pytest.raises(D.InvalidDataError) as info:
        _load(folder)
    assert info.value.report.problems == {"bad_bbox": [403]} and detail in str(info.value)


def test_a_polygon_wholly_outside_is_an_error_even_when_its_box_is_inside(tmp_path):
    folder = _coco_with(tmp_path, {"id": 404, "bbox": [1, 1, 5, 5], "segmentation": [[100, 100, 120, 100, 110, 120]]},
                        {"id": 405, "bbox": [1, 1, 5, 5], "segmentation": [[30, 1, 40, 1, 40, 9]]})
    with pytest.raises(D.InvalidDataError) as info:
        _load(folder)
    assert info.value.report.problems == {"polygon_outside_image": [404], "bad_polygon": [405]}
    assert "polygon has zero area inside the 30x30 image" in str(info.value)


def test_clip_polygon_is_the_exact_intersection():
    triangle = [(-10.0, 0.0), (20.0, 0.0), (5.0, 30.0)]  # half of it left of x = 0... and below y = 20
    inside = clip_polygon(triangle, 40, 20)
    assert all(0 <= x <= 40 and 0 <= y <= 20 for x, y in inside)
    # area by hand: the triangle between y = 0 and 20 minus its part at x < 0
    # edges: left (-10,0)-(5,30): x = -10 + y/2; right (20,0)-(5,30): x = 20 - y/2
    # width at height y: 30 - y; clipped at x >= 0: left edge x < 0 for y < 20, so width = 20 - y/2
    assert abs(polygon_area(inside)) == pytest.approx(sum((20 - (y + 0.5) / 2) for y in range(20)), rel=1e-9)
    assert clip_polygon([(50, 50), (60, 50), (60, 60)], 40, 20) == []


def test_json_syntax_errors_name_the_file(tmp_path):
    folder = _write_coco(tmp_path / "coco")
    text = (folder / "captions.json").read_text()
    (folder / "captions.json").write_text(text[:60] + '"unterminated' + "\n" * 3)
    with pytest.raises(ValueError, match=rf"captions file {folder / 'captions.json'} is not valid JSON: .* at line \d+, column \d+"):
        _load(folder)
    from astrea_vlm.eval.data import load_records

    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "ok", "answer": "x"}\n{"question": "oops", \n')
    with pytest.raises(ValueError, match=rf"{bad} is not valid JSONL: .* at line 2, column \d+"):
        load_records(bad)


def _coco_recipe(tmp_path, folder, **data):
    recipe = {"data": {"source": "coco", "images": str(folder / "img"), "coco_captions": str(folder / "captions.json"),
                       "coco_instances": str(folder / "instances.json"), "tags": str(folder / "tags.json"), **data},
              "output_dir": str(tmp_path / "out")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_command_line_says_what_a_recipe_writes_and_shows_the_report_once(tmp_path, capsys):
    folder = _coco_with(tmp_path, {"id": 401, "bbox": [500, 500, 50, 50]})
    assert main(["align", "--recipe", str(_coco_recipe(tmp_path, folder))]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("astrea align: error: [coco-train]") and "Traceback" not in err
    assert "set `skip_invalid: true` in the recipe's `data:` section" in err and "skip_invalid=True" not in err
    assert (out + err).count("records examined") == 1  # the report, once
    # a Python caller is told in Python
    with pytest.raises(D.InvalidDataError, match="pass skip_invalid=True to drop them"):
        _load(folder)


def test_the_stages_of_a_run_share_one_load_and_one_printed_report(tmp_path):
    folder = _coco_with(tmp_path, {"id": 402, "bbox": [20, 24, 20, 20]}, {"id": 401, "bbox": [500, 500, 50, 50]})
    data = yaml.safe_load(_coco_recipe(tmp_path, folder, skip_invalid=True).read_text())["data"]
    printed: list[str] = []
    for stage in range(4):
        D.stage_dataset(data, stage, "default", log=printed.append)
    reports = [line for line in printed if "records examined" in line]
    assert len(reports) == 1 and "box_outside_image: 1 -- 401" in reports[0] and "(bbox, partly outside): 1 -- 402" in reports[0]
    (folder / "tags.json").write_text(json.dumps({"a.png": ["dog"], "b.png": ["cat"], "c.png": ["field"], "new": []}))
    D.stage_dataset(data, 0, "default", log=printed.append)  # a changed file is read again
    assert sum("records examined" in line for line in printed) == 2


def test_a_recipe_yaml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("order: [caption\nalign: {max_steps: 2}\n")
    assert main(["instruct", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"astrea instruct: error: recipe {bad} is not valid YAML:") and "line 2, column" in err
