"""Real-size photos through the main job and the tools, with default flags, as a user runs them: a hang is a failure.

Each run is a fresh process with torch's default thread count (the test process itself runs torch on one thread,
which hides the deadlock these tests guard against), bounded by a timeout that kills its whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from captioning.arguments import to_argv

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = 96  # conftest's photo_folder: 76 train, 10 validation, 10 test images after the default 10 % / 10 % split
RUN_LIMIT_S = 300
TWO_PROCESSES = [
    sys.executable, "-m", "accelerate.commands.launch",
    "--config_file", "configs/accelerate/multi_gpu.yaml", "--num_processes", "2", "--mixed_precision", "no",
    "run_captioning.py",
]  # fmt: skip


def user_env() -> dict[str, str]:
    """A user's shell on a CPU machine: no thread limits, no GPU, no launcher variables."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def run_bounded(command: list[str], timeout: float = RUN_LIMIT_S) -> str:
    """Run ``command`` in its own process group; fail the test (and kill the group) when it exceeds ``timeout``
    seconds or exits non-zero. Returns its output."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the pool workers too, which a plain kill would orphan
        output, _ = process.communicate()
        pytest.fail(f"Hung: no exit after {timeout:.0f} s (process group killed).\n{output[-3000:]}")
    assert process.returncode == 0, output[-5000:]
    return output


def job_flags(model: Path, data: Path, output: Path) -> list[str]:
    """Train, evaluate and predict with every preprocessing flag at its default (scan, cache, workers)."""
    return to_argv(
        model_name_or_path=model,
        dataset_dir=data,
        output_dir=output,
        image_cache_dir=output.parent / f"{output.name}-image-cache",  # a cache of its own: built, never reused
        do_train=True,
        do_eval=True,
        do_predict=True,
        num_train_epochs=1,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        max_new_tokens=5,
        compute_meteor=False,
        report_to="none",
    )


def check_outputs(output: Path, log: str) -> None:
    assert "Preprocessed 76 train images once" in log and "Preprocessed 10 validation images once" in log
    # BLIP LoRA leaves the vision tower frozen: by default its features are computed once, then fed
    assert "Caching the image features of 76 train images" in log and "Image features cached" in log
    predictions = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 10 and all(row["image"].startswith("photo_") for row in predictions)
    assert all(len(row["references"]) == 3 for row in predictions)
    assert "eval_cider" in json.loads((output / "eval_results.json").read_text())
    report = json.loads((output / "data_report.json").read_text())
    assert report["splits"]["train"]["images_kept"] == 76


@pytest.mark.slow
@pytest.mark.timeout(RUN_LIMIT_S + 60)
def test_the_default_run_finishes_on_real_photos(tiny_blip, photo_folder, tmp_path):
    output = tmp_path / "run"
    log = run_bounded([sys.executable, "run_captioning.py", *job_flags(tiny_blip, photo_folder, output)])
    check_outputs(output, log)


PREPROCESS_AFTER_TORCH = """
import sys, torch, datasets
from captioning.image_cache import build_image_cache
from captioning.tiny_models import tiny_image_processor
torch.set_num_threads(2)
torch.nn.functional.interpolate(torch.rand(1, 3, 1200, 1600), size=(384, 384), mode="bilinear")  # starts the pool
paths = sorted(str(p) for p in __import__("pathlib").Path(sys.argv[1]).glob("photo_*"))
split = datasets.Dataset.from_dict({"image": paths})
cache = build_image_cache(split, tiny_image_processor(64), root=sys.argv[2], num_workers=2, show_progress=False)
print("cached", len(cache))
"""


@pytest.mark.timeout(120)
def test_parallel_preprocessing_after_torch_ran_in_the_parent(photo_folder, tmp_path):
    output = run_bounded([sys.executable, "-c", PREPROCESS_AFTER_TORCH, str(photo_folder), str(tmp_path)], 90)
    assert f"cached {PHOTOS}" in output


@pytest.mark.timeout(180)
def test_caption_images_with_default_workers_on_real_photos(tiny_blip, photo_folder, tmp_path):
    output = tmp_path / "captions.jsonl"
    command = [sys.executable, "caption_images.py", "--model", str(tiny_blip), "--images", str(photo_folder)]
    run_bounded([*command, "--output", str(output), "--max_new_tokens", "4"], 150)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == PHOTOS and {Path(row["image"]).name for row in rows} == {
        path.name for path in photo_folder.glob("photo_*")
    }


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_LIMIT_S + 60)
def test_qwen_and_then_scst_finish_on_real_photos_in_two_processes(tiny_qwen2_5_vl, photo_folder, tmp_path):
    """Dynamic resolution on real photos (each image its own size and token count, no fixed-size pixel cache but
    cached image features of different lengths, prompts of different lengths left-padded and gathered across 2
    processes), then self-critical training from that run, also on 2 processes: both finish under the bound."""
    xe = tmp_path / "xe"
    log = run_bounded(
        [*TWO_PROCESSES, *job_flags(tiny_qwen2_5_vl, photo_folder, xe), "--max_pixels", str(64 * 28 * 28)]
    )
    assert "no preprocessing cache" in log
    # Frozen vision: each photo's merger output (its own number of tokens) cached once, opened by both processes
    assert "Caching the image features of 76 train images" in log and "Image features cached" in log
    predictions = [json.loads(line) for line in (xe / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 10 and "eval_cider" in json.loads((xe / "eval_results.json").read_text())
    scst = tmp_path / "scst"
    flags = job_flags(xe, photo_folder, scst) + [
        "--training_objective", "scst", "--scst_samples", "3", "--max_steps", "3", "--logging_steps", "1",
        "--per_device_train_batch_size", "4", "--do_predict", "false",
    ]  # fmt: skip
    run_bounded([*TWO_PROCESSES, *flags])
    history = json.loads((scst / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "scst_reward" in entry] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.timeout(RUN_LIMIT_S + 60)
def test_both_stages_and_augmentation_finish_on_real_photos_in_two_processes(tiny_blip, photo_folder, tmp_path):
    """2 processes, real photos, one command with every preprocessing flag at its default: cross-entropy on cached
    image features (built by the main process, opened by the other), then --scst_epochs 1 on pixels, evaluation and
    predictions; then an augmented run (random crops at full resolution, no training cache). Both finish under the
    bound."""
    both = tmp_path / "both"
    stages = ["--scst_epochs", "1", "--scst_samples", "3", "--logging_steps", "1"]
    flags = job_flags(tiny_blip, photo_folder, both) + stages
    log = run_bounded([*TWO_PROCESSES, *flags])
    check_outputs(both, log)
    assert "Image features cached" in log and "Stage 2: self-critical training" in log
    history = json.loads((both / "trainer_state.json").read_text())["log_history"]
    assert any("scst_reward" in entry for entry in history)
    assert (both / "stage1_xe" / "adapter_model.safetensors").is_file() and (
        both / "adapter_model.safetensors"
    ).is_file()
    augmented = tmp_path / "augmented"
    log = run_bounded([*TWO_PROCESSES, *job_flags(tiny_blip, photo_folder, augmented), "--image_augmentation", "lavis"])
    assert "training images are decoded every epoch" in log and "--image_augmentation lavis changes the images" in log
    assert len(json.loads((augmented / "predictions.jsonl").read_text().splitlines()[0])["references"]) == 3
