"""Shared harness of the benchmarks: matched Astrea / LLaVA configs, inputs, FLOP counts and timing.

Why these configs
-----------------
The question the benchmarks answer is "what do four towers cost next to LLaVA's one?". At paper
scale (``astrea-13b``) the four towers are ~3.6 TFLOP per image and the 13B LLM ~17.7 TFLOP over
676 tokens (576 visual + ~100 text), a tower:LLM ratio of ~1:5 in the forward pass, and LLaVA's
SigLIP alone is ~4 % of the LLM. ``matched`` keeps those proportions at a size a 2-core CPU runs in
seconds: a 16-layer, 256-wide llama (deep and thin, so that the per-token cost of the bridges and
adapters -- a few ``D x D`` matmuls -- stays as small next to the LLM as at 5120 x 40 layers),
144 visual + 25 text tokens (the paper's 576:100 split), and the four tower kinds of the paper at
192 px sized so that their measured FLOPs sum to ~1/5 of the LLM's, split roughly as at paper
scale (SAM2 largest, then Grounding-DINO, SigLIP, RAM++ Swin). LLaVA gets the *same* LLM config
and weights and a SigLIP tower identical to Astrea's caption tower (same config and weights, same
12x12 grid, so both models see the same 169-token sequence).

``tower-heavy`` is the same LLM with the towers at 384 px and wider, so that they dominate the
step: that is where the feature cache matters (the stage-4 comparison). ``smoke`` is a minimal
config for the test of the harness itself.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions,
attention); element-wise ops and Grounding-DINO's deformable sampling (``grid_sample``) are not
counted, which under-counts that tower by a few percent.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]

#: Paper-scale reference (issue F): towers ~3.6 TFLOP per image, 13B LLM ~17.7 TFLOP over 676 tokens.
PAPER_TOWER_TFLOP = 3.6
PAPER_LLM_TFLOP = 17.7

SCALES = ("matched", "tower-heavy", "smoke")


# ------------------------------------------------------------------------------ configs
def _llm(vocab: int, hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    # Vicuna-style: MHA (kv heads = heads), untied head, llama RMSNorm/rope.
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }


def astrea_parts(scale: str = "matched") -> dict:
    """Keyword arguments of :class:`AstreaConfig` for one benchmark ``scale`` (see module docstring)."""
    from astrea_vlm.configuration.presets import _tiny_parts

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    parts = _tiny_parts()  # every tower kind with a valid toy layout; resized below
    if scale == "smoke":
        # The tiny preset as is, plus a caption grid equal to the visual-token grid (LLaVA needs it).
        parts["caption_config"]["tower_config"]["patch_size"] = 8  # 32 px / 8 = 4x4 = 16 tokens
        return parts

    heavy = scale == "tower-heavy"
    size = 384 if heavy else 192
    parts["text_config"] = _llm(vocab=1024, hidden=256, intermediate=688, layers=40, heads=4)
    parts["num_visual_tokens"] = 144  # 12x12: LLaVA's SigLIP grid (192 px / 16)
    parts["fusion_adapter_dim"] = None  # paper default: the LLM width
    parts["bridge_num_heads"] = 4

    caption = parts["caption_config"]
    caption["image_size"] = size
    caption["tower_config"].update(
        hidden_size=768 if heavy else 192,
        intermediate_size=3072 if heavy else 768,
        num_hidden_layers=8 if heavy else 3,
        num_attention_heads=4,
        image_size=size,
        patch_size=32 if heavy else 16,  # 12x12 grid at both sizes
    )

    classification = parts["classification_config"]
    classification["image_size"] = size
    classification["tower_config"]["model_args"] = {
        "img_size": size,
        "embed_dim": 96 if heavy else 16,
        "depths": [2, 2, 4] if heavy else [2, 2, 2],
        "num_heads": [1, 2, 4],
        "window_size": 12 if heavy else 6,
    }

    detection = parts["detection_config"]
    detection["image_size"] = size
    detection["feature_level"] = 1  # stride 16, like the paper preset
    detection["tower_config"]["backbone_config"].update(
        image_size=size, embed_dim=96 if heavy else 24, depths=[2, 2, 4] if heavy else [2, 2, 2], num_heads=[1, 2, 4], window_size=12 if heavy else 6
    )
    detection["tower_config"].update(
        d_model=128 if heavy else 96,
        encoder_ffn_dim=256 if heavy else 192,
        decoder_ffn_dim=256 if heavy else 192,
        encoder_layers=3 if heavy else 2, decoder_layers=2, num_queries=32
    )

    widths = [64, 128, 256, 512] if heavy else [48, 96, 192, 384]  # Hiera stage widths
    segmentation = parts["segmentation_config"]
    segmentation["image_size"] = size
    segmentation["feature_level"] = 2  # stride 16: SAM2's image embedding, as in the paper preset
    segmentation["tower_config"]["backbone_config"].update(
        hidden_size=widths[0],
        num_attention_heads=1,
        image_size=[size, size],
        blocks_per_stage=[1, 2, 4, 1] if heavy else [1, 2, 3, 1],
        embed_dim_per_stage=widths,
        num_attention_heads_per_stage=[1, 2, 4, 8],
        window_size_per_stage=[4, 4, 6, 6],
        global_attention_blocks=[5] if heavy else [4],
        window_positional_embedding_background_size=[6, 6],
    )
    segmentation["tower_config"].update(
        backbone_channel_list=widths[::-1],
        backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
        fpn_hidden_size=128 if heavy else 96,
    )
    return parts


def astrea_config(scale: str = "matched"):
    from astrea_vlm.configuration import AstreaConfig

    return AstreaConfig(**astrea_parts(scale))


def llava_config(config):
    """LLaVA with Astrea's LLM config and a SigLIP tower identical to Astrea's caption tower."""
    from transformers import LlavaConfig

    caption = config.caption_config
    return LlavaConfig(
        vision_config=copy.deepcopy(caption.tower_config).to_dict(),
        text_config=copy.deepcopy(config.text_config).to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.num_visual_tokens,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        vision_feature_layer=caption.feature_layer,
    )


def build_astrea(config, device="cpu", dtype=torch.float32, seed: int = 0):
    from astrea_vlm.modeling import AstreaForConditionalGeneration

    torch.manual_seed(seed)
    return AstreaForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


def build_llava(config, astrea=None, device="cpu", dtype=torch.float32, seed: int = 0):
    """LLaVA from ``llava_config(config)``; with ``astrea`` given, its LLM, head and SigLIP weights are copied."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(llava_config(config))
    if astrea is not None:
        # Same weights where the architectures agree: the comparison is then of structure only.
        llava.model.language_model.load_state_dict(astrea.model.language_model.state_dict())
        llava.lm_head.load_state_dict(astrea.lm_head.state_dict())
        llava.model.vision_tower.load_state_dict(astrea.model.towers["caption"].model.state_dict())
    grid = astrea.model.towers["caption"].grid if astrea is not None else None
    if grid is not None and grid[0] * grid[1] != config.num_visual_tokens:
        raise ValueError(f"caption grid {grid} must equal num_visual_tokens={config.num_visual_tokens} for LLaVA")
    return llava.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------------------ inputs
