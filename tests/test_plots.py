"""Model card figures: training curves and the sample gallery, as PNGs legible at the Hub's README width."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from captioning.plots import (
    Sample,
    _caption_lines,
    _fit_image,
    build_samples,
    build_samples_figure,
    build_training_curves_figure,
    load_prediction_samples,
    plot_samples,
    plot_training_curves,
)

HISTORY = [
    {"epoch": 0.5, "loss": 6.9, "learning_rate": 1e-3, "step": 10},
    {"epoch": 1.0, "loss": 3.1, "learning_rate": 9e-4, "step": 20},
    {"epoch": 1.0, "eval_loss": 2.8, "eval_cider": 1.2, "eval_bleu_4": 0.2, "step": 20},
    {"epoch": 1.5, "loss": 1.7, "learning_rate": 5e-4, "step": 30},
    {"epoch": 2.0, "loss": 1.1, "learning_rate": 1e-4, "step": 40},
    {"epoch": 2.0, "eval_loss": 1.3, "eval_cider": 2.4, "eval_bleu_4": 0.4, "step": 40},
    {"epoch": 2.0, "train_loss": 3.2, "train_runtime": 12.0, "step": 40},  # the summary line: not a point
]
BASELINE = {"eval_loss": 7.9, "eval_cider": 0.3, "eval_bleu_4": 0.01}


def _png_width(path) -> int:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size[0]


def _plotted(figure) -> dict[str, list[tuple[float, float]]]:
    """label -> points of every labelled line in the figure."""
    return {
        line.get_label(): list(zip(line.get_xdata(), line.get_ydata(), strict=True))
        for ax in figure.axes
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def test_training_curves_png_is_sized_for_the_hub(tmp_path):
    path = plot_training_curves(HISTORY, tmp_path / "training_curves.png", baseline=BASELINE)
    assert path == tmp_path / "training_curves.png"
    assert 700 <= _png_width(path) <= 1400
    assert [p.name for p in tmp_path.iterdir()] == ["training_curves.png"]  # no temporary file left behind


def test_training_curves_plot_loss_and_cider_with_the_baseline_at_step_zero():
    figure = build_training_curves_figure(HISTORY, baseline=BASELINE)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["Loss", "Validation CIDEr-D"]
    loss_ax, cider_ax = figure.axes
    loss_lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert list(loss_lines["training"].get_xdata()) == [10, 20, 30, 40]  # the train_loss summary is not a point
    assert list(loss_lines["validation"].get_ydata()) == [2.8, 1.3]
    assert list(loss_lines["before fine-tuning"].get_xydata()[0]) == [0, 7.9]
    cider_lines = {line.get_label(): line for line in cider_ax.get_lines()}
    assert list(cider_lines["validation"].get_ydata()) == [1.2, 2.4]
    assert list(cider_lines["before fine-tuning"].get_xydata()[0]) == [0, 0.3]
    assert all(ax.get_legend() is not None and ax.get_xlabel() == "step" for ax in figure.axes)


def test_training_curves_take_a_step_zero_evaluation_as_the_baseline():
    history = [{"eval_loss": 5.0, "eval_cider": 0.1, "step": 0}, *HISTORY]
    plotted = _plotted(build_training_curves_figure(history))
    assert (0, 0.1) in plotted["before fine-tuning"]


def test_training_curves_without_evaluation_have_one_panel():
    figure = build_training_curves_figure([entry for entry in HISTORY if "eval_loss" not in entry])
    assert [ax.get_title() for ax in figure.axes] == ["Loss"]


@pytest.mark.parametrize("history", [[], [{"train_loss": 1.0, "train_runtime": 3.0, "step": 5}], [{"loss": 1.0}]])
def test_nothing_to_plot_writes_nothing(tmp_path, history):
    assert plot_training_curves(history, tmp_path / "curves.png") is None
    assert not any(tmp_path.iterdir())


def _samples(count: int, with_baseline: bool = True) -> list[Sample]:
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]
    return [
        Sample(
            image=Image.new("RGB", (32, 32), colours[i % len(colours)]),
            prediction=f"prediction {i}: a small red square sticker on white paper , left side",
            reference=f"reference {i}: red square sticker , small , white paper",
            baseline=f"baseline {i}: a red square" if with_baseline else None,
        )
        for i in range(count)
    ]


def _texts(figure) -> str:
    return "\n".join(text.get_text() for text in figure.findobj(Text))


def _image_axes(figure) -> list:
    return [ax for ax in figure.axes if ax.get_images()]


@pytest.mark.parametrize(("count", "columns", "grid"), [(8, 4, (2, 4)), (6, 4, (2, 4)), (3, 4, (1, 3)), (5, 2, (3, 2))])
def test_samples_grid_has_one_panel_per_sample(count, columns, grid):
    figure = build_samples_figure(_samples(count), columns=columns)
    panels = _image_axes(figure)
    assert len(panels) == count
    rows, cols = grid
    geometry = {(ax.get_subplotspec().rowspan.start // 2, ax.get_subplotspec().colspan.start) for ax in panels}
    assert max(row for row, _ in geometry) == rows - 1 and max(col for _, col in geometry) == cols - 1


def test_samples_grid_shows_every_caption_wrapped():
    samples = _samples(4)
    text = _texts(build_samples_figure(samples))
    flat = " ".join(text.split())
    for sample in samples:
        assert f"Fine-tuned: {sample.prediction}" in flat
        assert f"Before: {sample.baseline}" in flat
        assert f"Reference: {sample.reference}" in flat
    assert max(len(line) for line in text.splitlines()) < 40  # wrapped to the ~240 px column


def test_very_long_captions_are_cut_with_an_ellipsis():
    sample = Sample(image=Image.new("RGB", (8, 8)), prediction="word " * 200, reference="a reference")
    text = _texts(build_samples_figure([sample]))
    assert "…" in text and text.count("word") < 150 and "Reference: a reference" in text


def test_samples_grid_leaves_out_the_baseline_when_unknown():
    text = _texts(build_samples_figure(_samples(2, with_baseline=False)))
    assert "Before:" not in text and "Fine-tuned:" in text


def test_samples_png_is_sized_for_the_hub(tmp_path):
    path = plot_samples(_samples(8), tmp_path / "samples.png")
    assert 700 <= _png_width(path) <= 1400
    assert [p.name for p in tmp_path.iterdir()] == ["samples.png"]
    assert plot_samples([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_small_images_are_upscaled_with_nearest_neighbour():
    checker = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]], [[255, 255, 255], [0, 0, 0]]], dtype=np.uint8))
    scaled = _fit_image(checker, (220, 199))
    assert scaled.size == (198, 198)  # a whole factor: every pixel becomes a 99x99 block
    assert {colour for _count, colour in scaled.getcolors()} == {(0, 0, 0), (255, 255, 255)}  # no blur
    large = _fit_image(Image.new("RGB", (1000, 500), (10, 20, 30)), (220, 199))
    assert large.size == (220, 110)


def test_samples_from_parallel_lists_and_from_predictions(tmp_path):
    images = [Image.new("RGB", (8, 8)) for _ in range(3)]
    samples = build_samples(
        images, ["p0", "p1", "p2"], [["r0", "x"], ["r1"], "r2"], baselines=["b0", "b1", "b2"], limit=2
    )
    assert [(s.prediction, s.reference, s.baseline) for s in samples] == [("p0", "r0", "b0"), ("p1", "r1", "b1")]

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "prediction": "a red thing", "references": ["red", "a red square"]},
        {"image": "missing.png", "prediction": "skipped", "references": ["x"]},
    ]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_prediction_samples(tmp_path / "predictions.jsonl", tmp_path, baselines={"a.png": "a dog"})
    assert [(s.prediction, s.reference, s.baseline, s.image.size) for s in loaded] == [
        ("a red thing", "red", "a dog", (8, 8))
    ]


def test_self_critical_steps_plot_their_reward_and_mark_where_scst_began():
    """Cross-entropy for 20 steps, then SCST: the loss panel keeps the cross-entropy steps only (a policy-gradient
    loss is no cross-entropy), the CIDEr-D panel adds the sample reward, and both mark step 20."""
    history = [
        {"loss": 3.0, "step": 10},
        {"loss": 2.0, "step": 20},
        {"eval_loss": 2.1, "eval_cider": 1.0, "step": 20},
        {"loss": -0.01, "scst_reward": 1.5, "scst_baseline": 1.5, "step": 30},
        {"loss": 0.02, "scst_reward": 1.9, "scst_baseline": 1.9, "step": 40},
        {"eval_loss": 2.3, "eval_cider": 1.4, "step": 40},
    ]
    figure = build_training_curves_figure(history)
    loss_ax, cider_ax = figure.axes
    assert cider_ax.get_title() == "CIDEr-D"
    loss_lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert list(loss_lines["training"].get_xydata().tolist()) == [[10, 3.0], [20, 2.0]]
    cider_lines = {line.get_label(): line for line in cider_ax.get_lines()}
    assert cider_lines["SCST sample reward (training)"].get_xydata().tolist() == [[30, 1.5], [40, 1.9]]
    assert list(cider_lines["SCST begins"].get_xdata()) == [20, 20]
    marks = [line for line in loss_ax.get_lines() if line.get_linestyle() == "--"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [20, 20]


def test_control_characters_in_a_caption_are_drawn_as_replacement_characters():
    sample = Sample(image=Image.new("RGB", (64, 48)), prediction="a\x06dog\x00", reference="a dog", baseline=None)
    lines = _caption_lines(sample, {"bold": 40, "regular": 40})
    assert lines[0][1] == ["Fine-tuned: a\ufffddog\ufffd"]
