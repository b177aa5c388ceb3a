"""loss.png: every stage readable on its own step axis, validation where logged, a title that fits."""

from __future__ import annotations

import math

import pytest

from astrea_vlm.eval.report import plot_training_curves, stage_series, training_figure

ALIGN = ["align-1-caption", "align-2-classification", "align-3-detection", "align-4-segmentation"]


def _demo_like_logs():
    """Four 50-step alignment stages and a 2000-step instruction tuning that evaluates every 250 steps."""
    stages = [(name, [{"step": s, "loss": 3 - s / 50 - i / 10, "loss_reg": 3 - s / 50 - i / 10, "learning_rate": 1e-3}
                      for s in range(10, 51, 10)]) for i, name in enumerate(ALIGN)]
    history = []
    for s in range(10, 2001, 10):
        history.append({"step": s, "loss": 1 + math.exp(-s / 500), "loss_reg": 0.9 + math.exp(-s / 500), "loss_moco": 0.1})
        if s % 250 == 0:
            history.append({"step": s, "eval_loss": 1.2 + math.exp(-s / 500), "eval_runtime": 2.0, "epoch": 1.0})
    return stages + [("instruct", history)]


def test_each_stage_is_drawn_on_its_own_step_axis_with_validation_where_logged():
    fig = training_figure(_demo_like_logs(), keys=["loss", "loss_reg", "loss_moco"], title="astrea demo: training loss per stage")
    axes = fig.axes
    assert len(axes) == 5  # one panel per stage; all loss terms share the row
    for ax, (name, steps) in zip(axes, [(n, 50) for n in ALIGN] + [("instruct", 2000)]):
        assert ax.get_title().splitlines() == [name, f"{steps} steps"]
        assert ax.get_xlim() == (0.0, float(steps))
        lines = {line.get_label(): line for line in ax.get_lines()}
        xs = [x for line in lines.values() for x in line.get_xdata()]
        assert min(xs) >= 0 and max(xs) == steps  # stage-relative steps, the whole stage visible
        if name == "instruct":
            assert set(lines) == {"loss", "L_reg", "L_moco", "validation loss"}
            assert list(lines["validation loss"].get_xdata()) == [250.0 * k for k in range(1, 9)]
            assert lines["validation loss"].get_linestyle() == "--"
        else:  # no validation logged: none drawn; L_reg equals the loss without MoCo: left out, not drawn over it
            assert set(lines) == {"loss"}
    fig.canvas.draw()
    figure_box = fig.bbox
    title = fig._suptitle.get_window_extent()
    assert figure_box.x0 <= title.x0 and title.x1 <= figure_box.x1 and title.y1 <= figure_box.y1  # the title fits
    legend = fig.legends[0].get_window_extent()
    assert not title.overlaps(legend)
    for ax in axes:
        assert not title.overlaps(ax.get_window_extent())


def test_stage_series_keeps_the_validation_twin_of_a_requested_key():
    series = dict(stage_series(_demo_like_logs(), keys=["loss"]))
    assert set(series["instruct"]) == {"loss", "eval_loss"} and set(series["align-1-caption"]) == {"loss"}
    assert series["instruct"]["eval_loss"][0] == (250.0, pytest.approx(1.2 + math.exp(-0.5)))


def test_plot_writes_a_png(tmp_path):
    from PIL import Image

    path = plot_training_curves(_demo_like_logs(), tmp_path / "loss.png", keys=["loss"])
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 5 * 250  # room for five panels
