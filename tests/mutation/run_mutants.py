"""Mutation run over the code that implements the paper's equations (not part of CI: it is slow).

Each mutant below is one changed line (a plausible slip that keeps the code running) in the
bridge, the fusion, the projector, the momentum contrast or the label masking. For each mutant the
driver copies the working tree to a temporary folder, applies the change there, runs the tests
that cover the module (``pytest -x``, under ``nice``, in a fork of the driver that has torch,
transformers and TRL imported already) and records whether they fail ("killed") or
pass ("survived"). A mutant listed with an ``equivalent`` reason changes no output the method
defines (the reason says why); it is skipped unless ``--run-equivalent`` asks for it (it then
survives every test file it runs, which is slow), and reported if a test does catch it. The score
is ``killed / (mutants - equivalent)``; every non-equivalent mutant should be killed.

    python tests/mutation/run_mutants.py                 # 15-25 min on 2 shared cores
    python tests/mutation/run_mutants.py --only bridge-kv-previous,fusion-balance-no-k
    python tests/mutation/run_mutants.py --list

Run from the repository root. The working tree itself is never modified.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EQUATIONS = "tests/test_equations.py"
MODELING = "tests/test_modeling.py"
MOCO = "tests/test_train_moco.py"
DATA = "tests/test_train_data.py"
PROCESSING = "tests/test_processing.py"
LABELS = "tests/test_sft_labels.py"
ROUTING = "tests/test_routing.py"


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    before: str  # exactly one occurrence in the file; replaced by `after`
    after: str
    about: str
    tests: tuple[str, ...]
    equivalent: str | None = None


def _m(id, path, before, after, about, tests, equivalent=None) -> Mutant:
    return Mutant(id, path, before, after, about, tuple(tests), equivalent)


BRIDGE, FUSION, PROJECTOR = "modeling_astrea/bridge.py", "modeling_astrea/fusion.py", "modeling_astrea/projector.py"
MOCO_PY, TRAINER, RECIPE = "train/moco.py", "train/trainer.py", "train/recipe.py"
CHAT, MODEL = "processing/processing_astrea.py", "modeling_astrea/modeling_astrea.py"
PRESETS, SAM2_TOWER = "configuration/presets.py", "modeling_astrea/tower_sam2.py"
T_MODEL = (EQUATIONS, MODELING)
T_MOCO = (EQUATIONS, MOCO)
T_ROUTE = (ROUTING, EQUATIONS, MODELING)
T_LABELS = (LABELS, EQUATIONS, DATA, PROCESSING)

MUTANTS: list[Mutant] = [
    # ---- eq. 2-4: the residual bridge
    _m("bridge-kv-previous", BRIDGE, "heads(self.k_proj(current)), heads(self.v_proj(current))",
       "heads(self.k_proj(previous[-1])), heads(self.v_proj(previous[-1]))", "K, V from the previous expert (eq. 4 turned around)", T_MODEL),
    _m("bridge-gamma-twice", BRIDGE, "return self.gamma * (weights", "return self.gamma * self.gamma * (weights", "gamma applied twice", T_MODEL),
    _m("bridge-gamma-dropped", BRIDGE, "return self.gamma * (weights", "return (weights", "gamma left out", T_MODEL),
    _m("bridge-bernoulli-flipped", BRIDGE, "generator=generator) < self.p", "generator=generator) > self.p", "keeps C_i with probability 1 - p", T_MODEL),
    _m("bridge-bernoulli-in-eval", BRIDGE, "if self.training:", "if True:", "Bernoulli p_i also in eval", T_MODEL),
    _m("bridge-eval-p-one", BRIDGE, "torch.full(stacked.shape[:2], self.p,", "torch.full(stacked.shape[:2], 1.0,", "eval uses p_i = 1, not its expectation", T_MODEL),
    _m("bridge-mean-not-sum", BRIDGE, "* stacked).sum(dim=0)", "* stacked).mean(dim=0)", "mean over earlier experts instead of the sum", T_MODEL),
    _m("bridge-query-from-current", BRIDGE, "query = self.q_proj(self.residual_query(previous, generator))",
       "query = self.q_proj(current)", "query from f_k instead of the earlier C_i", T_MODEL),
    _m("bridge-no-sqrt-d", BRIDGE, "heads(self.v_proj(current)))", "heads(self.v_proj(current)), scale=1.0)", "attention without 1/sqrt(d)", T_MODEL),
    _m("bridge-head-split", BRIDGE, "x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)",
       "x.view(batch, self.num_heads, -1, self.head_dim)", "heads cut across tokens instead of channels", T_MODEL),
    _m("bridge-gate-no-tanh", BRIDGE, "current + (torch.tanh(self.gate) *", "current + (self.gate *", "gate without tanh", T_MODEL),
    _m("bridge-no-residual", BRIDGE, "return current + (torch.tanh(self.gate) *", "return (torch.tanh(self.gate) *", "f_k not added back", T_MODEL),
    _m("bridge-no-out-proj", BRIDGE, "torch.tanh(self.gate) * self.o_proj(attended)", "torch.tanh(self.gate) * attended", "F_o left out", T_MODEL),
    _m("bridge-gate-init-one", BRIDGE, "torch.full((1,), float(gate_init))", "torch.full((1,), 1.0)", "gate starts open", T_MODEL),
    _m("model-bridge-sees-itself", MODEL, "previous = [features[earlier] for earlier in self.expert_order[:position]]",
       "previous = [features[earlier] for earlier in self.expert_order[:position + 1]]", "expert k's own features among the C_i", T_MODEL),
    _m("model-bridge-chained", MODEL, "previous = [features[earlier] for earlier in self.expert_order[:position]]",
       "previous = [bridged.get(earlier, features[earlier]) for earlier in self.expert_order[:position]]",
       "C_i taken after their own bridges (bridges chained)", T_MODEL),
    # ---- projector and token grid
    _m("projector-max-pool", PROJECTOR, "F.adaptive_avg_pool2d(feature_map, size)", "F.adaptive_max_pool2d(feature_map, size)", "max pooling instead of area", T_MODEL),
    _m("projector-nearest", PROJECTOR, 'mode="bilinear", align_corners=False', 'mode="nearest"', "nearest instead of bilinear", T_MODEL),
    _m("projector-align-corners", PROJECTOR, 'mode="bilinear", align_corners=False', 'mode="bilinear", align_corners=True', "corner-aligned bilinear", T_MODEL),
    _m("projector-pool-or", PROJECTOR, "if size[0] <= feature_map.shape[-2] and size[1] <= feature_map.shape[-1]:",
       "if size[0] <= feature_map.shape[-2] or size[1] <= feature_map.shape[-1]:", "pools a grid that is coarser in one direction", T_MODEL),
    _m("projector-column-major", PROJECTOR, "return resample_grid(fmap, (side, side)).flatten(2).transpose(1, 2)",
       "return resample_grid(fmap, (side, side)).transpose(2, 3).flatten(2).transpose(1, 2)",
       "tokens read out column by column", T_MODEL),
    _m("projector-channels-as-grid", PROJECTOR, "fmap = tokens.transpose(1, 2).reshape(batch, channels, h, w)",
       "fmap = tokens.reshape(batch, channels, h, w)", "token/channel layout mixed up", T_MODEL),
    _m("projector-last-queries", PROJECTOR, "return tokens[:, :num_tokens]", "return tokens[:, -num_tokens:]", "keeps the lowest-scored queries", T_MODEL),
    _m("projector-no-gelu", PROJECTOR, "layers += [ACT2FN[act], nn.Linear(out_dim, out_dim)]", "layers += [nn.Identity(), nn.Linear(out_dim, out_dim)]",
       "no GELU between the projector's layers", T_MODEL),
    _m("projector-extra-layer", PROJECTOR, "for _ in range(depth - 1):", "for _ in range(depth):", "one layer too many", T_MODEL),
    _m("projector-same-grid-shortcut", PROJECTOR, "if (h, w) == (side, side):", "if False:", "no shortcut for a grid that already matches", T_MODEL,
       equivalent="area pooling a grid to its own size is the identity"),
    # ---- eq. 9-10: the MoE fusion
    _m("fusion-softmax-all", FUSION, "logits.gather(-1, kept_index).softmax(dim=-1))",
       "logits.softmax(dim=-1).gather(-1, kept_index))", "softmax over all logits, not the kept ones", T_MODEL),
    _m("fusion-bottom-k", FUSION, "scores).topk(self.top_k, dim=-1)", "scores).topk(self.top_k, dim=-1, largest=False)", "keeps the lowest logits", T_MODEL),
    _m("fusion-k-plus-one", FUSION, "scores).topk(self.top_k, dim=-1)", "scores).topk(min(self.top_k + 1, logits.shape[-1]), dim=-1)", "keeps k + 1 experts", T_MODEL),
    _m("fusion-adapter-no-residual", FUSION, "return x + self.fc2(self.act(self.fc1(x)))", "return self.fc2(self.act(self.fc1(x)))", "adapter residual dropped", T_MODEL),
    _m("fusion-adapter-no-act", FUSION, "return x + self.fc2(self.act(self.fc1(x)))", "return x + self.fc2(self.fc1(x))", "adapter without its activation", T_MODEL),
    _m("fusion-unweighted", FUSION, "(weight * adapter(feature[rows]))", "(adapter(feature[rows]))",
       "kept experts summed without P_i", T_MODEL),
    _m("fusion-no-adapter", FUSION, "weight * adapter(feature[rows])", "weight * feature[rows]", "F_i skipped", T_MODEL),
    _m("fusion-adapters-reversed", FUSION, "zip(self.adapters, expert_features)", "zip(self.adapters[::-1], expert_features)", "each expert through another's adapter", T_MODEL),
    _m("fusion-break-on-unused", FUSION, "            continue\n", "            break\n", "stops at the first expert no image kept", T_MODEL),
    _m("fusion-ones-start", FUSION, "fused = torch.zeros_like(expert_features[0], dtype=dtype)", "fused = torch.ones_like(expert_features[0], dtype=dtype)", "sum starts at 1", T_MODEL),
    _m("fusion-balance-no-k", FUSION, "share = (flat_probs > 0).float().mean(dim=0) / self.top_k", "share = (flat_probs > 0).float().mean(dim=0)",
       "load-balancing share not divided by top-k", T_MODEL),
    _m("fusion-balance-kept-probs", FUSION, "(share * flat_logits.softmax(dim=-1).mean(dim=0))", "(share * flat_probs.mean(dim=0))", "balance uses the top-k probabilities", T_MODEL),
    _m("fusion-balance-no-e", FUSION, "balance = self.num_experts * (share", "balance = (share", "balance without the factor E", T_MODEL),
    _m("fusion-logits-not-float", FUSION, "logits = self.router(expert_features, text_features).float()", "logits = self.router(expert_features, text_features)",
       "router logits and P_i kept in the features' dtype (bf16 under mixed precision)", T_MODEL),
    # ---- the router's input (issue L): the instruction before the image, RMS-normalised parts, jittered top-k
    _m("router-no-norm", FUSION, "        if self.normalize:\n", "        if False:\n", "fusion_router_norm ignored", T_ROUTE),
    _m("router-text-scale-ignored", FUSION, "            parts[-1] = parts[-1] * self.text_scale\n", "            pass\n",
       "fusion_router_text_scale ignored", T_ROUTE),
    _m("text-selects-ignored", FUSION, "        if self.text_selects or not self.router.use_text:\n", "        if True:\n",
       "fusion_router_text_selects=False still lets the instruction choose the experts", T_ROUTE),
    _m("selection-bias-ignored", FUSION, "scores = scores + self.selection_bias.float()", "scores = scores",
       "the balancing bias never changes which experts are kept", T_ROUTE),
    _m("selection-bias-in-weights", FUSION, "scores = scores + self.selection_bias.float()",
       "scores = logits = scores + self.selection_bias.float()", "the balancing bias changes the kept experts' weights too", T_ROUTE),
    _m("bias-update-wrong-sign", TRAINER, "step = self.balance_bias_rate * torch.sign(1.0 / share.numel() - share)",
       "step = self.balance_bias_rate * torch.sign(share - 1.0 / share.numel())", "overloaded experts are made more likely still", (MOCO, ROUTING)),
    _m("bias-loads-not-reduced", TRAINER, 'load = self.accelerator.reduce(self._step_load, reduction="sum")',
       "load = self._step_load", "each process steps its balancing bias on its own loads", (MOCO, ROUTING)),
    _m("router-text-ignored", FUSION, "text = torch.zeros_like(expert_features[0][:, 0]) if text_features is None else text_features",
       "text = torch.zeros_like(expert_features[0][:, 0])", "the instruction never reaches the router", T_ROUTE),
    _m("router-jitter-in-eval", FUSION, "if self.training and self.jitter > 0", "if self.jitter > 0", "top-k jittered in evaluation too", T_ROUTE),
    _m("router-jitter-in-weights", FUSION, "scores = scores + self.jitter * torch.randn_like(logits)",
       "scores = logits = scores + self.jitter * torch.randn_like(logits)", "the noise changes the kept experts' weights, not only which are kept", T_ROUTE),
    _m("router-text-whole-row", MODEL, "return sums[batch, position] / counts[batch, position].clamp(min=1.0)",
       "return sums[batch, -1] / counts[batch, -1].clamp(min=1.0)", "the router reads the text after the image too (not causal)", T_ROUTE),
    _m("router-text-reads-padding", MODEL, "            text = text & attention_mask.bool()\n", "            text = text\n", "padding tokens enter the instruction mean", T_ROUTE),
    _m("router-text-reads-images", MODEL, "        text = ~image_mask\n", "        text = torch.ones_like(image_mask)\n",
       "earlier images' placeholder tokens enter the instruction mean", T_ROUTE),
    # ---- eq. 5-8: momentum contrast
    _m("moco-rows-temperature-times", MOCO_PY, "rows = q @ keys.T / self.temperature", "rows = q @ keys.T * self.temperature", "row logits times tau", T_MOCO),
    _m("moco-cols-temperature-times", MOCO_PY, "cols = k @ q.T / self.temperature", "cols = k @ q.T * self.temperature", "column logits times tau", T_MOCO),
    _m("moco-lambda-swapped", MOCO_PY, "-(self.lam * log_r + (1.0 - self.lam) * log_c)", "-((1.0 - self.lam) * log_r + self.lam * log_c)", "row/column weights swapped", T_MOCO),
    _m("moco-sum-not-mean", MOCO_PY, "* log_c).mean()", "* log_c).sum()", "summed over the batch, not averaged", T_MOCO),
    _m("moco-cols-are-rows", MOCO_PY, "cols = k @ q.T / self.temperature", "cols = q @ k.T / self.temperature", "column term reads rows", T_MOCO),
    _m("moco-no-queue", MOCO_PY, "keys = torch.cat([k, self.queue.to(q.dtype).clone().detach()], dim=0)", "keys = k", "queue not used as negatives", T_MOCO),
    _m("moco-targets-shifted", MOCO_PY, "targets = torch.arange(q.shape[0], device=q.device)", "targets = torch.arange(q.shape[0], device=q.device).flip(0)",
       "positives paired wrongly", T_MOCO),
    _m("moco-momentum-swapped", MOCO_PY, "theta_m.mul_(self.momentum).add_(online.to(theta_m.dtype), alpha=1.0 - self.momentum)",
       "theta_m.mul_(1.0 - self.momentum).add_(online.to(theta_m.dtype), alpha=self.momentum)", "m and 1 - m swapped", T_MOCO),
    _m("moco-fusion-not-updated", MOCO_PY, "return [(self.fusion, backbone.fusion), (self.head, backbone.moco_head)]",
       "return [(self.head, backbone.moco_head)]", "momentum fusion never updated", T_MOCO),
    _m("moco-queue-stuck", MOCO_PY, "self.queue_ptr.fill_((ptr + keys.shape[0]) % size)", "self.queue_ptr.fill_(ptr)", "queue pointer never moves", T_MOCO),
    _m("moco-queue-from-start", MOCO_PY, "index = (torch.arange(keys.shape[0], device=keys.device) + ptr) % size",
       "index = torch.arange(keys.shape[0], device=keys.device) % size", "always overwrites the first slots", T_MOCO),
    _m("moco-query-not-unit", MOCO_PY, "return F.normalize(backbone.moco_head(_random_half_mean(fused)), dim=-1)",
       "return backbone.moco_head(_random_half_mean(fused))", "query not normalised", T_MOCO),
    _m("moco-key-not-unit", MOCO_PY, "return F.normalize(self.head(_random_half_mean(fused)), dim=-1)", "return self.head(_random_half_mean(fused))",
       "key not normalised", T_MOCO),
    _m("moco-all-tokens", MOCO_PY, "keep = max(1, n // 2)", "keep = n", "both views pool every token (trivial task)", T_MOCO),
    _m("moco-half-sorted", MOCO_PY, "index = scores.argsort(dim=1)[:, :keep]", "index = scores.argsort(dim=1)[:, :keep].sort(dim=1).values",
       "the kept token indices sorted", T_MOCO, equivalent="a mean does not depend on the order of the tokens it averages"),
    _m("moco-other-half", MOCO_PY, "index = scores.argsort(dim=1)[:, :keep]", "index = scores.argsort(dim=1)[:, -keep:]",
       "the other half of the random permutation", T_MOCO,
       equivalent="the last half of a uniformly random permutation is as uniformly random a half as the first"),
    # ---- eq. 11 in the trainer
    _m("trainer-mu-dropped", TRAINER, "loss = loss + self.moco_mu * moco_loss / steps", "loss = loss + moco_loss / steps", "L_moco added without mu", T_MOCO),
    _m("trainer-moco-minus", TRAINER, "loss = loss + self.moco_mu * moco_loss / steps", "loss = loss - self.moco_mu * moco_loss / steps", "L_moco subtracted", T_MOCO),
    _m("trainer-balance-no-coef", TRAINER, "loss = loss + self.load_balance_coef * fusion.load_balance_loss / steps",
       "loss = loss + fusion.load_balance_loss / steps", "balance term without its coefficient", T_MOCO),
    _m("trainer-enqueue-queries", TRAINER, "self.moco.enqueue(self.accelerator.gather(k))", "self.moco.enqueue(self.accelerator.gather(q))",
       "queries enqueued instead of keys", T_MOCO),
    _m("trainer-momentum-before-step", TRAINER,
       "    def on_step_end(self, args, state, control, **kwargs):\n        if self.trainer.moco is not None:",
       "    def on_step_begin(self, args, state, control, **kwargs):\n        if self.trainer.moco is not None:",
       "momentum update before the optimizer step", T_MOCO),
    _m("trainer-bias-before-step", TRAINER,
       "    def on_step_end(self, args, state, control, **kwargs):\n        self.trainer.update_selection_bias()",
       "    def on_step_begin(self, args, state, control, **kwargs):\n        self.trainer.update_selection_bias()",
       "the balancing bias updated before the step's loads are in", (MOCO, ROUTING)),
    # ---- each expert's preprocessing (the released towers' constants)
    _m("presets-ram-mean-std-swapped", PRESETS,
       'ram_plus_swin_large_14m.pth",\n        "image_size": 384,\n        "image_mean": IMAGENET_MEAN,\n        "image_std": IMAGENET_STD,',
       'ram_plus_swin_large_14m.pth",\n        "image_size": 384,\n        "image_mean": IMAGENET_STD,\n        "image_std": IMAGENET_MEAN,',
       "the paper classification expert's mean and std swapped", (EQUATIONS,)),
    _m("presets-sam2-size", PRESETS, '"image_size": 1024,', '"image_size": 1008,', "the paper segmentation expert at another side", (EQUATIONS,)),
    _m("sam2-tower-bicubic", SAM2_TOWER, 'preprocessing = ("bilinear", "tensor", False)', 'preprocessing = ("bicubic", "tensor", False)',
       "the segmentation expert resized bicubic (SAM 2 was trained on bilinear)", (EQUATIONS,)),
    # ---- the SFT label mask (which tokens carry L_reg)
    _m("recipe-all-tokens-loss", RECIPE, "assistant_only_loss=True,", "assistant_only_loss=False,", "loss on prompt and image tokens too (the recipe's SFT settings)", T_LABELS),
    _m("chat-generation-includes-prefix", CHAT, """    "{{ 'ASSISTANT:' }}{% generation %}\"""", """    "{% generation %}{{ 'ASSISTANT:' }}\"""",
       "the 'ASSISTANT:' prefix is trained on", T_LABELS),
    _m("chat-eos-not-trained", CHAT, """    "{{ eos_token }}{% endgeneration %}{{ '\\\\n' }}\"""", """    "{% endgeneration %}{{ eos_token }}{{ '\\\\n' }}\"""",
       "the answer's end-of-sequence token carries no loss", T_LABELS),
    _m("mask-touching-tokens", CHAT, "(offsets[:, 0] < end) & (offsets[:, 1] > start)", "(offsets[:, 0] <= end) & (offsets[:, 1] >= start)",
       "tokens that only touch the answer are trained on", T_LABELS),
    _m("mask-shift-from-span-start", CHAT, 'r["new_span"][1] - r["span"][1]', 'r["new_span"][1] - r["span"][0]', "answer spans shifted wrongly past <image>", T_LABELS),
    _m("mask-bisect-left", CHAT, "bisect.bisect_right(placeholder_ends, char)", "bisect.bisect_left(placeholder_ends, char)", "a span starting at a placeholder's end",
       T_LABELS, equivalent="the two differ only for a span edge exactly at a placeholder's end; answer spans start after 'ASSISTANT:' and end after the EOS token, never there"),
    _m("trainer-image-labels-kept", TRAINER, 'inputs["labels"] = inputs["labels"].masked_fill(inputs["input_ids"] == self.image_token_id, -100)',
       'inputs["labels"] = inputs["labels"]', "the trainer does not mask <image> labels", T_LABELS),
]


