"""AstreaProcessor / AstreaImageProcessor: token counts, image inputs, tiling, video, chat template."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from astrea_vlm.configuration import get_preset
from astrea_vlm.modeling import AstreaForConditionalGeneration, build_tower, resample_tokens
from astrea_vlm.processing import AstreaImageProcessor, AstreaProcessor, build_processor, to_pil_rgb
from astrea_vlm.processing.image_processing_astrea import sample_frame_indices, select_best_resolution
from astrea_vlm.processing.tokenization import build_byte_level_tokenizer


@pytest.fixture(scope="module")
def config():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def processor(config):
    return build_processor(config)


def _image(color=(200, 30, 30), size=(40, 30)):
    return Image.new("RGB", size, color)


# --------------------------------------------------------------------- token counts
@pytest.mark.parametrize("preset", ["tiny", "astrea-13b", "astrea-34b"])
def test_image_markers_expand_to_exactly_the_tokens_the_model_produces(preset):
    config = get_preset(preset)
    image_processor = AstreaImageProcessor.from_model_config(config)
    tokenizer = build_byte_level_tokenizer(320, model_max_length=10**6)
    processor = AstreaProcessor(image_processor, tokenizer, num_visual_tokens=config.num_visual_tokens)
    per_image = processor.num_image_tokens(_image())
    # What each expert yields after resampling, per image (towers built on the meta device: no memory).
    for role, expert in config.expert_configs.items():
        with torch.device("meta"):
            tower = build_tower(expert)
        tokens = resample_tokens(torch.zeros(1, tower.num_tokens, 1), tower.grid, config.num_visual_tokens)
        assert tokens.shape[1] == per_image, role
    assert per_image == (576 if preset != "tiny" else 16)
    assert image_processor.experts["caption"]["size"] == (32 if preset == "tiny" else 384)
    if preset != "tiny":
        sizes = {role: spec["size"] for role, spec in image_processor.experts.items()}
        assert sizes == {"caption": 384, "classification": 384, "detection": 800, "segmentation": 1024}


def test_processor_output_runs_through_the_model(config, processor):
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config).eval()
    batch = processor(images=[_image(), _image((10, 200, 10)), _image((0, 0, 255))], text=["<image> a <image> b", "<image> c"])
    ids = batch["input_ids"]
    assert int((ids == config.image_token_id).sum()) == 3 * config.num_visual_tokens
    assert batch["pixel_values_caption"].shape == (3, 3, 32, 32)
    with torch.no_grad():
        out = model(**batch)
    assert out.image_hidden_states.shape == (3, config.num_visual_tokens, config.hidden_size)


def test_pixels_follow_marker_order_and_per_expert_normalisation(processor):
    red, green = _image((255, 0, 0)), _image((0, 255, 0))
    batch = processor(images=[red, green], text=["first <image>", "second <image>"])
    alone = processor(images=[green], text="<image>")
    torch.testing.assert_close(batch["pixel_values_detection"][1], alone["pixel_values_detection"][0])
    # caption expert uses mean/std 0.5: red -> (1, -1, -1); detection uses ImageNet statistics.
    torch.testing.assert_close(batch["pixel_values_caption"][0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(batch["pixel_values_detection"][0, :, 0, 0], expected)


def test_batches_are_left_padded_for_generation(processor, config):
    batch = processor(images=[_image(), _image()], text=["<image> short", "<image> a much longer question here"])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, 0] == processor.tokenizer.pad_token_id
    right = processor(images=[_image(), _image()], text=["<image> short", "<image> a much longer question"], padding_side="right")
    assert right["attention_mask"][0, -1] == 0


# --------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "images, text, message",
    [
        ([_image(), _image()], "<image> one marker", "1 <image> marker.*2 image"),
        ([], "<image> needs an image", "1 <image> marker.*0 image"),
        (None, "<image>", "1 <image> marker.*0 image"),
        ([_image()], "no marker", "0 <image> marker.*1 image"),
    ],
)
def test_markers_that_do_not_match_the_images_raise(processor, images, text, message):
    with pytest.raises(ValueError, match=message):
        processor(images=images, text=text)


def test_text_longer_than_the_context_raises(processor):
    with pytest.raises(ValueError, match="model context is 512"):
        processor(images=[_image()] * 40, text="<image>" * 40)


def test_bad_image_inputs_raise_clear_errors(processor, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    cases = [
        (np.full((4, 4, 3), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((4, 4, 5), np.uint8), "HxWx3"),
        (np.full((4, 4, 3), 2.0, np.float32), r"values in \[0, 1\]"),
        (str(not_image), "cannot read"),
        (str(tmp_path / "missing.png"), "not found"),
        ("https://example.com/cat.png", "URLs are not fetched"),
    ]
    for image, message in cases:
        with pytest.raises(ValueError, match=message):
            processor(images=[image], text="<image>")
    with pytest.raises(TypeError, match="unsupported image"):
        processor(images=[{"not": "an image"}], text="<image>")


# --------------------------------------------------------------------- image inputs
def test_every_pil_mode_is_converted_correctly():
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))  # fully transparent -> white
    assert to_pil_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_pil_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    assert to_pil_rgb(Image.new("L", (2, 2), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert to_pil_rgb(Image.new("LA", (2, 2), (100, 255))).getpixel((0, 0)) == (100, 100, 100)
    assert to_pil_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 255] + [0] * 765)
    assert to_pil_rgb(palette).getpixel((0, 0)) == (0, 0, 255)
    sixteen = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert to_pil_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped
    assert to_pil_rgb(Image.fromarray(np.full((2, 2), 257 * 128, np.uint16))).getpixel((0, 0)) == (128, 128, 128)
    assert to_pil_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    upright = to_pil_rgb(Image.open(io.BytesIO(buffer.getvalue())))
    assert upright.size == (20, 40)
    assert sum(upright.getpixel((10, 2))) > 600  # white is now on top


def test_numpy_torch_path_and_pil_inputs_give_the_same_pixels(processor, tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    inputs = [
        Image.fromarray(array),
        array,
        array.astype(np.float32) / 255.0,
        torch.from_numpy(array).permute(2, 0, 1),
        torch.from_numpy(array).permute(2, 0, 1).float() / 255.0,
        str(path),
        path,
    ]
    reference = processor(images=[inputs[0]], text="<image>")["pixel_values_segmentation"]
    for image in inputs[1:]:
        got = processor(images=[image], text="<image>")["pixel_values_segmentation"]
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


# --------------------------------------------------------------------- AnyRes and video
def test_select_best_resolution_prefers_most_pixels_then_least_padding():
    pinpoints = [[384, 768], [768, 384], [768, 768], [384, 1152]]
    assert select_best_resolution((300, 700), pinpoints) == (384, 768)
    assert select_best_resolution((900, 400), pinpoints) == (768, 384)
    assert select_best_resolution((1000, 1000), pinpoints) == (768, 768)


def test_anyres_tiling_adds_tiles_and_the_token_count_follows(config):
    processor = build_processor(config, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], tile_size=32)
    wide = _image(size=(128, 60))
    assert processor.image_processor.num_views(wide) == 3  # whole image + 1x2 tiles
    batch = processor(images=[wide], text="<image> describe")
    assert batch["pixel_values_caption"].shape[0] == 3
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 3 * config.num_visual_tokens
    # The first view is the whole image; the tiles are crops of the padded, resized image.
    whole = build_processor(config)(images=[wide], text="<image>")["pixel_values_caption"][0]
    torch.testing.assert_close(batch["pixel_values_caption"][0], whole)
    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config).eval()
    with torch.no_grad():
        assert model(**batch).image_hidden_states.shape[0] == 3


def test_video_is_sampled_into_frames(config):
    processor = build_processor(config, num_frames=4)
    assert sample_frame_indices(20, 4) == [2, 7, 12, 17]
    assert sample_frame_indices(3, 4) == [0, 1, 2]
    video = np.stack([np.full((20, 20, 3), 10 * i, np.uint8) for i in range(20)])
    batch = processor(videos=[video], text="<video> what happens?")
    assert batch["pixel_values_caption"].shape[0] == 4
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 4 * config.num_visual_tokens
    # frame 7 (value 70) is the second view
    expected = 70 / 255.0 * 2 - 1  # caption expert: mean/std 0.5
    torch.testing.assert_close(batch["pixel_values_caption"][1, 0, 0, 0], torch.tensor(expected), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="1 <video> marker.*0 video"):
        processor(text="<video>")


# --------------------------------------------------------------------- chat template
def test_chat_template_renders_vicuna_style_and_marks_answers(processor):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == "<s>Answer briefly.\nUSER: <image>\nColour?\nASSISTANT: red</s>\n"
    prompt = processor.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("Colour?\nASSISTANT:")
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt")
    mask = out["assistant_masks"][0].bool()
    assert processor.decode(out["input_ids"][0][mask]) == " red</s>"
    assert out["pixel_values_caption"].shape[0] == 1
    with pytest.raises(Exception, match="unknown role"):
        processor.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_assistant_masks_match_the_base_implementation(processor):
    from transformers.processing_utils import ProcessorMixin

    def chat(n_images, answers):
        turns = [{"role": "system", "content": "Be brief."}]
        for turn, answer in enumerate(answers):
            images = [{"type": "image"}] * (n_images if turn == 0 else 0)
            turns += [{"role": "user", "content": images + [{"type": "text", "text": f"question {turn}?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return turns

    # a batch with padding, several images before the first answer and several answers per sample
    conversations = [chat(2, ["red", "a long answer about shapes"]), chat(1, ["yes"]), chat(0, ["no image here", "two"])]
    images = [[_image(), _image((0, 9, 9))], [_image((5, 5, 5))], []]
    calls = []
    original = AstreaProcessor._adjust_assistant_masks_indices

    def capture(self, processed, generation_indices):
        calls.append(({k: list(v) for k, v in processed.items()}, generation_indices))
        return original(self, processed, generation_indices)

    AstreaProcessor._adjust_assistant_masks_indices = capture
    try:
        out = processor.apply_chat_template(conversations, images=images, tokenize=True, return_dict=True, padding=True,
                                            return_assistant_tokens_mask=True)
    finally:
        AstreaProcessor._adjust_assistant_masks_indices = original
    processed, generation_indices = calls[0]
    expected = ProcessorMixin._adjust_assistant_masks_indices(processor, dict(processed), generation_indices)["assistant_masks"]
    assert out["assistant_masks"] == expected
    decoded = [processor.decode([t for t, m in zip(ids, mask) if m]) for ids, mask in zip(out["input_ids"], out["assistant_masks"])]
    assert decoded == [" red</s> a long answer about shapes</s>", " yes</s>", " no image here</s> two</s>"]


def test_skip_pixels_leaves_out_only_those_experts(processor):
    images, text = [_image(), _image((1, 2, 3))], ["<image> a", "<image> b"]
    full = processor(images=images, text=text)
    with processor.skip_pixels(["caption", "detection"]):
        with processor.skip_pixels(["segmentation"]):  # nested blocks add up
            inner = processor(images=images, text=text)
        partial = processor(images=images, text=text)
    again = processor(images=images, text=text)
    assert set(inner) == {"input_ids", "attention_mask", "pixel_values_classification"}
    assert set(partial) == set(inner) | {"pixel_values_segmentation"}
    for key in partial:
        assert torch.equal(partial[key], full[key]), key
    assert set(again) == set(full)
    with pytest.raises(ValueError, match="no expert named \\['ocr'\\]"):
        with processor.skip_pixels(["ocr"]):
            pass


def test_processor_save_and_reload_gives_identical_outputs(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    from transformers import AutoProcessor

    again = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(again, AstreaProcessor) and again.num_visual_tokens == processor.num_visual_tokens
    a = processor(images=[_image()], text="<image> hi")
    b = again(images=[_image()], text="<image> hi")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pipeline_answers_a_chat_message_with_an_image(config, processor):
    from transformers import pipeline

    torch.manual_seed(0)
    model = AstreaForConditionalGeneration(config).eval()
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "Colour?"}]}]
    result = pipe(text=messages, max_new_tokens=4, do_sample=False)
    answer = result[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and isinstance(answer["content"], str)
    # Same tokens as generate() on the processor's own inputs.
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert answer["content"] == processor.decode(ids, skip_special_tokens=True)
