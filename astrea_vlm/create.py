"""``astrea create``: write a Hub-ready Astrea folder (weights, config, processor, code, model card).

* ``--preset tiny``: random weights and an offline byte-level tokenizer; nothing is downloaded.
* ``--preset astrea-13b`` / ``astrea-34b``: the LLM and the four expert towers are loaded from their
  pretrained sources (the preset's Hub ids by default; every part also takes a local path, so
  offline users are never stuck on a Hub id). Projectors, bridges and the fusion start random:
  they are what ``astrea align`` / ``astrea instruct`` train.

The LLM's vocabulary is extended to the preset's (``<image>`` is added to the tokenizer, and the
new embedding rows start at the mean of the pretrained ones). Assembling a paper-scale model holds
it in memory in ``--dtype`` (bfloat16 by default): about 30 GB for 13B, 75 GB for 34B.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .configuration import AstreaConfig, get_preset
from .configuration.presets import TEXT_PRETRAINED
from .modeling import AstreaForConditionalGeneration
from .processing import build_processor

def _check_llm_matches(config: AstreaConfig, llm_config) -> None:
    ours = config.text_config
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(llm_config, field, None) != getattr(ours, field, None):
            raise ValueError(
                f"the LLM's {field}={getattr(llm_config, field, None)} differs from the preset's text_config "
                f"({getattr(ours, field, None)}); pass the LLM the preset describes or edit the config"
            )


@torch.no_grad()
def load_llm(model: AstreaForConditionalGeneration, source: str, **hub_kwargs) -> None:
    """Copy a pretrained causal LM (HF folder or Hub id) into the model, growing the vocabulary if needed."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(source, dtype=model.dtype, **hub_kwargs)
    _check_llm_matches(model.config, llm.config)
    state = llm.get_decoder().state_dict()
    embed_key = "embed_tokens.weight"
    head = llm.get_output_embeddings().weight
    ours_embed = model.get_input_embeddings().weight
    pretrained_vocab = state[embed_key].shape[0]
    if pretrained_vocab > ours_embed.shape[0]:
        raise ValueError(
            f"the LLM has {pretrained_vocab} tokens but the config's vocab_size is {ours_embed.shape[0]}; "
            f"raise text_config.vocab_size"
        )
    # New rows (<image>, padding to a multiple of 64) start at the mean embedding.
    grown_embed = state[embed_key].mean(0, keepdim=True).repeat(ours_embed.shape[0], 1)
    grown_embed[:pretrained_vocab] = state[embed_key]
    state[embed_key] = grown_embed
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"LLM weights from {source} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    grown_head = head.mean(0, keepdim=True).repeat(ours_embed.shape[0], 1)
    grown_head[:pretrained_vocab] = head
    model.lm_head.weight.copy_(grown_head)


def load_tokenizer(source: str, config: AstreaConfig, **hub_kwargs):
    """The LLM's tokenizer with ``<image>`` added as a special token at ``config.image_token_id``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id != config.image_token_id:
        raise ValueError(
            f"<image> got id {image_id} in the tokenizer from {source}, but the config expects "
            f"{config.image_token_id}; set image_token_id={image_id} in the config"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    return tokenizer


def assemble(
    config: AstreaConfig,
    llm: str | None = None,
    tokenizer: str | None = None,
    towers: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **hub_kwargs,
):
    """Build a model and processor from pretrained parts; parts left out stay random (towers must all be given)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = AstreaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    towers = towers or {}
    unknown = sorted(set(towers) - set(config.expert_order))
    if unknown:
        raise ValueError(f"no expert role(s) {unknown}; the roles are {config.expert_order}")
    for role, source in towers.items():
        model.model.towers[role].load_pretrained(source, **hub_kwargs)
    if llm is not None:
        load_llm(model, llm, **hub_kwargs)
    if tokenizer is not None or llm is not None:
        processor = build_processor(config, tokenizer=load_tokenizer(tokenizer or llm, config, **hub_kwargs))
    else:
        processor = build_processor(config)
    return model.eval(), processor


def write_folder(config: AstreaConfig, output: str | Path, card=None, **assemble_kwargs) -> Path:
    """Assemble (see :func:`assemble`) and write the Hub folder with its model card (README.md).

    ``card``: the card's :class:`~astrea_vlm.card.CardFacts`; by default they say the folder was
    assembled from the parts given (or is random when none is).
    """
    from .card import created_facts, write_card
    from .export import save_hub_folder

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new folder (nothing was overwritten)")
    model, processor = assemble(config, **assemble_kwargs)
    save_hub_folder(model, output, processor=processor)
    if card is None:
        parts = _parts(config, assemble_kwargs.get("llm"), assemble_kwargs.get("tokenizer"), assemble_kwargs.get("towers"))
        card = created_facts(output, parts, "astrea_vlm.create.write_folder")
    write_card(output, card, model.config, processor, n_parameters=model.num_parameters())
    return output


def _parts(config: AstreaConfig, llm: str | None, tokenizer: str | None, towers: dict[str, str] | None) -> dict[str, str] | None:
    """Where each pretrained part comes from (None when nothing is pretrained: a random model)."""
    if not llm and not tokenizer and not towers:
        return None
    towers = towers or {}
    parts = {"language model": llm or "random"}
    if tokenizer and tokenizer != llm:
        parts["tokenizer"] = tokenizer
    for role, expert in config.expert_configs.items():
        parts[f"{role} expert ({expert.kind})"] = towers.get(role) or "random"
    return parts


def create(preset: str, output: str | Path, seed: int = 0, llm: str | None = None, tokenizer: str | None = None,
           towers: dict[str, str] | None = None, dtype: str = "auto", **hub_kwargs) -> Path:
    """Write the folder for ``preset`` (see the module docstring) and return its path."""
    from .card import created_facts

    config = get_preset(preset)
    command = f"astrea create --preset {preset}"
    if preset == "tiny":
        if llm or tokenizer or towers:
            raise ValueError("the tiny preset is random: it takes no pretrained parts")
        return write_folder(config, output, card=created_facts(output, None, command), seed=seed)
    parts = {role: expert.pretrained for role, expert in config.expert_configs.items()}
    parts.update(towers or {})
    llm = llm or TEXT_PRETRAINED[preset]
    card = created_facts(output, _parts(config, llm, tokenizer, parts), command)
    torch_dtype = torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)
    return write_folder(
        config, output, card=card, llm=llm, tokenizer=tokenizer, towers=parts, dtype=torch_dtype, seed=seed, **hub_kwargs
    )
