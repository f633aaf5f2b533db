"""Florence-2 end to end, through ``main([...])`` on the tiny checkpoint: LoRA on real-size photos (evaluated,
predicted, carded, merged, captioned by caption_images.py and pushed to a local Hub server), 4-bit LoRA, full
fine-tuning with the vision tower frozen, and a handful of photos learnt to validation CIDEr-D >= 1."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hub_server import TOKEN, USER, HubServer
from huggingface_hub import ModelCard, snapshot_download
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file

import caption_images
from captioning.arguments import to_argv
from captioning.families import FLORENCE2
from captioning.images import load_image
from captioning.inference import load_captioner
from merge_adapter import main as merge_main
from run_captioning import main
from tests.card_snippets import explicit_snippet
from tests.conftest import tiny_run_argv
from tests.photos import write_photos
from tests.test_hub import client_for

pytestmark = [
    pytest.mark.slow,
    # huggingface_hub's LFS upload passes a file object as `data=` (httpx2 deprecates that): their drift, not ours.
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
]

HUB_BASE = "florence-community/Florence-2-base"
METRICS = ("bleu_1", "bleu_4", "rouge_l", "cider", "loss")


def _predictions(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]


def _run_snippet(code: str, image_path: Path, **names) -> str:
    """Run the card's usage snippet on one image (``names`` replace its MODEL_ID / BASE_ID lines)."""
    names = {"image_path": image_path, **names}
    for name, value in names.items():
        code, found = re.subn(rf"^{name} = .*$", f"{name} = {json.dumps(str(value))}", code, count=1, flags=re.M)
        assert found, name
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)
    return namespace["caption"]


# --------------------------------------------------------------------------------------------------------------
# LoRA on real-size photos, pushed
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tiny_florence2, photo_folder, tmp_path_factory):
    """LoRA (default targets, vision tower frozen, so captions of an image share a vision pass), baseline + eval +
    predict, the card, and a push to a local Hub server as the Hub id of the base."""
    root = tmp_path_factory.mktemp("florence2-lora")
    output = root / "out"
    repo = f"{USER}/florence2-lora"
    argv = tiny_run_argv(
        tiny_florence2,
        photo_folder,
        output,
        max_train_samples=8,
        max_eval_samples=4,
        max_predict_samples=4,
        num_train_epochs=2,
        learning_rate=1e-2,
        eval_baseline=True,
        logging_steps=1,
        push_to_hub=True,
        hub_model_id=repo,
        base_model_id=HUB_BASE,
    )
    with HubServer() as server, client_for(server, root / "hf-home"):
        results = main(argv)
        download = Path(snapshot_download(repo, token=TOKEN, local_dir=root / "download"))
    assert server.errors == []
    return SimpleNamespace(
        output=output, results=results, download=download, repo=repo, data=photo_folder, base=tiny_florence2
    )


def test_lora_run_trains_evaluates_predicts_and_writes_its_settings(lora_run):
    output, results = lora_run.output, lora_run.results
    assert set(results) == {"baseline", "train", "eval", "predict"}
    assert results["train"]["train_loss"] > 0
    for phase, prefix in (("baseline", "eval"), ("eval", "eval"), ("predict", "test")):
        assert all(f"{prefix}_{metric}" in results[phase] for metric in METRICS), phase
    assert results["eval"]["eval_samples"] == results["predict"]["test_samples"] == 4

    settings = json.loads((output / "captioning_config.json").read_text())
    assert settings["family"] == "florence2" and settings["caption_prompt"] == "<CAPTION>"  # the family default
    assert settings["generation"]["num_beams"] == 3 and settings["generation"]["min_new_tokens"] == 0

    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(lora_run.base)  # locally, the local base
    state = load_file(output / "adapter_model.safetensors")
    adapted = {key.split(".lora_")[0] for key in state}
    assert len(adapted) == 16 and all(".language_model." in key for key in adapted)
    assert any(value.abs().sum() > 0 for key, value in state.items() if "lora_B" in key)

    lines = _predictions(output)
    metadata = {
        json.loads(row)["file_name"]: json.loads(row)["caption"]
        for row in (lora_run.data / "metadata.jsonl").read_text().splitlines()
    }
    assert len(lines) == 4 and all(line["references"] == metadata[line["image"]] for line in lines)
    assert all(isinstance(line["prediction"], str) for line in lines)

    card = (output / "README.md").read_text()
    assert "Florence-2" in card and "Florence2ForConditionalGeneration" in card
    assert 'PROMPT = "<CAPTION>"' in explicit_snippet(card)


