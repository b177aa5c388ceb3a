"""AstreaProcessor: tokenizer + per-expert image processor + chat template.

Text holds one ``<image>`` marker per image and one ``<video>`` marker per video. The processor
expands every marker to the exact number of ``<image>`` tokens the model fills: ``num_views *
num_visual_tokens`` for an image (one view, or the whole image plus its AnyRes tiles) and
``num_frames * num_visual_tokens`` for a video. Images and videos are consumed in the order their
markers appear, sample after sample, so a batch can mix samples with several images, videos or none.

The chat template is Vicuna-style (``USER: ... ASSISTANT: ...``), the format of the paper's LLMs,
with ``{% generation %}`` markers around every assistant answer so that TRL's
``assistant_only_loss=True`` trains on answers only (paper eq. 1). It also carries the *prompt
layout* a model was trained with, so that every client prompts it the same way: ``image_position``
(a user turn's images ``"before"`` its text, LLaVA's layout, or ``"after"`` it) and an optional
default ``system_prompt``; the parts of a user turn are joined by ``"\n"``
(``USER: <image>\nWhat is it?`` or ``USER: What is it?\n<image>``).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import re
from collections.abc import Iterable, Mapping

import numpy as np

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.tokenization_utils_base import TextInput

from .image_processing_astrea import flatten_images, flatten_videos

#: Values of ``image_position``: where a user turn's images (and videos) go relative to its text.
IMAGE_POSITIONS = ("before", "after")

#: First line of every template :func:`build_chat_template` writes (how a saved template is recognised as one).
TEMPLATE_MARK = "{#- astrea chat template v2: Vicuna-style, with the prompt layout -#}"

# The body reads `image_position` and `system_prompt`; :func:`build_chat_template` puts their defaults in
# front of it. A user turn renders its media and its text as two groups in `image_position` order
# (each group in the order given), every part separated from the next by a newline.
_TEMPLATE_BODY = (
    "{% if image_position not in ['before', 'after'] %}"
    "{{ raise_exception('image_position must be before or after (the prompt), got ' + image_position | string) }}{% endif %}"
    "{{ bos_token }}"
    "{% if system_prompt and (messages | length == 0 or messages[0]['role'] != 'system') %}{{ system_prompt }}{{ '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% set media = parts | selectattr('type', 'in', ['image', 'video']) | list %}"
    "{% set texts = parts | rejectattr('type', 'in', ['image', 'video']) | list %}"
    "{{ 'USER: ' }}"
    "{% for part in (media + texts if image_position == 'before' else texts + media) %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT:' }}{% generation %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_chat_template(image_position: str = "before", system_prompt: str | None = None) -> str:
    """The Vicuna-style chat template with this prompt layout as its defaults.

    The defaults are written into the template itself, so that the saved ``chat_template.jinja``
    prompts the model as it was trained wherever it is rendered; ``apply_chat_template(...,
    image_position=..., system_prompt=...)`` still overrides them for one call.
    """
    check_prompt_layout(image_position, system_prompt)
    # json.dumps gives a quoted, escaped literal that Jinja reads back unchanged
    system = "none" if system_prompt is None else json.dumps(system_prompt)
    return (
        TEMPLATE_MARK
        + f"{{% if image_position is not defined or image_position is none %}}{{% set image_position = {json.dumps(image_position)} %}}{{% endif %}}"
        + f"{{% if system_prompt is not defined %}}{{% set system_prompt = {system} %}}{{% endif %}}"
        + _TEMPLATE_BODY
    )


def check_prompt_layout(image_position: str, system_prompt: str | None = None) -> None:
    """Raise ValueError naming a bad ``image_position`` / ``system_prompt``."""
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"image_position={image_position!r}: use 'before' (the images, then the prompt, as in LLaVA) "
                         f"or 'after' (the prompt, then the images)")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")


#: The template with the default layout (images first, no system prompt).
CHAT_TEMPLATE = build_chat_template()

_MARKERS = re.compile(r"<image>|<video>")

#: What the chat template renders; anything else would be dropped silently, so it is refused.
CHAT_ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image", "video")


def check_conversation(conversation, index: int | None = None) -> None:
    """Raise ValueError/TypeError naming the message and part the chat template cannot render faithfully."""
    where = "" if index is None else f"conversation {index}: "
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"{where}a conversation must be a non-empty list of messages, got {conversation!r:.80}")
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise TypeError(f"{where}message {i} must be a dict with `role` and `content`, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}message {i} has unknown role {role!r}; use one of {CHAT_ROLES}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise TypeError(f"{where}message {i} content must be a string or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise TypeError(f"{where}message {i} content part {j} must be a dict with a `type`, got {type(part).__name__}")
            kind = part.get("type")
            if kind not in CONTENT_TYPES:
                raise ValueError(f"{where}message {i} content part {j} has unknown content type {kind!r}; Astrea reads {CONTENT_TYPES}")
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{where}message {i} content part {j} is a text part without a string `text`")
            if kind != "text" and role != "user":
                raise ValueError(f"{where}message {i} ({role}) has an {kind} part; images and videos go in user messages only")


def _order_user_parts(conversation, image_position: str) -> list:
    """The conversation with each user message's media ``image_position`` its text (for templates
    that do not place them themselves)."""
    out = []
    for message in conversation:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, (list, tuple)):
            media = [p for p in content if p.get("type") in ("image", "video")]
            texts = [p for p in content if p.get("type") not in ("image", "video")]
            message = {**message, "content": media + texts if image_position == "before" else texts + media}
        out.append(message)
    return out


class AstreaProcessor(ProcessorMixin):
    r"""Processor of :class:`AstreaForConditionalGeneration`.

    Args:
        image_processor (:class:`AstreaImageProcessor`): per-expert pixels (and AnyRes / video views).
        tokenizer: any tokenizer with ``<image>`` as an added special token whose id is the
            model's ``image_token_id``.
        num_visual_tokens (`int`): tokens per view; must equal the model's ``num_visual_tokens``.
        image_position (`str`, defaults to `"before"`): the prompt layout the model was trained
            with: a user turn's images ``"before"`` its text (LLaVA's layout) or ``"after"`` it.
        system_prompt (`str`, *optional*): rendered first when a conversation has no system message.
        chat_template (`str`, *optional*): defaults to the Vicuna-style template above, with this
            layout as its defaults (:func:`build_chat_template`).

    The layout is saved with the processor (``processor_config.json`` and the template's defaults),
    so ``apply_chat_template`` -- and the ``image-text-to-text`` pipeline, ``astrea eval`` and the
    lmms-eval adapter, which call it -- prompt the model as it was trained, whatever order the
    caller lists a message's parts in; ``apply_chat_template(..., image_position="after")``
    overrides it for one call. Change it with :meth:`set_prompt_layout`.
    """

    image_token = "<image>"
    video_token = "<video>"
    # Call defaults (transformers' ProcessingKwargs: processor attributes, overridden per call).
    text_kwargs = {"padding": True, "return_tensors": "pt"}

    def __init__(self, image_processor=None, tokenizer=None, num_visual_tokens: int = 576, image_position: str = "before",
                 system_prompt: str | None = None, chat_template: str | None = None, **kwargs):
        check_prompt_layout(image_position, system_prompt)
        if chat_template is None:
            chat_template = build_chat_template(image_position, system_prompt)
        self.num_visual_tokens = num_visual_tokens
        self.image_position = image_position
        self.system_prompt = system_prompt
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if self.image_token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {self.image_token!r} token; add it as a special token")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        # Experts whose pixels calls leave out (see `skip_pixels`); not saved with the processor.
        self._skipped_pixel_roles: frozenset[str] = frozenset()

    @property
    def prompt_layout(self) -> dict:
        """``{"image_position", "system_prompt"}``: how this processor prompts the model."""
        return {"image_position": self.image_position, "system_prompt": self.system_prompt}

    def set_prompt_layout(self, image_position: str | None = None, system_prompt: str | None = ...) -> None:
        """Change the prompt layout (``None`` / left out: unchanged; ``system_prompt=None``: none)
        and rewrite the chat template's defaults to match. A custom template (not written by
        :func:`build_chat_template`) cannot be rewritten, so changing its layout is an error."""
        image_position = self.image_position if image_position is None else image_position
        system_prompt = self.system_prompt if system_prompt is ... else system_prompt
        check_prompt_layout(image_position, system_prompt)
        if (image_position, system_prompt) == (self.image_position, self.system_prompt):
            return
        if not str(self.chat_template).startswith(TEMPLATE_MARK):
            raise ValueError("this processor has a custom chat template, which cannot take another prompt layout; "
                             "rebuild the processor with chat_template=None to use astrea's template")
        self.image_position, self.system_prompt = image_position, system_prompt
        self.chat_template = build_chat_template(image_position, system_prompt)

    @contextlib.contextmanager
    def skip_pixels(self, roles: Iterable[str]):
        """Within the block, calls return no ``pixel_values_<role>`` for ``roles``.

        For callers that already have those experts' features, e.g. the feature-cache collator:
        it wraps a TRL collator that calls this processor, and would otherwise resize and
        normalise every image for experts whose pixels it then drops. Tokens are unchanged.
        """
        roles = frozenset(roles)
        unknown = sorted(roles - set(self.image_processor.experts))
        if unknown:
            raise ValueError(f"no expert named {unknown}; this processor's experts are {list(self.image_processor.experts)}")
        previous = getattr(self, "_skipped_pixel_roles", frozenset())
        self._skipped_pixel_roles = previous | roles
        try:
            yield self
        finally:
            self._skipped_pixel_roles = previous

    # ------------------------------------------------------------------------- helpers
    def _expand_text(self, texts: list[str], images: list, videos: list, input_data_format=None, num_frames=None) -> tuple[list[str], list, list]:
        """Replace every marker by its ``<image>`` tokens and collect the views in marker order.

        Also returns, per sample, each replacement's offsets in transformers' layout
        (``{"type", "span", "new_span", "text", "replacement"}``: character spans before and after
        expansion), which ``apply_chat_template`` needs to place assistant masks.
        """
        n_image_markers = sum(t.count(self.image_token) for t in texts)
        n_video_markers = sum(t.count(self.video_token) for t in texts)
        if n_image_markers != len(images):
            raise ValueError(
                f"The number of {self.image_token} tokens in the prompts should be the same as the number of images: "
                f"the text has {n_image_markers} {self.image_token} marker(s) but {len(images)} image(s) were given; "
                f"put one {self.image_token} in the text per image (apply_chat_template does this for "
                f"{{'type': 'image'}} content) or pass as many images as markers"
            )
        if n_video_markers != len(videos):
            raise ValueError(
                f"The number of {self.video_token} tokens in the prompts should be the same as the number of videos: "
                f"the text has {n_video_markers} {self.video_token} marker(s) but {len(videos)} video(s) were given; "
                f"put one {self.video_token} in the text per video or pass as many videos as markers"
            )
        image_iter, video_iter = iter(images), iter(videos)
        views, expanded, offsets = [], [], []
        for text in texts:
            pieces, last, length, sample_offsets = [], 0, 0, []
            for match in _MARKERS.finditer(text):
                pieces.append(text[last : match.start()])
                length += match.start() - last
                if match.group() == self.image_token:
                    item_views = self.image_processor.image_views(next(image_iter), input_data_format)
                    replacement = self.replace_image_token({"views": [item_views]}, 0)
                else:
                    item_views = self.image_processor.video_views(next(video_iter), num_frames, input_data_format)
                    replacement = self.replace_video_token({"views": [item_views]}, 0)
                views.extend(item_views)
                pieces.append(replacement)
                sample_offsets.append(
                    {
                        "type": "image" if match.group() == self.image_token else "video",
                        "span": (match.start(), match.end()),
                        "new_span": (length, length + len(replacement)),
                        "text": match.group(),
                        "replacement": replacement,
                    }
                )
                length += len(replacement)
                last = match.end()
            pieces.append(text[last:])
            expanded.append("".join(pieces))
            offsets.append(sample_offsets)
        return expanded, views, offsets

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The ``<image>`` tokens that replace the marker of image ``image_idx``: N per view."""
        return self.image_token * (len(image_inputs["views"][image_idx]) * self.num_visual_tokens)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        """A video's marker becomes N ``<image>`` tokens per sampled frame (frames are views)."""
        return self.image_token * (len(video_inputs["views"][video_idx]) * self.num_visual_tokens)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """``<image>`` tokens and views per image of the given ``(height, width)`` sizes (vLLM's helper)."""
        data = {}
        if image_sizes is not None:
            views = [self.image_processor.num_views_for_size(height, width) for height, width in image_sizes]
            data = {"num_image_tokens": [n * self.num_visual_tokens for n in views], "num_image_patches": views}
        return MultiModalData(**data)

    def __call__(self, images: ImageInput | None = None, text: TextInput | list[TextInput] | None = None, **kwargs) -> BatchFeature:
        """Tokenise ``text`` with expanded image markers and process ``images`` / ``videos``.

        Returns ``input_ids``, ``attention_mask`` and one ``pixel_values_<role>`` per expert (when
        images or videos are given). Keyword arguments follow transformers' ``ProcessingKwargs``:
        text ones (``padding``, ``truncation``, ``max_length``, ``padding_side``, ...) go to the
        tokenizer, image ones (``do_rescale``, ``image_mean``, ``size``, ...) to the image processor,
        flat or as ``text_kwargs={...}`` / ``images_kwargs={...}``; a key given both ways raises.
        Defaults: ``padding=True`` (to the longest; on the left, the tokenizer's side, for
        generation -- pass ``padding_side="right"`` for training collators) and ``return_tensors="pt"``.

        ``videos=`` (keyword): lists of frames, one ``<video>`` marker each; the frames are image views
        of the image processor (``num_frames`` of them, or ``videos_kwargs={"num_frames": n}``), not
        transformers' video modality -- there is no video processor, so it is not a named argument.
        """
        if text is None:
            raise ValueError("AstreaProcessor needs `text`; put one <image> marker per image in it")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"`text` must be a string or a list of strings, got {type(text).__name__}")
        if not texts:
            raise ValueError("`text` is an empty list; pass at least one string")
        videos = kwargs.pop("videos", None)
        kwargs.pop("audio", None)  # apply_chat_template passes audio=None; Astrea reads no audio
        merged = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        input_data_format = images_kwargs.pop("input_data_format", None)
        image_list, video_list = flatten_images(images), flatten_videos(videos)
        expanded, views, offsets = self._expand_text(
            texts, image_list, video_list, input_data_format=input_data_format, num_frames=merged["videos_kwargs"].get("num_frames")
        )

        return_offsets = text_kwargs.pop("return_text_replacement_offsets", None) or merged.get("return_text_replacement_offsets")
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", None) or merged.get("return_mm_token_type_ids")
        encoding = self.tokenizer(expanded, return_tensors=None, **text_kwargs)
        lengths = [sum(mask) for mask in encoding["attention_mask"]] if "attention_mask" in encoding else [len(i) for i in encoding["input_ids"]]
        empty = [index for index, length in enumerate(lengths) if length == 0]
        if empty:
            raise ValueError(f"text sample(s) {empty} are empty (no tokens); give every sample some text or an <image> marker")
        self._check_image_tokens(expanded, encoding["input_ids"])
        limit = text_kwargs.get("max_length") or getattr(self.tokenizer, "model_max_length", None)
        if limit is not None and limit < 10**9:
            longest = max(len(ids) for ids in encoding["input_ids"])
            if longest > limit:
                raise ValueError(
                    f"a sample is {longest} tokens long (its images count {self.num_visual_tokens} tokens per view) "
                    f"but the model context is {limit}; shorten the text or pass fewer images / frames"
                )
        data = dict(encoding)
        if return_offsets:
            data["text_replacement_offsets"] = offsets
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(data["input_ids"])
        if views:
            skipped = getattr(self, "_skipped_pixel_roles", frozenset())
            roles = [role for role in self.image_processor.experts if role not in skipped] if skipped else None
            data.update(self.image_processor.pixels_for_views(views, return_tensors=None, roles=roles, **images_kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"])

    def _check_image_tokens(self, texts: list[str], input_ids: list[list[int]]) -> None:
        """Every expanded ``<image>`` must survive tokenisation: truncation that cuts into an image is an error."""
        for index, (sample, ids) in enumerate(zip(texts, input_ids)):
            expected, found = sample.count(self.image_token), sum(1 for i in ids if i == self.image_token_id)
            if found != expected:
                raise ValueError(
                    f"sample {index} holds {expected} <image> tokens after expansion but {found} after tokenisation: "
                    f"truncation (max_length) cut into its image(s); raise max_length or shorten the text"
                )

    def apply_chat_template(self, conversation, *args, **kwargs):
        """``ProcessorMixin.apply_chat_template`` after checking roles and content types (see :func:`check_conversation`).

        The prompt layout is the processor's (class docstring); ``image_position=`` and
        ``system_prompt=`` override it for this call. A template that does not read them (one
        saved before astrea had them, or a custom one) gets ``image_position`` by reordering each
        user message's parts here, and refuses ``system_prompt`` (add a system message instead).

        Tokenized output is Python lists unless ``return_tensors`` is given: that is what
        transformers' own processors return, and what TRL's chat-template checks (e.g. that the
        end-of-turn token is inside the assistant mask) expect. Pass ``return_tensors="pt"`` for
        tensors, as with any transformers processor.
        """
        if kwargs.get("tokenize") and kwargs.get("return_tensors", "auto") == "auto":
            kwargs["return_tensors"] = None
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0], (list, tuple))
        if batched:
            for index, item in enumerate(conversation):
                check_conversation(item, index)
        else:
            check_conversation(conversation)
        template = kwargs.get("chat_template") or (args[0] if args else None) or self.chat_template
        reads_layout = isinstance(template, str) and "image_position" in template
        if "image_position" in kwargs or "system_prompt" in kwargs:
            check_prompt_layout(kwargs.get("image_position") or "before", kwargs.get("system_prompt"))
        if not reads_layout:
            position = kwargs.pop("image_position", None)
            if kwargs.pop("system_prompt", None) is not None:
                raise ValueError("this chat template has no system_prompt; put a system message first in the conversation instead")
            if position is not None:
                conversation = [_order_user_parts(c, position) for c in conversation] if batched else _order_user_parts(conversation, position)
        return super().apply_chat_template(conversation, *args, **kwargs)

    def _adjust_assistant_masks_indices(self, processed_dict, generation_indices):
        """``assistant_masks`` from the answers' character spans: ``ProcessorMixin``'s result, vectorised.

        Each answer span is shifted past the ``<image>`` expansions before it; every token whose
        character range overlaps the shifted span is marked (zero-width tokens never overlap).
        Why override: the base class compares each span with each token in a Python loop, which
        with hundreds of image tokens per sample took ~25 ms of every training step of the demo.
        """
        offset_mapping = processed_dict.pop("offset_mapping")
        input_ids = processed_dict["input_ids"]
        replacements = processed_dict.pop("text_replacement_offsets", None)
        if replacements is None or len(replacements) == 0:
            replacements = [[]] * len(input_ids)
        masks = []
        for i in range(len(input_ids)):
            offsets = np.asarray(offset_mapping[i], dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(input_ids[i]), dtype=bool)
            placeholder_ends = [r["span"][1] for r in replacements[i]]
            chars_gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements[i]]
            for span in generation_indices[i]:
                start, end = (char + chars_gained[bisect.bisect_right(placeholder_ends, char)] for char in span)
                mask[: len(offsets)] |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
            masks.append(mask.astype(int).tolist())
        processed_dict["assistant_masks"] = masks
        return processed_dict

    def num_image_tokens(self, image) -> int:
        """``<image>`` tokens one image becomes (views x visual tokens)."""
        return self.image_processor.num_views(image) * self.num_visual_tokens

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)


__all__ = ["AstreaProcessor", "CHAT_TEMPLATE", "IMAGE_POSITIONS", "build_chat_template", "check_prompt_layout"]
