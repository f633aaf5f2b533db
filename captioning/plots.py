"""Figures for the model card: training curves from the Trainer's log history and a gallery of test captions.

Both are PNGs sized for the width the Hub renders a README at (about 800 px), written atomically.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must come before pyplot is imported anywhere

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.offsetbox import AnchoredOffsetbox, TextArea, VPacker  # noqa: E402
from PIL import Image  # noqa: E402

from captioning.outputs import atomic_file  # noqa: E402

DPI = 120
FIGURE_WIDTH = 8.0  # inches: 960 px at DPI, shown at ~800 px on the Hub without losing legibility

TRAIN_COLOUR = "#1f77b4"
EVAL_COLOUR = "#d62728"
CIDER_COLOUR = "#2ca02c"
BASELINE_COLOUR = "#555555"
REFERENCE_COLOUR = "#1f4e99"


@dataclass
class Sample:
    """One gallery panel: a test image, the fine-tuned caption, one reference and, if known, the caption before."""

    image: Image.Image
    prediction: str
    reference: str
    baseline: str | None = None


# --------------------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------------------


def plot_training_curves(
    log_history: Sequence[Mapping], path: str | Path, baseline: Mapping[str, float] | None = None
) -> Path | None:
    """Training and validation loss, and validation CIDEr-D, over optimizer steps, as a PNG at ``path``.

    ``log_history`` is ``trainer.state.log_history`` (or ``trainer_state.json``'s); ``baseline`` holds the eval_*
    metrics of the model before fine-tuning (``baseline_results.json``), drawn at step 0. Returns None and writes
    nothing when there is no point to plot.
    """
    figure = build_training_curves_figure(log_history, baseline)
    if figure is None:
        return None
    return _save_atomic(figure, path)


def build_training_curves_figure(
    log_history: Sequence[Mapping], baseline: Mapping[str, float] | None = None
) -> Figure | None:
    """The figure behind :func:`plot_training_curves` (None when there is nothing to plot)."""
    curves = _curves(log_history, baseline)
    if not any(curves.values()):
        return None
    has_cider = bool(curves["eval_cider"] or curves["baseline_cider"] or curves["scst_reward"])
    has_loss = bool(curves["train_loss"] or curves["eval_loss"] or curves["baseline_loss"])
    panels = int(has_loss) + int(has_cider)
    figure = Figure(figsize=(FIGURE_WIDTH, 4.5), dpi=DPI, layout="constrained")
    axes = list(figure.subplots(1, panels, squeeze=False)[0])
    if has_loss:
        ax = axes.pop(0)
        _line(ax, curves["train_loss"], color=TRAIN_COLOUR, label="training")  # cross-entropy steps only
        _line(ax, curves["eval_loss"], color=EVAL_COLOUR, marker="o", label="validation")
        _baseline_point(ax, curves["baseline_loss"])
        _label(ax, "Loss", "cross-entropy")
    if has_cider:
        ax = axes.pop(0)
        _line(ax, curves["eval_cider"], color=CIDER_COLOUR, marker="o", label="validation")
        _annotate_best(ax, curves["eval_cider"])
        _baseline_point(ax, curves["baseline_cider"])
        if curves["scst_reward"]:
            _line(ax, curves["scst_reward"], color=TRAIN_COLOUR, label="SCST sample reward (training)")
            _mark_scst_start(figure.axes, ax, curves["scst_start"][0][0])
        ax.set_ylim(bottom=0)
        title = "CIDEr-D" if curves["scst_reward"] else "Validation CIDEr-D"
        _label(ax, title, "CIDEr-D (pycocoevalcap scale)", legend_loc="lower right")
    return figure


def _mark_scst_start(axes, labelled, step: int) -> None:
    """A dashed line on every panel where self-critical training began (its policy-gradient loss is not a
    cross-entropy, so the loss panel shows the cross-entropy steps only)."""
    for ax in axes:
        ax.axvline(step, color=BASELINE_COLOUR, ls="--", lw=1.5, label="SCST begins" if ax is labelled else None)


def _line(ax, points: list[tuple], **style) -> None:
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, lw=2, ms=6, **style)


def _annotate_best(ax, points: list[tuple]) -> None:
    """Mark the best validation score: the checkpoint kept when selecting by this metric."""
    if not points:
        return
    step, value = max(points, key=lambda point: point[1])
    ax.plot([step], [value], ls="none", marker="*", ms=16, color=CIDER_COLOUR, zorder=4)
    ax.annotate(
        f"best {value:.3g} (step {step})",
        (step, value),
        xytext=(0, -22),
        textcoords="offset points",
        ha="center",
        fontsize=12,
    )


def _baseline_point(ax, points: list[tuple]) -> None:
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(
            steps,
            values,
            ls="none",
            marker="s",
            ms=10,
            color=BASELINE_COLOUR,
            label="before fine-tuning",
            clip_on=False,
            zorder=3,
        )


def _label(ax, title: str, ylabel: str, legend_loc: str = "best") -> None:
    """Titles, labels, ticks and legend in sizes that stay legible at ~800 px wide."""
    ax.set_title(title, fontsize=15, fontweight="bold")
    ax.set_xlabel("step", fontsize=13)
    ax.set_ylabel(ylabel, fontsize=13)
    ax.tick_params(labelsize=12)
    ax.legend(fontsize=12, loc=legend_loc)
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.spines[["top", "right"]].set_visible(False)


def _curves(log_history: Sequence[Mapping], baseline: Mapping[str, float] | None) -> dict[str, list[tuple]]:
    curves: dict[str, list[tuple]] = {
        "train_loss": [],
        "eval_loss": [],
        "eval_cider": [],
        "baseline_loss": [],
        "baseline_cider": [],
        "scst_reward": [],
        "scst_start": [],
    }
    last_cross_entropy_step = 0
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        # An evaluation logged at step 0 is the model before training (an evaluate() before train()).
        prefix = "baseline" if step == 0 else "eval"
        if _finite(entry.get("scst_reward")):  # a self-critical step: its loss is a policy-gradient loss
            curves["scst_reward"].append((step, entry["scst_reward"]))
            if not curves["scst_start"]:
                curves["scst_start"] = [(last_cross_entropy_step, 0.0)]
        elif _finite(entry.get("loss")):
            curves["train_loss"].append((step, entry["loss"]))
            last_cross_entropy_step = step
        if _finite(entry.get("eval_loss")):
            curves[f"{prefix}_loss"].append((step, entry["eval_loss"]))
        if _finite(entry.get("eval_cider")):
            curves[f"{prefix}_cider"].append((step, entry["eval_cider"]))
    if baseline:
        if _finite(baseline.get("eval_loss")):
            curves["baseline_loss"] = [(0, baseline["eval_loss"])]
        if _finite(baseline.get("eval_cider")):
            curves["baseline_cider"] = [(0, baseline["eval_cider"])]
    return curves


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------------------
# Sample gallery
# --------------------------------------------------------------------------------------------------------------

IMAGE_HEIGHT = 1.75  # inches per gallery row for the image
CAPTION_FONT_SIZE = 10.5  # points; ~14 px tall once the Hub scales the 960 px figure to ~800 px
LINE_HEIGHT = CAPTION_FONT_SIZE * 1.3 / 72  # inches
MAX_LINES_PER_CAPTION = 6


def plot_samples(samples: Sequence[Sample], path: str | Path, columns: int = 4) -> Path | None:
    """A grid of test images, each with its fine-tuned caption, the caption before fine-tuning (when known) and one
    reference, as a PNG at ``path``. Returns None and writes nothing when ``samples`` is empty."""
    figure = build_samples_figure(samples, columns)
    if figure is None:
        return None
    return _save_atomic(figure, path)


def build_samples_figure(samples: Sequence[Sample], columns: int = 4) -> Figure | None:
    """The figure behind :func:`plot_samples`: one image axes per sample, its captions in the axes below it."""
    if not samples:
        return None
    if columns < 1:
        raise ValueError(f"columns {columns}: must be at least 1.")
    columns = min(columns, len(samples))
    rows = math.ceil(len(samples) / columns)
    panel_width = FIGURE_WIDTH / columns
    # DejaVu Sans averages ~0.57 em per character, ~0.62 em in bold; keep 5% of the column as a gutter.
    usable_points = 0.95 * panel_width * 72
    widths = {
        "regular": int(usable_points / (0.57 * CAPTION_FONT_SIZE)),
        "bold": int(usable_points / (0.62 * CAPTION_FONT_SIZE)),
    }
    blocks = [_caption_lines(sample, widths) for sample in samples]

    # Each row's text area is as tall as its longest caption block.
    text_heights = []
    for row in range(rows):
        row_blocks = blocks[row * columns : (row + 1) * columns]
        lines = max(sum(len(lines) for _label, lines, _style in block) for block in row_blocks)
        text_heights.append(lines * LINE_HEIGHT + 0.25)
    height_ratios = [h for text_height in text_heights for h in (IMAGE_HEIGHT, text_height)]
    figure = Figure(figsize=(FIGURE_WIDTH, sum(height_ratios) + 0.1), dpi=DPI)
    grid = figure.add_gridspec(
        2 * rows,
        columns,
        height_ratios=height_ratios,
        left=0.01,
        right=0.99,
        top=0.995,
        bottom=0.005,
        wspace=0.06,
        hspace=0.04,
    )
    image_pixels = (int(panel_width * DPI * 0.92), int(IMAGE_HEIGHT * DPI * 0.95))
    for index, (sample, block) in enumerate(zip(samples, blocks, strict=True)):
        row, column = divmod(index, columns)
        image_ax = figure.add_subplot(grid[2 * row, column])
        image_ax.imshow(_fit_image(sample.image, image_pixels), interpolation="nearest")
        image_ax.set_axis_off()
        text_ax = figure.add_subplot(grid[2 * row + 1, column])
        text_ax.set_axis_off()
        areas = [
            TextArea("\n".join(lines), textprops={"fontsize": CAPTION_FONT_SIZE, "linespacing": 1.15, **style})
            for _label, lines, style in block
        ]
        box = VPacker(children=areas, align="left", pad=0, sep=3)
        text_ax.add_artist(AnchoredOffsetbox(loc="upper left", child=box, frameon=False, pad=0.1, borderpad=0.1))
    return figure


def _caption_lines(sample: Sample, widths: Mapping[str, int]) -> list[tuple[str, list[str], dict]]:
    """(label, wrapped lines, text style) for the fine-tuned caption, the baseline and the reference."""
    block = [("Fine-tuned", sample.prediction, {"color": "black", "fontweight": "bold"})]
    if sample.baseline is not None:
        block.append(("Before", sample.baseline, {"color": BASELINE_COLOUR, "fontstyle": "italic"}))
    block.append(("Reference", sample.reference, {"color": REFERENCE_COLOUR}))
    wrapped = []
    for label, text, style in block:
        width = max(10, widths["bold" if style.get("fontweight") == "bold" else "regular"])
        # Control characters (an untrained model can generate them) have no glyph: shown as U+FFFD.
        text = "".join(c if c.isprintable() else "\ufffd" for c in " ".join(str(text).split())) or "(empty)"
        lines = textwrap.wrap(f"{label}: {text}", width=width, break_long_words=True) or [f"{label}:"]
        if len(lines) > MAX_LINES_PER_CAPTION:
            lines = lines[:MAX_LINES_PER_CAPTION]
            lines[-1] = lines[-1][: width - 1].rstrip() + "…"
        wrapped.append((label, lines, style))
    return wrapped


def _fit_image(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to fit ``box`` pixels: up by a whole factor with nearest-neighbour (tiny images stay crisp
    instead of blurring), down with Lanczos."""
    image = image.convert("RGB")
    scale = min(box[0] / image.width, box[1] / image.height)
    if scale >= 2:
        factor = int(scale)  # whole pixels: every source pixel becomes the same square block
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def build_samples(
    images: Sequence[Image.Image],
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    baselines: Sequence[str] | None = None,
    limit: int = 8,
) -> list[Sample]:
    """Gallery samples from parallel lists (e.g. the first test images, ``trainer.predict`` captions and the
    dataset's references); the first reference of each image is shown."""
    count = min(limit, len(predictions), len(references), len(images))
    samples = []
    for i in range(count):
        refs = references[i]
        reference = refs if isinstance(refs, str) else (refs[0] if refs else "")
        baseline = baselines[i] if baselines is not None and i < len(baselines) else None
        samples.append(Sample(image=images[i], prediction=predictions[i], reference=reference, baseline=baseline))
    return samples


def load_prediction_samples(
    predictions_path: str | Path,
    image_root: str | Path,
    baselines: Mapping[str, str] | None = None,
    limit: int = 8,
) -> list[Sample]:
    """Gallery samples from a run's ``predictions.jsonl``, opening each ``image`` under ``image_root``;
    ``baselines`` maps an image to its caption before fine-tuning. Images that cannot be opened are skipped."""
    from captioning.images import load_image

    samples = []
    path = Path(predictions_path)
    if not path.is_file():
        return samples
    for line in path.read_text(encoding="utf-8").splitlines():
        if len(samples) >= limit:
            break
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            image = load_image(Path(image_root) / row["image"])
        except (OSError, ValueError):
            continue
        references = row.get("references") or [""]
        samples.append(
            Sample(
                image=image,
                prediction=row["prediction"],
                reference=references[0],
                baseline=(baselines or {}).get(row["image"]),
            )
        )
    return samples


# --------------------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------------------


def _save_atomic(figure: Figure, path: str | Path) -> Path:
    """Render the PNG into a temporary file in the destination folder, then rename it over ``path``."""
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=DPI, facecolor="white")
    return Path(path)