def _copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, plus the astrea_vlm import shims."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        link = dest / package.replace(".", "/")
        if package.count(".") and not link.exists():
            link.symlink_to(os.path.relpath(dest / folder, link.parent))


# Imported once by the driver, before any mutant: every pytest run is a fork of this process, so
# it skips the ~30-60 s of importing torch, transformers and TRL again. astrea itself is never
# imported here -- each fork imports the (mutated) copy fresh.
_THIRD_PARTY = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "PIL", "numpy", "yaml", "safetensors",
                "pytest", "hypothesis", "timm")


def _preload() -> None:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for name in _THIRD_PARTY:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert not any(m == "astrea_vlm" or m.startswith("astrea_vlm.") for m in sys.modules), "astrea imported before forking"


def _pytest(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str]:
    """Run ``pytest -x tests`` on ``tree`` in a forked child (nice 10); (status, detail)."""
    log = tree / ".mutant-pytest.log"
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            os.nice(10)
            os.chdir(tree)
            sys.path[:] = [str(tree)] + [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
            sys.dont_write_bytecode = True
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest

            # Its own temporary folder: never the machine-wide /tmp/pytest-of-<user> other runs share.
            code = int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", f"--basetemp={tree / '.pytest-tmp'}", *tests]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    done = 0
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                return "killed", f"timeout after {timeout:.0f} s"
            time.sleep(1)
    finally:
        if not done:  # a timeout, or the driver itself stopped (Ctrl-C, SIGTERM): take the run down with it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    output = log.read_text(errors="replace")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    if code == 0:
        return "survived", ""
    if code == 1:
        return "killed", failed[0] if failed else "a test failed"
    if code < 0:
        return "killed", f"the test process died (signal {-code})"
    tail = output.strip().splitlines()[-3:]
    return "error", f"pytest exit {code}: " + " | ".join(tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutant ids")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run (a timeout counts as killed)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    parser.add_argument("--logs", type=Path, help="keep each mutant's pytest output in this folder (<id>.log)")
    parser.add_argument("--run-equivalent", action="store_true", help="also run the mutants listed as equivalent")
    args = parser.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    assert len(set(ids)) == len(ids), "duplicate mutant ids"
    chosen = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(ids))
        if unknown:
            parser.error(f"unknown mutant ids {unknown}; see --list")
        chosen = [m for m in MUTANTS if m.id in wanted]
    if not (args.run_equivalent or args.only or args.list):
        chosen = [m for m in chosen if not m.equivalent]
    for m in chosen:  # every mutant applies to the current code exactly once
        count = (ROOT / m.path).read_text().count(m.before)
        if count != 1:
            raise SystemExit(f"mutant {m.id}: {m.before!r} occurs {count} times in {m.path}; update tests/mutation/run_mutants.py")
    if args.list:
        for m in chosen:
            print(f"{m.id:34s} {m.path:34s} {m.about}" + (f"  [equivalent: {m.equivalent}]" if m.equivalent else ""))
        return 0

    # `timeout` and friends send SIGTERM: unwind, so that the pytest child and the copied tree go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _preload()
    with tempfile.TemporaryDirectory(prefix="astrea-mutants-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            status, detail = _pytest(tree, tests, args.timeout * 2)
            if status != "survived":
                raise SystemExit(f"the unmutated code fails its tests ({detail}); fix that first")
            print(f"baseline: {len(tests)} test files pass on the unmutated code", flush=True)
        results = []
        for number, m in enumerate(chosen, start=1):
            path = tree / m.path
            original = path.read_text()
            path.write_text(original.replace(m.before, m.after))
            start = time.monotonic()
            try:
                status, detail = _pytest(tree, m.tests, args.timeout)
            finally:
                path.write_text(original)
            results.append((m, status, detail))
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(tree / ".mutant-pytest.log", args.logs / f"{m.id}.log")
            flag = f" (listed equivalent: {m.equivalent})" if m.equivalent else ""
            print(f"[{number}/{len(chosen)}] {status:8s} {m.id:34s} {detail}{flag}  ({time.monotonic() - start:.0f} s)", flush=True)

    equivalent = [r for r in results if r[0].equivalent]
    scored = [r for r in results if not r[0].equivalent]
    killed = [r for r in scored if r[1] == "killed"]
    listed = [m for m in MUTANTS if m.equivalent and (m in chosen or not args.only)]
    print(f"\nmutation score: {len(killed)} / {len(scored)} killed "
          f"({len(scored)} mutants run; {len(listed)} more listed as equivalent)")
    for m, status, detail in scored:
        if status != "killed":
            print(f"  {status}: {m.id} ({m.path}: {m.about}) {detail}")
    ran = {r[0].id: r[1] for r in equivalent}
    for m in listed:
        print(f"  equivalent ({ran.get(m.id, 'not run')}): {m.id}: {m.equivalent}")
    return 0 if len(killed) == len(scored) else 1


if __name__ == "__main__":
    raise SystemExit(main())