def test_card_snippet_and_caption_images_reproduce_the_predictions(lora_run, tmp_path):
    lines = _predictions(lora_run.output)
    code = explicit_snippet((lora_run.output / "README.md").read_text())  # rendered for the repo pushed to
    for line in lines[:2]:
        caption = _run_snippet(code, lora_run.data / line["image"], MODEL_ID=lora_run.output, BASE_ID=lora_run.base)
        assert caption == line["prediction"]

    captions_file = tmp_path / "captions.jsonl"
    images = [str(lora_run.data / line["image"]) for line in lines]
    caption_images.main(["--model", str(lora_run.output), "--images", *images, "--output", str(captions_file)])
    written = [json.loads(row) for row in captions_file.read_text().splitlines()]
    by_name = {Path(row["image"]).name: row["caption"] for row in written}
    assert by_name == {line["image"]: line["prediction"] for line in lines}


def test_merged_adapter_gives_the_logits_and_captions_of_base_plus_adapter(lora_run, tiny_florence2, tmp_path):
    merged = merge_main([str(lora_run.output), "--output_dir", str(tmp_path / "merged")])
    with_adapter = load_captioner(lora_run.output, device="cpu")
    standalone = load_captioner(merged, device="cpu")
    assert isinstance(with_adapter.model, PeftModel) and not isinstance(standalone.model, PeftModel)
    assert standalone.caption_prompt == with_adapter.caption_prompt == "<CAPTION>"
    images = [load_image(lora_run.data / line["image"]) for line in _predictions(lora_run.output)]
    rows = [{"image": image, "caption": caption} for image, caption in zip(images, ["a red dog"] * 4, strict=True)]
    batch = with_adapter.collator.collate_training(rows)
    base = FLORENCE2.model_class.from_pretrained(tiny_florence2).eval()
    with torch.no_grad():
        expected = with_adapter.model(**batch).logits
        assert (standalone.model(**batch).logits - expected).abs().max().item() <= 1e-5
        assert (base(**batch).logits - expected).abs().max().item() > 1e-3  # the adapter changes the model
    for num_beams in (1, 3):
        assert standalone.caption(images, num_beams=num_beams) == with_adapter.caption(images, num_beams=num_beams)


