"""``astrea create``: write a Hub-ready Astrea folder (weights, config, processor, code, model card).

* ``--preset tiny``: random weights and an offline byte-level tokenizer; nothing is downloaded.
* ``--preset astrea-13b`` / ``astrea-34b``: the LLM and the four expert towers are loaded from their
  pretrained sources (the preset's Hub ids by default; every part also takes a local path, so
  offline users are never stuck on a Hub id). Projectors, bridges and the fusion start random:
  they are what ``astrea align`` / ``astrea instruct`` train.

A paper-scale folder is written in bounded memory (:func:`write_assembled`):

1. every part is found and checked first (:mod:`astrea_vlm.parts`): a missing path or an
   unreachable Hub fails within seconds, naming each part and the flag that takes a local path;
2. the model is built on the meta device (no memory), and the shard files are planned from it;
3. one part at a time -- the new modules, each tower, the LLM -- is loaded straight into its place
   in the meta model, written to its own safetensors shards and released.

Peak memory is therefore about the largest part (the LLM: ~26 GB for 13B in bfloat16), never the
whole model (~30 GB) or a second copy of the LLM. The LLM's vocabulary is extended to the
preset's (``<image>`` is added to the tokenizer; the new embedding rows start at the mean of the
pretrained ones).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import torch

from .configuration import get_preset
from .configuration.presets import PRESETS, TEXT_PRETRAINED
from .parts import Part, resolve_parts

#: Tower kinds whose weights are a transformers folder (config.json + safetensors); the others read a checkpoint file.
FOLDER_TOWERS = ("siglip", "hf_vision", "grounding_dino")
#: Astrea's own modules, random in a created folder (what the alignment and instruction stages train).
NEW_MODULES = ("projectors", "bridges", "fusion", "moco_head")
#: Shard size of the written safetensors (transformers' convention: one file below it, else an index).
MAX_SHARD_BYTES = 5 * 1024**3


def _check_llm_matches(config, llm_config) -> None:
    ours = config.text_config
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(llm_config, field, None) != getattr(ours, field, None):
            raise ValueError(
                f"the LLM's {field}={getattr(llm_config, field, None)} differs from the preset's text_config "
                f"({getattr(ours, field, None)}); pass the LLM the preset describes or edit the config"
            )


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with rows appended up to ``rows``, each new one the mean of the pretrained ones."""
    grown = weight.mean(0, keepdim=True).repeat(rows, 1)
    grown[: weight.shape[0]] = weight
    return grown


def llm_state(llm, config, source: str) -> dict[str, torch.Tensor]:
    """A pretrained causal LM's weights under Astrea's names, the vocabulary grown to the config's."""
    _check_llm_matches(config, llm.config)
    state = {f"model.language_model.{k}": v for k, v in llm.get_decoder().state_dict().items()}
    embed_key = "model.language_model.embed_tokens.weight"
    vocab, pretrained_vocab = config.text_config.vocab_size, state[embed_key].shape[0]
    if pretrained_vocab > vocab:
        raise ValueError(f"the LLM from {source} has {pretrained_vocab} tokens but the config's vocab_size is {vocab}; "
                         f"raise text_config.vocab_size")
    state[embed_key] = _grow_rows(state[embed_key], vocab)  # new rows (<image>, padding to a multiple of 64)
    state["lm_head.weight"] = _grow_rows(llm.get_output_embeddings().weight.detach(), vocab)
    return state


