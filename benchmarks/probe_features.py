"""Where does an answer get lost? Attention probes on each stage of Astrea's visual path.

A trained Astrea answers a question from its visual tokens. When it fails on a question type,
either the answer never reached the visual tokens (the towers did not see it, or the projectors,
bridges and fusion dropped it), or it is there and the LLM does not read it out. This script tells
the two apart. For the question types that need the question and the image *together*
(existence, relative position, colour), it trains a small probe on frozen features of the
synthetic world's training split and scores it on the validation split, at four points:

``towers``     the four towers' tokens, side by side (4 x ``num_visual_tokens`` tokens)
``projected``  the projector outputs ``C_i`` (same tokens, LLM width)
``bridged``    after the random residual bridges (eval mode: ``p_i`` at its expectation)
``fused``      the MoE-fused visual tokens -- exactly what the LLM receives

The probe is one cross-attention layer whose query is built from the question's colour and shape
words (one-hot, in order of mention), followed by an MLP over [attended, query]: the smallest
reader that has to find the asked-about object(s) among the tokens. Compare its accuracy with the
model's own (``astrea eval`` on the same split, column ``model``): a probe far above the model
means the information is there and the LLM does not use it.

    python -m benchmarks.probe_features --model outputs/demo/train/final [--train-size 8192]

What it found on the demo model is in the README ("Why three question types stay at chance").
Not a test; ``tests/test_probe_features.py`` checks the probe on features with a known answer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

POINTS = ("towers", "projected", "bridged", "fused")
QUESTION_TYPES = ("existence", "relative_position", "colour")
MAX_WORDS = 4  # slots for the question's colour / shape words, in order of mention


def question_vocabulary() -> list[str]:
    from astrea_vlm.train.synthetic import COLOURS, SHAPES

    return list(COLOURS) + list(SHAPES)


def question_query(question: str, vocabulary: list[str]) -> torch.Tensor:
    """One-hot of the question's colour and shape words, one slot per mention (first ``MAX_WORDS``)."""
    query = torch.zeros(MAX_WORDS * len(vocabulary))
    words = [word.strip("?.,!:;") for word in question.lower().split()]
    for slot, word in enumerate([w for w in words if w in vocabulary][:MAX_WORDS]):
        query[slot * len(vocabulary) + vocabulary.index(word)] = 1.0
    return query


