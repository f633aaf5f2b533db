"""Reruns never mix two runs: an earlier run moves to previous-runs/, run.json names the current run, and the final
model is swapped in as a whole set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from captioning import run_dir
from captioning.checkpoints import COMPLETE_MARKER, RUN_RECORD, checkpoint_run_id, read_run_id
from captioning.hub import files_to_push
from captioning.run_dir import (
    PREVIOUS_RUNS,
    SWAP_MANIFEST,
    finish_final_save,
    move_previous_run,
    prepare_output_dir,
    staging_dir,
    swap_in_final_model,
)
from run_captioning import main
from tests.conftest import tiny_run_argv

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> text)."""
    return {str(path.relative_to(folder)): path.read_text() for path in sorted(folder.rglob("*")) if path.is_file()}


def _earlier_run(output_dir: Path) -> dict[str, str]:
    files = {
        "adapter_model.safetensors": "old weights",
        "adapter_config.json": "{}",
        "eval_results.json": '{"eval_cider": 9.0}',
        "README.md": "old card",
        "checkpoint-40/adapter_model.safetensors": "old checkpoint",
        "checkpoint-40/" + COMPLETE_MARKER: '{"run_id": "old"}',
        "runs/events": "tensorboard",
        ".final-old/model.safetensors": "an unfinished final save",
    }
    for name, text in files.items():
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_text(text)
    return {name: text for name, text in files.items() if not name.startswith(".final-")}


# --- 1. --overwrite_output_dir moves the earlier run aside -----------------------------------------------------------


def test_overwrite_moves_everything_of_the_earlier_run_to_previous_runs(tmp_path):
    output = tmp_path / "out"
    (output / PREVIOUS_RUNS / "2020-01-01T00-00-00.000000Z").mkdir(parents=True)
    (output / PREVIOUS_RUNS / "2020-01-01T00-00-00.000000Z" / "eval_results.json").write_text("oldest")
    earlier = _earlier_run(output)

    run_id = prepare_output_dir(output, resume_from=None, overwrite=True)

    assert sorted(path.name for path in output.iterdir()) == [PREVIOUS_RUNS, RUN_RECORD]
    assert json.loads((output / RUN_RECORD).read_text()) == {"run_id": run_id}
    folders = sorted(path.name for path in (output / PREVIOUS_RUNS).iterdir())
    assert len(folders) == 2 and folders[0] == "2020-01-01T00-00-00.000000Z"
    moved = output / PREVIOUS_RUNS / folders[1]
    assert datetime.strptime(folders[1], "%Y-%m-%dT%H-%M-%S.%fZ")  # a UTC time stamp
    assert _tree(moved) == earlier  # the unfinished final save was discarded first, not moved
    # Nothing under previous-runs/ is ever pushed: only top-level files are.
    (output / "adapter_model.safetensors").write_text("new weights")
    assert files_to_push(output) == ["adapter_model.safetensors"]


def test_two_moves_in_the_same_microsecond_get_their_own_folders(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)

    monkeypatch.setattr(run_dir, "datetime", Frozen)
    (tmp_path / "first.json").write_text("1")
    first = move_previous_run(tmp_path)
    (tmp_path / "second.json").write_text("2")
    second = move_previous_run(tmp_path)
    assert (first.name, second.name) == ("2024-05-06T07-08-09.123456Z", "2024-05-06T07-08-09.123456Z-1")
    assert _tree(first) == {"first.json": "1"} and _tree(second) == {"second.json": "2"}
    assert move_previous_run(tmp_path) is None  # only previous-runs/ left: nothing to move