@torch.no_grad()
def load_llm(model, source: str, **hub_kwargs) -> None:
    """Copy a pretrained causal LM (HF folder or Hub id) into the model, growing the vocabulary if needed."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(source, dtype=model.dtype, **hub_kwargs)
    state = llm_state(llm, model.config, source)
    head = state.pop("lm_head.weight")
    prefix = "model.language_model."
    missing, unexpected = model.model.language_model.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"LLM weights from {source} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.lm_head.weight.copy_(head)


def load_tokenizer(source: str, config, **hub_kwargs):
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
    config,
    llm: str | None = None,
    tokenizer: str | None = None,
    towers: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **hub_kwargs,
):
    """Build a model and processor from pretrained parts; parts left out stay random (towers must all be given)."""
    from .modeling import AstreaForConditionalGeneration
    from .processing import build_processor

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


def _check_new_folder(output: Path) -> None:
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new folder (nothing was overwritten)")


def write_folder(config, output: str | Path, card=None, **assemble_kwargs) -> Path:
    """Write the Hub folder with its model card (README.md).

    With the LLM and every tower given, the folder is written part by part in bounded memory
    (:func:`write_assembled`); otherwise the model is assembled in memory (:func:`assemble`).
    ``card``: the card's :class:`~astrea_vlm.card.CardFacts`; by default they say the folder was
    assembled from the parts given (or is random when none is).
    """
    from .card import created_facts, write_card
    from .export import save_hub_folder

    output = Path(output)
    _check_new_folder(output)
    if card is None:
        parts = _parts(config, assemble_kwargs.get("llm"), assemble_kwargs.get("tokenizer"), assemble_kwargs.get("towers"))
        card = created_facts(output, parts, "astrea_vlm.create.write_folder")
    towers = assemble_kwargs.get("towers") or {}
    if assemble_kwargs.get("llm") and set(towers) >= set(config.expert_order):
        return write_assembled(config, output, card=card, **{"dtype": torch.float32, **assemble_kwargs})  # assemble's default dtype
    model, processor = assemble(config, **assemble_kwargs)
    save_hub_folder(model, output, processor=processor)
    write_card(output, card, model.config, processor, n_parameters=model.num_parameters())
    return output


def _parts(config, llm: str | None, tokenizer: str | None, towers: dict[str, str] | None) -> dict[str, str] | None:
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


# --------------------------------------------------------------------- bounded-memory assembly
def requested_parts(kinds: dict[str, str], llm: str, tokenizer: str | None, towers: dict[str, str]) -> list[Part]:
    """The parts to resolve: the LLM, the tokenizer when it is not the LLM's, and a tower per role of ``kinds``."""
    unknown = sorted(set(towers) - set(kinds))
    if unknown:
        raise ValueError(f"no expert role(s) {unknown}; the roles are {list(kinds)}")
    parts = [Part("llm", "--llm", llm, "folder")]
    if tokenizer is not None:
        parts.append(Part("tokenizer", "--tokenizer", tokenizer, "folder"))
    for role, kind in kinds.items():
        parts.append(Part(role, f"--{role}", towers[role], "folder" if kind in FOLDER_TOWERS else "weights"))
    return parts


def meta_model(config, dtype: torch.dtype):
    """The whole model on the meta device: names, shapes and dtypes, and no memory."""
    from .modeling import AstreaForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return AstreaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)


def part_of(key: str) -> str:
    """Which part a state-dict key belongs to: ``llm``, an expert role, or ``new`` (Astrea's own modules)."""
    if key.startswith("model.towers."):
        return key.split(".")[2]
    if key.startswith(("model.language_model.", "lm_head.")):
        return "llm"
    if key.split(".")[1] in NEW_MODULES:
        return "new"
    raise ValueError(f"{key} belongs to no part")


