"""metrics/coco_caption, the `evaluate` module of the COCO caption metrics: loaded by path and offline, it returns
the keys and values of metrics.compute_metrics, and scores a run's predictions.jsonl as the run scored its test
split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import evaluate
import pytest

from metrics import compute_metrics
from run_captioning import main
from tests.conftest import tiny_run_argv
from tests.test_metrics import PREDICTIONS, REFERENCES

MODULE = str(Path(__file__).resolve().parents[1] / "metrics" / "coco_caption")


@pytest.fixture(scope="module")
def coco():
    return evaluate.load(MODULE)


@pytest.mark.parametrize(
    "use_meteor",
    [False, pytest.param(True, marks=pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java"))],
)
def test_the_module_returns_what_compute_metrics_returns(coco, use_meteor):
    expected = compute_metrics(PREDICTIONS, REFERENCES, use_meteor=use_meteor)
    assert coco.compute(predictions=PREDICTIONS, references=REFERENCES, use_meteor=use_meteor) == expected
    assert ("meteor" in expected) == use_meteor and expected["cider"] > 0


def test_a_runs_predictions_score_as_the_run_scored_its_test_split(coco, tiny_blip, caption_folder, tmp_path):
    """What the README shows: score predictions.jsonl with the module; the figures equal predict_results.json's."""
    output = tmp_path / "run"
    main(tiny_run_argv(tiny_blip, caption_folder, output, num_train_epochs=3, do_eval=False))
    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    scores = coco.compute(
        predictions=[row["prediction"] for row in rows],
        references=[row["references"] for row in rows],
        use_meteor=False,
    )
    run = json.loads((output / "predict_results.json").read_text())
    assert scores == {key: run[f"test_{key}"] for key in scores}
