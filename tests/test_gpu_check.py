"""benchmarks/gpu_check.sh, the one-script GPU check: its CPU smoke run (--quick) measures every path and ends with
the JSON line; without a GPU and without --quick it refuses and points to --quick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
QUICK_TIMEOUT_S = 180  # ~30 s on 2 cores; past this it hangs, and a hang is a failure
MODES = ("seed_style", "grouped", "feature_cache")
EVAL_SIDES = ("ours", "feature_cache", "stock_per_row")


def run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``sh gpu_check.sh ARGS`` in its own process group, killed whole (DataLoader and pool workers included) when
    it runs past ``timeout``."""
    process = subprocess.Popen(
        ["sh", str(SCRIPT), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"gpu_check.sh {' '.join(args)} ran past {timeout} s and was killed; stderr:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_quick_run_measures_every_path_and_ends_with_the_json_line(tmp_path):
    json_out = tmp_path / "gpu_check.json"
    # One torch thread: on a shared 2-core machine two threads wait on each other (the smoke run takes 2x longer).
    args = ["--quick", "--threads", "1", "--json_out", str(json_out), "--workdir", str(tmp_path)]
    done = run_script(args, QUICK_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(json_out.read_text()) == result
    assert result["benchmark"] == "gpu_check"
    assert result["settings"]["quick"] is True and result["skipped"] == [] and result["errors"] == {}
    for mode in MODES:
        assert result[f"samples_per_s_{mode}"] > 0, mode
        assert result[f"seed004_s_{mode}"] > 0, mode
        assert result[f"estimate_seed004_s_{mode}"] > 0, mode
        assert result[f"median_step_s_{mode}"] > 0, mode
    for side in EVAL_SIDES:
        assert result[f"eval_images_per_s_{side}"] > 0, side
    parts = result["seed004_parts_s"]
    assert set(parts) == set(MODES)
    assert parts["feature_cache"]["feature_pass_s"] > 0 and "feature_pass_s" not in parts["grouped"]
    assert result["feature_cache_speedup"] > 0 and result["speedup_vs_seed_style"] > 0
    # The store holds the tiny vision tower's output: (64 / 16)^2 + 1 tokens x 64 wide, in the run's precision.
    value_bytes = 2 if result["settings"]["precision"] == "bf16" else 4
    assert result["feature_cache_bytes_per_image"] == 17 * 64 * value_bytes
    assert result["feature_cache_bytes"] == result["settings"]["images"] * 17 * 64 * value_bytes
    for stage in ("generate", "preprocess", "feature_cache_build"):  # the one-time passes, timed apart
        assert result[f"{stage}_ms_per_image"] > 0, stage
    assert result["settings"]["images"] == 40 and result["settings"]["jpeg_kib_per_image"] > 10
    if not torch.cuda.is_available():
        assert result["peak_gpu_mb"] is None
    assert "[gpu_check" in done.stderr and "feature cache of 40 images built" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the full check would run")
def test_without_a_gpu_the_full_check_refuses_and_points_to_quick(tmp_path):
    done = run_script(["--workdir", str(tmp_path)], 120)
    assert done.returncode != 0
    assert "needs a CUDA GPU" in done.stderr and "--quick" in done.stderr
    assert done.stdout.strip() == ""
    assert list(tmp_path.iterdir()) == []  # refused before writing anything
