"""Self-critical training end to end (--training_objective scst, captioning/scst.py): a second stage from a
cross-entropy adapter that logs its rewards, plots them and says so on the card; 2 processes make the updates of
one; a run killed after a checkpoint and resumed ends with the adapter of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioning.arguments import parse_args, to_argv, validate_args
from captioning.checkpoints import COMPLETE_MARKER
from run_captioning import main
from tests.conftest import make_caption_folder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _flags(model, data, output, **extra) -> dict:
    flags = dict(
        model_name_or_path=model,
        dataset_dir=data,
        output_dir=output,
        do_train=True,
        do_eval=True,
        validation_split_percentage=20,
        test_split_percentage=0,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        eval_strategy="no",
        save_strategy="no",
        dataloader_num_workers=0,
        compute_meteor=False,
        num_beams=1,
        max_new_tokens=6,
        seed=5,
        report_to="none",
    )
    flags.update(extra)
    return flags


# No dropout: runs that must agree to the last bit (1 vs 2 processes, resumed) draw no dropout masks.
STAGE_ONE = dict(
    num_train_epochs=12, learning_rate=2e-2, lora_dropout=0.0, lora_target_modules=["query", "key", "value", "dense"]
)


@pytest.fixture(scope="module")
def stage_one(tiny_blip, tmp_path_factory):
    """A cross-entropy adapter on 10 images x 3 captions (8 for training), trained until it says real words."""
    root = tmp_path_factory.mktemp("scst")
    data = make_caption_folder(root / "data", num_images=10, captions_per_image=3)
    output = root / "xe"
    main(to_argv(**_flags(tiny_blip, data, output, **STAGE_ONE)))
    return data, output


def _scst(stage_one, output, **extra) -> dict:
    data, adapter = stage_one
    return _flags(
        adapter,
        data,
        output,
        training_objective="scst",
        scst_samples=3,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        **{"max_steps": 4, **extra},
    )


def test_scst_continues_the_adapter_logs_rewards_plots_them_and_names_the_objective(stage_one, tmp_path):
    output = tmp_path / "scst"
    results = main(to_argv(**_scst(stage_one, output, logging_steps=1, eval_baseline=True)))
    assert "eval_cider" in results["eval"] and "eval_cider" in results["baseline"]
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "scst_reward" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4]
    for entry in steps:
        assert {"scst_baseline", "scst_advantage_std", "scst_sample_length", "loss"} <= entry.keys()
        assert entry["scst_baseline"] == pytest.approx(entry["scst_reward"], abs=1e-4)  # mean-of-others baseline
        assert 0 < entry["scst_sample_length"] <= 6
    assert any(entry["scst_reward"] > 0 for entry in steps)  # stage 1 taught words the references share
    before = load_file(stage_one[1] / "adapter_model.safetensors")
    after = load_file(output / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[key], after[key]) for key in before)
    assert (output / "training_curves.png").is_file()
    card = (output / "README.md").read_text()
    assert "self-critical sequence training" in card and "3 captions sampled" in card
    assert str(stage_one[1]) not in card  # the local stage 1 folder is not named


def test_scst_flags_are_checked_before_anything_loads(stage_one, tmp_path):
    data, adapter = stage_one
    cases = {
        "--scst_samples 1: the mean baseline needs at least 2": dict(scst_samples=1),
        "--scst_baseline 'best': choose mean or greedy": dict(scst_baseline="best"),
        "--training_objective 'rl': choose xe or scst": dict(training_objective="rl"),
        "--scst_bleu_weight -1.0: must be 0 or more": dict(scst_bleu_weight=-1.0),
        "--training_objective scst does not support --image_splitting yet": dict(image_splitting=True),
        "--scst_epochs runs SCST after cross-entropy epochs": dict(scst_epochs=1),
    }
    both_stages = {
        "--scst_epochs -1.0: must be 0": dict(scst_epochs=-1),
        "--scst_learning_rate is the learning rate of the --scst_epochs stage": dict(scst_learning_rate=1e-4),
        "--scst_learning_rate -0.1: must be above 0": dict(scst_epochs=1, scst_learning_rate=-0.1),
        "--max_steps 5 with --scst_epochs": dict(scst_epochs=1, max_steps=5),
        "--scst_epochs does not support --image_splitting yet": dict(scst_epochs=1, image_splitting=True),
        "--scst_epochs trains: add --do_train": dict(scst_epochs=1, do_train=False),
    }
    for message, extra in [*cases.items(), *both_stages.items()]:
        objective = "scst" if message in cases else "xe"
        flags = _flags(adapter, data, tmp_path / "x", **{"training_objective": objective, **extra})
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate_args(*parse_args(to_argv(**flags)))


def _env():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    return env


def _adapters_equal(left: Path, right: Path) -> None:
    expected, actual = load_file(left / "adapter_model.safetensors"), load_file(right / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_two_processes_make_the_updates_of_one(stage_one, tmp_path):
    """Samples are drawn per (seed, step, image, sample): 2 processes x 2 images a step sample, reward and update
    as 1 process x 4 images (DDP averages the two halves' mean losses), and log the rewards of all 4 images."""
    one, two = tmp_path / "one", tmp_path / "two"
    main(to_argv(**_scst(stage_one, one, logging_steps=1)))
    flags = to_argv(**_scst(stage_one, two, per_device_train_batch_size=2, logging_steps=1))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "multi_gpu.yaml"), "--num_processes", "2", "--mixed_precision",
              "no", str(ROOT / "run_captioning.py")]  # fmt: skip
    result = subprocess.run(launch + flags, env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    _adapters_equal(one, two)
    rewards = [
        [entry["scst_reward"] for entry in json.loads((run / "trainer_state.json").read_text())["log_history"]
         if "scst_reward" in entry]
        for run in (one, two)
    ]  # fmt: skip
    assert len(rewards[0]) == 4 and rewards[0] == pytest.approx(rewards[1], abs=1e-4)  # both processes' samples


def test_resumed_after_a_kill_ends_with_the_adapter_of_an_uninterrupted_run(stage_one, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    saving = dict(max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=2)
    main(to_argv(**_scst(stage_one, straight, **saving)))
    _kill_then_resume(to_argv(**_scst(stage_one, killed, **saving)), killed / "checkpoint-4", killed)
    _adapters_equal(straight, killed)


def _kill_then_resume(flags: list[str], checkpoint: Path, output: Path) -> None:
    """Run the job in a subprocess, SIGKILL it once ``checkpoint`` is complete, then rerun it with
    --resume_from_checkpoint latest to the end."""
    command = [sys.executable, str(ROOT / "run_captioning.py"), *flags]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (checkpoint / COMPLETE_MARKER).is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, f"no {checkpoint} in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (output / "adapter_model.safetensors").exists()
    resumed = subprocess.run(
        [*command, "--resume_from_checkpoint", "latest"], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


# --- both stages in one command (--scst_epochs) -------------------------------------------------------------------

BOTH_STAGES = dict(scst_epochs=2, scst_learning_rate=5e-3, scst_samples=3)


def test_one_command_runs_both_stages_as_two_commands_do(stage_one, tiny_blip, tmp_path):
    """--scst_epochs: stage 1 in <output_dir>/stage1_xe is the cross-entropy run itself, and stage 2, continuing in
    memory, ends with the adapter of an SCST run started from stage 1's saved output (same scheduler, rate and
    epochs); the card tells both stages, the plot and the logs hold both."""
    data, stage_one_output = stage_one
    second = tmp_path / "second"
    main(
        to_argv(
            **_flags(
                stage_one_output, data, second, training_objective="scst", scst_samples=3, num_train_epochs=2,
                learning_rate=5e-3,
            )
        )
    )  # fmt: skip
    both = tmp_path / "both"
    flags = _flags(tiny_blip, data, both, **STAGE_ONE, **BOTH_STAGES, logging_steps=1, eval_baseline=True)
    results = main(to_argv(**flags))
    _adapters_equal(stage_one_output, both / "stage1_xe")
    _adapters_equal(second, both)
    stage1_eval = json.loads((both / "stage1_xe" / "eval_results.json").read_text())
    assert results["stage1_eval"]["eval_cider"] == stage1_eval["eval_cider"]
    assert results["eval"]["eval_cider"] == json.loads((both / "eval_results.json").read_text())["eval_cider"]
    history = json.loads((both / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "scst_reward" in entry] == [1, 2, 3, 4]
    baseline = json.loads((both / "baseline_results.json").read_text())
    assert baseline["eval_cider"] == results["baseline"]["eval_cider"]
    card = (both / "README.md").read_text()
    assert f"| {baseline['eval_cider']:.4f} |" in card  # the model before stage 1, in the results table
    assert "Two stages in this one run" in card and "12 epochs of cross-entropy at learning rate 0.02" in card
    assert f"ending at validation CIDEr-D {stage1_eval['eval_cider']:.4f}" in card
    assert "2 epochs of self-critical sequence training at learning rate 0.005" in card
    assert (both / "training_curves.png").is_file()


@pytest.mark.parametrize("stage", [1, 2])
def test_both_stages_resumed_after_a_kill_end_as_one_uninterrupted_run(stage_one, tiny_blip, tmp_path, stage):
    """Killed after a checkpoint of stage 1 (stage1_xe/checkpoint-4) or of stage 2 (checkpoint-2), then run again
    with --resume_from_checkpoint latest: the same final adapter as the run never stopped."""
    data, _ = stage_one
    saving = dict(save_strategy="steps", save_steps=2, save_total_limit=2)
    flags = {**STAGE_ONE, **BOTH_STAGES, "num_train_epochs": 4, **saving}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main(to_argv(**_flags(tiny_blip, data, straight, **flags)))
    checkpoint = killed / "stage1_xe" / "checkpoint-4" if stage == 1 else killed / "checkpoint-2"
    _kill_then_resume(to_argv(**_flags(tiny_blip, data, killed, **flags)), checkpoint, killed)
    _adapters_equal(straight / "stage1_xe", killed / "stage1_xe")
    _adapters_equal(straight, killed)