class ShardWriter:
    """Writes a model's safetensors shards part by part, as each part is loaded.

    The shards are planned up front from the meta model, so that their names
    (``model-00001-of-0000N.safetensors``) are final when the first one is written; a shard never
    spans two parts, so one part in memory is enough to write it.
    """

    def __init__(self, folder: Path, model, parts: list[str], max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        state = model.state_dict()
        if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
            state.pop("lm_head.weight", None)  # tied: saved once, as transformers does
        self.expected = {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
        self.plan: dict[str, list[list[str]]] = {part: [] for part in parts}
        self.part_bytes = dict.fromkeys(parts, 0)
        filled = dict.fromkeys(parts, 0)  # bytes in each part's last shard
        for key, tensor in state.items():
            part, size = part_of(key), tensor.numel() * tensor.element_size()
            shards = self.plan[part]
            if not shards or filled[part] and filled[part] + size > max_shard_bytes:
                shards.append([])
                filled[part] = 0
            shards[-1].append(key)
            filled[part] += size
            self.part_bytes[part] += size
        count = sum(len(shards) for shards in self.plan.values())
        names = iter(["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])
        self.files = {part: [next(names) for _ in shards] for part, shards in self.plan.items()}
        self.weight_map: dict[str, str] = {}

    def write(self, part: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Write ``part``'s shards; its keys, shapes and dtypes must be the planned ones."""
        from safetensors.torch import save_file

        planned = {k for shard in self.plan[part] for k in shard}
        missing, unexpected = sorted(planned - set(tensors)), sorted(set(tensors) - planned)
        wrong = [k for k in planned & set(tensors) if tuple(tensors[k].shape) != self.expected[k][0] or tensors[k].is_meta]
        if missing or unexpected or wrong:
            raise ValueError(f"the {part} weights from {source} do not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} with other shapes "
                             f"(e.g. {wrong[:3]}); check that the preset's config matches the checkpoint")
        for keys, name in zip(self.plan[part], self.files[part]):
            shard = {k: tensors[k].detach().to(self.expected[k][1]).contiguous() for k in keys}
            save_file(shard, str(self.folder / name), metadata={"format": "pt"})
            self.weight_map.update(dict.fromkeys(keys, name))
            del shard

    def finish(self) -> None:
        if set(self.weight_map) != set(self.expected):
            raise RuntimeError(f"parts never written: {sorted(set(self.plan) - {part_of(k) for k in self.weight_map})}")
        if len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": sum(self.part_bytes.values())}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _release(module: torch.nn.Module | None = None) -> None:
    """Free a written part and hand its memory back to the system before the next part is loaded."""
    if module is not None:
        module.to("meta")
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap; without a trim the
    # previous part's memory stays resident under the next part's, and the peak becomes their sum.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def write_assembled(config, output: str | Path, llm: str | None = None, towers: dict[str, str] | None = None,
                    tokenizer: str | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    max_shard_bytes: int = MAX_SHARD_BYTES, log=print, parts: list[Part] | None = None, card=None) -> Path:
    """Write the folder of a model assembled from pretrained parts, one part in memory at a time (module docstring).

    ``parts``: already resolved parts (:func:`requested_parts` + :func:`astrea_vlm.parts.resolve_parts`);
    otherwise ``llm``, ``towers`` (every role) and ``tokenizer`` are resolved here. ``card``: the
    model card's facts (default: assembled from these parts).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .card import created_facts, write_card

    from .export import save_hub_folder
    from .processing import build_processor

    output = Path(output)
    _check_new_folder(output)
    if parts is None:
        kinds = {role: config.expert_configs[role].kind for role in config.expert_order}
        parts = resolve_parts(requested_parts(kinds, llm, tokenizer, towers or {}), log=log)
    parts = {part.name: part for part in parts}
    _check_llm_matches(config, AutoConfig.from_pretrained(parts["llm"].path))
    processor = build_processor(config, tokenizer=load_tokenizer(str(parts.get("tokenizer", parts["llm"]).path), config))

    model = meta_model(config, dtype)
    output.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(output, model, ["new", *config.expert_order, "llm"], max_shard_bytes)
    try:
        torch.manual_seed(seed)
        new = {}
        for name in NEW_MODULES:
            module = getattr(model.model, name)
            module.to_empty(device="cpu")
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
                model._init_weights(sub)
            new.update({f"model.{name}.{k}": v for k, v in module.state_dict().items()})
        writer.write("new", new, "Astrea's new modules")
        del new
        for name in NEW_MODULES:
            _release(getattr(model.model, name))
        for role in config.expert_order:
            tower, part = model.model.towers[role], parts[role]
            log(f"{part.flag}: loading {part.source} ({writer.part_bytes[role] / 1e9:.2f} GB in {str(dtype).split('.')[-1]})")
            tower.load_pretrained(str(part.path))
            writer.write(role, {f"model.towers.{role}.{k}": v for k, v in tower.state_dict().items()}, part.source)
            _release(tower)
        log(f"--llm: loading {parts['llm'].source} ({writer.part_bytes['llm'] / 1e9:.2f} GB)")
        pretrained = AutoModelForCausalLM.from_pretrained(parts["llm"].path, dtype=dtype)
        state = llm_state(pretrained, config, parts["llm"].source)
        del pretrained
        _release()
        writer.write("llm", state, parts["llm"].source)
        del state
        _release()
        writer.finish()
        save_hub_folder(model, output, processor=processor, weights=False)
        if card is None:
            sources = {role: parts[role].source for role in config.expert_order}
            card = created_facts(output, _parts(config, parts["llm"].source, parts.get("tokenizer") and parts["tokenizer"].source,
                                                sources), "astrea_vlm.create.write_assembled")
        write_card(output, card, model.config, processor, n_parameters=model.num_parameters())
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)  # never leave a folder that looks complete but is not
        raise
    return output


def create(preset: str, output: str | Path, seed: int = 0, llm: str | None = None, tokenizer: str | None = None,
           towers: dict[str, str] | None = None, dtype: str = "auto", log=print) -> Path:
    """Write the folder for ``preset`` (see the module docstring) and return its path.

    For a paper preset every part is found and checked before the config or the model is built
    (and before torch's model code is imported), so that a missing part fails within seconds.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    from .card import created_facts

    command = f"astrea create --preset {preset}"
    if preset == "tiny":
        if llm or tokenizer or towers:
            raise ValueError("the tiny preset is random: it takes no pretrained parts")
        return write_folder(get_preset(preset), output, card=created_facts(output, None, command), seed=seed)
    torch_dtype = torch.bfloat16 if dtype == "auto" else getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"--dtype {dtype!r} is not a floating-point torch dtype; use bfloat16, float16 or float32")
    _check_new_folder(Path(output))
    raw = PRESETS[preset]()  # plain dicts: reading them needs no transformers
    experts = {key[: -len("_config")]: value for key, value in raw.items() if key.endswith("_config") and key != "text_config"}
    sources = {role: expert["pretrained"] for role, expert in experts.items()}
    sources.update(towers or {})
    kinds = {role: expert["kind"] for role, expert in experts.items()}
    llm = llm or TEXT_PRETRAINED[preset]
    parts = resolve_parts(requested_parts(kinds, llm, tokenizer, sources), log=log)
    config = get_preset(preset)
    card = created_facts(output, _parts(config, llm, tokenizer, sources), command)
    return write_assembled(config, output, dtype=torch_dtype, seed=seed, log=log, parts=parts, card=card)
