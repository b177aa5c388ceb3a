"""Warm the tiny towers up on their own specialities, so the four random experts really differ.

Before the demo freezes them, each tower learns a small supervised task of its kind on the synthetic
world's training split (categories, tags, boxes, masks), read from its resampled tokens through a
linear probe that is thrown away. The tasks and losses: ``docs/synthetic_world.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .synthetic import BACKGROUNDS, COLOURS as _PALETTE, SHAPES

COLOURS = list(_PALETTE)

CATEGORIES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
TAGS = list(SHAPES) + list(COLOURS) + sorted({tag for _, tag in BACKGROUNDS.values()})
LOCAL = len(SHAPES) + len(COLOURS)  # shape + colour multi-hot of one grid cell


def warmup_targets(scene, role: str, side: int) -> torch.Tensor:
    """The warm-up target of ``scene`` for expert ``role`` on a ``side x side`` token grid."""
    if role == "caption":
        target = torch.zeros(len(CATEGORIES))
        for obj in scene.objects:
            target[CATEGORIES.index(obj.category)] = 1.0
        return target
    if role == "classification":
        target = torch.zeros(len(TAGS))
        for tag in scene.tags:
            if tag in TAGS:
                target[TAGS.index(tag)] = 1.0
        return target
    height, width = scene.objects[0].mask.shape
    if role == "detection":
        cells = torch.zeros(side, side, 1 + LOCAL + 4)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            col = min(side - 1, int((x1 + x2) / 2 * side))
            row = min(side - 1, int((y1 + y2) / 2 * side))
            cells[row, col, 0] = 1.0
            cells[row, col, 1 + SHAPES.index(obj.shape)] = 1.0
            cells[row, col, 1 + len(SHAPES) + COLOURS.index(obj.colour)] = 1.0
            cells[row, col, 1 + LOCAL:] = torch.tensor([x1, y1, x2, y2])
        return cells.flatten(0, 1)
    cells = torch.zeros(side, side, 1 + LOCAL)
    if role == "segmentation":
        ys = np.linspace(0, height, side + 1).round().astype(int)
        xs = np.linspace(0, width, side + 1).round().astype(int)
        union = np.zeros((height, width), dtype=bool)
        for obj in scene.objects:
            union |= obj.mask
        for r in range(side):
            for c in range(side):
                window = (slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1]))
                cells[r, c, 0] = float(union[window].mean()) if union[window].size else 0.0
                for obj in scene.objects:
                    if obj.mask[window].any():
                        cells[r, c, 1 + SHAPES.index(obj.shape)] = 1.0
                        cells[r, c, 1 + len(SHAPES) + COLOURS.index(obj.colour)] = 1.0
        return cells.flatten(0, 1)
    raise ValueError(f"no warm-up task for expert {role!r}; the roles are caption, classification, detection, segmentation")


class _Probe(nn.Module):
    def __init__(self, role: str, width: int):
        super().__init__()
        self.role = role
        out = {"caption": len(CATEGORIES), "classification": len(TAGS), "detection": 1 + LOCAL + 4}.get(role, 1 + LOCAL)
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.role in ("caption", "classification"):
            tokens = tokens.mean(dim=1)
        return self.linear(self.norm(tokens))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits
        if self.role == "segmentation":  # cell fraction: regression; the rest: multi-hot
            fraction = nn.functional.mse_loss(torch.sigmoid(logits[..., 0]), target[..., 0])
            return fraction + bce(logits[..., 1:], target[..., 1:])
        if self.role == "detection":  # multi-hot, plus the box of cells that hold an object's centre
            has_box = target[..., :1]
            box_error = ((torch.sigmoid(logits[..., 1 + LOCAL:]) - target[..., 1 + LOCAL:]) ** 2 * has_box).sum()
            return bce(logits[..., : 1 + LOCAL], target[..., : 1 + LOCAL]) + 10 * box_error / has_box.sum().clamp(min=1) / 4
        return bce(logits, target)


def warm_up_towers(model, processor, scenes: Sequence, steps: int | Mapping[str, int] = 60, batch_size: int = 32,
                   learning_rate: float = 2e-3, roles: Sequence[str] | None = None, seed: int = 0,
                   progress: bool = True) -> dict[str, dict[str, float]]:
    """Train each tower of ``model`` on its speciality (see the module docstring) for ``steps`` steps.

    ``steps`` is one number for every tower or ``{role: steps}`` (a role left out, or 0, is not
    warmed up): the towers differ a lot in cost per step.

    Returns ``{role: {"loss_first", "loss_last", "seconds"}}`` (mean loss of the first and last five
    steps), so a caller can show that every tower learned something.
    """
    from tqdm.auto import tqdm

    backbone = model.model
    roles = list(roles or backbone.expert_order)
    if isinstance(steps, Mapping):
        unknown = sorted(set(steps) - set(backbone.expert_order))
        if unknown:
            raise ValueError(f"warm-up steps for unknown expert(s) {unknown}; the model's experts are {list(backbone.expert_order)}")
        per_role = {role: int(steps.get(role, 0)) for role in roles}
    else:
        per_role = {role: int(steps) for role in roles}
    roles = [role for role in roles if per_role[role] > 0]
    side = math.isqrt(backbone.config.num_visual_tokens)
    image_processor = processor.image_processor
    images = [scene.image for scene in scenes]
    generator = torch.Generator().manual_seed(seed)
    report: dict[str, dict[str, float]] = {}
    for role in roles:
        start = time.perf_counter()
        tower = backbone.towers[role]
        targets = torch.stack([warmup_targets(scene, role, side) for scene in scenes])
        processed = image_processor(images, return_tensors="pt")
        pixels, masks = processed[f"pixel_values_{role}"], processed.get(f"pixel_mask_{role}")
        if pixels.shape[0] != len(scenes):
            raise ValueError(f"warm-up expects one view per image; the {role} processor gives {pixels.shape[0]} for {len(scenes)}")
        torch.manual_seed(seed)
        with torch.no_grad():
            width = backbone.get_tower_tokens(role, pixels[:1], None if masks is None else masks[:1]).shape[-1]
        probe = _Probe(role, width)
        frozen = tower.config.frozen
        tower.config.frozen = False  # a frozen tower runs under no_grad; let this one learn for now
        tower.requires_grad_(True)
        tower.train()
        try:
            params = [p for p in tower.parameters() if p.requires_grad] + list(probe.parameters())
            optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
            losses = []
            for _ in tqdm(range(per_role[role]), desc=f"warm-up tower [{role}]", disable=not progress, leave=False):
                index = torch.randint(len(scenes), (min(batch_size, len(scenes)),), generator=generator)
                tokens = backbone.get_tower_tokens(role, pixels[index], None if masks is None else masks[index])
                loss = probe.loss(probe(tokens), targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        finally:
            tower.config.frozen = frozen
            tower.freeze_if_configured()
        window = max(1, min(5, len(losses) // 2))
        report[role] = {"loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:])),
                        "seconds": round(time.perf_counter() - start, 2)}
    return report


__all__ = ["CATEGORIES", "TAGS", "warm_up_towers", "warmup_targets"]
