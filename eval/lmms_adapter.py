"""lmms-eval adapter: ``lmms-eval --model astrea --model_args pretrained=DIR --tasks ...``.

Registered as a chat model through the ``lmms_eval.models`` entry point (:func:`lmms_manifest`).
lmms-eval is an optional extra (``astrea-vlm[lmms]``); without it :class:`AstreaLmms` derives from
:class:`LmmsStandIn`, a local copy of the contract the tests run against. The contract, the prompt
layout and the generation kwargs understood: ``docs/lmms_eval.md``.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

try:  # lmms-eval is optional (the `lmms` extra)
    from lmms_eval.api.model import lmms as _LmmsBase

    HAS_LMMS_EVAL = True
except ImportError:  # pragma: no cover - depends on the environment
    _LmmsBase = None
    HAS_LMMS_EVAL = False


class _NoCache:
    def add_partial(self, attr, req, res) -> None:
        pass


class LmmsStandIn:
    """The parts of ``lmms_eval.api.model.lmms`` an adapter relies on, for use without lmms-eval."""

    is_simple = True

    def __init__(self) -> None:
        self._rank = 0
        self._world_size = 1
        self.cache_hook = _NoCache()
        self.task_dict: dict = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = {}
        for part in filter(None, (p.strip() for p in arg_string.split(","))):
            key, value = part.split("=", 1)
            args[key] = _parse_value(value)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**args, **extra)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def set_cache_hook(self, cache_hook) -> None:
        self.cache_hook = cache_hook


def _parse_value(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


class AstreaLmms(_LmmsBase if HAS_LMMS_EVAL else LmmsStandIn):
    """Astrea as a chat-style lmms-eval model (module docstring).

    Args:
        pretrained: a model folder (``astrea create`` or a training output).
        device: torch device (default cuda if available, else cpu).
        batch_size: requests per ``generate`` call.
        dtype: ``"auto"`` (the folder's) or a torch dtype name.
        max_new_tokens: default when a task does not set it.
        image_position: ``"before"`` / ``"after"``: where the images go relative to the prompt;
            default (None): the layout saved with the model.
    """

    is_simple = False

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1, dtype: str = "auto",
                 max_new_tokens: int = 128, image_position: str | None = None, **kwargs) -> None:
        super().__init__()
        from .runner import load_model, prompt_layout

        prompt_layout(None, image_position)  # a bad value fails before the model is loaded
        self.image_position = image_position
        self.model, self.processor = load_model(Path(pretrained), device=device, dtype=dtype)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # "auto" -> 1
        self.default_max_new_tokens = int(max_new_tokens)
        ignored = sorted(k for k in kwargs if k != "max_batch_size")
        if ignored:
            warnings.warn(f"astrea's lmms-eval adapter ignores the model args {ignored}", stacklevel=2)

    @property
    def device(self):
        return self.model.device

    # ------------------------------------------------------------------------------ generation
    def _conversation(self, messages: list[dict]) -> tuple[list[dict], list]:
        from .data import load_image

        conversation, images = [], []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            parts = []
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image":
                    images.append(load_image(part.get("url", part.get("image")), Path.cwd()))
                    parts.append({"type": "image"})
                else:
                    raise ValueError(f"astrea's lmms-eval adapter reads text and images, not {kind!r} content")
            conversation.append({"role": message["role"], "content": parts})
        return conversation, images

    @staticmethod
    def _generate_settings(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[int, dict, list[str]]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(gen_kwargs.pop("max_new_tokens", default_max_new_tokens))
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", temperature > 0)) and temperature > 0
        settings = {"do_sample": do_sample, "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1)}
        if do_sample:
            settings["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                settings["top_p"] = float(gen_kwargs["top_p"])
        return max_new_tokens, settings, until

    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        from .runner import generate_conversations

        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[2] or {}, sort_keys=True, default=str)].append(index)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="astrea responding")
        for indices in groups.values():
            for begin in range(0, len(indices), self.batch_size):
                chunk = indices[begin : begin + self.batch_size]
                conversations, images = [], []
                for index in chunk:
                    _, doc_to_messages, _, doc_id, task, split = requests[index].args
                    doc = self.task_dict[task][split][doc_id]
                    messages = doc_to_messages(doc) if callable(doc_to_messages) else doc_to_messages
                    conversation, sample_images = self._conversation(messages)
                    conversations.append(conversation)
                    images.append(sample_images)
                gen_kwargs = requests[chunk[0]].args[2]
                max_new_tokens, settings, until = self._generate_settings(gen_kwargs, self.default_max_new_tokens)
                texts, _ = generate_conversations(self.model, self.processor, conversations, images, max_new_tokens,
                                                  image_position=self.image_position, **settings)
                for index, text in zip(chunk, texts):
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop, 1)[0]
                    answers[index] = text
                    self.cache_hook.add_partial("generate_until", (requests[index].args[0], gen_kwargs), text)
                bar.update(len(chunk))
        bar.close()
        return answers

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("astrea's lmms-eval adapter does not implement multi-round generation")

    # ------------------------------------------------------------------------------ likelihood
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        import torch

        from .runner import render_prompt

        results = []
        tokenizer = self.processor.tokenizer
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
            visuals = [] if visuals is None else (list(visuals) if isinstance(visuals, (list, tuple)) else [visuals])
            content = [{"type": "image", "url": v} for v in visuals] + [{"type": "text", "text": context}]
            conversation, images = self._conversation([{"role": "user", "content": content}])
            prompt = render_prompt(self.processor, conversation, self.image_position)
            inputs = self.processor(images=images or None, text=[prompt], return_tensors="pt").to(self.model.device)
            context_ids = inputs["input_ids"]
            target_ids = torch.tensor([tokenizer(" " + str(continuation), add_special_tokens=False)["input_ids"]], device=context_ids.device)
            inputs["input_ids"] = torch.cat([context_ids, target_ids], dim=1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            for key, value in inputs.items():
                if torch.is_floating_point(value):
                    inputs[key] = value.to(self.model.dtype)
            with torch.no_grad():
                logits = self.model(**inputs).logits[0, context_ids.shape[1] - 1 : -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            target = target_ids[0]
            total = float(logprobs.gather(1, target[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == target).all())
            results.append((total, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (total, greedy))
        return results


def lmms_manifest():
    """The ``lmms_eval.models`` entry point: registers :class:`AstreaLmms` as the chat model ``astrea``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="astrea", chat_class_path="astrea_vlm.eval.lmms_adapter.AstreaLmms")