@dataclass
class Batch:
    """One batch for both models: the same ids and image, in each model's pixel format."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    astrea_pixels: dict[str, torch.Tensor]
    llava_pixels: torch.Tensor

    def astrea(self, with_labels: bool = False) -> dict:
        extra = {"labels": self.labels} if with_labels else {}
        pixels = {f"pixel_values_{role}": value for role, value in self.astrea_pixels.items()}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **pixels, **extra}

    def llava(self, with_labels: bool = False) -> dict:
        extra = {"labels": self.labels} if with_labels else {}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.llava_pixels, **extra}


def text_tokens(config) -> int:
    """Text tokens per sample: the paper's 100 per 576 visual tokens, scaled (at least 4)."""
    return max(4, round(config.num_visual_tokens * 100 / 576))


def make_batch(config, batch_size: int = 1, device="cpu", dtype=torch.float32, seed: int = 0) -> Batch:
    """``[bos] <image>*N text*T`` per sample; one random image per sample, at each tower's resolution."""
    generator = torch.Generator().manual_seed(seed)
    n_text = text_tokens(config)
    vocab = config.text_config.vocab_size
    rows = []
    for _ in range(batch_size):
        text = torch.randint(10, vocab, (n_text,), generator=generator)
        image = torch.full((config.num_visual_tokens,), config.image_token_id)
        rows.append(torch.cat([torch.tensor([1]), image, text]))
    input_ids = torch.stack(rows).to(device)
    labels = input_ids.masked_fill(input_ids == config.image_token_id, -100)
    labels[:, 0] = -100
    # One image per sample; each tower gets it at its own size (as the processor would resize it).
    base = torch.randn(batch_size, 3, 64, 64, generator=generator)
    pixels = {
        role: torch.nn.functional.interpolate(base, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False).to(device, dtype)
        for role, cfg in config.expert_configs.items()
    }
    return Batch(input_ids, torch.ones_like(input_ids), labels, pixels, pixels["caption"])


