"""Astrea: expert towers -> projectors -> residual bridges -> MoE fusion -> causal LM.

The layout follows transformers' LLaVA, which TRL and PEFT expect:

* :class:`AstreaModel` (the backbone, ``base_model_prefix = "model"``) owns the towers, the
  projectors, the bridges, the fusion and ``language_model``; it puts the fused visual tokens in
  place of the ``<image>`` placeholders and returns ``last_hidden_state``.
* :class:`AstreaForConditionalGeneration` adds ``lm_head``, the loss and ``generate``.

Forward, top to bottom, for each image (one run of ``num_visual_tokens`` ``<image>`` tokens):

1. each expert tower reads its own pixels (``pixel_values_<role>``: every tower has its own
   resolution and normalisation; Grounding-DINO keeps the aspect ratio and reads a padded batch
   with ``pixel_mask_<role>``) -> tokens ``(n_img, N_i, D_i)``;
2. tokens are resampled to ``num_visual_tokens`` and projected to the LLM width: ``f_i`` (eq. 10's
   FFN output, and the ``C_i`` of the feature cache); precomputed ``C_i`` can be passed instead
   with ``expert_features={role: tensor}``, which skips that tower and projector, and cached
   resampled tower tokens with ``tower_features={role: tensor}``, which skips the tower only
   (both are what :class:`astrea_vlm.train.FeatureCache` stores);
3. the expert at stage position k>0 passes through its :class:`ResidualBridge` over the earlier
   experts' ``C_i`` (eq. 2-4);
4. :class:`MoEFusion` routes each image (or each visual token) from the experts' features and the
   text before the image, keeps the top-k experts and mixes their adapters (eq. 9-10).

``generate`` computes steps 1-4 once, in the prefill; the decode steps only run the LLM.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import torch_compilable_check
from transformers.utils.generic import can_return_tuple

from ..configuration.configuration_astrea import EXPERT_ROLES, AstreaConfig
from .bridge import ResidualBridge
from .checkpoint_files import check_weights_folder
from .fusion import MoEFusion
from .input_checks import check_features, check_inputs, check_pixel_masks
from .outputs import AstreaCausalLMOutputWithPast, AstreaImageFeaturesOutput, AstreaModelOutputWithPast
from .projector import ExpertProjector, resample_tokens
from .registry import build_tower
from .towers import ExpertTower, can_run_attn_implementation

PIXEL_KEYS = tuple(f"pixel_values_{role}" for role in EXPERT_ROLES)
PIXEL_MASK_KEYS = tuple(f"pixel_mask_{role}" for role in EXPERT_ROLES)


class AstreaPreTrainedModel(PreTrainedModel):
    config: AstreaConfig
    config_class = AstreaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["ExpertTower", "ResidualBridge", "MoEFusion"]
    _skip_keys_device_placement = ["past_key_values"]
    # Folders saved before the fusion had a selection bias load as they were trained: plain top-k
    # (the bias initialises to 0), without a missing-weights report.
    _keys_to_ignore_on_load_missing = [r"fusion\.selection_bias$"]
    # A string attention implementation reaches the towers that can run it; the others keep their
    # default (see `towers.fit_attn_implementation`).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Decode steps (no pixels) run the LLM only, without data-dependent Python branches.
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # `init.*` skip tensors already loaded by from_pretrained (they carry `_is_hf_initialized`).
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5 if getattr(module, "fan_in_init", False) else std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ResidualBridge):
            init.constant_(module.gate, module.gate_init)
        elif isinstance(module, MoEFusion):
            init.zeros_(module.selection_bias)
        if hasattr(module, "init_non_persistent_buffers") and not isinstance(module, PreTrainedModel):
            # timm modules (Swin's relative-position index and shifted-window mask) rebuild their own
            # buffers; a model built on the meta device and moved with `to_empty()` has garbage there.
            # (The transformers towers' own `_init_weights` rebuild theirs.)
            module.init_non_persistent_buffers()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Weights load only from safetensors (never a pickle), and a local folder's files are checked
        # first, so that a truncated file or a missing shard is named instead of failing deep inside.
        kwargs.setdefault("use_safetensors", True)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(source, (str, os.PathLike)) and os.path.isdir(os.path.join(source, kwargs.get("subfolder") or "")):
            check_weights_folder(os.path.join(source, kwargs.get("subfolder") or ""))
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info=True
        # Non-persistent tower buffers (relative-position indices, masks) are not in the checkpoint.
        for module in model.modules():
            if isinstance(module, ExpertTower):
                module.restore_non_persistent_buffers()
                module.freeze_if_configured()  # loading replaces the parameters, and their requires_grad
        return loaded

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False):
        """``PreTrainedModel.set_attn_implementation``; a string applies to the sub-models that can run it.

        The others (Grounding-DINO has neither SDPA nor flash attention) keep their current one, as
        at construction (:func:`towers.fit_attn_implementation`), instead of failing the whole call.
        A request transformers refuses (an unknown name) leaves every config as it was.
        """
        if not isinstance(attn_implementation, str):
            return super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)
        per_subconfig, unowned = self._attn_implementation_per_subconfig(attn_implementation)
        # Configs that no sub-model owns (the expert wrappers, the timm tower's config) only record the
        # value: set here, so that transformers does not warn that it cannot check them.
        previous = [(config, config._attn_implementation_internal) for config in unowned]
        for config in unowned:
            config._attn_implementation_internal = attn_implementation
        try:
            return super().set_attn_implementation(per_subconfig, allow_all_kernels=allow_all_kernels)
        except Exception:
            for config, value in previous:
                config._attn_implementation_internal = value
            raise

    def _attn_implementation_per_subconfig(self, requested: str) -> tuple[str | dict, list]:
        """``requested`` as the nested per-sub-config dict ``set_attn_implementation`` takes, and the
        configs that no sub-model owns."""
        owners = {id(module.config): type(module) for module in self.modules() if isinstance(module, PreTrainedModel)}
        unowned = []

        def tree(config):
            owner = owners.get(id(config))
            if owner is None:
                unowned.append(config)
            own = requested if owner is None or can_run_attn_implementation(owner, requested) else config._attn_implementation
            nested = {key: tree(sub) for key in config.sub_configs if (sub := getattr(config, key, None)) is not None}
            return {"": own, **nested} if nested else own

        return tree(self.config), unowned

    def enable_input_require_grads(self):
        """Make the LLM's input embeddings require grad (for adapters / gradient checkpointing).

        Only the LLM's embeddings are hooked: the towers are frozen, and some of their embedding
        modules return tuples that the generic transformers hook cannot handle.
        """

        def make_inputs_require_grads(module, inputs, output):
            output.requires_grad_(True)

        self._require_grads_hooks = [self.get_input_embeddings().register_forward_hook(make_inputs_require_grads)]
        self._require_grads_hook = self._require_grads_hooks[0]


class AstreaModel(AstreaPreTrainedModel):
    def __init__(self, config: AstreaConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.expert_order = list(config.expert_order)
        self.towers = nn.ModuleDict({role: build_tower(cfg) for role, cfg in config.expert_configs.items()})
        self.projectors = nn.ModuleDict(
            {
                role: ExpertProjector(tower.out_dim, hidden, config.projector_depth, config.projector_hidden_act)
                for role, tower in self.towers.items()
            }
        )
        self.bridges = nn.ModuleDict(
            {
                role: ResidualBridge(hidden, config.bridge_num_heads, config.bridge_gamma, config.bridge_p, config.bridge_gate_init)
                for role in self.expert_order[1:]
            }
        )
        self.fusion = MoEFusion(
            num_experts=config.num_experts,
            hidden_size=hidden,
            adapter_dim=config.fusion_adapter_dim or hidden,
            top_k=config.fusion_top_k,
            use_text=config.fusion_router_input == "visual+text",
            act=config.projector_hidden_act,
            per_token=config.fusion_routing == "token",
            jitter=config.fusion_router_jitter,
            normalize=config.fusion_router_norm,
            text_scale=config.fusion_router_text_scale,
            text_selects=config.fusion_router_text_selects,
        )
        # Projection head of the momentum-contrast loss (eq. 5-7): used by the trainer only.
        self.moco_head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, config.moco_dim))
        for layer in (self.moco_head[0], self.moco_head[2]):
            # The head's output is L2-normalised, whose gradient scales as 1/|z|: with the LLM's
            # small init (std 0.02) |z| starts near 1e-3 and the first MoCo gradients reach 1e4,
            # so global clipping would freeze every other parameter. Fan-in init keeps |z| ~ |x|.
            layer.fan_in_init = True
        self.language_model = AutoModel.from_config(config.text_config)
        side = math.isqrt(config.num_visual_tokens)
        for tower in self.towers.values():
            if tower.config.keep_aspect_ratio and tower.grid is not None:
                # It resamples each image's own region itself: straight to the token grid, in one step.
                tower.grid = (side, side)
        self.alignment_role: str | None = None
        self.alignment_group: list[str] = []
        self.post_init()

    def set_alignment_stage(self, roles: str | list[str] | None) -> None:
        """Enter (``roles``) or leave (``None``) a pre-alignment stage (paper §3.1).

        While aligning expert k the LLM sees expert k's bridged features ``f'_k`` alone -- the MoE
        fusion is not trained yet -- and only experts 1..k of the stage order are computed. A joint
        stage (Table 6's "Cap->All") aligns several consecutive experts at once; the LLM then sees
        the mean of their bridged features.
        """
        if roles is None:
            self.alignment_role, self.alignment_group = None, []
            return
        group = [roles] if isinstance(roles, str) else list(roles)
        unknown = [r for r in group if r not in self.expert_order]
        if unknown or not group:
            raise ValueError(f"unknown expert role(s) {unknown or group}; the roles are {self.expert_order}")
        self.alignment_group = sorted(group, key=self.expert_order.index)
        self.alignment_role = self.alignment_group[-1]

    @property
    def active_roles(self) -> list[str]:
        """Experts computed by a forward pass: all of them, or 1..k while aligning expert k."""
        if self.alignment_role is None:
            return list(self.expert_order)
        return self.expert_order[: self.expert_order.index(self.alignment_role) + 1]

    def contrastive_embedding(self, fused: torch.Tensor) -> torch.Tensor:
        """L2-normalised MoCo embedding ``(n_images, moco_dim)`` of fused visual tokens ``(n_images, N, D)``."""
        return nn.functional.normalize(self.moco_head(fused.mean(dim=1)), dim=-1)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ------------------------------------------------------------------ visual side
    def get_tower_tokens(self, role: str, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tower tokens of one expert resampled to ``num_visual_tokens``: ``(n_images, N, D_i)``.

        ``pixel_mask`` (1 on the image, 0 on the padding) goes with the padded pixels of an
        aspect-preserving expert (``pixel_mask_<role>`` of the processor).
        """
        tower = self.towers[role]
        return resample_tokens(tower(pixel_values, pixel_mask), tower.grid, self.config.num_visual_tokens)

    def get_expert_features(
        self,
        pixel_values: dict[str, torch.Tensor] | None = None,
        expert_features: dict[str, torch.Tensor] | None = None,
        tower_features: dict[str, torch.Tensor] | None = None,
        tower_outputs: dict[str, dict] | None = None,
        output_attentions: bool = False,
        pixel_masks: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Projector outputs ``C_i`` ``(n_images, N, D)`` per expert, from pixels, cached tower tokens or precomputed.

        ``tower_outputs``: a dict to fill with each run tower's ``{"hidden_states", "attentions"}``;
        when given, the towers are asked for their hidden states, and for their attentions with
        ``output_attentions`` (see :meth:`ExpertTower.forward_with_states`).
        """
        pixel_values = pixel_values or {}
        pixel_masks = pixel_masks or {}
        expert_features = expert_features or {}
        tower_features = tower_features or {}
        out = {}
        for role in self.active_roles:
            projector = self.projectors[role]
            dtype = projector.layers[0].weight.dtype
            if role in expert_features:
                # Cached C_i are float32; a bf16/fp16 model reads them in its own dtype.
                feature = check_features(f"expert_features['{role}']", expert_features[role], self.config.num_visual_tokens, self.config.text_config.hidden_size)
                out[role] = feature.to(dtype)
                continue
            if role in tower_features:
                width = self.projectors[role].layers[0].in_features
                tokens = check_features(f"tower_features['{role}']", tower_features[role], self.config.num_visual_tokens, width)
            elif pixel_values.get(role) is not None and tower_outputs is not None:
                tower = self.towers[role]
                tokens, tower_outputs[role] = tower.forward_with_states(pixel_values[role], output_attentions, pixel_masks.get(role))
                tokens = resample_tokens(tokens, tower.grid, self.config.num_visual_tokens)
            elif pixel_values.get(role) is not None:
                tokens = self.get_tower_tokens(role, pixel_values[role], pixel_masks.get(role))
            else:
                raise ValueError(
                    f"no input for the {role} expert: pass `pixel_values_{role}` (AstreaProcessor makes it) "
                    f"or its cached features in `tower_features['{role}']` / `expert_features['{role}']`"
                )
            out[role] = projector(tokens.to(dtype))
        counts = {role: feature.shape[0] for role, feature in out.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"every expert needs the same number of images (pixel_values_<role> / features), got {counts}")
        return out

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values_caption: torch.FloatTensor | None = None,
        pixel_values_classification: torch.FloatTensor | None = None,
        pixel_values_detection: torch.FloatTensor | None = None,
        pixel_values_segmentation: torch.FloatTensor | None = None,
        pixel_values: dict[str, torch.Tensor] | None = None,
        expert_features: dict[str, torch.Tensor] | None = None,
        tower_features: dict[str, torch.Tensor] | None = None,
        text_features: torch.Tensor | None = None,
        bridge_generator: torch.Generator | None = None,
        pixel_mask_caption: torch.LongTensor | None = None,
        pixel_mask_classification: torch.LongTensor | None = None,
        pixel_mask_detection: torch.LongTensor | None = None,
        pixel_mask_segmentation: torch.LongTensor | None = None,
        pixel_masks: dict[str, torch.Tensor] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> AstreaImageFeaturesOutput | tuple:
        """Steps 1-4 of the module docstring: fused visual tokens plus the router outputs.

        Takes the processor's pixel keys (``pixel_values_<role>=...``) or, equivalently, one dict
        ``pixel_values={role: tensor}``, plus cached ``expert_features`` / ``tower_features``;
        ``pixel_mask_<role>`` (or ``pixel_masks={role: tensor}``) go with an aspect-preserving
        expert's padded pixels.
        ``text_features`` (``(n_images, D)``) feed a ``visual+text`` router (the default; see
        ``instruction_features``; without them it reads zeros, as for an image with no text before
        it); ``bridge_generator`` draws the bridge's training-time Bernoulli masks.
        """
        pixel_values = {**(pixel_values or {}), **_pixel_dict(pixel_values_caption, pixel_values_classification, pixel_values_detection, pixel_values_segmentation)}
        pixel_masks = {**(pixel_masks or {}), **_pixel_dict(pixel_mask_caption, pixel_mask_classification, pixel_mask_detection, pixel_mask_segmentation)}
        check_pixel_masks(pixel_values, pixel_masks)
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        tower_outputs = {} if output_hidden_states or output_attentions else None
        features = self.get_expert_features(
            pixel_values, expert_features, tower_features, tower_outputs, bool(output_attentions), pixel_masks
        )
        visual = self.fuse_expert_features(features, text_features, bridge_generator)
        if tower_outputs:
            asked = [name for name, wanted in (("hidden_states", output_hidden_states), ("attentions", output_attentions)) if wanted]
            for name in asked:
                per_expert = {role: states[name] for role, states in tower_outputs.items() if states.get(name) is not None}
                visual[f"expert_{name}"] = per_expert
                visual[name] = per_expert.get(self.active_roles[0])
        return visual

    def fuse_expert_features(
        self,
        features: dict[str, torch.Tensor],
        text_features: torch.Tensor | None = None,
        bridge_generator: torch.Generator | None = None,
    ) -> AstreaImageFeaturesOutput:
        """Steps 3-4: residual bridges over the earlier experts' ``C_i``, then the MoE fusion."""
        bridged = {}
        for position, role in enumerate(self.active_roles):
            previous = [features[earlier] for earlier in self.expert_order[:position]]
            bridged[role] = self.bridges[role](features[role], previous, bridge_generator) if previous else features[role]
        if self.alignment_role is not None:
            fused = torch.stack([bridged[role] for role in self.alignment_group]).mean(dim=0)
            return AstreaImageFeaturesOutput(last_hidden_state=fused, pooler_output=tuple(fused), expert_features=features, bridged_features=bridged)
        fusion = self.fusion([bridged[role] for role in self.expert_order], text_features)
        return AstreaImageFeaturesOutput(
            last_hidden_state=fusion.fused,
            pooler_output=tuple(fusion.fused),
            expert_features=features,
            bridged_features=bridged,
            router_logits=fusion.router_logits,
            router_probs=fusion.router_probs,
            load_balance_loss=fusion.load_balance_loss,
        )

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """``(batch, seq_len)`` mask of the ``<image>`` positions: from the ids, or, given only
        ``inputs_embeds``, where a row equals the ``<image>`` embedding (as LLaVA finds them)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding.to(inputs_embeds.dtype)).all(-1)

    def instruction_features(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, image_mask: torch.Tensor) -> torch.Tensor:
        """Router input ``(n_images, D)``: per image, the mean embedding of the text tokens before it.

        Only what precedes the image is read -- as the LLM itself reads it, causally -- so the
        routing of an image is the same in training (prompt + answer) and in generation (prompt),
        and never changes as a conversation goes on. With the question before the image (the
        demo's layout) that is the instruction; with the image first, only the system prompt and
        earlier turns. Padding and other images' tokens are skipped; the result carries no gradient
        into the embeddings.
        """
        text = ~image_mask
        if attention_mask is not None and attention_mask.dim() == 2:
            text = text & attention_mask.bool()
        weights = text.float()[..., None]
        sums = (inputs_embeds.detach().float() * weights).cumsum(dim=1)
        counts = weights.cumsum(dim=1)
        # Image i fills the i-th run of num_visual_tokens <image> positions (row-major, as masked_scatter fills).
        batch, position = image_mask.nonzero(as_tuple=True)
        first = slice(None, None, self.config.num_visual_tokens)
        batch, position = batch[first], position[first]
        return sums[batch, position] / counts[batch, position].clamp(min=1.0)

    # ----------------------------------------------------------------------- forward
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values_caption: torch.FloatTensor | None = None,
        pixel_values_classification: torch.FloatTensor | None = None,
        pixel_values_detection: torch.FloatTensor | None = None,
        pixel_values_segmentation: torch.FloatTensor | None = None,
        pixel_mask_caption: torch.LongTensor | None = None,
        pixel_mask_classification: torch.LongTensor | None = None,
        pixel_mask_detection: torch.LongTensor | None = None,
        pixel_mask_segmentation: torch.LongTensor | None = None,
        expert_features: dict[str, torch.Tensor] | None = None,
        tower_features: dict[str, torch.Tensor] | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> AstreaModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        pixel_values = _pixel_dict(pixel_values_caption, pixel_values_classification, pixel_values_detection, pixel_values_segmentation)
        pixel_masks = _pixel_dict(pixel_mask_caption, pixel_mask_classification, pixel_mask_detection, pixel_mask_segmentation)
        check_inputs(self, input_ids, inputs_embeds, attention_mask, past_key_values, pixel_values)
        check_pixel_masks(pixel_values, pixel_masks)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        visual = None
        if pixel_values or expert_features or tower_features:
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            n_images = next(iter({**pixel_values, **(tower_features or {}), **(expert_features or {})}.values())).shape[0]
            per_image = self.config.num_visual_tokens
            torch_compilable_check(
                image_mask.sum() == n_images * per_image,
                lambda: (
                    f"the text holds {int(image_mask.sum())} <image> tokens but {n_images} image(s) x {per_image} visual tokens "
                    f"= {n_images * per_image} are needed; build the inputs with AstreaProcessor, which expands each "
                    f"<image> to {per_image} tokens"
                ),
            )
            text_features = None
            if self.fusion.router.use_text:
                text_features = self.instruction_features(inputs_embeds, attention_mask, image_mask)
            visual = self.get_image_features(
                pixel_values=pixel_values,
                expert_features=expert_features,
                tower_features=tower_features,
                pixel_masks=pixel_masks,
                text_features=text_features,
                output_hidden_states=False,
                output_attentions=False,
                return_dict=True,
            )
            fused = visual.fused.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], fused.reshape(-1, fused.shape[-1]))
        elif past_key_values is None and not torch.compiler.is_compiling() and bool(self.get_placeholder_mask(input_ids, inputs_embeds).any()):
            raise ValueError("the text holds <image> tokens but no pixel values were given; pass the images to the processor")

        if output_attentions is not None:  # else the language model's own default
            kwargs["output_attentions"] = output_attentions
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return AstreaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=None if visual is None else visual.fused,
            router_logits=None if visual is None else visual.router_logits,
            router_probs=None if visual is None else visual.router_probs,
            load_balance_loss=None if visual is None else visual.load_balance_loss,
        )


def _pixel_dict(caption, classification, detection, segmentation) -> dict[str, torch.Tensor]:
    """``{role: pixels}`` of the per-expert pixel arguments that were given."""
    values = (caption, classification, detection, segmentation)
    return {role: value for role, value in zip(EXPERT_ROLES, values) if value is not None}


class AstreaForConditionalGeneration(AstreaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # As LLaVA's: the LM head's shard plan (the LLM's own plan comes from its config's base_model_tp_plan).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: AstreaConfig):
        super().__init__(config)
        self.model = AstreaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, **kwargs) -> AstreaImageFeaturesOutput | tuple:
        """:meth:`AstreaModel.get_image_features` (same arguments)."""
        return self.model.get_image_features(**kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values_caption: torch.FloatTensor | None = None,
        pixel_values_classification: torch.FloatTensor | None = None,
        pixel_values_detection: torch.FloatTensor | None = None,
        pixel_values_segmentation: torch.FloatTensor | None = None,
        pixel_mask_caption: torch.LongTensor | None = None,
        pixel_mask_classification: torch.LongTensor | None = None,
        pixel_mask_detection: torch.LongTensor | None = None,
        pixel_mask_segmentation: torch.LongTensor | None = None,
        expert_features: dict[str, torch.Tensor] | None = None,
        tower_features: dict[str, torch.Tensor] | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> AstreaCausalLMOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values_caption=pixel_values_caption,
            pixel_values_classification=pixel_values_classification,
            pixel_values_detection=pixel_values_detection,
            pixel_values_segmentation=pixel_values_segmentation,
            pixel_mask_caption=pixel_mask_caption,
            pixel_mask_classification=pixel_mask_classification,
            pixel_mask_detection=pixel_mask_detection,
            pixel_mask_segmentation=pixel_mask_segmentation,
            expert_features=expert_features,
            tower_features=tower_features,
            use_cache=use_cache,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])

        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != hidden.shape[:2]:
                raise ValueError(
                    f"`labels` must be an integer tensor shaped like the input {tuple(hidden.shape[:2])}, got "
                    f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
                )
            vocab = self.config.text_config.vocab_size
            # A data-dependent check: eager only (under torch.compile it would break the graph).
            if not torch.compiler.is_compiling() and bool(((labels != -100) & ((labels < 0) | (labels >= vocab))).any()):
                raise ValueError(f"`labels` must be -100 (ignored) or token ids in [0, {vocab})")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)

        return AstreaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            router_logits=outputs.router_logits,
            router_probs=outputs.router_probs,
            load_balance_loss=outputs.load_balance_loss,
        )

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
        """Beams and ``num_return_sequences`` repeat every sample; its images must follow as a group.

        ``GenerationMixin`` repeats each row of every tensor argument in place (``[A, B] -> [A, A,
        B, B]``), which is right for the text but not for the images when a sample has several or
        none: sample 0 with images A, B needs ``[A, B, A, B]``. Pixels and cached features are
        repeated here per sample instead (images per sample = its ``<image>`` tokens / N).
        """
        visual = {
            key: model_kwargs.pop(key)
            for key in (*PIXEL_KEYS, *PIXEL_MASK_KEYS, "expert_features", "tower_features")
            if model_kwargs.get(key) is not None
        }
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        if expand_size > 1 and visual:
            text = input_ids if input_ids is not None and input_ids.numel() else None
            mask = self.model.get_placeholder_mask(text, model_kwargs.get("inputs_embeds"))
            # The text was expanded already: every expand_size-th row is an original sample.
            per_sample = (mask[::expand_size].sum(-1) // self.config.num_visual_tokens).tolist()

            def regroup(images: torch.Tensor) -> torch.Tensor:
                if sum(per_sample) != images.shape[0]:
                    return images  # malformed: forward names the mismatch
                groups = images.split(per_sample)
                return torch.cat([group for group in groups for _ in range(expand_size)])

            visual = {
                key: {role: regroup(value) for role, value in item.items()} if isinstance(item, dict) else regroup(item)
                for key, item in visual.items()
            }
        return input_ids, {**model_kwargs, **visual}

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values=None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        # The named arguments are GenerationMixin's: generate() reads this signature to allow
        # `inputs_embeds` (it refuses them for a model whose signature lacks the name).
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if not is_first_iteration and kwargs.get("use_cache", True):
            # Visual features are computed once, in the prefill; decode steps only run the LLM.
            for key in (*PIXEL_KEYS, *PIXEL_MASK_KEYS, "expert_features", "tower_features"):
                model_inputs.pop(key, None)
        return model_inputs


def find_backbone(model: nn.Module) -> nn.Module:
    """The :class:`AstreaModel` inside ``model``: itself, an ``AstreaForConditionalGeneration``, a PEFT
    wrapper, or either loaded as remote code (found by class name: remote code has its own classes)."""
    for module in model.modules():
        if type(module).__name__ == "AstreaModel":
            return module
    raise ValueError(f"no AstreaModel inside the {type(model).__name__} given; pass an Astrea model "
                     "(AstreaForConditionalGeneration, its backbone, or a PEFT wrapper of it)")


__all__ = ["AstreaPreTrainedModel", "AstreaModel", "AstreaForConditionalGeneration", "find_backbone"]
