"""merge_adapter: a LoRA adapter folded into its base is a plain transformers model with the same logits and
captions as base + adapter."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor

from captioning.arguments import to_argv
from captioning.families import detect_family
from captioning.inference import load_captioner
from merge_adapter import main as merge_main
from run_captioning import main as train_main

pytestmark = pytest.mark.slow

ATOL = 1e-5
CAPTIONS = ["a red dog", "two green cats on the grass", "a man", "a yellow ball on a white background"]


def train_adapter(model_dir, data_dir, output_dir):
    """A couple of LoRA steps with a large learning rate, so that the adapter is far from its zero init."""
    train_main(
        to_argv(
            model_name_or_path=model_dir,
            dataset_dir=data_dir,
            output_dir=output_dir,
            do_train=True,
            validation_split_percentage=0,
            test_split_percentage=0,
            max_train_samples=4,
            num_train_epochs=1,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            save_strategy="no",
            caption_prompt="a photo of ",
            max_new_tokens=6,
            dataloader_num_workers=0,
            compute_meteor=False,
            report_to="none",
        )
    )
    return output_dir


@pytest.fixture(scope="module", params=["blip", "blip2-opt"])
def adapter(request, tiny_models, caption_folder, tmp_path_factory):
    return train_adapter(tiny_models[request.param], caption_folder, tmp_path_factory.mktemp(request.param) / "run")


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    output = tmp_path_factory.mktemp("merged") / "model"
    assert merge_main([str(adapter), "--output_dir", str(output)]) == output
    return output


def base_of(adapter) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_adapter_is_not_zero(adapter):
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [value for key, value in weights.items() if "lora_B" in key]
    assert lora_b and all(value.abs().max() > 0 for value in lora_b)


def test_merged_folder_holds_a_plain_model_processor_and_settings(adapter, merged):
    names = {path.name for path in merged.iterdir()}
    assert {"config.json", "model.safetensors", "captioning_config.json", "tokenizer_config.json"} <= names
    assert not {name for name in names if name.startswith("adapter_")}
    assert not {name for name in names if name.endswith(".tmp") or name.endswith(".bin")}
    umask = os.umask(0)
    os.umask(umask)
    assert merged.stat().st_mode & 0o777 == 0o777 & ~umask  # not the owner-only mode of a temporary folder
    assert (merged / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    family = detect_family(AutoConfig.from_pretrained(merged))
    model, info = family.model_class.from_pretrained(merged, output_loading_info=True)
    assert not isinstance(model, PeftModel)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not [name for name, _ in model.named_parameters() if "lora" in name]
    assert AutoProcessor.from_pretrained(merged).tokenizer is not None
    # The run's prompt and generation settings travel with the merged model.
    assert json.loads((merged / "captioning_config.json").read_text()) == json.loads(
        (adapter / "captioning_config.json").read_text()
    )


def fixed_batch(captioner) -> dict[str, torch.Tensor]:
    rows = [{"image": image, "caption": caption} for image, caption in zip(sample_images(4), CAPTIONS, strict=True)]
    return captioner.collator.collate_training(rows)


def sample_images(count: int) -> list[Image.Image]:
    """Plain colours and seeded noise, so that images differ in every pixel statistic."""
    generator = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]
    images = [Image.new("RGB", (40 + 4 * i, 36), colour) for i, colour in enumerate(colours)]
    images += [Image.fromarray(generator.integers(0, 256, (36, 44, 3), dtype=np.uint8)) for _ in range(4)]
    return images[:count]


def logits(model, batch) -> torch.Tensor:
    """Teacher-forced logits (labels give Flan-T5 its decoder inputs; BLIP and OPT just add a loss)."""
    with torch.no_grad():
        return model(**batch).logits


def test_merged_logits_match_base_plus_adapter(adapter, merged):
    with_adapter = load_captioner(adapter, device="cpu")
    assert isinstance(with_adapter.model, PeftModel)
    family = with_adapter.family
    batch = fixed_batch(with_adapter)

    merged_model = family.model_class.from_pretrained(merged).eval()
    base_model = family.model_class.from_pretrained(base_of(adapter)).eval()
    expected = logits(with_adapter.model, batch)

    assert (logits(merged_model, batch) - expected).abs().max().item() <= ATOL
    assert (logits(base_model, batch) - expected).abs().max().item() > 1e-3  # the adapter changes the model


@pytest.mark.parametrize("num_beams", [1, 3])
def test_merged_captions_match_base_plus_adapter(adapter, merged, num_beams):
    images = sample_images(8)
    with_adapter = load_captioner(adapter, device="cpu")
    standalone = load_captioner(merged, device="cpu")
    assert not isinstance(standalone.model, PeftModel)
    assert standalone.caption_prompt == with_adapter.caption_prompt == "a photo of "

    expected = with_adapter.caption(images, num_beams=num_beams)
    assert standalone.caption(images, num_beams=num_beams) == expected
    assert all(isinstance(caption, str) for caption in expected)


def test_refuses_a_non_empty_output_dir_unless_overwrite(adapter, tmp_path):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    (output / "adapter_config.json").write_text("{}")  # an old adapter that must not survive next to the model
    with pytest.raises(ValueError, match="--output_dir .* is not empty .*--overwrite_output_dir"):
        merge_main([str(adapter), "--output_dir", str(output)])

    merge_main([str(adapter), "--output_dir", str(output), "--overwrite_output_dir"])
    assert (output / "model.safetensors").is_file() and (output / "notes.txt").read_text() == "keep me"
    assert not (output / "adapter_config.json").exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_refuses_the_adapter_folder_as_output(adapter):
    with pytest.raises(ValueError, match="is the adapter folder"):
        merge_main([str(adapter), "--output_dir", str(adapter), "--overwrite_output_dir"])


def test_clear_errors_for_what_is_not_an_adapter(tiny_blip, tmp_path):
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("no model here")
    with pytest.raises(ValueError, match="neither a LoRA adapter .*adapter_config.json.* nor a model .*config.json"):
        merge_main([str(neither), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="full model .*nothing to merge"):
        merge_main([str(tiny_blip), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        merge_main([str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
