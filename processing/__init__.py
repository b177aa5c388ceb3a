"""Processing for Astrea (``astrea_vlm.processing``): per-expert images, tokenizer, chat template."""

from .image_processing_astrea import AstreaImageProcessor, ExpertImageSpec, select_best_resolution, to_pil_rgb
from .processing_astrea import CHAT_TEMPLATE, IMAGE_POSITIONS, AstreaProcessor, build_chat_template


def build_processor(config, tokenizer=None, **image_processor_kwargs) -> AstreaProcessor:
    """An :class:`AstreaProcessor` matching ``config`` (its visual tokens and prompt layout); a
    byte-level tokenizer is built offline when none is given."""
    if tokenizer is None:
        from .tokenization import build_byte_level_tokenizer

        tokenizer = build_byte_level_tokenizer(
            config.text_config.vocab_size, model_max_length=config.text_config.max_position_embeddings
        )
    image_processor = AstreaImageProcessor.from_model_config(config, **image_processor_kwargs)
    processor = AstreaProcessor(image_processor, tokenizer, num_visual_tokens=config.num_visual_tokens,
                                image_position=config.image_position, system_prompt=config.system_prompt)
    if processor.image_token_id != config.image_token_id:
        raise ValueError(
            f"the tokenizer's <image> id is {processor.image_token_id} but the model's image_token_id is "
            f"{config.image_token_id}; add <image> to the tokenizer and set config.image_token_id to its id"
        )
    return processor


def _register_auto_classes() -> None:
    from transformers import AutoImageProcessor, AutoProcessor

    from ..configuration import AstreaConfig

    # One class whatever backend is asked for: AstreaImageProcessor has a single implementation, so
    # the default request ("torchvision" when installed) must not "fall back" with a warning.
    AutoImageProcessor.register(AstreaConfig, image_processor_classes={"pil": AstreaImageProcessor, "torchvision": AstreaImageProcessor},
                                exist_ok=True)
    AutoProcessor.register(AstreaConfig, AstreaProcessor, exist_ok=True)


_register_auto_classes()

__all__ = ["AstreaImageProcessor", "AstreaProcessor", "CHAT_TEMPLATE", "IMAGE_POSITIONS", "build_chat_template", "ExpertImageSpec", "build_processor", "select_best_resolution", "to_pil_rgb"]
