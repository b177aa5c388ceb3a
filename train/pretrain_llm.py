"""Pretrain the demo's toy LLM once on the synthetic world's language (the shipped "world LLM").

The paper starts from a pretrained LLM; this gives the demo the analogue: a toy LLM trained on the
chat-formatted QA of the synthetic world, with a *symbolic scene* in place of the image. Visual
token ``j`` covers cell ``j`` of a 4x4 grid (the layout of the experts' 16 tokens) and is

    t_j = sum_o coverage(o, j) * (E[colour_o] + E[shape_o]) + coverage(background, j) * E[background]

with ``E`` the LLM's own word embeddings (a word of several tokens: their mean) and ``coverage``
the fraction of the cell that an object's visible pixels (or the background) cover. No pixel, tower
or projector is involved, and nothing of the demo's splits: the scenes come from their own
``"pretrain"`` split. The prompt comes before the image
(``image_position: after``) so that each visual token can attend to the question. Why, and what it
measures: README, "The world LLM". Rebuild the shipped files with ``astrea pretrain-llm --output DIR``;
how they were made (a run continued with ``--init-from``): ``train/world_llm/README.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Folder of the shipped world LLM (weights, tokenizer, settings) inside the installed package.
SHIPPED = Path(__file__).resolve().parent / "world_llm"
PRETRAIN_SEED = 1000
GRID = 4


@dataclasses.dataclass
class PretrainSettings:
    """Every setting of ``astrea pretrain-llm``; stored in the output's ``pretrain.json``."""

    scenes: int = 8000           # pretraining scenes, 6.5 QA rows each (captions from every second scene)
    steps: int = 12000
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    stage_fraction: float = 0.0   # share of batches drawn from the alignment-stage targets (0: QA only)
    # Sampling weight of a QA row per question type (the look-up types need the most practice).
    type_weights: dict = dataclasses.field(default_factory=lambda: {
        "existence": 3.0, "relative_position": 3.0, "grounding": 2.0, "colour": 1.5})
    image_position: str = "after"  # the question first, so the visual tokens can attend to it (see the docstring)
    eval_every: int = 2000        # also score the held-out symbolic scenes every this many steps (0: at the end only)
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 4
    vocab_size: int = 1024
    seed: int = PRETRAIN_SEED
    validation_scenes: int = 256
    log_every: int = 500
    threads: int = 1              # torch threads, fixed so that a rerun gives the same weights (train/reproducibility.py)
    # Continue from a world LLM folder (its weights and tokenizer) instead of random weights and a new
    # tokenizer: adapts a pretrained world LLM to a changed chat template without the full run.
    init_from: str | None = None


