"""The prompt layout a model was trained with travels with its folder.

``image_position`` (images before or after the prompt), the separator between text and image
markers and an optional system prompt are saved in the processor (``processor_config.json``, the
chat template's own defaults) and in ``config.json``; ``apply_chat_template``, the
``image-text-to-text`` pipeline, ``astrea eval`` and the lmms-eval adapter use them with no flag,
and ``image_position`` can be overridden per call / per run.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from astrea_vlm.configuration import AstreaConfig, get_preset
from astrea_vlm.export import save_hub_folder
from astrea_vlm.modeling import AstreaForConditionalGeneration
from astrea_vlm.processing import AstreaProcessor, build_processor

# The v1 template (before the layout was saved): images where the caller lists them, glued to text.
OLD_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['content'] is string %}"
    "{% set parts = [{'type': 'text', 'text': message['content']}] %}{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% for part in parts %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + parts[0]['text'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

IMAGE, TEXT = {"type": "image"}, {"type": "text", "text": "How many shapes?"}


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def _image(seed=0, size=(40, 32)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def after_folder(tmp_path_factory):
    """A tiny random model saved with the prompt after the image ("after") and a system prompt."""
    folder = tmp_path_factory.mktemp("layout") / "after"
    torch.manual_seed(0)
    config = get_preset("tiny", image_position="after", system_prompt="Answer briefly.")
    model = AstreaForConditionalGeneration(config).eval()
    save_hub_folder(model, folder, processor=build_processor(config))
    return folder


# ------------------------------------------------------------------------------ the template
@pytest.mark.parametrize("position, expected", [
    ("before", "<s>USER: <image>\nHow many shapes?\nASSISTANT:"),
    ("after", "<s>USER: How many shapes?\n<image>\nASSISTANT:"),
])
def test_the_template_places_images_by_the_layout_whatever_order_the_parts_come_in(position, expected):
    processor = build_processor(get_preset("tiny", image_position=position))
    for parts in ((IMAGE, TEXT), (TEXT, IMAGE)):
        assert processor.apply_chat_template(_user(*parts), tokenize=False, add_generation_prompt=True) == expected
    # a separator between every part: several images stay together, in their order, on their own lines
    video = {"type": "video"}
    text = processor.apply_chat_template(_user(IMAGE, TEXT, video, IMAGE), tokenize=False)
    assert text == {"before": "<s>USER: <image>\n<video>\n<image>\nHow many shapes?\n",
                    "after": "<s>USER: How many shapes?\n<image>\n<video>\n<image>\n"}[position]


def test_the_image_first_layout_renders_as_before_the_layout_was_saved():
    """Folders trained with images first (every recipe but the demo) see the same text as before."""
    processor = build_processor(get_preset("tiny"))
    messages = [{"role": "system", "content": "Be brief."}, *_user(IMAGE, TEXT),
                {"role": "assistant", "content": [{"type": "text", "text": "three"}]}]
    assert processor.apply_chat_template(messages, tokenize=False) == "<s>Be brief.\nUSER: <image>\nHow many shapes?\nASSISTANT: three</s>\n"


def test_overrides_per_call_and_the_system_prompt():
    processor = build_processor(get_preset("tiny", image_position="after", system_prompt='Say "yes" or "no".\nBe brief.'))
    default = processor.apply_chat_template(_user(IMAGE, TEXT), tokenize=False, add_generation_prompt=True)
    assert default == '<s>Say "yes" or "no".\nBe brief.\nUSER: How many shapes?\n<image>\nASSISTANT:'
    before = processor.apply_chat_template(_user(IMAGE, TEXT), tokenize=False, add_generation_prompt=True,
                                           image_position="before", system_prompt=None)
    assert before == "<s>USER: <image>\nHow many shapes?\nASSISTANT:"
    own = [{"role": "system", "content": "Mine."}, *_user(IMAGE, TEXT)]  # a conversation's own system turn wins
    assert processor.apply_chat_template(own, tokenize=False).startswith("<s>Mine.\nUSER: How many shapes?\n<image>")
    # tokenized: the same text, expanded, with the pixels
    out = processor.apply_chat_template(_user({"type": "image", "image": _image()}, TEXT), tokenize=True, return_dict=True,
                                        add_generation_prompt=True, return_tensors="pt")
    expected = processor(images=[_image()], text=default, return_tensors="pt")
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["pixel_values_caption"], expected["pixel_values_caption"])


def test_set_prompt_layout_rewrites_the_template_defaults():
    processor = build_processor(get_preset("tiny"))
    processor.set_prompt_layout(image_position="after")
    assert processor.prompt_layout == {"image_position": "after", "system_prompt": None}
    assert processor.apply_chat_template(_user(IMAGE, TEXT), tokenize=False) == "<s>USER: How many shapes?\n<image>\n"
    processor.set_prompt_layout(system_prompt="Hi.")  # the position is kept
    assert processor.apply_chat_template(_user(IMAGE, TEXT), tokenize=False) == "<s>Hi.\nUSER: How many shapes?\n<image>\n"


def test_bad_layouts_are_refused_with_the_fix():
    config = get_preset("tiny")
    with pytest.raises(ValueError, match="image_position='middle': use 'before'"):
        build_processor(config).apply_chat_template(_user(IMAGE, TEXT), tokenize=False, image_position="middle")
    with pytest.raises(ValueError, match="image_position='left'"):
        AstreaProcessor(build_processor(config).image_processor, build_processor(config).tokenizer, image_position="left")
    with pytest.raises(ValueError, match="AstreaConfig: invalid `image_position`='left'"):
        AstreaConfig(**{**config.to_dict(), "image_position": "left"})
    with pytest.raises(ValueError, match="system_prompt must be a string"):
        build_processor(config).set_prompt_layout(system_prompt=3)


def test_a_template_without_the_layout_still_takes_an_override():
    """Folders saved before the layout (or with a custom template): ``image_position=`` reorders the
    parts itself; a system prompt or a new default layout cannot be put into such a template."""
    processor = build_processor(get_preset("tiny"))
    processor.chat_template = OLD_TEMPLATE
    assert processor.apply_chat_template(_user(IMAGE, TEXT), tokenize=False) == "<s>USER: <image>\nHow many shapes?\n"
    assert processor.apply_chat_template(_user(IMAGE, TEXT), tokenize=False, image_position="after") == "<s>USER: How many shapes?<image>\n\n"
    with pytest.raises(ValueError, match="no system_prompt; put a system message first"):
        processor.apply_chat_template(_user(IMAGE, TEXT), tokenize=False, system_prompt="x")
    with pytest.raises(ValueError, match="custom chat template"):
        processor.set_prompt_layout(image_position="after")


# --------------------------------------------------------------------------- the saved folder
def test_the_folder_carries_the_layout(after_folder):
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils.chat_template_utils import render_jinja_template

    config = json.loads((after_folder / "config.json").read_text())
    assert config["image_position"] == "after" and config["system_prompt"] == "Answer briefly."
    saved = json.loads((after_folder / "processor_config.json").read_text())
    assert saved["image_position"] == "after" and saved["system_prompt"] == "Answer briefly."
    assert AutoConfig.from_pretrained(after_folder, trust_remote_code=True).image_position == "after"
    processor = AutoProcessor.from_pretrained(after_folder, trust_remote_code=True)
    assert processor.prompt_layout == {"image_position": "after", "system_prompt": "Answer briefly."}
    expected = "<s>Answer briefly.\nUSER: How many shapes?\n<image>\nASSISTANT:"
    assert processor.apply_chat_template(_user(IMAGE, TEXT), tokenize=False, add_generation_prompt=True) == expected
    # chat_template.jinja alone (as any other renderer reads it) holds the layout as its defaults
    template = (after_folder / "chat_template.jinja").read_text()
    rendered, _ = render_jinja_template(conversations=[_user(IMAGE, TEXT)], chat_template=template, add_generation_prompt=True,
                                        bos_token="<s>", eos_token="</s>")
    assert rendered == [expected]


def test_the_pipeline_prompts_as_the_folder_says(after_folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    pipe = pipeline("image-text-to-text", model=str(after_folder), trust_remote_code=True)
    image = _image(3)
    messages = _user({"type": "image", "image": image}, TEXT)  # image listed first, as most clients do
    answer = pipe(text=messages, max_new_tokens=5, generate_kwargs={"do_sample": False})[0]["generated_text"][-1]["content"]

    model = AutoModelForImageTextToText.from_pretrained(after_folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(after_folder, trust_remote_code=True)
    text = "<s>Answer briefly.\nUSER: How many shapes?\n<image>\nASSISTANT:"
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert answer == processor.decode(ids, skip_special_tokens=True)


def _records(folder):
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(3):
        _image(i).save(folder / "images" / f"{i}.png")
        records.append({"id": f"q{i}", "image": f"images/{i}.png", "question": f"What is shown {i}?", "answer": "noise",
                        "metric": "exact_match", "question_type": "what"})
    (folder / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder / "qa.jsonl"


def test_astrea_eval_uses_the_saved_layout_and_the_flag_overrides_it(after_folder, tmp_path, monkeypatch):
    from astrea_vlm.cli import main
    from astrea_vlm.eval import runner

    from astrea_vlm.eval.prompts import build_prompt

    data = _records(tmp_path / "data")
    prompts = [build_prompt("exact_match", json.loads(line)) for line in data.read_text().splitlines()]
    rendered: list[str] = []
    real = runner.render_prompt
    monkeypatch.setattr(runner, "render_prompt", lambda *a, **k: rendered.append(real(*a, **k)) or rendered[-1])

    assert main(["eval", "--model", str(after_folder), "--task", "qa", "--data", str(data), "--output", str(tmp_path / "a"),
                 "--max-new-tokens", "3"]) == 0
    saved = json.loads((tmp_path / "a" / "results.json").read_text())["settings"]
    assert (saved["image_position"], saved["image_position_from"], saved["system_prompt"]) == ("after", "folder", "Answer briefly.")
    assert rendered == [f"<s>Answer briefly.\nUSER: {p}\n<image>\nASSISTANT:" for p in prompts]

    rendered.clear()
    assert main(["eval", "--model", str(after_folder), "--task", "qa", "--data", str(data), "--output", str(tmp_path / "b"),
                 "--max-new-tokens", "3", "--image-position", "before"]) == 0
    saved = json.loads((tmp_path / "b" / "results.json").read_text())["settings"]
    assert (saved["image_position"], saved["image_position_from"]) == ("before", "argument")
    assert rendered == [f"<s>Answer briefly.\nUSER: <image>\n{p}\nASSISTANT:" for p in prompts]


def test_astrea_eval_refuses_a_bad_image_position_before_loading(tmp_path, capsys):
    from astrea_vlm.cli import main
    from astrea_vlm.eval.runner import run_eval

    data = _records(tmp_path / "data")
    with pytest.raises(ValueError, match="image_position='middle'"):
        run_eval(tmp_path / "no-model-here", "qa", data, image_position="middle")
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--task", "qa", "--data", str(data), "--image-position", "middle"])
    assert "invalid choice: 'middle'" in capsys.readouterr().err


def test_lmms_adapter_uses_the_saved_layout_and_its_model_arg_overrides_it(after_folder, monkeypatch):
    from astrea_vlm.eval import runner
    from astrea_vlm.eval.lmms_adapter import AstreaLmms

    class Request:
        def __init__(self, *args):
            self.args = args

    def messages(doc):
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["text"]}]}]

    rendered: list[str] = []
    real = runner.render_prompt
    monkeypatch.setattr(runner, "render_prompt", lambda *a, **k: rendered.append(real(*a, **k)) or rendered[-1])
    docs = [{"image": _image(1), "text": "Which colour?"}]
    for arg, expected in (("", "<s>Answer briefly.\nUSER: Which colour?\n<image>\nASSISTANT:"),
                          (",image_position=before", "<s>Answer briefly.\nUSER: <image>\nWhich colour?\nASSISTANT:")):
        adapter = AstreaLmms.create_from_arg_string(f"pretrained={after_folder}{arg}", {"device": "cpu"})
        adapter.task_dict = {"toy": {"test": docs}}
        rendered.clear()
        adapter.generate_until([Request("ctx", messages, {"max_new_tokens": 2}, 0, "toy", "test")])
        adapter.loglikelihood([Request("Which colour?", "red", lambda d: [d["image"]], 0, "toy", "test")])
        assert rendered == [expected, expected]
    with pytest.raises(ValueError, match="image_position='sideways'"):
        AstreaLmms.create_from_arg_string("pretrained=nowhere,image_position=sideways", {"device": "cpu"})


# ------------------------------------------------------------------------------------ training
def test_a_recipe_sets_the_layout_it_trains_with(tmp_path):
    from astrea_vlm.train.run import load_model_and_processor
    from astrea_vlm.train.schedule import load_recipe

    recipe = load_recipe("tiny")
    assert "image_position" not in recipe.data
    model, processor = load_model_and_processor(recipe)
    assert processor.image_position == model.config.image_position == "before"  # default: LLaVA's layout
    after = dataclasses.replace(recipe, data={**recipe.data, "image_position": "after", "system_prompt": "Look."})
    model, processor = load_model_and_processor(after)
    assert processor.prompt_layout == {"image_position": "after", "system_prompt": "Look."}
    assert (model.config.image_position, model.config.system_prompt) == ("after", "Look.")
    save_hub_folder(model, tmp_path / "m", processor=processor)
    # a recipe that does not name a layout keeps the one of the folder it starts from
    again = dataclasses.replace(recipe, model={"path": str(tmp_path / "m")})
    model, processor = load_model_and_processor(again)
    assert processor.prompt_layout == {"image_position": "after", "system_prompt": "Look."}
    assert model.config.image_position == "after"


def test_demo_recipe_trains_evaluates_and_ships_the_question_first():
    from astrea_vlm.train.pretrain_llm import SHIPPED
    from astrea_vlm.train.schedule import load_recipe

    recipe = load_recipe("demo")
    world = json.loads((SHIPPED / "pretrain.json").read_text())["settings"]
    assert recipe.data["image_position"] == world["image_position"] == "after"