# ------------------------------------------------------------------------------ FLOPs
def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def flop_breakdown(astrea, llava, batch: Batch) -> dict[str, float]:
    """Forward FLOPs per sample of each part (towers, projectors+bridges+fusion, LLM, LLaVA's tower)."""
    n = batch.input_ids.shape[0]
    backbone = astrea.model
    out = {}
    for role, tower in backbone.towers.items():
        out[f"tower.{role}"] = count_flops(lambda: tower(batch.astrea_pixels[role])) / n
    tokens = {role: backbone.get_tower_tokens(role, batch.astrea_pixels[role]) for role in backbone.towers}
    out["astrea.glue"] = count_flops(lambda: backbone.fuse_expert_features(backbone.get_expert_features(tower_features=tokens))) / n
    embeds = backbone.get_input_embeddings()(batch.input_ids)
    out["llm"] = count_flops(lambda: astrea.lm_head(backbone.language_model(inputs_embeds=embeds).last_hidden_state)) / n
    out["llava.tower"] = count_flops(lambda: llava.model.vision_tower(batch.llava_pixels)) / n
    out["towers"] = sum(v for k, v in out.items() if k.startswith("tower."))
    return out


def print_flops(flops: dict[str, float], config) -> None:
    seq = 1 + config.num_visual_tokens + text_tokens(config)
    print(f"forward GFLOP per sample ({seq}-token sequence, {config.num_visual_tokens} visual tokens):")
    for key in sorted(flops):
        print(f"  {key:<24}{flops[key] / 1e9:9.3f}")
    print(
        f"  tower:LLM ratio {flops['towers'] / flops['llm']:.3f} (paper 13B: {PAPER_TOWER_TFLOP}/{PAPER_LLM_TFLOP} = "
        f"{PAPER_TOWER_TFLOP / PAPER_LLM_TFLOP:.3f}); LLaVA tower:LLM {flops['llava.tower'] / flops['llm']:.3f}"
    )


