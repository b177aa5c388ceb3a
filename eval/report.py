"""Routing report (paper Fig. 2) and training curves (paper Fig. 3), as PNG and markdown.

**Router probabilities** come from ``astrea eval`` results JSONs: every sample stores the router
probabilities of each of its images (``(n_images, n_experts)``, experts in the results'
``expert_order``). For each group (a ``question_type``, or the task of each results file) the
table gives each expert's mean probability over **all images** of the group's samples (a sample
with two images counts twice: routing is per image). The PNG is a grouped bar chart, one group of
bars per task / question type, one bar per expert.

**Training curves** come from trainer logs: ``trainer_state.json``'s ``log_history`` (a list of
dicts with ``step`` and the logged keys: ``loss``, ``learning_rate``, ``grad_norm``, ``router/...``,
evaluation metrics ...). Each stage is a folder (or file) and gets its own column of panels on its
own step axis (a 50-step alignment stage is as readable as a 2000-step instruction tuning), one row
per logged quantity, all loss terms in one row, validation values (``eval_*``, logged when the recipe
evaluates) dashed with markers, as in Fig. 3. :func:`stage_curves` still gives the stages one after
the other on a shared axis.

Command line: ``python -m astrea_vlm.eval.report --results R.json [R2.json ...] --stages DIR
[DIR ...] --output FOLDER``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Bookkeeping keys of the trainer's log that are not curves.
SKIPPED_LOG_KEYS = frozenset({"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------- router report
def _load_results(item) -> dict:
    if isinstance(item, Mapping):
        return dict(item)
    return json.loads(Path(item).read_text(encoding="utf-8"))


def router_table(results: Sequence, group_by: str = "question_type") -> tuple[dict[str, dict[str, float]], list[str], dict[str, int]]:
    """Mean router probability of each expert per group.

    ``results``: results dicts or paths of ``results.json`` files (from ``astrea eval``); they must
    share one ``expert_order``. ``group_by``: ``"question_type"`` or ``"task"``.
    Returns ``(table, expert_order, n_images)`` with ``table[group][expert]`` the mean and
    ``n_images[group]`` the number of images averaged.
    """
    if group_by not in ("question_type", "task"):
        raise ValueError("group_by is 'question_type' or 'task'")
    if isinstance(results, (str, Path, Mapping)):
        results = [results]
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = defaultdict(int)
    order: list[str] | None = None
    for item in results:
        result = _load_results(item)
        experts = list(result.get("expert_order") or [])
        if order is None:
            order = experts
        elif experts != order:
            raise ValueError(f"results with different expert orders: {order} vs {experts}")
        for sample in result["samples"]:
            group = result["task"] if group_by == "task" else sample["question_type"]
            for probs in sample.get("router_probs") or []:
                if len(probs) != len(order):
                    raise ValueError(f"router probabilities of length {len(probs)} but {len(order)} experts")
                row = sums.setdefault(group, [0.0] * len(order))
                for i, p in enumerate(probs):
                    row[i] += float(p)
                counts[group] += 1
    if not sums:
        raise ValueError("no router probabilities in the results (was the model evaluated in an alignment stage?)")
    table = {group: {e: row[i] / counts[group] for i, e in enumerate(order)} for group, row in sums.items()}
    return table, list(order), dict(counts)


def routing_summary(table: Mapping[str, Mapping[str, float]], expert_order: Sequence[str], n_images: Mapping[str, int]) -> dict:
    """How much routing follows the task: the largest total-variation distance between two groups'
    mean distributions (``tv_max``, ``tv_pair``) and each expert's mean probability over all images."""
    groups = sorted(table)
    pairs = [(a, b) for i, a in enumerate(groups) for b in groups[i + 1 :]]

    def tv(a, b):
        return 0.5 * sum(abs(table[a][e] - table[b][e]) for e in expert_order)

    pair = max(pairs, key=lambda p: tv(*p)) if pairs else None
    total = sum(n_images[g] for g in groups)
    return {
        "tv_max": tv(*pair) if pair else 0.0,
        "tv_pair": list(pair) if pair else None,
        "expert_mean": {e: sum(table[g][e] * n_images[g] for g in groups) / total for e in expert_order},
    }


