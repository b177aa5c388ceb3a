"""transformers' ``ModelTesterMixin`` and ``ConfigTester``, and our generation checks, run against Astrea.

The pattern is transformers' ``tests/models/llava/test_modeling_llava.py``: a model tester that
builds a config and matching inputs, and one ``unittest.TestCase`` that mixes in the common tests.
The mixins come from the transformers source distribution (see ``transformers_common``); when it
cannot be had, the generation checks (``generation_checks``, ours) still run and
``test_transformers_common_tests_are_available`` is skipped with the reason.

Skipped mixin tests: ``expected_skips`` lists each with its reason (tests/conftest.py fails any other
skip of the class). They are LLaVA's own skips, the mixin's skips for what LLaVA lacks too (sparse
FFN experts, sliding windows, partial or axial RoPE, position embeddings, an encoder-decoder), two
architectural ones, and, on a CPU machine, those that need an accelerator or the kernels library.
"""

from __future__ import annotations

import contextlib
import copy
import unittest
from unittest import mock

import pytest
import torch
import transformers_common
from generation_checks import GenerationChecks

from astrea_vlm.configuration import AstreaConfig, get_preset
from astrea_vlm.configuration.presets import PRESETS
from astrea_vlm.modeling import AstreaForConditionalGeneration, AstreaModel

try:
    common = transformers_common.load()
except transformers_common.Unavailable as error:
    if transformers_common.REQUIRED:
        raise
    common, UNAVAILABLE = None, str(error)
else:
    UNAVAILABLE = None


class AstreaModelTester:
    """The ``tiny`` preset (all four tower kinds of the paper) and inputs with one image per sample.

    Text: ``num_visual_tokens`` ``<image>`` tokens then ``text_length`` text tokens drawn above the
    special ids (pad 0, bos 1, eos 2, ``<image>`` 3). Every sample has its image, as the processor
    would give: refusing ``<image>`` ids without pixels is the model's contract.
    """

    def __init__(self, parent=None, batch_size=3, text_length=7, is_training=True, **config_overrides):
        self.parent = parent
        self.config_overrides = config_overrides
        self.config = get_preset("tiny", **config_overrides)
        text = self.config.text_config
        self.batch_size = batch_size
        self.is_training = is_training
        self.vocab_size = text.vocab_size
        self.hidden_size = text.hidden_size
        self.num_hidden_layers = text.num_hidden_layers
        self.num_attention_heads = text.num_attention_heads
        self.num_image_tokens = self.config.num_visual_tokens
        self.seq_length = text_length + self.num_image_tokens
        self.encoder_seq_length = self.seq_length
        # `get_image_features` reports the hidden states / attentions of the first expert's tower.
        first = self.config.expert_configs[self.config.expert_order[0]].tower_config
        self.vision_config = {"num_hidden_layers": first.num_hidden_layers}

    def get_config(self) -> AstreaConfig:
        return get_preset("tiny", **self.config_overrides)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixels = {
            f"pixel_values_{role}": torch.randn(self.batch_size, 3, expert.image_size, expert.image_size)
            for role, expert in config.expert_configs.items()
        }
        input_ids = torch.randint(4, self.vocab_size, (self.batch_size, self.seq_length))
        input_ids[:, : self.num_image_tokens] = config.image_token_id
        return config, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}


def _siglip_expert_config():
    """The tiny preset's SigLIP (caption) expert config, to stand in for another expert."""
    return copy.deepcopy(PRESETS["tiny"]()["caption_config"])


def _text_ids_tensor(shape, vocab_size, rng=None, name=None):
    """The mixin's ``ids_tensor`` without the tiny preset's ``<image>`` id."""
    image_token = get_preset("tiny").image_token_id
    ids = _mixin_ids_tensor(shape, vocab_size - 1, rng=rng, name=name)
    return ids + (ids >= image_token).long() if vocab_size > image_token else ids


_mixin_ids_tensor = common.modeling.ids_tensor if common else None
_BASES = (common.modeling.ModelTesterMixin, GenerationChecks) if common else (GenerationChecks,)


