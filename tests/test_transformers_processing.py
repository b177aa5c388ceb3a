"""transformers' ``ProcessorTesterMixin`` run against ``AstreaProcessor``.

The pattern is transformers' ``tests/models/llava/test_processing_llava.py``; the mixin comes from
the transformers source distribution (see ``transformers_common``), so this module is skipped, with
the reason, when that cannot be had. The components are the ``tiny`` preset's: the offline
byte-level tokenizer (``<image>`` is id 3) and the per-expert image processor.
"""

from __future__ import annotations

import unittest

import transformers_common

from astrea_vlm.configuration import get_preset
from astrea_vlm.processing import AstreaImageProcessor, AstreaProcessor
from astrea_vlm.processing.tokenization import build_byte_level_tokenizer

common = transformers_common.load_or_skip()


class AstreaProcessorTest(common.processing.ProcessorTesterMixin, unittest.TestCase):
    processor_class = AstreaProcessor
    # Astrea returns one pixel tensor per expert; the first expert's is checked like LLaVA's `pixel_values`.
    images_input_name = "pixel_values_caption"
    # Every test that may skip here, and why (tests/conftest.py fails any other skip). Skips for what the
    # machine lacks (torchcodec, librosa) pass anywhere.
    expected_skips = {
        r".*(audio|video).*": "Astrea's processor has no audio or video processor (it reads images and text, as LLaVA's "
        "processor, for which the mixin skips the same tests)",
        "test_apply_chat_template_tool_calls_no_content": "Astrea's chat template has no tool calls (LLaVA's has none either)",
    }

    @classmethod
    def _setup_test_attributes(cls, processor):
        # Astrea reads videos through its image processor (frames are views), not a `video_processor`,
        # so the mixin passes it no videos; its texts must then carry no `<video>` marker either.
        cls.image_token = processor.image_token

    @classmethod
    def _setup_tokenizer(cls):
        text = get_preset("tiny").text_config
        return build_byte_level_tokenizer(text.vocab_size, model_max_length=text.max_position_embeddings)

    @classmethod
    def _setup_image_processor(cls):
        return AstreaImageProcessor.from_model_config(get_preset("tiny"))

    @staticmethod
    def prepare_processor_dict():
        return {"num_visual_tokens": get_preset("tiny").num_visual_tokens}
