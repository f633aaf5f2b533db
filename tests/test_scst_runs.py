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


@pytest.fixture(scope="module")
def stage_one(tiny_blip, tmp_path_factory):
    """A cross-entropy adapter on 10 images x 3 captions (8 for training), trained until it says real words."""
    root = tmp_path_factory.mktemp("scst")
    data = make_caption_folder(root / "data", num_images=10, captions_per_image=3)
    output = root / "xe"
    # No dropout: runs that must agree to the last bit (1 vs 2 processes, resumed) draw no dropout masks.
    flags = _flags(tiny_blip, data, output, num_train_epochs=12, learning_rate=2e-2, lora_dropout=0.0)
    flags["lora_target_modules"] = ["query", "key", "value", "dense"]
    main(to_argv(**flags))
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
    }
    for message, extra in cases.items():
        flags = _flags(adapter, data, tmp_path / "x", **{"training_objective": "scst", **extra})
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
    command = [sys.executable, str(ROOT / "run_captioning.py"), *to_argv(**_scst(stage_one, killed, **saving))]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-4" / COMPLETE_MARKER).is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint-4 in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()
    resumed = subprocess.run(
        [*command, "--resume_from_checkpoint", "latest"], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _adapters_equal(straight, killed)