# ----------------------------------------------------------------------------- symbolic scenes
def cell_coverage(scene, grid: int = GRID) -> np.ndarray:
    """``(n_objects + 1, grid * grid)``: the fraction of each grid cell covered by each object's
    visible pixels (rows 0..n-1, drawing order) and by the background (last row); columns row major."""
    h, w = scene.height, scene.width
    masks = scene.masks.astype(np.float32)                       # (n, H, W), visible pixels
    rows = np.minimum(np.arange(h) * grid // h, grid - 1)
    cols = np.minimum(np.arange(w) * grid // w, grid - 1)
    cell_of = rows[:, None] * grid + cols[None, :]                # (H, W) -> cell index
    pixels = np.bincount(cell_of.ravel(), minlength=grid * grid).astype(np.float32)
    cover = np.stack([np.bincount(cell_of.ravel(), weights=m.ravel(), minlength=grid * grid) for m in masks]) \
        if len(masks) else np.zeros((0, grid * grid), np.float32)
    cover = cover / pixels
    background = np.clip(1.0 - cover.sum(0), 0.0, 1.0)
    return np.concatenate([cover, background[None]], 0).astype(np.float32)


def word_ids(tokenizer, word: str) -> list[int]:
    """The token ids of `` word`` as it appears inside a sentence (byte-level BPE: leading space)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the tokenizer encodes {word!r} as nothing")
    return ids


def scene_words(scene, tokenizer) -> list[list[list[int]]]:
    """Per row of :func:`cell_coverage`, the token-id lists of the words that name it."""
    from .synthetic import BACKGROUNDS

    words = [[word_ids(tokenizer, o.colour), word_ids(tokenizer, o.shape)] for o in scene.objects]
    words.append([word_ids(tokenizer, BACKGROUNDS[scene.background][1])])
    return words


def symbolic_tokens(embedding: torch.Tensor, coverage: torch.Tensor, words: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """``(grid*grid, hidden)`` symbolic visual tokens: ``coverage.T @ (sum of each row's word embeddings)``.

    A word that is several tokens contributes the mean of its token embeddings.
    """
    rows = []
    for row in words:
        rows.append(sum(embedding[torch.tensor(ids)].mean(0) for ids in row))
    return coverage.T.to(embedding.dtype) @ torch.stack(rows)


# ----------------------------------------------------------------------------- sequences
def world_tokenizer(scenes, vocab_size: int, model_max_length: int = 512):
    """Byte-level BPE trained on the scenes' text (captions, tags, prompts and answers)."""
    from ..eval.prompts import build_prompt
    from ..processing.tokenization import build_byte_level_tokenizer
    from .synthetic import eval_record

    texts = []
    for scene in scenes:
        texts.append(scene.caption)
        texts.append(", ".join(scene.tags))
        for qa in scene.qa:
            record = eval_record(qa)
            texts.append(build_prompt(record["metric"], record) + " " + qa["answer"])
    return build_byte_level_tokenizer(vocab_size, model_max_length=model_max_length, corpus=texts)


def encode_row(processor, messages: list[dict[str, Any]], image_position: str | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a one-turn chat row as the demo's trainer sees it: rendered by the
    chat template in ``image_position`` (default: the processor's layout), ``<image>`` expanded to
    the visual tokens; labels on the answer and ``</s>`` only."""
    tokenizer = processor.tokenizer
    layout = {} if image_position is None else {"image_position": image_position}
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True, **layout)
    full = processor.apply_chat_template(messages, tokenize=False, **layout)
    image = processor.image_token if hasattr(processor, "image_token") else "<image>"
    n_visual = processor.num_visual_tokens if hasattr(processor, "num_visual_tokens") else GRID * GRID
    prompt, full = prompt.replace(image, image * n_visual), full.replace(image, image * n_visual)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if f_ids[: len(p_ids)] != p_ids:
        raise ValueError(f"the prompt's tokens are not a prefix of the full row's tokens: {prompt!r}")
    labels = [-100] * len(p_ids) + f_ids[len(p_ids):]
    return f_ids, labels


@dataclasses.dataclass
class _Row:
    scene: int
    input_ids: list[int]
    labels: list[int]
    question_type: str


def _sparse_scene(coverage: np.ndarray, words, width: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Cell -> (token ids, weights) of the symbolic tokens, padded to ``width`` (weight 0)."""
    weights: list[dict[int, float]] = [dict() for _ in range(coverage.shape[1])]
    for row, row_words in enumerate(words):
        for ids in row_words:
            for token in ids:
                for cell in np.nonzero(coverage[row] > 0)[0]:
                    weights[cell][token] = weights[cell].get(token, 0.0) + float(coverage[row, cell]) / len(ids)
    index = np.zeros((coverage.shape[1], width), np.int64)
    value = np.zeros((coverage.shape[1], width), np.float32)
    for cell, items in enumerate(weights):
        if len(items) > width:
            raise ValueError(f"cell {cell} is named by {len(items)} tokens, more than width={width}; raise the width")
        items = sorted(items.items(), key=lambda kv: -kv[1])
        for k, (token, w) in enumerate(items):
            index[cell, k], value[cell, k] = token, w
    return index, value


class WorldCorpus:
    """Scenes as symbolic-token tables plus their tokenized QA and alignment-stage rows."""

    def __init__(self, scenes, processor, *, caption_fraction: float = 0.5, with_stages: bool = True,
                 image_position: str = "after"):
        from .data import build_qa_dataset, build_stage_datasets, source_from_scenes

        self.scenes = scenes
        tables = [_sparse_scene(cell_coverage(s), scene_words(s, processor.tokenizer)) for s in scenes]
        self.index = torch.from_numpy(np.stack([t[0] for t in tables]))    # (S, 16, K)
        self.value = torch.from_numpy(np.stack([t[1] for t in tables]))
        position = {s.image_id: i for i, s in enumerate(scenes)}
        qa = build_qa_dataset(scenes, type_fractions={"caption": caption_fraction}, image_position=image_position)
        self.qa = [_Row(position[r["image_id"]], *encode_row(processor, r["messages"], image_position), r["question_type"]) for r in qa]
        self.stages: list[_Row] = []
        if with_stages:
            for dataset in build_stage_datasets(source_from_scenes(scenes), processor=processor, image_position=image_position):
                self.stages += [_Row(position[r["image_id"]], *encode_row(processor, r["messages"], image_position), "stage:" + r["stage"])
                                for r in dataset]

    def slots(self, embedding: torch.Tensor, scene_ids: torch.Tensor) -> torch.Tensor:
        """``(B, 16, hidden)`` symbolic visual tokens of the scenes, from the live embedding table."""
        return (embedding[self.index[scene_ids]] * self.value[scene_ids][..., None]).sum(-2)


def embed_rows(model, corpus: WorldCorpus, rows: Sequence[_Row], image_token_id: int, pad_id: int = 0,
               left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Padded ``inputs_embeds`` (symbolic tokens at the ``<image>`` positions), mask, labels, positions."""
    length = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(length - len(r.input_ids), length) if left_pad else slice(0, len(r.input_ids))
        ids[i, span], labels[i, span], mask[i, span] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
    table = model.get_input_embeddings().weight
    embeds = table[ids]
    image = ids == image_token_id
    slots = corpus.slots(table, torch.tensor([r.scene for r in rows]))
    embeds = embeds.masked_scatter(image[..., None], slots.reshape(-1, slots.shape[-1]))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels, "position_ids": positions}


def row_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over rows of each row's mean next-token loss on its labelled tokens (every row counts
    the same: a 120-token alignment target does not drown a one-token answer).

    The LM head runs only where a label is: an answer is a few of a row's ~90 tokens, and the head
    (1024 words) was most of a step's work when it ran on every position."""
    hidden = model.model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"]).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    token_loss = F.cross_entropy(model.lm_head(hidden[valid]).float(), labels[valid], reduction="none")
    per_token = torch.zeros(labels.shape, dtype=token_loss.dtype).masked_scatter(valid, token_loss)
    return (per_token.sum(1) / valid.sum(1).clamp(min=1)).mean()


@torch.no_grad()
def greedy_answers(model, corpus: WorldCorpus, rows: Sequence[_Row], image_token_id: int, eos_id: int, tokenizer,
                   max_new_tokens: int = 24, batch_size: int = 64) -> list[str]:
    """Greedy answers to ``rows``' prompts (their labelled part is cut off), read from symbolic scenes."""
    answers = []
    for start in range(0, len(rows), batch_size):
        chunk = []
        for r in rows[start:start + batch_size]:
            n = r.labels.index(next(l for l in r.labels if l != -100))
            chunk.append(dataclasses.replace(r, input_ids=r.input_ids[:n], labels=r.labels[:n]))
        batch = embed_rows(model, corpus, chunk, image_token_id, left_pad=True)
        embeds, mask = batch["inputs_embeds"], batch["attention_mask"]
        out = torch.zeros((len(chunk), 0), dtype=torch.long)
        done = torch.zeros(len(chunk), dtype=torch.bool)
        table = model.get_input_embeddings().weight
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
            token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, eos_id), token)
            out = torch.cat([out, token[:, None]], 1)
            done |= token == eos_id
            if bool(done.all()):
                break
            embeds = torch.cat([embeds, table[token][:, None]], 1)
            mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=mask.dtype)], 1)
        for row in out.tolist():
            row = row[: row.index(eos_id)] if eos_id in row else row
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def score_answer(question_type: str, prediction: str, truth: str) -> float:
    """Accuracy of one answer, as ``astrea eval`` scores it: exact match after its normalisation;
    grounding: IoU above its threshold with the true box."""
    from ..eval.boxes import box_iou, parse_boxes
    from ..eval.metrics import exact_match_score
    from ..eval.runner import GROUNDING_IOU_THRESHOLD

    if question_type == "grounding":
        predicted, true = parse_boxes(prediction), parse_boxes(truth)
        return float(bool(predicted) and box_iou(predicted[0], true[0]) > GROUNDING_IOU_THRESHOLD)
    return exact_match_score(prediction, truth)


def evaluate_symbolic(model, corpus: WorldCorpus, processor, image_token_id: int) -> dict[str, float]:
    """Per question type, accuracy of the LLM's greedy answers on symbolic scenes (captions skipped)."""
    rows = [r for r in corpus.qa if r.question_type != "caption"]
    answers = greedy_answers(model, corpus, rows, image_token_id, processor.tokenizer.eos_token_id, processor.tokenizer)
    scores: dict[str, list[float]] = {}
    for row, answer in zip(rows, answers):
        truth = processor.tokenizer.decode([t for t in row.labels if t >= 0], skip_special_tokens=True).strip()
        scores.setdefault(row.question_type, []).append(score_answer(row.question_type, answer, truth))
    return {qtype: float(np.mean(values)) for qtype, values in sorted(scores.items())}


def world_text_config(vocab_size: int):
    """The tiny preset's LLM config with the world tokenizer's vocabulary."""
    from ..configuration import get_preset

    return get_preset("tiny", text_config={"vocab_size": vocab_size}).text_config


def _scenes(split: str, n: int, settings: PretrainSettings, log=print):
    from .synthetic import make_split

    tick = time.perf_counter()
    scenes = make_split(split, n, seed=settings.seed, image_size=settings.image_size, min_objects=settings.min_objects,
                        max_objects=settings.max_objects)
    log(f"{split}: {n} scenes in {time.perf_counter() - tick:.0f} s")
    return scenes


def pretrain_world_llm(settings: PretrainSettings | None = None, output: str | Path = SHIPPED, log=print) -> dict[str, Any]:
    """Pretrain the world LLM and write ``model.safetensors``, ``tokenizer.json`` (+ its config files)
    and ``pretrain.json`` (settings, loss curve, symbolic-scene accuracy per type) to ``output``.
    The same settings give the same files on the same machine (fixed threads, seeded, deterministic)."""
    from .reproducibility import reproducible

    settings = settings or PretrainSettings()
    with reproducible(settings.seed, settings.threads):
        return _pretrain(settings, Path(output), log)


def _pretrain(settings: PretrainSettings, output: Path, log) -> dict[str, Any]:
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

    from ..processing import build_processor
    from ..configuration import get_preset

    rng = np.random.default_rng(settings.seed)
    train_scenes = _scenes("pretrain", settings.scenes, settings, log)
    config = get_preset("tiny", text_config={"vocab_size": settings.vocab_size})
    if settings.init_from:
        tokenizer = load_world_tokenizer(settings.init_from)
    else:
        tokenizer = world_tokenizer(train_scenes, settings.vocab_size, config.text_config.max_position_embeddings)
    processor = build_processor(config, tokenizer=tokenizer)
    processor.set_prompt_layout(image_position=settings.image_position)
    tick = time.perf_counter()
    corpus = WorldCorpus(train_scenes, processor, with_stages=settings.stage_fraction > 0, image_position=settings.image_position)
    held_out = WorldCorpus(_scenes("pretrain-validation", settings.validation_scenes, settings, log), processor, with_stages=False,
                           image_position=settings.image_position)
    log(f"{len(corpus.qa)} QA rows, {len(corpus.stages)} alignment rows ({time.perf_counter() - tick:.0f} s)")

    qa_weights = np.array([settings.type_weights.get(r.question_type, 1.0) for r in corpus.qa])
    qa_weights = qa_weights / qa_weights.sum()
    model = LlamaForCausalLM(config.text_config)
    base_summary = None
    if settings.init_from:
        from safetensors.torch import load_file

        state = load_file(str(Path(settings.init_from) / "model.safetensors"))
        rows = state["model.embed_tokens.weight"].shape[0]
        if rows != settings.vocab_size:
            raise ValueError(f"init_from={settings.init_from} has a {rows}-word embedding and vocab_size is "
                             f"{settings.vocab_size}: pass the base's vocab_size")
        model.load_state_dict(state)
        base_meta = Path(settings.init_from) / "pretrain.json"
        base_summary = json.loads(base_meta.read_text()) if base_meta.is_file() else None
        log(f"continuing from {settings.init_from}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98),
                                  weight_decay=settings.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * settings.steps), settings.steps)
    image_id = config.image_token_id
    curve, checks, tick, window = [], [], time.perf_counter(), []
    model.train()
    for step in range(1, settings.steps + 1):
        if corpus.stages and rng.random() < settings.stage_fraction:
            rows = [corpus.stages[i] for i in rng.integers(len(corpus.stages), size=settings.batch_size)]
        else:
            rows = [corpus.qa[i] for i in rng.choice(len(corpus.qa), size=settings.batch_size, p=qa_weights)]
        loss = row_loss(model, embed_rows(model, corpus, rows, image_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(float(loss.detach()))
        if step % settings.log_every == 0 or step == settings.steps:
            curve.append({"step": step, "loss": float(np.mean(window))})
            log(f"step {step}/{settings.steps} loss {np.mean(window):.3f} ({time.perf_counter() - tick:.0f} s)")
            window = []
        if settings.eval_every and step % settings.eval_every == 0 and step < settings.steps:
            model.eval()
            accuracy = evaluate_symbolic(model, held_out, processor, image_id)
            checks.append({"step": step, **accuracy})
            log(f"step {step} symbolic-scene accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
            model.train()
    model.eval()
    accuracy = evaluate_symbolic(model, held_out, processor, image_id)
    log("symbolic-scene accuracy (held out): " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))

    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(output / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(str(output))
    summary = {"settings": dataclasses.asdict(settings), "text_config": config.text_config.to_dict(), "loss": curve,
               "symbolic_accuracy": accuracy, "symbolic_accuracy_during_training": checks, "seconds": round(time.perf_counter() - tick, 1)}
    if base_summary is not None:  # the run this one continued, with its own settings and scores
        summary["continued_from"] = {k: v for k, v in base_summary.items() if k != "text_config"}
    (output / "pretrain.json").write_text(json.dumps(summary, indent=1))
    write_world_llm_card(output, summary)
    return summary


def write_world_llm_card(folder: str | Path, summary: dict[str, Any], path: str | None = None) -> None:
    """``config.json`` (so ``AutoModelForCausalLM`` loads the folder) and the README.md card, from
    ``pretrain.json``'s content; ``path`` names the folder in the card's snippet (default: ``folder``).
    The shipped folder's card: ``write_world_llm_card(SHIPPED, summary, "train/world_llm")``."""
    from transformers import LlamaConfig

    from ..card import world_llm_card

    LlamaConfig(**{k: v for k, v in summary["text_config"].items() if k != "transformers_version"}).save_pretrained(str(folder))
    world_llm_card(folder, summary, "astrea pretrain-llm", path=path)


# ----------------------------------------------------------------------------- using the shipped LLM
def load_world_tokenizer(folder: str | Path = SHIPPED):
    """The world LLM's tokenizer (its token ids index the shipped embeddings)."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no world LLM at {folder}: build it with `astrea pretrain-llm --output {folder}`")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def load_world_llm(model, folder: str | Path = SHIPPED) -> dict[str, Any]:
    """Copy the world LLM's weights into ``model`` (an :class:`AstreaForConditionalGeneration`):
    ``model.*`` -> ``model.language_model.*``, ``lm_head`` -> ``lm_head``. Returns ``pretrain.json``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no world LLM weights at {path}: build them with `astrea pretrain-llm --output {folder}`")
    state = load_file(str(path))
    target = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v for k, v in state.items()}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape) if k in own else 'missing'}"
             for k, v in target.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"the world LLM at {folder} does not fit this model's LLM ({'; '.join(wrong[:3])}); "
                         f"use the tiny preset with text_config.vocab_size matching the world tokenizer, or rebuild it "
                         f"with `astrea pretrain-llm`")
    missing = [k for k in own if k.startswith("model.language_model.") and k not in target]
    if missing:
        raise ValueError(f"the world LLM at {folder} lacks {missing[:3]}: rebuild it with `astrea pretrain-llm`")
    with torch.no_grad():
        for key, value in target.items():
            own[key].copy_(value)
    meta = folder / "pretrain.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}
