"""The transformers processor contract (issue 17, items 11-14): kwargs, image layouts, chat template.

``AstreaProcessor.__call__`` follows transformers' ``ProcessingKwargs`` (``_merge_kwargs``): text
kwargs reach the tokenizer, image kwargs the image processor, flat or structured, construction
defaults stay unless a call overrides them and a key given twice raises. Pixel values are checked
against a hand computation of each expert's own pipeline (filter, aspect policy, rescale, normalise).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from astrea_vlm.configuration import get_preset
from astrea_vlm.processing import AstreaImageProcessor, AstreaProcessor, build_processor


@pytest.fixture(scope="module")
def config():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def processor(config):
    return build_processor(config)


def _image(seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _by_hand(image, spec, rescale=None, normalize=True, mean=None, std=None):
    """What the image processor must produce for one expert, in float32 numpy.

    Each expert's own pipeline: a square, or (keep_aspect_ratio) the shortest side ``size`` with the
    other side scaled and truncated; PIL's filter on the 8-bit image, or torch's antialiased resize
    of the rescaled float image (resize_on="tensor", as ToTensor then Resize).
    """
    if spec["keep_aspect_ratio"]:
        short, long = sorted((image.height, image.width))
        assert long * spec["size"] / short <= spec["max_size"]  # the cap is not reached by these images
        height, width = (spec["size"], int(spec["size"] * image.width / image.height)) if image.height <= image.width else (
            int(spec["size"] * image.height / image.width), spec["size"])
    else:
        height = width = spec["size"]
    if spec["resize_on"] == "tensor":
        values = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        values = values / 255.0 if rescale is None else values * float(np.float32(rescale))
        values = torch.nn.functional.interpolate(values[None], size=(height, width), mode=spec["resample"], antialias=True)[0]
        pixels = values.permute(1, 2, 0).numpy()
    else:
        pixels = np.asarray(image.resize((width, height), _FILTERS[spec["resample"]]), dtype=np.float32)
        pixels = pixels / 255.0 if rescale is None else pixels * np.float32(rescale)
    if normalize:
        pixels = (pixels - np.asarray(mean or spec["image_mean"], dtype=np.float32)) / np.asarray(std or spec["image_std"], dtype=np.float32)
    return pixels.transpose(2, 0, 1)


# --------------------------------------------------------------------- 11: ProcessingKwargs
def test_default_pixels_are_each_experts_own_pipeline_bit_for_bit(processor):
    image = _image()
    batch = processor(images=[image], text="<image> hi")
    for role, spec in processor.image_processor.experts.items():
        np.testing.assert_array_equal(batch[f"pixel_values_{role}"][0].numpy(), _by_hand(image, spec))


def test_padding_to_max_length_pads_and_text_kwargs_reach_the_tokenizer(processor, config):
    batch = processor(images=[_image()], text="<image> hi", padding="max_length", max_length=40)
    assert batch["input_ids"].shape == (1, 40)
    pad = processor.tokenizer.pad_token_id
    real = int(batch["attention_mask"].sum())
    assert batch["input_ids"][0, : 40 - real].eq(pad).all()  # left padding: the tokenizer's side
    right = processor(images=[_image()], text="<image> hi", padding="max_length", max_length=40, padding_side="right")
    assert right["input_ids"][0, real:].eq(pad).all() and right["input_ids"][0, :real].tolist() == batch["input_ids"][0, -real:].tolist()
    no_mask = processor(images=[_image()], text="<image> hi", return_attention_mask=False)
    assert "attention_mask" not in no_mask
    lists = processor(images=[_image()], text="<image> hi", return_tensors=None)
    assert isinstance(lists["input_ids"], list)
    # Truncation that would cut into an image is refused, naming the cause; text-only truncation works.
    with pytest.raises(ValueError, match="truncation .*cut into its image"):
        processor(images=[_image()], text="<image> a long question about it", truncation=True, max_length=10)
    short = processor(text="a long question about the scene", truncation=True, max_length=5)
    assert short["input_ids"].shape == (1, 5)


def test_image_kwargs_reach_the_image_processor(processor):
    image = _image(1)
    specs = processor.image_processor.experts
    rescaled = processor(images=[image], text="<image> x", do_rescale=True, rescale_factor=-1.0)
    plain = processor(images=[image], text="<image> x", do_normalize=False)
    stats = processor(images=[image], text="<image> x", images_kwargs={"image_mean": [0.25, 0.5, 0.75], "image_std": [2.0, 2.0, 2.0]})
    for role, spec in specs.items():
        key = f"pixel_values_{role}"
        np.testing.assert_array_equal(rescaled[key][0].numpy(), _by_hand(image, spec, rescale=-1.0))
        np.testing.assert_array_equal(plain[key][0].numpy(), _by_hand(image, spec, normalize=False))
        np.testing.assert_array_equal(stats[key][0].numpy(), _by_hand(image, spec, mean=[0.25, 0.5, 0.75], std=[2.0, 2.0, 2.0]))
    resized = processor.image_processor(images=[image], size={"height": 24, "width": 24})
    for role, spec in specs.items():
        # Squares become 24x24; an aspect-preserving expert (Grounding-DINO) gets 24 as its shortest side.
        expected = (1, 3, 24, 32) if spec["keep_aspect_ratio"] else (1, 3, 24, 24)
        assert resized[f"pixel_values_{role}"].shape == expected, role
        np.testing.assert_array_equal(resized[f"pixel_values_{role}"][0].numpy(), _by_hand(image, {**spec, "size": 24}))
    with pytest.raises(ValueError, match="crop_size is not supported"):
        processor(images=[image], text="<image> x", crop_size={"height": 8, "width": 8})
    with pytest.raises(ValueError, match="towers read squares"):
        processor(images=[image], text="<image> x", size={"height": 24, "width": 32})


def test_construction_defaults_hold_until_a_call_overrides_them(config, processor):
    image = _image(2)
    image_processor = AstreaImageProcessor.from_model_config(config, do_normalize=False)
    custom = AstreaProcessor(image_processor, processor.tokenizer, num_visual_tokens=config.num_visual_tokens)
    spec = image_processor.experts["caption"]
    np.testing.assert_array_equal(custom(images=[image], text="<image> x")["pixel_values_caption"][0].numpy(), _by_hand(image, spec, normalize=False))
    np.testing.assert_array_equal(
        custom(images=[image], text="<image> x", do_normalize=True)["pixel_values_caption"][0].numpy(), _by_hand(image, spec)
    )
    # ... and they survive save_pretrained / from_pretrained.
    assert image_processor.to_dict()["do_normalize"] is False


def test_a_kwarg_given_twice_raises_and_structured_kwargs_work(processor):
    with pytest.raises(ValueError, match="passed two times"):
        processor(images=[_image()], text="<image> x", images_kwargs={"do_rescale": True}, do_rescale=True)
    with pytest.raises(ValueError, match="passed two times"):
        processor(images=[_image()], text="<image> x", text_kwargs={"padding": "longest"}, padding="max_length")
    batch = processor(images=[_image()], text="<image> x", text_kwargs={"padding": "max_length", "max_length": 30}, common_kwargs={"return_tensors": "np"})
    assert isinstance(batch["input_ids"], np.ndarray) and batch["input_ids"].shape == (1, 30)


def test_call_arguments_default_to_none():
    parameters = inspect.signature(AstreaProcessor.__call__).parameters
    named = [name for name, p in parameters.items() if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    assert named == ["images", "text"]
    assert all(parameters[name].default is None for name in named)


# --------------------------------------------------------------------- 12: image layouts
def test_channels_first_arrays_equal_channels_last(processor):
    rng = np.random.default_rng(3)
    last = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    first = np.ascontiguousarray(last.transpose(2, 0, 1))
    expected = processor(images=[last], text="<image> x")
    for image, kwargs in ((first, {}), (first, {"input_data_format": "channels_first"}), (torch.from_numpy(first), {})):
        got = processor(images=[image], text="<image> x", **kwargs)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
    # A 3x5x3 array is ambiguous: input_data_format decides.
    small = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    as_first = processor.image_processor(images=[small], input_data_format="channels_first")
    as_last = processor.image_processor(images=[small], input_data_format="channels_last")
    np.testing.assert_array_equal(as_first["pixel_values_caption"].numpy(), processor.image_processor(images=[small.transpose(1, 2, 0)])["pixel_values_caption"].numpy())
    assert not torch.equal(as_first["pixel_values_caption"], as_last["pixel_values_caption"])
    with pytest.raises(ValueError, match="input_data_format"):
        processor.image_processor(images=[small], input_data_format="sideways")


# ------------------------------------------------------------------ 14: chat template images
def test_apply_chat_template_with_images_tokenized_untokenized_dict_and_batched(processor, config):
    image, other = _image(4), _image(5)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": other}]}],
    ]
    text = processor.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=False)
    assert text.count("<image>") == 1 and text.endswith("ASSISTANT:")
    ids = processor.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=True)
    direct = processor(images=[image], text=text, add_special_tokens=False)
    assert ids == direct["input_ids"].tolist()  # lists, as transformers' processors return them
    as_dict = processor.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    for key, value in direct.items():
        assert torch.equal(as_dict[key], value), key
    batched = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    n = config.num_visual_tokens
    assert batched["pixel_values_caption"].shape[0] == 2
    assert batched["input_ids"].eq(config.image_token_id).sum(-1).tolist() == [n, n]
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    alone = processor(images=[image, other], text=texts, add_special_tokens=False)
    for key, value in alone.items():
        assert torch.equal(batched[key], value), key
