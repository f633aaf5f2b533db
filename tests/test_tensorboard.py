"""--report_to tensorboard: event files under <output_dir>/runs/ carry the training loss, the learning rate and every
evaluation metric, with the --eval_baseline evaluation at step 0, as trainer_state.json and baseline_results.json
record them. Read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from run_captioning import main
from tests.conftest import tiny_run_argv

METRICS = ("cider", "bleu_4", "meteor", "rouge_l", "loss")


def read_scalars(runs) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under ``runs``: tag -> [(step, value)] in the order written."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(runs.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in events.Scalars(tag))
    return scalars


@pytest.mark.skipif(shutil.which("java") is None, reason="needs `java` on PATH (METEOR)")
def test_event_files_hold_the_losses_the_learning_rate_and_every_metric_from_the_baseline_on(
    tiny_blip, caption_folder, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    output = tmp_path / "out"
    flags = dict(report_to="tensorboard", eval_baseline=True, num_train_epochs=2, logging_steps=1, do_predict=False)
    main(tiny_run_argv(tiny_blip, caption_folder, output, compute_meteor=True, **flags))
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    scalars = read_scalars(output / "runs")

    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    assert [step for step, _ in scalars["train/loss"]] == [entry["step"] for entry in steps]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx([entry["loss"] for entry in steps])
    assert [value for _, value in scalars["train/learning_rate"]] == pytest.approx(
        [entry["learning_rate"] for entry in steps]
    )

    baseline = json.loads((output / "baseline_results.json").read_text())
    evaluations = [entry for entry in history if "eval_cider" in entry]
    final = json.loads((output / "eval_results.json").read_text())
    assert len(evaluations) == 2  # one per epoch
    for name in METRICS:
        written = scalars[f"eval/{name}"]
        # the baseline at step 0, each epoch's evaluation, then the final model's (the best checkpoint's)
        expected = [(0, baseline[f"eval_{name}"])]
        expected += [(entry["step"], entry[f"eval_{name}"]) for entry in evaluations]
        expected += [(evaluations[-1]["step"], final[f"eval_{name}"])]
        assert [step for step, _ in written] == [step for step, _ in expected], name
        assert [value for _, value in written] == pytest.approx([value for _, value in expected], rel=1e-6), name