class AstreaForConditionalGenerationModelTest(*_BASES, unittest.TestCase):
    all_model_classes = (AstreaModel, AstreaForConditionalGeneration)
    _is_composite = True
    # `test_get_image_features_output` reads the batch size from `pixel_values`; Astrea has one
    # pixel tensor per expert (`pixel_values_<role>`). The shapes are checked in test_hf_contract_model.
    skip_test_image_features_output_shape = True

    # Every mixin test that may skip here, and why (test name pattern -> reason). Skips for what the
    # machine lacks (an accelerator, flash-attn, the kernels library, RUN_SLOW) pass anywhere.
    expected_skips = {
        # As LLaVA's test (tests/models/llava/test_modeling_llava.py): the reasons on the skips below.
        r"test_training_gradient_checkpointing(_use_reentrant_(true|false))?": "as LLaVA",
        "test_flash_attention_2_padding_matches_padding_free_with_position_ids": "as LLaVA",
        # Architectural, written on the skip below: timm towers initialise themselves.
        "test_can_init_all_missing_weights": "architectural (the timm towers)",
        # The mixin's own skips for features that LLaVA (Llama LLM) lacks as well.
        r"test_eager_matches_batched_and_grouped_inference_.*": "no sparse FFN experts (@use_experts_implementation): "
        "Astrea's experts are vision towers mixed by a dense router, not grouped_mm expert layers",
        "test_moe_models_record_router_logits": "no sparse FFN experts (as above)",
        "test_output_router_logits_from_config": "no sparse FFN experts: the config has no output_router_logits",
        "test_encoder_decoder_loss_no_double_shift": "a decoder-only LLM",
        "test_model_rope_with_partial_rotation": "the LLM's RoPE has no partial_rotary_factor",
        "test_vision_axial_rope": "no axial (2-D) RoPE layer",
        "test_sliding_window_mask": "no sliding-window attention",
        "test_resize_position_vector_embeddings": "no position-embedding table (RoPE)",
        "test_sdpa_can_dispatch_non_composite_models": "a composite model (its composite twin below)",
        r"test_keep_in_fp32_modules(_exist)?": "no module kept in float32 (_keep_in_fp32_modules is empty, as LLaVA's)",
        # Architectural: the composite SDPA check finds one modality tower by attribute name (vision_tower,
        # visual, ...); Astrea has four, `model.towers[role]`. test_hf_contract_model's
        # test_sdpa_reaches_every_tower_that_has_it_and_matches_eager checks each of them (Grounding-DINO
        # stays eager) and that an eager load leaves no SDPA layer.
        "test_sdpa_can_dispatch_composite_models": "four vision towers, not one `vision_tower`",
    }

    # The mixin's attention tests pass only `main_input_name` and these; an <image> id needs its pixels.
    additional_model_inputs = [f"pixel_values_{role}" for role in get_preset("tiny").expert_order]

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The mixin tells a base model from a task model, and which labels a model takes, by class
        # name in transformers' own auto tables, where an in-library model is listed. Astrea is
        # listed where LLaVA is, for this class only.
        from transformers.models.auto import modeling_auto

        cls._auto_tables = contextlib.ExitStack()  # the class-wide patches below
        for table, name in (
            ("MODEL_MAPPING_NAMES", "AstreaModel"),
            ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AstreaForConditionalGeneration"),
            ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "AstreaForConditionalGeneration"),
            ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "AstreaForConditionalGeneration"),
        ):
            cls._auto_tables.enter_context(mock.patch.dict(getattr(modeling_auto, table), {"astrea": name}))
        # The mixin's text-only inputs (the RoPE tests) are random ids over the whole vocabulary, so
        # they would hold the <image> placeholder without images, which Astrea refuses (and should).
        # Random text is drawn from the other ids, each as likely.
        if common is not None:
            cls._auto_tables.enter_context(mock.patch.object(common.modeling, "ids_tensor", _text_ids_tensor))

    @classmethod
    def tearDownClass(cls):
        cls._auto_tables.close()
        super().tearDownClass()

    def setUp(self):
        self.model_tester = AstreaModelTester(self)
        if common is not None:
            self.config_tester = common.configuration.ConfigTester(
                self, config_class=AstreaConfig, has_text_modality=False, common_properties=["image_token_id", "num_visual_tokens"]
            )

    def test_config(self):
        if common is None:
            self.skipTest(UNAVAILABLE)
        self.config_tester.run_common_tests()

    if common is not None:

        @common.modeling.parameterized.expand(common.modeling.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION)
        def test_eager_matches_sdpa_inference(self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels):
            # The mixin runs a batch of 7 and fills missing rows with random ids below 5, which include
            # <image> (3) without its pixels; a tester batch of 7 gives it seven real image+text samples.
            self.model_tester = AstreaModelTester(self, batch_size=7)
            common.modeling._test_eager_matches_sdpa_inference(self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels)

    # The mixin skips the attention switch for any model holding a sub-model that lacks SDPA or the
    # AttentionInterface ("Parts of this model cannot set attention dynamically"). Architectural: that is
    # transformers' GroundingDinoModel (the detection tower), which Astrea uses as transformers ships it.
    # Every other tower kind has the switch, so both tests run on the tiny preset with a SigLIP tower in
    # the detection expert's place (the Swin, SAM2, SigLIP and Llama sub-models keep theirs). That
    # Grounding-DINO stays on eager when the others switch is test_hf_contract_model's
    # test_sdpa_reaches_every_tower_that_has_it_and_matches_eager.
    def test_can_set_attention_dynamically(self):
        self.model_tester = AstreaModelTester(self, detection_config=_siglip_expert_config())
        super().test_can_set_attention_dynamically()

    def test_can_set_attention_dynamically_composite_model(self):
        self.model_tester = AstreaModelTester(self, detection_config=_siglip_expert_config())
        super().test_can_set_attention_dynamically_composite_model()

    @unittest.skip(
        reason="Architectural: the timm towers (RAM++ Swin) initialise themselves at construction with timm's own "
        "schemes (convolutions, relative-position tables), which Astrea's _init_weights leaves alone so that a fresh "
        "model's random weights stay what they were; the mixin's seeded re-initialisation cannot reproduce them. "
        "(LLaVA's only tower is a transformers model.) The mixin itself would skip it: no copyright year in the config module."
    )
    def test_can_init_all_missing_weights(self):
        pass

    # As LLaVA's test (tests/models/llava/test_modeling_llava.py):
    @unittest.skip(reason="As LLaVA: this architecture's gradients under gradient checkpointing are not checked (transformers PR 27124)")
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(reason="As LLaVA: this architecture's gradients under gradient checkpointing are not checked (transformers PR 27124)")
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    @unittest.skip(reason="As LLaVA: this architecture's gradients under gradient checkpointing are not checked (transformers PR 27124)")
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip(reason="As LLaVA: VLM inputs need image/mask preparation for pad-free batches; the LLM's own tests cover it")
    def test_flash_attention_2_padding_matches_padding_free_with_position_ids(self):
        pass


def test_transformers_common_tests_are_available():
    """Says, as a skip reason, why the mixins did not run (an error instead when CI requires them)."""
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    assert issubclass(AstreaForConditionalGenerationModelTest, common.modeling.ModelTesterMixin)