def describe_router(router: Mapping | None, image_position: str | None = None) -> str:
    """One sentence on what the router reads (from a results JSON's ``router`` entry)."""
    if not router:
        return "Router input unknown (results written before astrea recorded it)."
    text = "the experts' projected tokens"
    if router.get("input") == "visual+text":
        where = {"after": " (the prompt comes first: this is the question)",
                 "before": " (the image comes first: only the chat's opening, not the question)"}.get(image_position or "", "")
        text += f" and the mean embedding of the text before the image{where}"
        if router.get("text_scale", 1.0) != 1.0:
            text += f", the text's part scaled by {router['text_scale']:g}"
    unit = "each visual token" if router.get("routing") == "token" else "each image"
    top_k = f"top-{router.get('top_k', '?')} experts"
    if router.get("input") == "visual+text" and router.get("text_selects", True) is False:
        return f"The router reads {text}; the image alone chooses the {top_k} for {unit}, and the text weighs them."
    return f"The router reads {text}; it routes {unit} to its {top_k}."


def router_markdown(table: Mapping[str, Mapping[str, float]], expert_order: Sequence[str], n_images: Mapping[str, int] | None = None,
                    expected: Mapping[str, Sequence[str]] | None = None) -> str:
    """The router table as markdown: one row per group, one column per expert (4 decimals).

    With ``expected`` (group -> experts a reading such as the paper's Fig. 2 expects to lead), two
    more columns: that reading and whether the group's top expert is among them.
    """
    head = "| group | images | " + " | ".join(expert_order) + " |"
    rule = "| --- | --- | " + " | ".join("---" for _ in expert_order) + " |"
    if expected is not None:
        head += " top expert | Fig. 2 reading | agrees |"
        rule += " --- | --- | --- |"
    lines = [head, rule]
    for group in sorted(table):
        n = "" if n_images is None else str(n_images.get(group, ""))
        row = f"| {group} | {n} | " + " | ".join(f"{table[group][e]:.4f}" for e in expert_order) + " |"
        if expected is not None:
            top = max(expert_order, key=lambda e: table[group][e])
            reading = expected.get(group)
            row += f" {top} | {' / '.join(reading) if reading else '-'} | {('yes' if top in reading else 'no') if reading else '-'} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def plot_router_bars(table: Mapping[str, Mapping[str, float]], expert_order: Sequence[str], path: str | Path, title: str | None = None,
                     caption: str | None = None) -> Path:
    """Grouped bar chart of the router table (paper Fig. 2) saved as a PNG; ``caption`` is printed below it."""
    import textwrap

    plt = _pyplot()
    groups = sorted(table)
    width = 0.8 / max(1, len(expert_order))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.2))
    for i, expert in enumerate(expert_order):
        xs = [g + (i - (len(expert_order) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [table[group][expert] for group in groups], width=width, label=expert)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean router probability")
    ax.set_title(title or "router probability per expert")
    ax.legend(fontsize="small", ncol=min(4, len(expert_order)))
    if caption:
        fig.text(0.01, 0.01, textwrap.fill(caption, 130), fontsize="x-small", va="bottom")
    fig.tight_layout(rect=(0, 0.1 if caption else 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_router_report(results: Sequence, output: str | Path, group_by: str = "question_type",
                        expected: Mapping[str, Sequence[str]] | None = None, title: str | None = None) -> tuple[Path, Path]:
    """``router.md`` and ``router.png`` in ``output`` from results JSONs; returns their paths.

    Both say what the router reads (from the first results' ``router`` entry), the markdown also how
    far apart the groups' distributions are and each expert's mean; ``expected`` adds a reading to
    compare with (:func:`router_markdown`).
    """
    table, order, counts = router_table(results, group_by=group_by)
    first = _load_results(results[0] if isinstance(results, Sequence) and not isinstance(results, (str, Path)) else results)
    caption = describe_router(first.get("router"), (first.get("settings") or {}).get("image_position"))
    summary = routing_summary(table, order, counts)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    md = output / "router.md"
    pair = f" ({' vs '.join(summary['tv_pair'])})" if summary["tv_pair"] else ""
    md.write_text(
        f"# Mean router probability per {group_by.replace('_', ' ')}\n\n{caption}\n\n"
        + router_markdown(table, order, counts, expected)
        + f"\nLargest total-variation distance between two groups: {summary['tv_max']:.3f}{pair}. "
        + "Mean probability per expert over all images: "
        + ", ".join(f"{e} {v:.3f}" for e, v in summary["expert_mean"].items()) + ".\n",
        encoding="utf-8")
    return md, plot_router_bars(table, order, output / "router.png", title=title, caption=caption)


# ------------------------------------------------------------------------------ training curves
def load_log_history(source: str | Path) -> list[tuple[str, list[dict]]]:
    """``[(stage name, log_history), ...]`` of one stage folder or log file.

    A folder is read from its ``trainer_state.json``, else its ``stage_done.json`` (what
    ``astrea align`` / ``instruct`` write when a stage ends), else the ``trainer_state.json`` of its
    last ``checkpoint-N``. A file may be a ``trainer_state.json``, a ``stage_done.json`` or an
    ``alignment_summary.json`` (a list of stage summaries, giving several stages).
    """
    source = Path(source)
    if source.is_dir():
        candidates = [source / "trainer_state.json", source / "stage_done.json"]
        checkpoints = sorted(source.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
        found = next((c for c in candidates if c.is_file()), checkpoints[-1] if checkpoints else None)
        if found is None:
            raise FileNotFoundError(f"{source}: no trainer_state.json, stage_done.json or checkpoint-*/trainer_state.json")
        return [(source.name, _history(json.loads(found.read_text(encoding="utf-8")), found))]
    data = json.loads(source.read_text(encoding="utf-8"))
    if isinstance(data, list):
        return [(str(s.get("stage", f"stage-{i + 1}")), _history(s, source)) for i, s in enumerate(data)]
    name = data.get("stage") or (source.parent.name if source.name in ("trainer_state.json", "stage_done.json") else source.stem)
    return [(str(name), _history(data, source))]


def _history(data: Mapping, where) -> list[dict]:
    history = data.get("log_history")
    if not isinstance(history, list):
        raise ValueError(f"{where}: no log_history list")
    return [dict(entry) for entry in history]


def stage_curves(stages: Sequence[tuple[str, list[dict]]], keys: Sequence[str] | None = None) -> tuple[dict[str, list[tuple[float, float, int]]], list[tuple[str, float, float]]]:
    """Curves on the shared step axis: ``({key: [(step, value, stage index), ...]}, [(stage, start, end), ...])``.

    Stage ``k``'s steps are offset by the last step of the stages before it. Only numeric, finite
    values are kept; without ``keys``, every logged key but the bookkeeping ones
    (:data:`SKIPPED_LOG_KEYS`, ``*_runtime``, ``*_per_second``) is drawn.
    """
    curves: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    spans = []
    offset = 0.0
    for index, (name, history) in enumerate(stages):
        last = 0.0
        for entry in history:
            step = entry.get("step")
            if not isinstance(step, (int, float)):
                continue
            last = max(last, float(step))
            for key, value in entry.items():
                if keys is not None and key not in keys:
                    continue
                if keys is None and (key in SKIPPED_LOG_KEYS or key.endswith(("_runtime", "_per_second"))):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    curves[key].append((offset + float(step), float(value), index))
        spans.append((name, offset, offset + last))
        offset += last
    return dict(curves), spans


def _is_bookkeeping(key: str) -> bool:
    return key in SKIPPED_LOG_KEYS or key.endswith(("_runtime", "_per_second"))


def _row_of(key: str) -> str:
    """The panel row a logged key is drawn in: every loss term (and its validation twin) in the
    ``loss`` row, any other key (and its ``eval_`` twin) in its own row."""
    base = key[len("eval_"):] if key.startswith("eval_") else key
    return "loss" if base == "loss" or base.startswith("loss_") else base


def stage_series(stages: Sequence[tuple[str, list[dict]]], keys: Sequence[str] | None = None) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """Each stage's curves on its own step axis: ``[(stage, {key: [(step, value), ...]}), ...]``.

    Without ``keys`` every logged key but the bookkeeping ones is kept; with ``keys``, those keys
    and their validation twins (``eval_<key>``, logged when the recipe evaluates during training).
    """
    wanted = None if keys is None else set(keys) | {f"eval_{k}" for k in keys}
    found = []
    for name, history in stages:
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for entry in history:
            step = entry.get("step")
            if not isinstance(step, (int, float)):
                continue
            for key, value in entry.items():
                if (wanted is not None and key not in wanted) or (wanted is None and _is_bookkeeping(key)):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    series[key].append((float(step), float(value)))
        found.append((name, dict(series)))
    return found


def _label(key: str) -> str:
    if key.startswith("eval_"):
        return "validation " + _label(key[len("eval_"):])
    return {"loss": "loss", "loss_reg": "L_reg", "loss_moco": "L_moco"}.get(key, key)


def _same_as_total(key: str, curves: Mapping[str, list[tuple[float, float]]]) -> bool:
    """Whether ``key`` is a loss term equal to its stage's total at every logged step (L_reg in a
    stage without MoCo): drawn, it would only hide the total."""
    prefix = "eval_" if key.startswith("eval_") else ""
    if not key[len(prefix):].startswith("loss_"):
        return False
    total = curves.get(prefix + "loss") or []
    term = curves.get(key) or []
    return len(total) == len(term) and all(a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-6, abs_tol=1e-9)
                                           for a, b in zip(total, term))


def training_figure(stages: Sequence, keys: Sequence[str] | None = None, title: str | None = None):
    """The figure of :func:`plot_training_curves` (a matplotlib ``Figure``): one column per stage, each
    on its own step axis, one row per logged quantity (all loss terms share the ``loss`` row; a term
    equal to the total, such as L_reg without MoCo, is left out); validation values (``eval_*``)
    are drawn as dashed lines with markers."""
    loaded: list[tuple[str, list[dict]]] = []
    for stage in stages:
        if isinstance(stage, tuple):
            loaded.append((str(stage[0]), list(stage[1])))
        else:
            loaded.extend(load_log_history(stage))
    series = stage_series(loaded, keys)
    all_keys = sorted({key for _, curves in series for key in curves}, key=lambda k: (_row_of(k) != "loss", _row_of(k), k.startswith("eval_"), k))
    if not all_keys:
        raise ValueError("no numeric values logged with a step in these stages")
    rows = list(dict.fromkeys(_row_of(k) for k in all_keys))
    plt = _pyplot()
    columns = len(series)
    fig, axes = plt.subplots(len(rows), columns, figsize=(max(6.0, 3.1 * columns), 2.5 * len(rows) + 1.2),
                             squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    base_keys = list(dict.fromkeys(k[len("eval_"):] if k.startswith("eval_") else k for k in all_keys))
    colour_of = {k: colours[i % len(colours)] for i, k in enumerate(base_keys)}
    for column, (stage, curves) in enumerate(series):
        last = max((x for points in curves.values() for x, _ in points), default=0.0)
        for row, row_name in enumerate(rows):
            ax = axes[row][column]
            drawn = False
            # draw the total last (on top), and a loss term only where it says more than the total
            for key in sorted(all_keys, key=lambda k: k in ("loss", "eval_loss")):
                if _row_of(key) != row_name or not curves.get(key) or _same_as_total(key, curves):
                    continue
                xs, ys = zip(*curves[key])
                validation = key.startswith("eval_")
                base = key[len("eval_"):] if validation else key
                ax.plot(xs, ys, color=colour_of[base], linestyle="--" if validation else "-",
                        marker="o" if validation or len(xs) < 30 else None, markersize=3, label=_label(key),
                        linewidth=1.8 if base == "loss" else 1.1)
                drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")
            ax.set_xlim(0, max(1.0, last))
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize="small")
            if row == 0:
                ax.set_title(f"{stage}\n{int(last)} steps", fontsize="medium")
            if row == len(rows) - 1:
                ax.set_xlabel("step of this stage", fontsize="small")
            if column == 0:
                ax.set_ylabel(row_name)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(6, len(handles)), fontsize="small",
               handlelength=3.5)
    fig.suptitle(title or "training curves per stage", fontsize="large")
    return fig


def plot_training_curves(stages: Sequence, path: str | Path, keys: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Training curves (paper Fig. 3) saved as a PNG: one panel per stage and quantity, every stage on
    its own step axis, validation curves where the stage logged them (see :func:`training_figure`).

    ``stages``: stage folders / log files (see :func:`load_log_history`), or ``(name, log_history)`` pairs.
    """
    plt = _pyplot()
    fig = training_figure(stages, keys, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m astrea_vlm.eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="*", default=[], help="results.json files of `astrea eval`")
    parser.add_argument("--group-by", default="question_type", choices=["question_type", "task"])
    parser.add_argument("--stages", nargs="*", default=[], help="stage folders or trainer_state.json files, in training order")
    parser.add_argument("--output", required=True, help="folder for router.md / router.png / training_curves.png")
    args = parser.parse_args(argv)
    if not args.results and not args.stages:
        parser.error("give --results and/or --stages")
    if args.results:
        md, png = write_router_report(args.results, args.output, group_by=args.group_by)
        print(f"wrote {md} and {png}")
    if args.stages:
        print(f"wrote {plot_training_curves(args.stages, Path(args.output) / 'training_curves.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
