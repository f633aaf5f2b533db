"""A run killed with SIGKILL after its first checkpoint and resumed ends where an uninterrupted run ends; resuming and
rotating only ever touch the checkpoints of the run being continued."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioning.arguments import to_argv
from captioning.checkpoints import (
    COMPLETE_MARKER,
    RUN_RECORD,
    MarkCompleteCheckpoints,
    checkpoint_run_id,
    latest_complete_checkpoint,
    read_run_id,
    resolve_resume_checkpoint,
    rotate_run_checkpoints,
)
from run_captioning import main
from tests.conftest import tiny_run_argv

ROOT = Path(__file__).resolve().parents[1]


def _command(model, data, output, **extra) -> list[str]:
    flags = dict(
        model_name_or_path=model,
        dataset_dir=data,
        output_dir=output,
        do_train=True,
        do_eval=True,
        validation_split_percentage=25,
        test_split_percentage=0,
        max_steps=120,
        learning_rate=5e-3,
        per_device_train_batch_size=4,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=10,
        save_total_limit=2,
        dataloader_num_workers=0,
        compute_meteor=False,
        max_new_tokens=5,
        seed=3,
    )
    flags.update(extra)
    return [sys.executable, str(ROOT / "run_captioning.py"), *to_argv(**flags)]


def _env():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_kill_after_first_checkpoint_then_resume_matches_uninterrupted(tiny_blip, caption_folder, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_command(tiny_blip, caption_folder, straight), env=_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _command(tiny_blip, caption_folder, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (killed / "checkpoint-10" / COMPLETE_MARKER).is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()  # it really died mid-run

    resumed = subprocess.run(
        _command(tiny_blip, caption_folder, killed, resume_from_checkpoint="latest"),
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr

    expected = load_file(straight / "adapter_model.safetensors")
    actual = load_file(killed / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    straight_eval = json.loads((straight / "eval_results.json").read_text())
    resumed_eval = json.loads((killed / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_bleu_4", "eval_cider", "eval_rouge_l"):
        assert resumed_eval[key] == pytest.approx(straight_eval[key], rel=1e-5, abs=1e-7)

    # LoRA checkpoints hold the adapter, not the full model, and save_total_limit=2 is honoured.
    checkpoints = sorted(path.name for path in killed.glob("checkpoint-*"))
    assert len(checkpoints) == 2
    for name in checkpoints:
        assert (killed / name / "adapter_model.safetensors").is_file()
        assert not (killed / name / "model.safetensors").exists()


def _checkpoint(output_dir: Path, step: int, run_id: str | None) -> Path:
    """A checkpoint folder; complete (with its marker) when ``run_id`` is given."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_text("x")
    if run_id is not None:
        (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": step, "run_id": run_id}))
    return folder


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    (tmp_path / RUN_RECORD).write_text('{"run_id": "this"}')
    _checkpoint(tmp_path, 5, "this")
    _checkpoint(tmp_path, 10, None)
    assert latest_complete_checkpoint(tmp_path, "this") == tmp_path / "checkpoint-5"
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-5")
    with pytest.raises(ValueError, match="not saved completely"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-10"), tmp_path)
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path)


def test_latest_resumes_the_recorded_run_never_a_higher_checkpoint_of_another(tmp_path):
    (tmp_path / RUN_RECORD).write_text('{"run_id": "this"}')
    _checkpoint(tmp_path, 10, "this")
    _checkpoint(tmp_path, 20, "this")
    _checkpoint(tmp_path, 30, None)  # this run, killed while saving
    _checkpoint(tmp_path, 500, "other")  # left by another run, or copied in
    _checkpoint(tmp_path, 40, "other")
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-20")
    (tmp_path / RUN_RECORD).write_text('{"run_id": "other"}')
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-500")


def test_latest_needs_the_run_record_and_a_checkpoint_of_that_run(tmp_path):
    _checkpoint(tmp_path, 10, "this")
    with pytest.raises(ValueError, match=f"has no {RUN_RECORD}.*--resume_from_checkpoint <output_dir>/checkpoint-N"):
        resolve_resume_checkpoint("latest", tmp_path)
    (tmp_path / RUN_RECORD).write_text('{"run_id": "another"}')
    with pytest.raises(ValueError, match="no complete checkpoint of run another"):
        resolve_resume_checkpoint("latest", tmp_path)


def test_the_marker_records_the_step_and_the_run(tmp_path):
    (tmp_path / "checkpoint-7").mkdir()
    args, state = type("Args", (), {"output_dir": str(tmp_path)}), type("State", (), {})()
    state.global_step, state.is_world_process_zero = 7, True
    MarkCompleteCheckpoints("abc").on_save(args, state, control=None)
    assert json.loads((tmp_path / "checkpoint-7" / COMPLETE_MARKER).read_text()) == {"global_step": 7, "run_id": "abc"}
    assert checkpoint_run_id(tmp_path / "checkpoint-7") == "abc"


def test_rotation_deletes_only_this_runs_oldest_checkpoints_and_keeps_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        _checkpoint(tmp_path, step, "this")
    _checkpoint(tmp_path, 9, "other")
    _checkpoint(tmp_path, 7, None)  # incomplete, of no known run
    newest = _checkpoint(tmp_path, 5, None)  # being saved: not marked yet
    deleted = rotate_run_checkpoints(tmp_path, "this", 2, newest=newest, best=str(tmp_path / "checkpoint-2"))
    assert [path.name for path in deleted] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "checkpoint-2",
        "checkpoint-5",
        "checkpoint-7",
        "checkpoint-9",
    ]
    # --save_total_limit 1 at the end of training: only the best of this run stays.
    rotate_run_checkpoints(tmp_path, "this", 1, newest=tmp_path / "checkpoint-2", best=str(tmp_path / "checkpoint-2"))
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "checkpoint-2",
        "checkpoint-5",
        "checkpoint-7",
        "checkpoint-9",
    ]
    (newest / COMPLETE_MARKER).write_text('{"run_id": "this"}')
    rotate_run_checkpoints(tmp_path, "this", 1, newest=tmp_path / "checkpoint-2", best=str(tmp_path / "checkpoint-2"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-7", "checkpoint-9"]
    assert rotate_run_checkpoints(tmp_path, "this", None, newest=newest) == []


@pytest.mark.slow
def test_resumed_run_continues_its_own_checkpoint_and_keeps_a_foreign_one(tiny_blip, caption_folder, tmp_path):
    output = tmp_path / "out"
    flags = dict(eval_strategy="no", save_strategy="steps", save_steps=1, save_total_limit=2, do_predict=False)
    main(tiny_run_argv(tiny_blip, caption_folder, output, max_steps=4, **flags))
    run_id = read_run_id(output)
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    foreign = output / "checkpoint-100"  # another run's checkpoint with a higher step, copied in
    shutil.copytree(output / "checkpoint-4", foreign)
    (foreign / COMPLETE_MARKER).write_text(json.dumps({"global_step": 100, "run_id": "another"}))

    main(tiny_run_argv(tiny_blip, caption_folder, output, max_steps=6, resume_from_checkpoint="latest", **flags))

    # Resumed from checkpoint-4 (from checkpoint-100 there would be no step left to train and nothing to save).
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 6
    assert read_run_id(output) == run_id
    assert sorted(path.name for path in output.glob("checkpoint-*")) == [
        "checkpoint-100",
        "checkpoint-5",
        "checkpoint-6",
    ]
    assert [checkpoint_run_id(output / f"checkpoint-{step}") for step in (5, 6, 100)] == [run_id, run_id, "another"]