def test_a_move_cut_short_is_finished_into_the_same_folder(tmp_path, monkeypatch):
    for name in ("a.json", "b.json", "c.json"):
        (tmp_path / name).write_text(name)
    original = Path.rename
    calls = []

    def crash_on_second(self, target):
        calls.append(self.name)
        if len(calls) == 2:
            raise OSError("killed")
        return original(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        move_previous_run(tmp_path)
    monkeypatch.setattr(Path, "rename", original)
    folder = move_previous_run(tmp_path)
    assert [path.name for path in (tmp_path / PREVIOUS_RUNS).iterdir()] == [folder.name]
    assert _tree(folder) == {"a.json": "a.json", "b.json": "b.json", "c.json": "c.json"}


def test_resuming_moves_nothing_and_continues_the_checkpoints_run(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    earlier = _earlier_run(output)
    (output / RUN_RECORD).write_text('{"run_id": "old"}')

    run_id = prepare_output_dir(output, resume_from=str(output / "checkpoint-40"), overwrite=True)

    assert run_id == "old" and read_run_id(output) == "old"
    assert not (output / PREVIOUS_RUNS).exists()
    assert _tree(output) == {**earlier, RUN_RECORD: '{\n  "run_id": "old"\n}\n'}


def test_overwrite_never_moves_an_input_or_the_current_folder(tmp_path, monkeypatch):
    from captioning.arguments import CaptioningTrainingArguments
    from captioning.run_dir import start_run

    output = tmp_path / "out"
    (output / "model").mkdir(parents=True)
    training = CaptioningTrainingArguments(output_dir=str(output), overwrite_output_dir=True, report_to="none")
    with pytest.raises(ValueError, match="would move --model_name_or_path .*/out/model .*Give another --output_dir"):
        start_run(training, {"--model_name_or_path": str(output / "model"), "--train_file": None})
    monkeypatch.chdir(output / "model")
    with pytest.raises(ValueError, match="it holds the current folder.*--output_dir outputs/run"):
        start_run(training, {})
    assert [path.name for path in output.iterdir()] == ["model"]  # nothing moved
    training.resume_from_checkpoint = str(output / "model")  # resuming moves nothing: no check
    monkeypatch.chdir(tmp_path)
    (output / "model" / COMPLETE_MARKER).write_text('{"run_id": "kept"}')
    assert start_run(training, {"--model_name_or_path": str(output / "model")}) == "kept"


def test_each_fresh_run_gets_its_own_run_id(tmp_path):
    first = prepare_output_dir(tmp_path / "a", resume_from=None, overwrite=False)
    second = prepare_output_dir(tmp_path / "a", resume_from=None, overwrite=True)
    assert len(first) == len(second) == 32 and first != second
    assert read_run_id(tmp_path / "a") == second
    assert read_run_id(tmp_path / "a" / PREVIOUS_RUNS / os.listdir(tmp_path / "a" / PREVIOUS_RUNS)[0]) == first


_TWO_PROCESSES = """
import json, pathlib, sys, time
from captioning.arguments import CaptioningTrainingArguments
from captioning.distributed import end_processes
from captioning.run_dir import start_run
args = CaptioningTrainingArguments(output_dir=sys.argv[1], overwrite_output_dir=True, report_to="none")
time.sleep(2 * args.process_index)  # rank 1 is still checking output_dir when rank 0 gets to start_run
before = sorted(path.name for path in pathlib.Path(sys.argv[1]).iterdir())
run_id = start_run(args)
after = sorted(path.name for path in pathlib.Path(sys.argv[1]).iterdir())
result = {"run_id": run_id, "before": before, "after": after}
pathlib.Path(f"{sys.argv[1]}-rank{args.process_index}.json").write_text(json.dumps(result))
end_processes()
"""


@pytest.mark.slow
def test_two_processes_move_the_earlier_run_once_and_share_the_run_id(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    earlier = _earlier_run(output)
    script = tmp_path / "start.py"
    script.write_text(_TWO_PROCESSES)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(output)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"out-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["run_id"] == ranks[1]["run_id"] == read_run_id(output)
    top = sorted({name.split("/")[0] for name in earlier} | {".final-old"})
    assert ranks[0]["before"] == ranks[1]["before"] == top  # rank 0 waited for rank 1 to look before moving
    assert ranks[0]["after"] == ranks[1]["after"] == [PREVIOUS_RUNS, RUN_RECORD]  # rank 1 waited for the move
    (moved,) = (output / PREVIOUS_RUNS).iterdir()
    assert _tree(moved) == earlier


@pytest.mark.slow
def test_rerun_with_overwrite_keeps_nothing_of_the_earlier_run_at_the_top(tiny_blip, caption_folder, tmp_path):
    output = tmp_path / "out"
    flags = dict(eval_strategy="no", save_strategy="steps", save_steps=2, max_steps=4, save_total_limit=5)
    main(tiny_run_argv(tiny_blip, caption_folder, output, **flags))
    first_run = read_run_id(output)
    before = {path.name for path in output.iterdir()}
    assert {"predictions.jsonl", "predict_results.json", "samples.png", "checkpoint-2", "checkpoint-4"} <= before
    assert "split: test" in (output / "README.md").read_text()

    main(tiny_run_argv(tiny_blip, caption_folder, output, do_predict=False, overwrite_output_dir=True, **flags))

    second_run = read_run_id(output)
    assert second_run != first_run
    (moved,) = (output / PREVIOUS_RUNS).iterdir()
    assert {path.name for path in moved.iterdir()} == before
    assert read_run_id(moved) == first_run
    after = {path.name for path in output.iterdir()}
    assert not {"predictions.jsonl", "predict_results.json", "samples.png"} & after
    assert "split: test" not in (output / "README.md").read_text()  # the card shows no score of the earlier run
    assert [checkpoint_run_id(output / name) for name in ("checkpoint-2", "checkpoint-4")] == [second_run] * 2
    pushed = files_to_push(output)
    assert "adapter_model.safetensors" in pushed and "predict_results.json" not in pushed
    assert all("/" not in name and name in after for name in pushed)


# --- 3. the final model is swapped in as a whole set -----------------------------------------------------------------


def _model_files(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in folder.iterdir() if path.is_file() and path.name != "README.md"}


def _old_adapter_set(output: Path) -> dict[str, str]:
    output.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        (output / name).write_text(f"old {name}")
    return _model_files(output)


def _new_full_set(staging: Path) -> dict[str, str]:
    staging.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (staging / name).write_text(f"new {name}")
    return _model_files(staging)


def test_a_swap_replaces_the_set_and_removes_the_other_kind(tmp_path):
    old = _old_adapter_set(tmp_path)
    new = _new_full_set(staging_dir(tmp_path, "run"))
    assert old.keys() != new.keys()
    swap_in_final_model(staging_dir(tmp_path, "run"), tmp_path)
    assert _model_files(tmp_path) == new
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == []


def test_a_crash_before_the_commit_keeps_the_old_set(tmp_path, monkeypatch):
    old = _old_adapter_set(tmp_path)
    _new_full_set(staging_dir(tmp_path, "run"))
    monkeypatch.setattr(run_dir, "write_json", lambda path, data: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        swap_in_final_model(staging_dir(tmp_path, "run"), tmp_path)
    assert _model_files(tmp_path) == old
    finish_final_save(tmp_path)  # the next start discards the uncommitted staging folder
    assert _model_files(tmp_path) == old and not staging_dir(tmp_path, "run").exists()


def test_a_crash_after_the_commit_is_completed_by_the_next_start(tmp_path, monkeypatch):
    _old_adapter_set(tmp_path)
    new = _new_full_set(staging_dir(tmp_path, "run"))
    original = os.replace
    calls = []

    def crash_on_second(source, target):
        if not str(source).endswith(".tmp"):  # a staged file, not the manifest's temporary file
            calls.append(source)
            if len(calls) == 2:
                raise OSError("killed")
        return original(source, target)

    monkeypatch.setattr(run_dir.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        swap_in_final_model(staging_dir(tmp_path, "run"), tmp_path)
    monkeypatch.setattr(run_dir.os, "replace", original)
    assert (staging_dir(tmp_path, "run") / SWAP_MANIFEST).is_file()
    assert _model_files(tmp_path) == {"config.json": "new config.json", "tokenizer.json": "old tokenizer.json"}

    prepare_output_dir(tmp_path, resume_from=None, overwrite=False)

    assert _model_files(tmp_path) == {**new, RUN_RECORD: (tmp_path / RUN_RECORD).read_text()}
    assert not staging_dir(tmp_path, "run").exists()
