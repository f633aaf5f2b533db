"""captioning/stages.py: which stage a two-stage run (--scst_epochs) resumes, each stage's arguments, and one step
axis for both stages' logs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from captioning.checkpoints import COMPLETE_MARKER, write_run_record
from captioning.outputs import write_json
from captioning.stages import joined_log_history, resolve_stage_resume, stage_arguments


def _checkpoint(folder, step: int, run_id: str = "run-a", complete: bool = True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        write_json(path / COMPLETE_MARKER, {"global_step": step, "run_id": run_id})
    return path


def test_latest_resumes_stage_two_when_it_saved_else_stage_one(tmp_path):
    write_run_record(tmp_path, "run-a")
    stage1 = tmp_path / "stage1_xe"
    assert resolve_stage_resume(None, tmp_path) == (1, None)
    _checkpoint(stage1, 4)
    _checkpoint(stage1, 6, complete=False)  # killed while saving: not trusted
    _checkpoint(stage1, 8, run_id="run-b")  # another run's
    _checkpoint(tmp_path, 9, run_id="run-b")
    assert resolve_stage_resume("latest", tmp_path) == (1, str(stage1 / "checkpoint-4"))
    _checkpoint(tmp_path, 2)
    assert resolve_stage_resume("latest", tmp_path) == (2, str(tmp_path / "checkpoint-2"))


def test_a_folder_given_by_path_belongs_to_the_stage_it_lies_in(tmp_path):
    first, second = _checkpoint(tmp_path / "stage1_xe", 4), _checkpoint(tmp_path, 2)
    assert resolve_stage_resume(str(first), tmp_path) == (1, str(first))
    assert resolve_stage_resume(str(second), tmp_path) == (2, str(second))


def test_latest_without_any_checkpoint_says_so(tmp_path):
    write_run_record(tmp_path, "run-a")
    with pytest.raises(ValueError, match="no complete checkpoint of run run-a"):
        resolve_stage_resume("latest", tmp_path)


def test_stage_arguments():
    training = SimpleNamespace(output_dir="out", num_train_epochs=3, learning_rate=2e-3, resume_from_checkpoint="x")
    caption = SimpleNamespace(scst_epochs=2, scst_learning_rate=None)
    first = stage_arguments(training, caption, 1, None)
    assert (first.output_dir, first.num_train_epochs, first.learning_rate) == ("out/stage1_xe", 3, 2e-3)
    assert first.resume_from_checkpoint is None and training.resume_from_checkpoint == "x"  # a copy
    second = stage_arguments(training, caption, 2, "out/checkpoint-2")
    assert (second.output_dir, second.num_train_epochs, second.learning_rate) == ("out", 2, pytest.approx(2e-4))
    assert second.resume_from_checkpoint == "out/checkpoint-2"
    caption.scst_learning_rate = 5e-5
    assert stage_arguments(training, caption, 2, None).learning_rate == 5e-5


def test_stage_two_logs_continue_stage_one_step_axis():
    first = [{"loss": 2.0, "step": 5}, {"eval_cider": 0.5, "step": 10}, {"train_runtime": 3.0, "step": 10}]
    second = [{"loss": -0.1, "scst_reward": 1.0, "step": 2}, {"eval_cider": 0.7, "step": 4}, {"note": "no step"}]
    joined = joined_log_history(first, second)
    assert joined[:3] == first
    assert [entry.get("step") for entry in joined[3:]] == [12, 14, None]
    assert joined_log_history([], second) == second
