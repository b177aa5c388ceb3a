"""Checks of the model's forward inputs: malformed ids, embeddings, masks or pixels fail with an
error that names the input and the fix, before torch fails deep inside."""

from __future__ import annotations

import torch


def check_inputs(model, input_ids, inputs_embeds, attention_mask, past_key_values, pixel_values) -> None:
    """Refuse malformed inputs with a ValueError/TypeError naming them, before torch fails deep inside.

    Three reductions (id range, finite pixels, the cache length) are the only cost; they are skipped
    while compiling.
    """
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"`input_ids` must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"`input_ids` must be (batch, seq_len) with seq_len >= 1, got shape {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point() or inputs_embeds.dim() != 3:
            raise TypeError("`inputs_embeds` must be a float tensor (batch, seq_len, hidden_size)")
        hidden = model.config.text_config.hidden_size
        if inputs_embeds.shape[1] == 0 or inputs_embeds.shape[-1] != hidden:
            raise ValueError(f"`inputs_embeds` must be (batch, seq_len >= 1, {hidden}), got {tuple(inputs_embeds.shape)}")
        shape = tuple(inputs_embeds.shape[:2])
    for role, value in pixel_values.items():
        name = f"pixel_values_{role}"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch tensor, got {type(value).__name__}; AstreaProcessor returns tensors")
        if not value.is_floating_point():
            raise TypeError(
                f"`{name}` has dtype {value.dtype}: pixel values are normalised floats, not raw image bytes; "
                "preprocess the images with AstreaProcessor / AstreaImageProcessor"
            )
        if value.dim() != 4:
            raise ValueError(f"`{name}` must be (n_images, 3, height, width), got shape {tuple(value.shape)}")
    if torch.compiler.is_compiling():
        return
    if attention_mask is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        # A static cache's length is a tensor: read only outside compilation (a graph break otherwise).
        cached = past_key_values is not None and (past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else 1) > 0
        ok = attention_mask.shape[0] == shape[0] and (attention_mask.shape[1] >= shape[1] if cached else attention_mask.shape[1] == shape[1])
        if not ok:
            raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)} but the input is {shape}; pad both the same way")
    if input_ids is not None:
        vocab = model.get_input_embeddings().num_embeddings
        if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            raise ValueError(
                f"`input_ids` holds ids outside the vocabulary [0, {vocab}) (min {int(input_ids.min())}, max {int(input_ids.max())}); "
                "use the model's tokenizer, or resize the embeddings after adding tokens"
            )
    for role, value in pixel_values.items():
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"`pixel_values_{role}` holds NaN or infinite values; check the images and their preprocessing")


def check_features(name: str, value, tokens: int, width: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"`{name}` must be a float tensor, got {getattr(value, 'dtype', type(value).__name__)}")
    if value.dim() != 3 or value.shape[1:] != (tokens, width):
        raise ValueError(f"`{name}` must be (n_images, {tokens}, {width}), got shape {tuple(value.shape)}")
    return value


def check_pixel_masks(pixel_values: dict, pixel_masks: dict) -> None:
    for role, mask in pixel_masks.items():
        name = f"pixel_mask_{role}"
        if role not in pixel_values:
            raise ValueError(f"`{name}` was given without `pixel_values_{role}`; pass both (AstreaProcessor makes them together)")
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"`{name}` must be an integer or bool tensor (1 on the image, 0 on the padding), got {getattr(mask, 'dtype', type(mask).__name__)}")
        pixels = pixel_values[role]
        if pixels.dim() == 4 and tuple(mask.shape) != (pixels.shape[0], *pixels.shape[-2:]):
            raise ValueError(f"`{name}` must be (n_images, height, width) = {(pixels.shape[0], *pixels.shape[-2:])}, got {tuple(mask.shape)}")