# ------------------------------------------------------------------------------ timing
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Seconds per run of each case, on one clock (see :func:`time_side_by_side`)."""

    clock: str = "wall"
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def min(self, name: str) -> float:
        return min(self.samples[name])


def default_clock(device) -> str:
    # With one intra-op thread, the process's CPU time is its compute time and does not count the
    # time other processes on a shared machine take from it; on CUDA only wall time is meaningful.
    return "wall" if torch.device(device).type == "cuda" else "cpu"


def time_side_by_side(
    cases: dict[str, Callable[[], object]], warmup: int, repeats: int, device="cpu", clock: str | None = None
) -> dict[str, Timings]:
    """Run every case ``warmup`` times, then ``repeats`` rounds of every case, interleaved.

    Interleaving spreads any drift of the machine (frequency, other load) over all cases alike.
    Returns the samples on both clocks: ``"wall"`` (``perf_counter``) and ``"cpu"``
    (``process_time``), and under ``"main"`` the one the ratios use (``clock``, by default
    :func:`default_clock`).
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    synchronize(device)
    wall, cpu = Timings("wall"), Timings("cpu")
    for _ in range(repeats):
        for name, fn in cases.items():
            synchronize(device)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            cpu.add(name, time.process_time() - start_cpu)
            wall.add(name, time.perf_counter() - start_wall)
    main = wall if (clock or default_clock(device)) == "wall" else cpu
    return {"wall": wall, "cpu": cpu, "main": main}


def print_table(timings: dict[str, Timings], names: list[str] | None = None, unit: float = 1e3, label: str = "ms") -> None:
    wall, cpu = timings["wall"], timings["cpu"]
    names = names or list(wall.samples)
    print(f"  {'case':<28}{'cpu med':>10}{'cpu min':>10}{'wall med':>10}{'wall min':>10}  ({label}; ratios use {timings['main'].clock} time)")
    for name in names:
        print(
            f"  {name:<28}{cpu.median(name) * unit:10.2f}{cpu.min(name) * unit:10.2f}"
            f"{wall.median(name) * unit:10.2f}{wall.min(name) * unit:10.2f}"
        )


def ratios(timings: dict[str, Timings], numerator: str, denominator: str) -> tuple[float, float]:
    """``numerator / denominator`` on the main clock, of the medians and of the minima."""
    main = timings["main"]
    return main.median(numerator) / main.median(denominator), main.min(numerator) / main.min(denominator)


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return f"{'PASS' if ok else 'MISS'} (target {'>=' if higher_is_better else '<='} {target:.2f})"


# ------------------------------------------------------------------------------ CLI and memory
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_parser(description: str, repeats: int = 5) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per case first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU; default 1)")
    parser.add_argument("--scale", default="matched", choices=SCALES)
    return parser


def setup(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} scale={args.scale} "
        f"repeats={args.repeats} warmup={args.warmup} torch={torch.__version__}"
    )


def astrea_and_llava(args):
    """``setup(args)``, then the Astrea model at ``args.scale``, its matched LLaVA and a batch-1 prompt with
    one image, on ``args.device`` in ``args.dtype``: the starting point of the generation benchmarks."""
    setup(args)
    dtype = DTYPES[args.dtype]
    config = astrea_config(args.scale)
    astrea = build_astrea(config, args.device, dtype)
    llava = build_llava(config, astrea, args.device, dtype)
    return config, astrea, llava, make_batch(config, 1, args.device, dtype)


def keep_timed_steps(timings: dict[str, Timings], record: dict[str, Timings], repeats: int, new_tokens: int) -> None:
    """Copy the clock stamps of the timed rounds from ``record`` into ``timings`` (warm-up rounds dropped):
    a decode-step series keeps ``repeats * (new_tokens - 1)`` stamps, any other ``repeats``."""
    for kind in ("wall", "cpu"):
        for name, samples in record[kind].samples.items():
            keep = repeats * (new_tokens - 1) if name.endswith("decode_step") else repeats
            timings[kind].samples[name] = samples[-keep:]


def peak_memory_mb(device) -> float:
    """Peak memory of this process so far: max allocated on CUDA, max RSS on CPU (MiB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # Linux: VmHWM, this address space's high-water mark. Not ru_maxrss, which also keeps the peak
    # of the process before exec -- a child of a big benchmark process would inherit its peak.
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