class AttentionProbe(nn.Module):
    """Query (from the question's words) attends over the tokens; an MLP reads [attended, query]."""

    def __init__(self, token_dim: int, num_tokens: int, query_dim: int, num_labels: int, width: int = 64, heads: int = 4):
        super().__init__()
        self.tokens = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, width))
        # random, not zero: relative position needs to tell the tokens apart from the first step
        self.position = nn.Parameter(torch.randn(num_tokens, width))
        self.query = nn.Linear(query_dim, width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, num_labels))

    def forward(self, tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        keys = self.tokens(tokens) + self.position
        q = self.query(query)[:, None]
        attended, _ = self.attention(q, keys, keys)
        return self.head(torch.cat([attended[:, 0], q[:, 0]], dim=-1))


def train_probe(train: tuple[torch.Tensor, torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                num_labels: int, steps: int = 1000, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> dict[str, float]:
    """Fit an :class:`AttentionProbe` on ``(tokens, queries, labels)``; accuracy on both splits."""
    tokens, queries, labels = train
    torch.manual_seed(seed)
    probe = AttentionProbe(tokens.shape[-1], tokens.shape[1], queries.shape[-1], num_labels)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(labels), (min(batch_size, len(labels)),), generator=generator)
        loss = nn.functional.cross_entropy(probe(tokens[index], queries[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    probe.eval()
    with torch.no_grad():
        accuracy = {name: float((probe(t, q).argmax(-1) == y).float().mean())
                    for name, (t, q, y) in (("train", train), ("val", val))}
    return accuracy


@torch.no_grad()
def visual_path_features(model, processor, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """``{point: (n_images, tokens, dim)}`` for every point of :data:`POINTS`."""
    backbone = model.model
    out: dict[str, list[torch.Tensor]] = {point: [] for point in POINTS}
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[start:start + batch_size], return_tensors="pt")
        order = backbone.expert_order
        tokens = {role: backbone.get_tower_tokens(role, pixels[f"pixel_values_{role}"], pixels.get(f"pixel_mask_{role}")) for role in order}
        visual = backbone.get_image_features(tower_features=tokens)  # the towers run once, for both points
        out["towers"].append(torch.cat([tokens[role] for role in order], dim=1))
        out["projected"].append(torch.cat([visual.expert_features[role] for role in order], dim=1))
        out["bridged"].append(torch.cat([visual.bridged_features[role] for role in order], dim=1))
        out["fused"].append(visual.fused)
    return {point: torch.cat(chunks).float() for point, chunks in out.items()}


def probe_dataset(scenes, features: torch.Tensor, question_type: str, vocabulary: list[str], labels: list[str] | None = None):
    """``(tokens, queries, labels)`` of one question type, plus the label names."""
    pairs = [(index, qa) for index, scene in enumerate(scenes) for qa in scene.qa if qa["question_type"] == question_type]
    labels = labels or sorted({qa["answer"] for _, qa in pairs})
    pairs = [(i, qa) for i, qa in pairs if qa["answer"] in labels]
    tokens = features[[i for i, _ in pairs]]
    queries = torch.stack([question_query(qa["question"], vocabulary) for _, qa in pairs])
    targets = torch.tensor([labels.index(qa["answer"]) for _, qa in pairs])
    return (tokens, queries, targets), labels


def model_accuracy(model_dir: Path, scenes, work: Path, image_position: str | None = None) -> dict[str, float]:
    """The model's own accuracy per question type on ``scenes`` (``astrea eval --task qa``; the
    folder's prompt layout unless ``image_position`` is given)."""
    from astrea_vlm.demo import primary_scores, write_eval_split
    from astrea_vlm.eval.runner import run_eval

    records = write_eval_split(scenes, work / "data")
    return primary_scores(run_eval(model_dir, task="qa", data=records, output=work / "eval", batch_size=32, max_new_tokens=16,
                                  image_position=image_position))


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoProcessor

    from astrea_vlm.modeling import AstreaForConditionalGeneration
    from astrea_vlm.train.synthetic import make_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained Astrea folder, e.g. outputs/demo/train/final")
    parser.add_argument("--train-size", type=int, default=8192, help="training scenes for the probes")
    parser.add_argument("--val-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="the data seed the model was trained with")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--image-position", choices=["before", "after"],
                        help="put the image before or after the prompt (default: the layout saved with the model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--output", default=None, help="folder for probe.json / probe.md (default: <model>/probe)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: no config.json there; pass a trained Astrea folder (e.g. outputs/demo/train/final)")
    output = Path(args.output) if args.output else model_dir / "probe"
    start = time.perf_counter()
    model = AstreaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    world = {"image_size": args.image_size, "min_objects": 2, "max_objects": args.max_objects}
    train_scenes = make_split("train", args.train_size, seed=args.seed, **world)
    val_scenes = make_split("validation", args.val_size, seed=args.seed, **world)
    features = {"train": visual_path_features(model, processor, [s.image for s in train_scenes]),
                "val": visual_path_features(model, processor, [s.image for s in val_scenes])}
    vocabulary = question_vocabulary()
    own = model_accuracy(model_dir, val_scenes, output, image_position=args.image_position)
    table: dict[str, dict[str, float]] = {}
    for qtype in QUESTION_TYPES:
        table[qtype] = {}
        for point in POINTS:
            train, labels = probe_dataset(train_scenes, features["train"][point], qtype, vocabulary)
            val, _ = probe_dataset(val_scenes, features["val"][point], qtype, vocabulary, labels)
            table[qtype][point] = train_probe(train, val, len(labels), steps=args.steps)["val"]
            print(f"{qtype:<18} {point:<10} probe val {table[qtype][point]:.3f}", flush=True)
        table[qtype]["model"] = own.get(qtype, float("nan"))
    lines = ["| question type | " + " | ".join(POINTS) + " | model |", "|---|" + "---:|" * (len(POINTS) + 1)]
    lines += [f"| {q} | " + " | ".join(f"{row[p]:.3f}" for p in (*POINTS, "model")) + " |" for q, row in table.items()]
    markdown = "\n".join(lines)
    output.mkdir(parents=True, exist_ok=True)
    result = {"model": str(model_dir), "train_size": args.train_size, "val_size": args.val_size, "steps": args.steps,
              "validation_accuracy": table, "seconds": round(time.perf_counter() - start, 1)}
    (output / "probe.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (output / "probe.md").write_text(markdown + "\n", encoding="utf-8")
    print("\n" + markdown)
    return result


if __name__ == "__main__":
    main()
