"""End to end: main([...]) for each family with LoRA, 8-bit + LoRA and full fine-tuning, on tiny checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from captioning.arguments import to_argv
from captioning.families import detect_family
from collators import CaptionCollator, build_layout
from run_captioning import main
from tests.conftest import tiny_run_argv

pytestmark = pytest.mark.slow

METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "loss")


def run(model_dir, data_dir, output_dir, *extra):
    return main(tiny_run_argv(model_dir, data_dir, output_dir) + list(extra))


def caption_with(model, processor_dir, image) -> str:
    """Caption one image with a loaded model (and the processor saved in ``processor_dir``) as the trainer does."""
    processor = AutoProcessor.from_pretrained(processor_dir)
    config = model.config
    layout = build_layout(detect_family(config), config, processor.tokenizer)
    batch = CaptionCollator(processor.image_processor, processor.tokenizer, layout)(
        [{"image": image, "image_index": 0}]
    )
    batch.pop("image_index")
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, num_beams=2)
    return layout.decode(generated, processor.tokenizer)[0]


MODES = {
    "lora": [],
    "8bit": ["--load_in_8bit"],
    "full": ["--use_lora", "false"],
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", ["blip", "blip2-opt", "blip2-t5"])
def test_train_evaluate_predict(tiny_models, caption_folder, tmp_path, family, mode):
    model_dir = tiny_models[family]
    output = tmp_path / "out"
    results = run(model_dir, caption_folder, output, *MODES[mode], "--eval_baseline")

    for name in (
        "train_results.json",
        "eval_results.json",
        "predict_results.json",
        "all_results.json",
        "baseline_results.json",
        "trainer_state.json",
        "predictions.jsonl",
        "tokenizer_config.json",
        "captioning_config.json",
    ):
        assert (output / name).is_file(), name
    eval_results = json.loads((output / "eval_results.json").read_text())
    baseline = json.loads((output / "baseline_results.json").read_text())
    for key in METRICS:
        assert f"eval_{key}" in eval_results and f"eval_{key}" in baseline
        assert f"test_{key}" in results["predict"]
    assert eval_results["eval_samples"] == 3  # images, not caption rows

    # One prediction per test image, each with all of its references.
    lines = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    metadata = {
        json.loads(row)["file_name"]: json.loads(row)["caption"]
        for row in (caption_folder / "metadata.jsonl").read_text().splitlines()
    }
    for line in lines:
        assert set(line) == {"image", "prediction", "references"}
        assert line["references"] == metadata[line["image"]]
        assert isinstance(line["prediction"], str)

    # What was saved loads with the plain clients and captions an image.
    family_row = detect_family(AutoConfig.from_pretrained(model_dir))
    image = Image.new("RGB", (40, 36), (30, 200, 30))
    if mode == "full":
        assert (output / "model.safetensors").is_file() and not (output / "adapter_config.json").exists()
        model = family_row.model_class.from_pretrained(output).eval()
    else:
        assert (output / "adapter_model.safetensors").is_file() and not (output / "model.safetensors").exists()
        base = family_row.model_class.from_pretrained(model_dir)
        model = PeftModel.from_pretrained(base, output).eval()
    assert isinstance(caption_with(model, output, image), str)


@pytest.mark.parametrize("family", ["blip", "blip2-opt"])
def test_gradient_checkpointing_with_lora_and_kbit(tiny_models, caption_folder, tmp_path, family):
    for extra in (
        ["--activation_checkpointing", "true"],
        ["--activation_checkpointing", "true", "--load_in_4bit"],
        ["--activation_checkpointing", "true", "--use_lora", "false", "--freeze_vision_tower"],
    ):
        output = tmp_path / "-".join(extra).replace("--", "")
        results = run(
            tiny_models[family], caption_folder, output, *extra, "--eval_strategy", "no", "--save_strategy", "no"
        )
        assert results["train"]["train_loss"] > 0


def test_lora_weights_change_and_base_does_not(tiny_blip, caption_folder, tmp_path):
    from safetensors.torch import load_file

    output = tmp_path / "out"
    run(tiny_blip, caption_folder, output, "--num_train_epochs", "2")
    adapter = load_file(output / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert any(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)


@pytest.mark.parametrize("family", ["blip", "blip2-opt", "blip2-t5"])
def test_overfits_a_handful_of_images(tiny_models, tmp_path, family):
    """Training and generation agree on the caption layout: a model that memorised four captions says them back."""
    data = tmp_path / "data"
    data.mkdir()
    captions = {"red": "a red dog", "green": "two green cats", "blue": "a man on the beach", "yellow": "a yellow ball"}
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
    with open(data / "metadata.jsonl", "w") as handle:
        for name, caption in captions.items():
            Image.new("RGB", (32, 32), colours[name]).save(data / f"{name}.png")
            handle.write(json.dumps({"file_name": f"{name}.png", "caption": caption}) + "\n")
    output = tmp_path / "out"
    argv = to_argv(
        model_name_or_path=tiny_models[family],
        output_dir=output,
        train_file=data / "metadata.jsonl",
        test_file=data / "metadata.jsonl",
        do_train=True,
        do_predict=True,
        use_lora=False,
        validation_split_percentage=0,
        num_train_epochs=150,
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        save_strategy="no",
        num_beams=1,
        max_new_tokens=8,
        min_new_tokens=0,
        dataloader_num_workers=0,
        compute_meteor=False,
        seed=0,
        logging_steps=1,
    )
    main(argv)
    # Every step moved the model: an infinite gradient norm (e.g. float32 overflow of the squared norm) makes
    # clipping zero all gradients, and the step silently does nothing.
    state = json.loads((output / "trainer_state.json").read_text())
    grad_norms = [entry["grad_norm"] for entry in state["log_history"] if "grad_norm" in entry]
    assert len(grad_norms) == 150 and all(math.isfinite(norm) for norm in grad_norms)
    predictions = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    assert {line["image"]: line["prediction"] for line in predictions} == {
        f"{name}.png": caption for name, caption in captions.items()
    }


def test_best_checkpoint_by_cider_and_early_stopping(tiny_blip, caption_folder, tmp_path):
    output = tmp_path / "out"
    # A zero learning rate never improves CIDEr: patience 1 stops after the second evaluation of five epochs.
    run(
        tiny_blip,
        caption_folder,
        output,
        "--num_train_epochs",
        "5",
        "--learning_rate",
        "0",
        "--early_stopping_patience",
        "1",
    )
    state = json.loads((output / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_cider" in entry]
    assert [entry["epoch"] for entry in evaluations] == [1.0, 2.0]
    assert state["best_metric"] == max(entry["eval_cider"] for entry in evaluations)
    # 6 training images x 3 captions = 18 rows, 5 steps an epoch: the first evaluation's checkpoint stays the best
    assert state["best_model_checkpoint"].endswith("checkpoint-5")


def test_demo_builds_and_runs_with_its_config(small_demo):
    """The demo's build script and config work together (small sizes here; `make demo` runs the full ones)."""
    build, output, results = small_demo.build, small_demo.output, small_demo.results
    assert (build / "model" / "model.safetensors").is_file() and not (build / "pretrain").exists()
    assert set(results) == {"baseline", "train", "eval", "predict"}
    assert (output / "baseline_results.json").is_file() and (output / "eval_results.json").is_file()
