"""A run killed with SIGKILL after its first checkpoint and resumed ends where an uninterrupted run ends."""

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

from captioning.arguments import to_argv
from captioning.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint, resolve_resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


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


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    for step, complete in ((5, True), (10, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_text("x")
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-5")
    with pytest.raises(ValueError, match="not saved completely"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-10"), tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume_checkpoint("latest", tmp_path / "empty")
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path)
