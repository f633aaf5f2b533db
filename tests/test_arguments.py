"""Configuration: defaults < YAML < command line, unknown keys, documented flags, shipped configs, early errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from captioning.arguments import ARGUMENT_CLASSES, build_parser, parse_args, validate_args

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--model_name_or_path", "m", "--dataset_dir", "d", "--output_dir", "o", "--do_train"]
CPU = ["--use_cpu", "true"]  # the GPU recipes ask for bf16, which transformers accepts on CPU only with use_cpu


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_changed_training_defaults():
    *_, training = parse_args(BASE)
    assert training.remove_unused_columns is False
    assert training.predict_with_generate is True
    assert training.metric_for_best_model == "cider" and training.greater_is_better is True
    assert training.load_best_model_at_end is True
    assert training.label_names == ["labels"]
    assert training.eval_strategy.value == training.save_strategy.value == "epoch"
    assert training.ddp_find_unused_parameters is False


def test_precedence_defaults_then_yaml_then_command_line(tmp_path):
    config = write(
        tmp_path / "c.yaml",
        "learning_rate: 3.0e-4\nlora_r: 8\nlora_target_modules: [query, key]\nnum_train_epochs: 2\nbf16: false\n",
    )
    model, data, lora, caption, training = parse_args(["--config", config, *BASE, "--lora_r", "4"])
    assert training.learning_rate == 3e-4  # YAML over default
    assert lora.lora_r == 4  # command line over YAML
    assert lora.lora_target_modules == ["query", "key"]
    assert training.num_train_epochs == 2
    assert lora.lora_alpha == 32  # default kept
    assert model.model_name_or_path == "m" and data.dataset_dir == "d"


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # PyYAML reads 5e-5 as a string; argparse then converts it with the flag's type.
    config = write(tmp_path / "c.yaml", "learning_rate: 5e-5\n")
    *_, training = parse_args(["--config", config, *BASE])
    assert training.learning_rate == 5e-5


def test_unknown_yaml_keys_are_listed(tmp_path):
    config = write(tmp_path / "c.yaml", "learning_rat: 1.0e-4\nlora_rank: 8\nlora_r: 8\n")
    with pytest.raises(ValueError) as error:
        parse_args(["--config", config, *BASE])
    message = str(error.value)
    assert "learning_rat (did you mean learning_rate?)" in message
    assert "lora_rank (did you mean lora_r?)" in message
    assert "lora_r," not in message


def test_wrong_yaml_type_names_the_flag(tmp_path, capsys):
    config = write(tmp_path / "c.yaml", "lora_r: eight\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", config, *BASE])
    assert "--lora_r" in capsys.readouterr().err


def test_list_for_a_scalar_flag_is_rejected(tmp_path):
    config = write(tmp_path / "c.yaml", "lora_r: [8, 16]\n")
    with pytest.raises(ValueError, match="lora_r takes one value"):
        parse_args(["--config", config, *BASE])


def test_missing_config_file():
    with pytest.raises(ValueError, match="no such file"):
        parse_args(["--config", "nope.yaml", *BASE])


def test_unknown_command_line_flag():
    with pytest.raises(ValueError, match="--lora_rank"):
        parse_args([*BASE, "--lora_rank", "8"])


def test_superseded_generation_flags_point_to_ours():
    with pytest.raises(ValueError, match="--max_new_tokens"):
        parse_args([*BASE, "--generation_max_length", "30"])


def test_help_documents_every_flag():
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_captioning.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    ours = [field.name for cls in ARGUMENT_CLASSES[:-1] for field in fields(cls)]
    for name in ours + ["config"]:
        assert f"--{name}" in result.stdout, name
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"--{action.dest} has no help text"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(config, tmp_path):
    text = config.read_text()
    assert "run_captioning.py" in text.split("\n\n")[0] or "make demo" in text.split("\n\n")[0], (
        "the header must carry the run command"
    )
    args = parse_args(["--config", str(config), *CPU, "--output_dir", str(tmp_path / "run")])
    validate_args(*args)


def test_seed_recipes_match_their_sources():
    lora = parse_args(["--config", str(ROOT / "configs/blip_base_lora.yaml"), *CPU])
    assert (lora[2].lora_r, lora[2].lora_alpha, lora[2].lora_dropout) == (16, 32, 0.05)
    assert lora[2].lora_target_modules == ["query", "value"]
    assert (lora[4].learning_rate, lora[4].per_device_train_batch_size, lora[4].num_train_epochs, lora[4].bf16) == (
        5e-5,
        128,
        5,
        True,
    )
    blip2 = parse_args(["--config", str(ROOT / "configs/blip2_opt_8bit_lora.yaml"), *CPU])
    assert blip2[2].load_in_8bit and (blip2[2].lora_r, blip2[2].lora_alpha, blip2[2].lora_dropout) == (8, 32, 0.1)
    assert (blip2[4].learning_rate, blip2[4].per_device_train_batch_size, blip2[4].num_train_epochs) == (1e-4, 8, 5)
    full = parse_args(["--config", str(ROOT / "configs/blip_full_finetune.yaml"), *CPU])
    assert full[2].use_lora is False and full[1].caption_prompt == "a picture of "
    assert (full[4].learning_rate, full[4].weight_decay, full[4].num_train_epochs) == (1e-5, 0.05, 5)
    assert (full[3].num_beams, full[3].max_new_tokens, full[3].min_new_tokens) == (3, 20, 5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset_name", "x"], "exactly one data source"),
        (["--load_in_8bit", "--load_in_4bit"], "exclude each other"),
        (["--load_in_8bit", "--use_lora", "false"], "cannot be fine-tuned directly"),
        (["--freeze_vision_tower"], "--freeze_vision_tower is for full fine-tuning"),
        (["--use_lora", "false", "--lora_vision"], "need --use_lora true"),
        (["--lora_dropout", "1.5"], "--lora_dropout"),
        (["--validation_split_percentage", "60", "--test_split_percentage", "50"], "sum must be below 100"),
        (["--min_new_tokens", "9", "--max_new_tokens", "5"], "--min_new_tokens 9 exceeds"),
        (["--metric_for_best_model", "accuracy"], "--metric_for_best_model 'accuracy'"),
        (["--metric_for_best_model", "meteor", "--compute_meteor", "false"], "needs --compute_meteor"),
        (["--max_train_samples", "0"], "--max_train_samples 0"),
        (["--num_beams", "0"], "--num_beams 0"),
    ],
)
def test_validation_errors_name_the_flag(extra, message):
    args = parse_args([*BASE, *extra])
    with pytest.raises(ValueError, match=message):
        validate_args(*args)


def test_nothing_to_do_and_no_source():
    with pytest.raises(ValueError, match="--do_train"):
        validate_args(*parse_args(["--model_name_or_path", "m", "--dataset_dir", "d", "--output_dir", "o"]))
    with pytest.raises(ValueError, match="got none"):
        validate_args(*parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--do_train"]))


def test_trust_remote_code_is_off_by_default():
    model, *_ = parse_args(BASE)
    assert model.trust_remote_code is False


def test_non_empty_output_dir_is_never_silently_reused(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "adapter_model.safetensors").write_text("earlier run")
    base = ["--model_name_or_path", "m", "--dataset_dir", "d", "--output_dir", str(output), "--do_train"]
    with pytest.raises(ValueError, match="is not empty \\(adapter_model.safetensors\\).*--overwrite_output_dir"):
        validate_args(*parse_args(base))
    validate_args(*parse_args([*base, "--overwrite_output_dir"]))
    validate_args(*parse_args([*base, "--resume_from_checkpoint", str(output)]))
