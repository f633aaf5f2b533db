"""Sharded engines on CPU processes: configs/accelerate/fsdp.yaml (FSDP2), deepspeed_zero2.yaml and
deepspeed_zero3.yaml as users launch them, with the command-line overrides a CPU needs (2 processes, no bf16), on the
tiny BLIP and real-size photos. Full fine-tuning (vision tower frozen) and LoRA train, save checkpoints, resume from
one, and evaluate (generation with synced processes); each run ends where plain DDP (multi_gpu.yaml) ends on the same
steps: metrics within 1e-4, and saved weights with the keys and shapes that a one-process load expects (ZeRO-3 LoRA:
see its test). The DeepSpeed tests are skipped, saying why, where deepspeed is not installed (requirements-dev.txt
installs it)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import BlipForConditionalGeneration

from tests.photos import write_photo_folder
from tests.test_distributed import _env, _flags

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
RUN_LIMIT_S = 600
METRICS = ("bleu_1", "bleu_4", "rouge_l", "cider", "loss")
STEPS_PER_EPOCH = 4  # 9 training images x 3 captions = 27 rows; 2 processes x 4 rows a step
FULL = dict(
    do_train=True,
    do_eval=True,
    eval_strategy="no",
    save_strategy="no",
    use_lora=False,
    freeze_vision_tower=True,
    num_train_epochs=2,
    learning_rate=1e-3,
)
LORA = dict(
    do_train=True,
    do_eval=True,
    eval_strategy="no",
    save_strategy="epoch",
    learning_rate=1e-2,
    lora_target_modules=["query", "key", "value", "dense"],
)

pytestmark = pytest.mark.slow
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install deepspeed)"
)


def launch(config: str, flags: list[str], log: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(ROOT / "run_captioning.py"),
        *flags,
    ]
    result = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=RUN_LIMIT_S)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def full_run(config: str, model: Path, data: Path, output: Path) -> Path:
    launch(config, _flags(model, data, output, **FULL), output.with_suffix(".log"))
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2 * STEPS_PER_EPOCH
    return output


def lora_run_resumed(config: str, model: Path, data: Path, output: Path) -> Path:
    """One epoch (a checkpoint at its end), then a second launch resumed from it to two epochs."""
    launch(config, _flags(model, data, output, num_train_epochs=1, **LORA), output.with_suffix(".1.log"))
    assert (output / f"checkpoint-{STEPS_PER_EPOCH}").is_dir()
    resumed = _flags(model, data, output, num_train_epochs=2, resume_from_checkpoint="latest", **LORA)
    launch(config, resumed, output.with_suffix(".2.log"))
    assert f"checkpoint-{STEPS_PER_EPOCH}" in output.with_suffix(".2.log").read_text()  # it resumed from there
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2 * STEPS_PER_EPOCH
    return output


def shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in load_file(path).items()}


def assert_same_metrics(one: Path, other: Path) -> None:
    a, b = (json.loads((run / "eval_results.json").read_text()) for run in (one, other))
    for metric in METRICS:
        assert a[f"eval_{metric}"] == pytest.approx(b[f"eval_{metric}"], abs=1e-4), metric
    assert a["eval_bleu_1"] > 0  # real captions


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("sharded-data"), count=23)  # real-size JPEGs and PNGs


@pytest.fixture(scope="module")
def ddp_full(tiny_blip, data, tmp_path_factory) -> Path:
    return full_run("multi_gpu.yaml", tiny_blip, data, tmp_path_factory.mktemp("ddp") / "full")


@pytest.fixture(scope="module")
def ddp_lora(tiny_blip, data, tmp_path_factory) -> Path:
    return lora_run_resumed("multi_gpu.yaml", tiny_blip, data, tmp_path_factory.mktemp("ddp") / "lora")


def test_full_fine_tuning_under_fsdp2_ends_as_ddp_and_saves_a_whole_model(tiny_blip, data, ddp_full, tmp_path):
    fsdp = full_run("fsdp.yaml", tiny_blip, data, tmp_path / "fsdp")
    assert "FSDP shard the weights" in fsdp.with_suffix(".log").read_text()  # it ran sharded
    assert_same_metrics(fsdp, ddp_full)
    # The whole model, gathered from the shards: what BlipForConditionalGeneration.from_pretrained loads.
    assert shapes(fsdp / "model.safetensors") == shapes(tiny_blip / "model.safetensors")


def test_lora_under_fsdp2_saves_resumes_and_ends_as_ddp(tiny_blip, data, ddp_lora, tmp_path):
    fsdp = lora_run_resumed("fsdp.yaml", tiny_blip, data, tmp_path / "fsdp")
    assert_same_metrics(fsdp, ddp_lora)
    assert shapes(fsdp / "adapter_model.safetensors") == shapes(ddp_lora / "adapter_model.safetensors")


@needs_deepspeed
def test_full_fine_tuning_under_zero2_ends_as_ddp(tiny_blip, data, ddp_full, tmp_path):
    zero2 = full_run("deepspeed_zero2.yaml", tiny_blip, data, tmp_path / "zero2")
    assert_same_metrics(zero2, ddp_full)
    # ZeRO-2 writes the tied LM head out too; the model loads with nothing missing, unexpected or reshaped.
    _, info = BlipForConditionalGeneration.from_pretrained(zero2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@needs_deepspeed
def test_lora_under_zero3_saves_checkpoints_and_evaluates(tiny_blip, data, ddp_lora, tmp_path):
    """Not compared with DDP's metrics: the model is built under deepspeed.zero.Init (zero3_init_flag), which draws
    LoRA's random A matrices from another random stream (up to 0.25 apart from DDP's at step 0, measured), so the
    runs start apart. The adapter is the one DDP writes, key for key, shape for shape."""
    zero3 = tmp_path / "zero3"
    launch("deepspeed_zero3.yaml", _flags(tiny_blip, data, zero3, num_train_epochs=2, **LORA), tmp_path / "zero3.log")
    assert (zero3 / f"checkpoint-{STEPS_PER_EPOCH}").is_dir() and (zero3 / f"checkpoint-{2 * STEPS_PER_EPOCH}").is_dir()
    assert json.loads((zero3 / "eval_results.json").read_text())["eval_bleu_1"] > 0  # real captions
    assert shapes(zero3 / "adapter_model.safetensors") == shapes(ddp_lora / "adapter_model.safetensors")
