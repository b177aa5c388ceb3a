"""Configuration of Astrea: the LLM, the four expert towers and the modules that join them.

An :class:`AstreaConfig` is a composite transformers config. It holds

* ``text_config`` -- any causal-LM config (Vicuna/Llama, Yi, Qwen2, ...);
* one :class:`AstreaExpertConfig` per expert role, named after the paper's four pre-alignment
  stages: ``caption_config`` (global / captioning), ``classification_config`` (tagging),
  ``detection_config`` and ``segmentation_config``. A role set to ``None`` disables that expert;
* the fields of the projectors, the residual bridge (eq. 2-4), the MoE fusion (eq. 9-10) and the
  momentum-contrast head (eq. 5-8). The training terms' settings are the trainer's
  (``AstreaSFTConfig``).

Every sub-config must be complete: transformers builds a sub-config given as a dict with *its
class defaults*, so ``text_config={"vocab_size": 100}`` means a 7B Llama with a 100-word vocabulary.
The presets in :mod:`astrea_vlm.configuration.presets` are the easy way to get a consistent config.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .presets import paper_13b_parts, preset_parts

#: The expert roles, in the paper's default (coarse-to-fine) pre-alignment order.
EXPERT_ROLES = ("caption", "classification", "detection", "segmentation")


def _tower_class(kind: str):
    """The tower class registered for ``kind`` (``astrea_vlm.modeling.registry``: the only list of kinds), or None."""
    from ..modeling.registry import TOWER_REGISTRY

    return TOWER_REGISTRY.get(kind)


def tower_kinds() -> tuple[str, ...]:
    """The expert tower kinds, as registered by ``astrea_vlm.modeling.registry``."""
    from ..modeling.registry import TOWER_REGISTRY

    return tuple(TOWER_REGISTRY)


#: Grounding-DINO's longest-side cap relative to its shortest side: 1333 px for 800 px.
GROUNDING_DINO_MAX_SIZE = (1333, 800)

RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")
RESIZE_ON = ("pil", "tensor")

#: Fields older configs held that are training settings now (``AstreaSFTConfig``): accepted, ignored.
TRAINING_SETTINGS = ("moco_queue_size", "moco_momentum", "moco_temperature", "moco_lambda", "moco_mu", "fusion_load_balance_coef")

#: Upper bounds of :meth:`AstreaConfig.validate`'s size checks (far above the paper's 34B model).
MAX_PARAMETERS = 2 * 10**12
MAX_IMAGE_SIDE = 16384


def _check(condition: bool, field: str, value: Any, why: str) -> None:
    if not condition:
        raise ValueError(f"AstreaConfig: invalid `{field}`={value!r}: {why}")


class AstreaExpertConfig(PreTrainedConfig):
    r"""One expert vision tower and how its tokens are taken.

    Args:
        kind (`str`, defaults to `"siglip"`):
            Tower implementation, one of ``siglip``, ``ram_plus`` (a timm Swin loaded from RAM++
            checkpoints), ``grounding_dino``, ``sam2`` (transformers' Hiera + FPN image encoder,
            loading original SAM2 ``.pt`` checkpoints), ``hf_vision`` (any transformers vision
            model: CLIP, EVA-CLIP, DINOv2, SigLIP variants) or ``timm`` (any timm backbone).
        tower_config (`dict` or `PreTrainedConfig`):
            The tower's own config: a transformers vision config for the transformers kinds, a
            ``timm_wrapper`` config (``architecture`` + ``model_args``) for ``ram_plus``/``timm``.
            Always complete; see the module docstring.
        pretrained (`str`, *optional*):
            Hub id or local path of the tower's real weights (used when an Astrea model is
            assembled from pretrained parts; never read when a saved Astrea folder is loaded,
            whose safetensors already hold the tower).
        image_size (`int`, defaults to 384):
            Square side, in pixels, of the images this tower reads (with ``keep_aspect_ratio``: the
            shortest side).
        image_mean (`list[float]`), image_std (`list[float]`):
            Per-channel normalisation of the tower's pixels (used by the processor).
        resample (`str`, *optional*):
            Resampling filter of the resize (``nearest``, ``bilinear``, ``bicubic``, ``lanczos``);
            defaults to the kind's original (its tower class's ``preprocessing``).
        resize_on (`str`, *optional*):
            ``"pil"``: the 8-bit image is resized (as torchvision's ``Resize`` does on a PIL image);
            ``"tensor"``: the [0, 1] float image is resized with antialiasing (``Resize`` after
            ``ToTensor``, as SAM2 does). Defaults to the kind's original.
        keep_aspect_ratio (`bool`, *optional*):
            ``False``: the image is resized to an ``image_size`` square. ``True`` (Grounding-DINO's
            default): the shortest side becomes ``image_size`` and the longest at most ``max_size``;
            batches are zero-padded at the bottom and right and carry a pixel mask, which the tower
            honours. Only ``grounding_dino`` towers take it.
        max_size (`int`, *optional*):
            Longest side with ``keep_aspect_ratio``; ``None`` means ``image_size * 1333 // 800``
            (1333 at Grounding-DINO's 800), see :attr:`longest_side`.
        feature_layer (`int`, defaults to -1):
            Hidden layer whose tokens are used (transformers ViT-like towers: -1 last, -2 the
            penultimate as in LLaVA). Ignored by towers without a layer stack.
        token_source (`str`, defaults to `"encoder"`):
            ``grounding_dino`` only. ``"encoder"``: the text-enhanced image memory of one pyramid
            level (a grid, spatially aligned with the other experts); ``"queries"``: the top-N
            decoder queries ranked by detection score, each with its box appended.
        feature_level (`int`, defaults to 0):
            Pyramid level read by multi-scale towers (``grounding_dino`` encoder, ``sam2`` FPN);
            0 is the finest. For SAM2's FPN the finest level of ``fpn_hidden_states`` is stride 4;
            the paper presets take the stride-16 image embedding.
        prompt_ids (`list[int]`, *optional*):
            ``grounding_dino`` only: token ids of the fixed, class-agnostic text prompt fed to the
            detector's text branch (the default prompt of the presets is "object .").
        frozen (`bool`, defaults to `True`):
            Keep the tower in eval mode without gradients (the paper's setting).
    """

    model_type = "astrea_expert"
    sub_configs_defaults = {
        "tower_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
    }

    kind: str = "siglip"
    tower_config: dict | PreTrainedConfig | None = None
    pretrained: str | None = None
    image_size: int = 384
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    feature_layer: int = -1
    token_source: str = "encoder"
    feature_level: int = 0
    prompt_ids: list[int] | None = None
    frozen: bool = True
    resample: str | None = None
    resize_on: str | None = None
    keep_aspect_ratio: bool | None = None
    max_size: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_mean is None:
            self.image_mean = [0.5, 0.5, 0.5]
        if self.image_std is None:
            self.image_std = [0.5, 0.5, 0.5]
        tower = _tower_class(self.kind)  # None for an unknown kind: validate_expert names it
        resample, resize_on, keep_aspect_ratio = tower.preprocessing if tower is not None else ("bicubic", "pil", False)
        if self.resample is None:
            self.resample = resample
        if self.resize_on is None:
            self.resize_on = resize_on
        if self.keep_aspect_ratio is None:
            self.keep_aspect_ratio = keep_aspect_ratio
        self.validate_expert()

    def validate_expert(self, prefix: str = "expert") -> None:
        tower = _tower_class(self.kind)
        _check(tower is not None, f"{prefix}.kind", self.kind, f"unknown expert kind; choose one of {tower_kinds()}")
        allowed = tower.tower_model_types
        model_type = getattr(self.tower_config, "model_type", None)
        _check(
            allowed is None or model_type in allowed,
            f"{prefix}.tower_config.model_type",
            model_type,
            f"a `{self.kind}` tower needs a tower_config of model_type {allowed}",
        )
        _check(isinstance(self.image_size, int) and self.image_size > 0, f"{prefix}.image_size", self.image_size, "must be a positive int")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            _check(len(value) == 3, f"{prefix}.{name}", value, "needs 3 channel values")
        _check(all(s > 0 for s in self.image_std), f"{prefix}.image_std", self.image_std, "must be > 0")
        _check(self.resample in RESAMPLE_FILTERS, f"{prefix}.resample", self.resample, f"choose one of {RESAMPLE_FILTERS}")
        _check(self.resize_on in RESIZE_ON, f"{prefix}.resize_on", self.resize_on, f"choose one of {RESIZE_ON}")
        _check(
            self.resize_on == "pil" or self.resample in ("bilinear", "bicubic"),
            f"{prefix}.resample",
            self.resample,
            "an antialiased tensor resize (resize_on='tensor') is bilinear or bicubic",
        )
        _check(
            not self.keep_aspect_ratio or self.kind == "grounding_dino",
            f"{prefix}.keep_aspect_ratio",
            self.keep_aspect_ratio,
            f"only grounding_dino towers read padded images with a pixel mask; a {self.kind} tower reads squares",
        )
        _check(
            self.max_size is None or (self.keep_aspect_ratio and isinstance(self.max_size, int) and self.max_size >= self.image_size),
            f"{prefix}.max_size",
            self.max_size,
            "is the longest side of an aspect-preserving resize: set keep_aspect_ratio=True and max_size >= image_size",
        )
        _check(self.token_source in ("encoder", "queries"), f"{prefix}.token_source", self.token_source, "use 'encoder' or 'queries'")
        _check(self.feature_level >= 0, f"{prefix}.feature_level", self.feature_level, "must be >= 0")

    @property
    def longest_side(self) -> int | None:
        """The longest side of an aspect-preserving resize: ``max_size``, or ``image_size * 1333 // 800``."""
        if not self.keep_aspect_ratio:
            return None
        if self.max_size is not None:
            return self.max_size
        longest, shortest = GROUNDING_DINO_MAX_SIZE
        return self.image_size * longest // shortest

    @property
    def is_grid(self) -> bool:
        """Whether the tower's tokens lie on a 2-D grid."""
        return _tower_class(self.kind).tokens_on_grid(self)


# One class per role, each naming its entry of an Astrea config.json (`base_config_key`), so that
# e.g. `AstreaCaptionExpertConfig.from_pretrained(folder)` reads `caption_config` -- with a single
# class for the four roles, transformers would pick whichever entry has the model type last.
class AstreaCaptionExpertConfig(AstreaExpertConfig):
    """:class:`AstreaExpertConfig` of the caption (global) expert: ``caption_config``."""

    base_config_key = "caption_config"


class AstreaClassificationExpertConfig(AstreaExpertConfig):
    """:class:`AstreaExpertConfig` of the classification (tagging) expert: ``classification_config``."""

    base_config_key = "classification_config"


class AstreaDetectionExpertConfig(AstreaExpertConfig):
    """:class:`AstreaExpertConfig` of the detection expert: ``detection_config``."""

    base_config_key = "detection_config"


class AstreaSegmentationExpertConfig(AstreaExpertConfig):
    """:class:`AstreaExpertConfig` of the segmentation expert: ``segmentation_config``."""

    base_config_key = "segmentation_config"


#: The expert config class of each role.
EXPERT_CONFIG_CLASSES = {
    "caption": AstreaCaptionExpertConfig,
    "classification": AstreaClassificationExpertConfig,
    "detection": AstreaDetectionExpertConfig,
    "segmentation": AstreaSegmentationExpertConfig,
}


def _expert_spec(role: str) -> SubConfigSpec:
    return SubConfigSpec(config_class=EXPERT_CONFIG_CLASSES[role], optional=True)


class AstreaConfig(PreTrainedConfig):
    r"""Configuration of :class:`AstreaForConditionalGeneration`.

    The defaults describe the paper's 13B model (``astrea-13b``): Vicuna-1.5-13B, SigLIP
    SO400M/14@384, RAM++ Swin-L@384, the open Grounding-DINO and SAM2 Hiera-L. Use
    `get_preset` for ``tiny`` / ``astrea-13b`` / ``astrea-34b``.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            Complete config of the causal LM. Its ``hidden_size`` is the visual-token width D.
        caption_config, classification_config, detection_config, segmentation_config
        (`dict` or `AstreaExpertConfig`, *optional*):
            The four experts. ``None`` for a role drops that expert (it must then be absent from
            ``expert_order``).
        expert_order (`list[str]`, defaults to caption, classification, detection, segmentation):
            Pre-alignment stage order (coarse to fine). It also fixes the residual bridge: the
            expert at position k reads the cached features of the experts before it (eq. 3).
            Table 6's reverse order is ``["segmentation", "detection", "classification", "caption"]``.
            The number of experts E of the MoE fusion is ``len(expert_order)`` (property ``num_experts``).
        num_visual_tokens (`int`, defaults to 576):
            Tokens per image after fusion. Every expert is resampled to this count, so that eq.
            10's weighted sum is over aligned tokens: grid towers by area pooling (downsampling)
            or bilinear interpolation (upsampling) on the 2-D grid, which needs a perfect square;
            Grounding-DINO in ``queries`` mode by keeping the top-N queries, which needs
            ``N <= num_queries``.
        image_token_id (`int`):
            Id of the ``<image>`` placeholder; each occurrence is replaced by one visual token.
        projector_hidden_act (`str`, defaults to `"gelu"`), projector_depth (`int`, defaults to 2):
            Per-expert FFN projector ``D_i -> D`` (``depth`` Linear layers with the activation between).
        bridge_gamma (`float`, defaults to 1.0):
            gamma of eq. 3, the weight of the residual sum of earlier experts' features.
        bridge_p (`float`, defaults to 0.5):
            Probability that p_i = 1 (eq. 3) during training. In eval the rule is deterministic:
            every earlier expert is used, scaled by ``bridge_p`` (the expectation of the training
            sum, as in dropout), so that eval sees the mean of the training-time query.
        bridge_num_heads (`int`, defaults to 8):
            Heads of the bridge's cross-attention; must divide ``text_config.hidden_size``.
        bridge_gate_init (`float`, defaults to 0.0):
            Initial value of the tanh gate on the bridge output. At 0 a freshly built model
            equals the projector-only path: ``f'_k = f_k + tanh(g) * Attn(Q, K, V)``.
        fusion_top_k (`int`, defaults to 3):
            k of eq. 10: experts kept per sample (1 <= k <= number of experts).
        fusion_adapter_dim (`int`, *optional*):
            Hidden width of each expert's MLP adapter F_i (eq. 10); defaults to the LLM width.
        fusion_router_input (`str`, defaults to `"visual+text"`):
            What the linear router reads. ``"visual"``: the experts' projected tokens only
            (concatenated), so every question about an image is routed alike. ``"visual+text"``
            (the default): those plus the *instruction*: for each image, the mean
            input embedding of the text tokens that precede it in the sequence (padding and image
            tokens skipped, no gradient into the embeddings). Reading only the text before the image
            keeps routing causal: an image is routed the same in training and generation and as a
            conversation grows. With the question before the image (the demo's layout) the router
            sees the question; with the image first it sees only the system prompt and earlier turns.
        fusion_routing (`str`, defaults to `"image"`):
            ``"image"``: one router distribution per image, from the mean-pooled tokens.
            ``"token"``: one per visual token, from the experts' tokens at that position (the
            paper's wording); ``router_logits`` / ``router_probs`` are then ``(n_images, N, E)``.
        fusion_router_jitter (`float`, defaults to 0.0):
            Training only: standard deviation of Gaussian noise added to the router logits when
            choosing the top-k experts (the kept experts' weights are still the softmax of the
            noise-free logits), so that an expert ranked last still gets chosen, and a gradient,
            now and then. 0 disables it.
        fusion_router_norm (`bool`, defaults to `True`):
            RMS-normalise each part of the router's input (each expert's pooled tokens and the
            instruction vector) before the linear layer, so that the instruction weighs as much as
            each expert's features whatever their scales. The demo recipe sets it to ``False``
            (chosen on validation over three seeds, README "Routing"): unnormalised, the small
            mean embedding of the question tilts the routing instead of switching expert sets by
            question type, and the demo answered existence and grounding clearly better. The
            default stays ``True`` because at paper scale the two parts' scales are not known in
            advance; normalised, neither can drown the other.
        fusion_router_text_scale (`float`, defaults to 1.0):
            Factor on the (normalised) instruction vector in the router's input, with
            ``fusion_router_input="visual+text"``: 1 weighs the instruction like one expert's
            features; below 1 the question moves the router's logits proportionally less (also
            under Adam, whose steps on the instruction's weights are the same size whatever the
            factor), so routing can follow the question without switching every expert set by it.
        fusion_router_text_selects (`bool`, defaults to `True`):
            With ``fusion_router_input="visual+text"``: whether the instruction takes part in choosing
            the top-k experts. ``False``: the experts kept are chosen from the router's logits with
            the instruction left out (the image decides which experts are kept), and the instruction
            then reweighs the kept ones (their weights are the softmax of the full logits), so every
            question about an image sees the same experts in different proportions.
        moco_dim (`int`, defaults to 256):
            Width of the momentum-contrast embedding (the MoCo head's output, eq. 5-8). The loss's
            settings (queue, momentum, temperature, lambda, mu) and the router's load-balancing
            weight are training settings: ``AstreaSFTConfig`` (``astrea_vlm.train.trainer``).
        tie_word_embeddings (`bool`, defaults to `False`): tie the LM head to the input embeddings.
        image_position (`str`, defaults to `"before"`), system_prompt (`str`, *optional*):
            The prompt layout the model was trained with: a user turn's images ``"before"`` its
            text (LLaVA's layout) or ``"after"`` it, and the system prompt rendered when a
            conversation has none. The processor's chat template applies them; they are recorded
            here too so that the folder's config says how to prompt the model.
    """

    model_type = "astrea"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "caption_config": _expert_spec("caption"),
        "classification_config": _expert_spec("classification"),
        "detection_config": _expert_spec("detection"),
        "segmentation_config": _expert_spec("segmentation"),
    }

    text_config: dict | PreTrainedConfig | None = None
    caption_config: dict | PreTrainedConfig | None = None
    classification_config: dict | PreTrainedConfig | None = None
    detection_config: dict | PreTrainedConfig | None = None
    segmentation_config: dict | PreTrainedConfig | None = None
    expert_order: list[str] | None = None
    num_visual_tokens: int = 576
    image_token_id: int = 32000
    projector_hidden_act: str = "gelu"
    projector_depth: int = 2
    bridge_gamma: float = 1.0
    bridge_p: float = 0.5
    bridge_num_heads: int = 8
    bridge_gate_init: float = 0.0
    fusion_top_k: int = 3
    fusion_adapter_dim: int | None = None
    fusion_router_input: str = "visual+text"
    fusion_routing: str = "image"
    fusion_router_jitter: float = 0.0
    fusion_router_norm: bool = True
    fusion_router_text_scale: float = 1.0
    fusion_router_text_selects: bool = True
    moco_dim: int = 256
    tie_word_embeddings: bool = False
    image_position: str = "before"
    system_prompt: str | None = None

    def __post_init__(self, **kwargs):
        moved = sorted(k for k in kwargs if k in TRAINING_SETTINGS)
        if moved:
            # Configs saved before these moved to the trainer still load; their values are not used.
            warnings.warn(f"AstreaConfig: {moved} are training settings now, set on AstreaSFTConfig "
                          "(astrea_vlm.train.trainer) or in a recipe's phase; the values in this config are ignored",
                          FutureWarning, stacklevel=2)
            for key in moved:
                kwargs.pop(key)
        no_experts = all(getattr(self, f"{r}_config") is None for r in EXPERT_ROLES)
        if self.text_config is None and no_experts:
            # A bare AstreaConfig() describes the paper's 13B model (transformers convention).
            parts = paper_13b_parts()
            self.text_config = parts.pop("text_config")
            for key, value in parts.items():
                setattr(self, key, value)
        if isinstance(self.text_config, dict):
            # transformers fills a partial sub-config dict from the class defaults, not from any
            # preset: {"vocab_size": 100} would silently become a 7B Llama. Refuse it.
            missing = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size") if k not in self.text_config]
            _check(
                not missing,
                "text_config",
                {k: self.text_config[k] for k in list(self.text_config)[:4]},
                f"is incomplete (missing {missing}); pass a complete LLM config, e.g. AutoConfig.from_pretrained(...).to_dict()",
            )
        for role in EXPERT_ROLES:
            # Build expert sub-configs here so that their errors name the role's field.
            value = getattr(self, f"{role}_config")
            if isinstance(value, dict):
                try:
                    setattr(self, f"{role}_config", EXPERT_CONFIG_CLASSES[role](**value))
                except ValueError as error:
                    raise ValueError(str(error).replace("`expert.", f"`{role}_config.")) from None
        super().__post_init__(**kwargs)
        if self.expert_order is None:
            self.expert_order = [r for r in EXPERT_ROLES if getattr(self, f"{r}_config") is not None]
        self.expert_order = list(self.expert_order)
        self.validate()

    # ------------------------------------------------------------------ helpers
    @property
    def expert_configs(self) -> dict[str, AstreaExpertConfig]:
        """Enabled experts in ``expert_order`` (the stage order)."""
        return {role: getattr(self, f"{role}_config") for role in self.expert_order}

    @property
    def num_experts(self) -> int:
        return len(self.expert_order)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def visual_grid(self) -> tuple[int, int] | None:
        side = math.isqrt(self.num_visual_tokens)
        return (side, side) if side * side == self.num_visual_tokens else None

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and value for any inconsistent setting."""
        _check(self.text_config is not None, "text_config", None, "an LLM config is required")
        for role in EXPERT_ROLES:
            expert = getattr(self, f"{role}_config")
            if expert is not None:
                _check(isinstance(expert, AstreaExpertConfig), f"{role}_config", type(expert).__name__, "must be an AstreaExpertConfig or dict")
                expert.validate_expert(prefix=f"{role}_config")
        order = self.expert_order
        unknown = [r for r in order if r not in EXPERT_ROLES]
        _check(not unknown, "expert_order", order, f"unknown role(s) {unknown}; roles are {EXPERT_ROLES}")
        _check(len(set(order)) == len(order), "expert_order", order, "lists a role twice")
        missing = [r for r in order if getattr(self, f"{r}_config") is None]
        _check(not missing, "expert_order", order, f"role(s) {missing} have no expert config (set `<role>_config`)")
        unused = [r for r in EXPERT_ROLES if getattr(self, f"{r}_config") is not None and r not in order]
        _check(not unused, "expert_order", order, f"configured expert(s) {unused} are missing from the order")
        _check(len(order) >= 1, "expert_order", order, "at least one expert is needed")

        n = self.num_visual_tokens
        _check(isinstance(n, int) and n > 0, "num_visual_tokens", n, "must be a positive int")
        for role, expert in self.expert_configs.items():
            if expert.is_grid:
                _check(
                    self.visual_grid is not None,
                    "num_visual_tokens",
                    n,
                    f"the {role} expert ({expert.kind}) has grid tokens, which are resampled on a square grid; "
                    f"use a perfect square such as {math.isqrt(n) ** 2 or 1} or {(math.isqrt(n) + 1) ** 2}",
                )
            else:
                num_queries = expert.tower_config.num_queries
                _check(
                    n <= num_queries,
                    "num_visual_tokens",
                    n,
                    f"the {role} expert keeps its top-N of {num_queries} decoder queries; "
                    f"lower num_visual_tokens or raise detection num_queries",
                )

        vocab = self.text_config.vocab_size
        _check(0 <= self.image_token_id < vocab, "image_token_id", self.image_token_id, f"must index the LLM vocabulary (size {vocab})")
        _check(self.projector_depth >= 1, "projector_depth", self.projector_depth, "must be >= 1")
        _check(self.bridge_gamma >= 0, "bridge_gamma", self.bridge_gamma, "must be >= 0")
        _check(0.0 <= self.bridge_p <= 1.0, "bridge_p", self.bridge_p, "a probability must lie in [0, 1]")
        d = self.text_config.hidden_size
        _check(
            self.bridge_num_heads >= 1 and d % self.bridge_num_heads == 0,
            "bridge_num_heads",
            self.bridge_num_heads,
            f"must divide the LLM width {d}",
        )
        k, e = self.fusion_top_k, self.num_experts
        _check(1 <= k <= e, "fusion_top_k", k, f"must be between 1 and the number of experts ({e})")
        _check(self.fusion_adapter_dim is None or self.fusion_adapter_dim > 0, "fusion_adapter_dim", self.fusion_adapter_dim, "must be > 0")
        _check(self.fusion_router_input in ("visual", "visual+text"), "fusion_router_input", self.fusion_router_input, "use 'visual' or 'visual+text'")
        _check(self.fusion_routing in ("image", "token"), "fusion_routing", self.fusion_routing, "use 'image' or 'token'")
        _check(self.fusion_router_text_scale > 0, "fusion_router_text_scale", self.fusion_router_text_scale,
               "must be > 0 (to keep the instruction out of the router, set fusion_router_input='visual')")
        _check(self.fusion_router_jitter >= 0, "fusion_router_jitter", self.fusion_router_jitter, "must be >= 0")
        _check(self.moco_dim >= 1, "moco_dim", self.moco_dim, "must be >= 1")
        _check(self.image_position in ("before", "after"), "image_position", self.image_position,
               "use 'before' (the images, then the prompt) or 'after' (the prompt, then the images)")
        _check(self.system_prompt is None or isinstance(self.system_prompt, str), "system_prompt", self.system_prompt, "must be a string or None")
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Refuse absurd sizes by arithmetic, before anything is allocated (a typo such as
        ``hidden_size=10**9`` would otherwise ask for terabytes, or be OOM-killed)."""
        text = self.text_config
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"):
            value = getattr(text, name, None)
            if value is not None:
                _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"text_config.{name}", value, "must be a positive int")
        context = getattr(text, "max_position_embeddings", None)
        if context is not None:
            _check(
                self.num_visual_tokens <= context,
                "num_visual_tokens",
                self.num_visual_tokens,
                f"one image would not fit in the LLM context (text_config.max_position_embeddings={context})",
            )
        for role, expert in self.expert_configs.items():
            _check(expert.image_size <= MAX_IMAGE_SIDE, f"{role}_config.image_size", expert.image_size, f"must be <= {MAX_IMAGE_SIDE} pixels")
            _check((expert.max_size or 0) <= MAX_IMAGE_SIDE, f"{role}_config.max_size", expert.max_size, f"must be <= {MAX_IMAGE_SIDE} pixels")
        d = text.hidden_size
        inter = getattr(text, "intermediate_size", None) or 4 * d
        estimate = 2 * text.vocab_size * d + text.num_hidden_layers * (4 * d * d + 3 * d * inter)
        estimate += self.num_experts * 2 * d * (self.fusion_adapter_dim or d) + 4 * d * d * max(0, self.num_experts - 1)
        estimate += self.projector_depth * d * d * self.num_experts + d * d + d * self.moco_dim
        for role, expert in self.expert_configs.items():
            tower = expert.tower_config
            width = getattr(tower, "hidden_size", None) or getattr(tower, "d_model", None) or 0
            layers = getattr(tower, "num_hidden_layers", None) or 1
            if isinstance(width, int) and isinstance(layers, int):
                estimate += 12 * width * width * layers + width * d
        _check(
            estimate <= MAX_PARAMETERS,
            "text_config / expert sizes",
            f"~{estimate:.3g} parameters",
            f"more than {MAX_PARAMETERS:.0e}, larger than any model this code is meant to build; check hidden_size, "
            "intermediate_size, num_hidden_layers, vocab_size, fusion_adapter_dim and moco_dim",
        )


def get_preset(name: str, **overrides: Any) -> AstreaConfig:
    """The :class:`AstreaConfig` of preset ``name`` (``tiny``, ``astrea-13b``, ``astrea-34b``).

    ``overrides`` are merged in by :func:`~astrea_vlm.configuration.presets.merge_overrides`: nested
    dicts key by key (``text_config={"vocab_size": 1024}`` changes one field of the LLM config),
    anything else replaces (``segmentation_config=None`` drops that expert).
    """
    return AstreaConfig(**preset_parts(name, overrides))


__all__ = ["AstreaConfig", "AstreaExpertConfig", "EXPERT_CONFIG_CLASSES", "EXPERT_ROLES", "get_preset", "tower_kinds"]