def test_the_pushed_adapter_names_the_hub_base_and_captions_like_the_local_one(lora_run, tiny_florence2):
    download = lora_run.download
    assert json.loads((download / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_BASE
    assert json.loads((download / "captioning_config.json").read_text())["caption_prompt"] == "<CAPTION>"
    card = ModelCard.load(download / "README.md")
    assert card.data.base_model == HUB_BASE
    code = explicit_snippet(card.text)
    assert f'MODEL_ID = "{lora_run.repo}"' in code and f'BASE_ID = "{HUB_BASE}"' in code
    line = _predictions(lora_run.output)[0]
    image = lora_run.data / line["image"]
    assert _run_snippet(code, image, MODEL_ID=download, BASE_ID=tiny_florence2) == line["prediction"]
    from_hub = load_captioner(download, base_model=str(tiny_florence2), device="cpu")
    assert from_hub.caption([load_image(image)]) == [line["prediction"]]


# --------------------------------------------------------------------------------------------------------------
# 4-bit LoRA, full fine-tuning
# --------------------------------------------------------------------------------------------------------------


def test_4bit_lora_with_activation_checkpointing(tiny_florence2, caption_folder, tmp_path):
    output = tmp_path / "out"
    flags = dict(load_in_4bit=True, activation_checkpointing=True, eval_strategy="no", save_strategy="no")
    results = main(tiny_run_argv(tiny_florence2, caption_folder, output, num_train_epochs=2, **flags))
    assert results["train"]["train_loss"] > 0 and "eval_cider" in results["eval"] and "test_cider" in results["predict"]
    assert len(_predictions(output)) == 3
    assert (output / "adapter_model.safetensors").is_file() and not (output / "model.safetensors").exists()
    # the adapter trained on 4-bit weights captions on the full-precision base
    captions = load_captioner(output, device="cpu").caption([Image.new("RGB", (40, 36), (30, 200, 30))])
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_full_fine_tuning_with_the_vision_tower_frozen(tiny_florence2, caption_folder, tmp_path):
    output = tmp_path / "out"
    flags = dict(use_lora=False, freeze_vision_tower=True, learning_rate=1e-3, eval_strategy="no", save_strategy="no")
    results = main(tiny_run_argv(tiny_florence2, caption_folder, output, **flags))
    assert results["train"]["train_loss"] > 0 and "eval_cider" in results["eval"]
    assert not (output / "adapter_config.json").exists()
    base, tuned = load_file(tiny_florence2 / "model.safetensors"), load_file(output / "model.safetensors")
    assert base.keys() == tuned.keys()
    changed = {key for key in base if not torch.equal(base[key], tuned[key])}
    vision = {key for key in base if key.startswith("model.vision_tower.")}
    assert vision and not changed & vision
    assert any(key.startswith("model.language_model.") for key in changed)
    assert any(key.startswith("model.multi_modal_projector.") for key in changed)  # the projector trains
    captioner = load_captioner(output, device="cpu")
    assert captioner.caption_prompt == "<CAPTION>" and captioner.generation_kwargs["num_beams"] == 3
    predictions = _predictions(output)
    images = [load_image(caption_folder / line["image"]) for line in predictions]
    assert captioner.caption(images) == [line["prediction"] for line in predictions]


# --------------------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------------------

OVERFIT_CAPTIONS = [
    "a red dog on the grass",
    "two green cats",
    "a man on the beach",
    "a yellow ball",
    "the blue water",
    "a dog and a man",
]


def test_overfits_a_handful_of_photos_to_validation_cider_above_one(tiny_florence2, tmp_path):
    """Six real-size photos, one caption each, validated on the same photos with the family's generation defaults
    (3 beams over a batch of six): a model that memorised them says them back."""
    data = tmp_path / "data"
    for split in ("train", "validation"):
        photos = write_photos(data / split, len(OVERFIT_CAPTIONS), png_every=0, rotate_every=0)
        rows = [
            {"file_name": photo.file_name, "caption": caption}
            for photo, caption in zip(photos, OVERFIT_CAPTIONS, strict=True)
        ]
        (data / split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    argv = to_argv(
        model_name_or_path=tiny_florence2,
        dataset_dir=data,
        output_dir=output,
        do_train=True,
        do_eval=True,
        use_lora=False,
        validation_split_percentage=0,
        test_split_percentage=0,
        num_train_epochs=300,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        per_device_train_batch_size=len(OVERFIT_CAPTIONS),
        per_device_eval_batch_size=len(OVERFIT_CAPTIONS),
        eval_strategy="no",
        save_strategy="no",
        logging_steps=50,
        dataloader_num_workers=0,
        compute_meteor=False,
        report_to="none",
        seed=0,
    )
    results = main(argv)
    print("overfit:", {key: round(value, 4) for key, value in results["eval"].items() if isinstance(value, float)})
    assert results["eval"]["eval_cider"] >= 1.0
    assert results["eval"]["eval_bleu_4"] > 0.9
