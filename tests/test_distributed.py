"""Several processes: the same captions and metrics as one process, engine configs that load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from accelerate.commands.config.config_args import load_config_from_file

from captioning.arguments import to_argv
from run_captioning import main
from tests.conftest import make_caption_folder

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_configs_load(path):
    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16"
    assert "accelerate launch" in path.read_text() or path.name == "multi_node.yaml"
    if config.distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] in (2, 3)
    if config.distributed_type == "FSDP":
        for name in config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","):
            assert hasattr(transformers.models.blip.modeling_blip, name) or hasattr(
                transformers.models.blip.modeling_blip_text, name
            ), name


def test_engine_configs_cover_every_setup():
    kinds = {load_config_from_file(str(path)).distributed_type for path in ACCELERATE_CONFIGS}
    assert kinds == {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    stages = {
        load_config_from_file(str(path)).deepspeed_config.get("zero_stage")
        for path in ACCELERATE_CONFIGS
        if "deepspeed" in path.name
    }
    assert stages == {2, 3}
    slurm = ROOT / "configs" / "accelerate" / "slurm_multinode.sh"
    subprocess.run(["bash", "-n", str(slurm)], check=True)
    assert "--machine_rank" in slurm.read_text() and "c10d" in slurm.read_text()


def _settings(model, data, **extra) -> dict:
    """The flags of the multi-process tests' runs, as a dict (``extra`` overrides or adds)."""
    settings = dict(
        model_name_or_path=model,
        dataset_dir=data,
        validation_split_percentage=30,
        test_split_percentage=30,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,  # 7 images on 2 processes: the last batch is padded with duplicates
        max_new_tokens=6,
        num_beams=2,
        dataloader_num_workers=0,
        compute_meteor=False,
    )
    return {**settings, **extra}


def _flags(model, data, output, **extra) -> list[str]:
    return to_argv(**_settings(model, data, output_dir=output, **extra))


def _env():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    return env


def evaluate_alone(model: Path, data: Path, output: Path) -> None:
    """Evaluate and predict with ``model`` in one process (this one: no second start-up of the libraries)."""
    main(_flags(model, data, output, do_eval=True, do_predict=True))


# Per tiny checkpoint (its conftest fixture): training long enough that captions are real words, so equal metrics
# mean something. A family joins by its fixture's name.
# BLIP's case is tests/test_multi_node.py: two machines of one process each, compared with one process the same way.
TWO_PROCESS_TRAINING = {
    "tiny_florence2": dict(
        num_train_epochs=20, learning_rate=3e-3, use_lora=False
    ),  # LoRA on a 1-layer BART learns too little
    "tiny_paligemma": dict(num_train_epochs=4, learning_rate=1e-2),  # token_type_ids reach generate, with beams
    # Chat template; captions of an image share one get_image_features pass (mm_encoder_outputs), with beams
    "tiny_smolvlm": dict(num_train_epochs=4, learning_rate=1e-2),
    # Prompts of different lengths per image (dynamic resolution): left-padded, cut per batch, gathered across processes
    "tiny_qwen2_5_vl": dict(num_train_epochs=4, learning_rate=1e-2),
}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", sorted(TWO_PROCESS_TRAINING))
def test_two_processes_give_the_metrics_of_one(request, fixture, tmp_path):
    """Trained on 2 processes, evaluated on 2 and on 1: the same captions and scores (7 images, batches of 2, so the
    last batch of the 2-process run is padded with duplicates)."""
    data = make_caption_folder(tmp_path / "data", num_images=23, captions_per_image=3)
    two = tmp_path / "two"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "multi_gpu.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(ROOT / "run_captioning.py"),
    ]
    training = TWO_PROCESS_TRAINING[fixture]
    flags = _flags(
        request.getfixturevalue(fixture),
        data,
        two,
        do_train=True,
        do_eval=True,
        do_predict=True,
        eval_strategy="no",
        save_strategy="no",
        **training,
    )
    result = subprocess.run(launch + flags, env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    state = json.loads((two / "trainer_state.json").read_text())
    # 9 training images x 3 captions = 27 rows; 2 processes x 4 rows a step = 4 steps an epoch (1 process: 7)
    assert state["global_step"] == training["num_train_epochs"] * 4
    one = tmp_path / "one"
    evaluate_alone(two, data, one)

    for name, prefix in (("eval_results.json", "eval"), ("predict_results.json", "test")):
        many, single = json.loads((two / name).read_text()), json.loads((one / name).read_text())
        for metric in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "loss"):
            assert many[f"{prefix}_{metric}"] == pytest.approx(single[f"{prefix}_{metric}"], rel=1e-6, abs=1e-9)
        assert many[f"{prefix}_samples"] == single[f"{prefix}_samples"] == 7
        assert many[f"{prefix}_bleu_1"] > 0  # real captions, not empty strings
    many_lines = (two / "predictions.jsonl").read_text().splitlines()
    assert many_lines == (one / "predictions.jsonl").read_text().splitlines()
    assert len(many_lines) == len({json.loads(line)["image"] for line in many_lines}) == 7
