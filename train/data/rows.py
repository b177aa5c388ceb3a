"""The row format every dataset here uses: TRL 1.16's conversational vision-language rows.

``{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]},
{"role": "assistant", "content": [{"type": "text", "text": ...}]}], "images": [PIL.Image],
"image_id": str}``: bare ``{"type": "image"}`` placeholders, filled from ``images`` in order by
TRL's ``prepare_multimodal_messages`` (see ``docs/training_data.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def row_features(extra: Mapping[str, Any] | None = None):
    from datasets import Features, Image, List, Value

    feats = {
        "messages": List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}),
        "images": List(Image()),
        "image_id": Value("string"),
    }
    feats.update(extra or {})
    return Features(feats)


def make_dataset(rows: list[dict[str, Any]], features):
    """``Dataset.from_list`` that also accepts an empty list."""
    import datasets

    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    if "images" in features:
        rows = _encode_images_once(rows)
    return datasets.Dataset.from_list(rows, features=features)


def _encode_images_once(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose PIL images are replaced by their encoded form, each distinct image encoded once.

    The QA rows of one scene share its image object; ``Dataset.from_list`` would PNG-encode it
    once per row (6-7 times a scene, most of the dataset's build time). The bytes are what the
    ``Image`` feature itself would store, so the dataset is unchanged.
    """
    from datasets.features.image import encode_pil_image
    from PIL import Image as PILImage

    encoded: dict[int, dict[str, Any]] = {}

    def encode(image):
        if not isinstance(image, PILImage.Image):
            return image
        if id(image) not in encoded:
            encoded[id(image)] = encode_pil_image(image)
        return encoded[id(image)]

    return [{**row, "images": [encode(image) for image in row["images"]]} if row.get("images") else row for row in rows]


def single_turn_row(image: Any, prompt: str, answer: str, image_id: str, image_position: str = "before", **extra: Any) -> dict[str, Any]:
    """One TRL conversational VLM row: the image placeholder, then the prompt (or the reverse, with
    ``image_position="after"``); the answer."""
    parts = [{"type": "image"}, {"type": "text", "text": prompt}]
    if image_position == "after":
        parts.reverse()
    elif image_position != "before":
        raise ValueError(f"image_position={image_position!r}: use 'before' or 'after' (the prompt)")
    return {
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image],
        "image_id": str(image_id),
        **extra,
    }
