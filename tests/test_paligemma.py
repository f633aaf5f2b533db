"""PaliGemma as a family (captioning/families/paligemma.py): the collator's batches are the processor's own
``suffix=`` rows, the loss is next-token cross-entropy over the caption, generation starts where training does, image
grouping changes nothing, and main() trains (LoRA, 4-bit LoRA, full), evaluates, captions, merges and pushes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hub_server import TOKEN, USER, HubServer
from huggingface_hub import ModelCard, snapshot_download
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from test_hub import client_for, run_cli
from transformers import AutoConfig, AutoProcessor

import caption_images
from captioning.arguments import LoraArguments, to_argv
from captioning.families import PALIGEMMA, detect_family
from captioning.families.paligemma import DEFAULT_PROMPT
from captioning.inference import load_captioner
from captioning.layout import IGNORE_INDEX
from captioning.modeling import resolve_lora_targets
from captioning.tiny_paligemma import build_tiny_paligemma
from captioning.trainer import generation_inputs
from collators import CaptionCollator, build_layout
from merge_adapter import main as merge_main
from run_captioning import main
from tests.card_snippets import explicit_snippet
from tests.conftest import tiny_run_argv
from tests.decoder_checks import (
    check_first_token_is_learnt_where_generate_predicts_it,
    check_loss_is_next_token_cross_entropy,
    sharpen,
)

NUM_IMAGE_TOKENS = 16  # the tiny checkpoint: image 32 / patch 8
HUB_BASE = "google/paligemma2-3b-pt-224"  # what the tiny checkpoint stands in for (the config, a push)
IMAGES = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (30, 60), (10, 200, 10))]
CAPTIONS = ["a red dog", "the green cat is on the grass"]  # different lengths: the first row is padded


def setup(path, prompt=None, max_caption_length=64, group_images=False):
    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    layout = build_layout(family, config, processor, prompt)
    collator = CaptionCollator(
        processor.image_processor, processor.tokenizer, layout, max_caption_length, group_images=group_images
    )
    return processor, family, layout, collator


def encode(processor, **kwargs):
    """The processor's own batch as torch tensors (``return_tensors="pt"`` with a suffix warns under torch 2.14 +
    numpy 2.4: processing_paligemma.py calls np.array on a torch tensor)."""
    return processor(**kwargs, return_tensors="np").convert_to_tensors("pt")


def training_rows(images=IMAGES, captions=CAPTIONS):
    return [{"image": image, "caption": caption} for image, caption in zip(images, captions, strict=True)]


def generation_rows(images=IMAGES):
    return [{"image": image, "image_index": i} for i, image in enumerate(images)]


# --- the family record ---------------------------------------------------------------------------------------------


def test_detected_with_its_defaults(tiny_paligemma, tmp_path):
    assert detect_family(AutoConfig.from_pretrained(tiny_paligemma)) is PALIGEMMA
    paligemma1 = build_tiny_paligemma(tmp_path / "pg1", gemma2=False)
    assert detect_family(AutoConfig.from_pretrained(paligemma1)) is PALIGEMMA
    assert PALIGEMMA.prompt(None) == DEFAULT_PROMPT == "caption en"
    assert PALIGEMMA.prompt("") == ""  # --caption_prompt "" is honoured
    assert (PALIGEMMA.num_beams, PALIGEMMA.max_new_tokens, PALIGEMMA.min_new_tokens) == (1, 30, 0)


def test_default_lora_targets_are_gemma_only_and_lora_vision_adds_siglip_attention(tiny_paligemma):
    config = AutoConfig.from_pretrained(tiny_paligemma)
    model = PALIGEMMA.model_class.from_pretrained(tiny_paligemma)
    targets = resolve_lora_targets(model, PALIGEMMA, LoraArguments())
    # SigLIP has q_proj / k_proj / v_proj too: a bare-name match would adapt the vision tower as well.
    assert len(targets) == 7 * config.text_config.num_hidden_layers
    assert all(name.startswith("model.language_model.layers.") for name in targets)
    with_vision = resolve_lora_targets(model, PALIGEMMA, LoraArguments(lora_vision=True))
    vision = [name for name in with_vision if name not in targets]
    assert len(vision) == 4 * config.vision_config.num_hidden_layers
    assert all(re.fullmatch(r"model\.vision_tower\.encoder\.layers\.\d\.self_attn\.\w+_proj", name) for name in vision)
    model.get_submodule(PALIGEMMA.image_feature_module)  # exists


def test_shipped_qlora_config_loads_paligemma2_in_4bit_with_the_family_prompt():
    from captioning.arguments import parse_args

    config = Path(__file__).resolve().parents[1] / "configs" / "paligemma2_3b_qlora.yaml"
    model, data, lora, caption, training = parse_args(["--config", str(config), "--use_cpu", "true"])
    assert model.model_name_or_path == HUB_BASE and lora.load_in_4bit and not lora.load_in_8bit
    assert lora.lora_target_modules is None  # the family's Gemma-only defaults
    assert PALIGEMMA.prompt(data.caption_prompt) == DEFAULT_PROMPT
    assert (caption.num_beams, caption.max_new_tokens, caption.min_new_tokens) == (1, 30, 0)
    assert training.bf16 and training.activation_checkpointing


# --- batches -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, "", "caption en en"])
def test_training_batch_is_the_processors_suffix_batch(tiny_paligemma, prompt):
    processor, _, layout, collator = setup(tiny_paligemma, prompt)
    text = DEFAULT_PROMPT if prompt is None else prompt
    batch = collator(training_rows())
    expected = encode(
        processor, images=IMAGES, text=[text] * 2, suffix=CAPTIONS, padding="longest", padding_side="right"
    )
    assert set(batch) == {"pixel_values", "input_ids", "token_type_ids", "attention_mask", "labels"}
    assert set(expected) == set(batch)
    for key in ("input_ids", "token_type_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], expected[key]), key
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)

    # Spelled out for the default prompt: prefix | caption <eos>, right padding with <pad> / 0 / -100 / 0.
    if prompt is None:
        tok = processor.tokenizer
        ids = tok.convert_tokens_to_ids
        prefix = [processor.image_token_id] * NUM_IMAGE_TOKENS + [tok.bos_token_id, *ids(["caption", "▁en", "\n"])]
        short = ids(["a", "▁red", "▁dog"]) + [tok.eos_token_id]
        pad = batch["input_ids"].shape[1] - len(prefix) - len(short)
        assert pad > 0
        assert batch["input_ids"][0].tolist() == prefix + short + [tok.pad_token_id] * pad
        assert batch["token_type_ids"][0].tolist() == [0] * len(prefix) + [1] * len(short) + [0] * pad
        assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prefix) + short + [IGNORE_INDEX] * pad
        assert batch["attention_mask"][0].tolist() == [1] * (len(prefix) + len(short)) + [0] * pad
        assert layout.generated_prefix_length == len(prefix) == NUM_IMAGE_TOKENS + 4


def test_generation_batch_is_the_processors_prompt_and_decoding_keeps_new_tokens_only(tiny_paligemma):
    processor, _, layout, collator = setup(tiny_paligemma)
    batch = collator(generation_rows())
    expected = encode(processor, images=IMAGES, text=[DEFAULT_PROMPT] * 2)
    assert set(batch) == {"pixel_values", "input_ids", "token_type_ids", "attention_mask", "image_index"}
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(batch[key], expected[key]), key
    assert (batch["token_type_ids"] == 0).all()
    assert set(generation_inputs(batch)) == {"pixel_values", "input_ids", "token_type_ids", "attention_mask"}

    tok = processor.tokenizer
    caption = tok("a red dog", add_special_tokens=False).input_ids
    generated = torch.tensor([[*batch["input_ids"][0].tolist(), *caption, tok.eos_token_id, IGNORE_INDEX]])
    assert layout.decode(generated, tok) == ["a red dog"]  # the prompt ("caption en") is not part of the caption


def test_a_truncated_caption_keeps_its_eos(tiny_paligemma):
    processor, _, layout, collator = setup(tiny_paligemma, max_caption_length=2)
    batch = collator(training_rows())
    tok = processor.tokenizer
    caption_labels = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist()
    assert caption_labels == tok.convert_tokens_to_ids(["the", "▁green"]) + [tok.eos_token_id]


# --- loss and the first generated token -----------------------------------------------------------------------------


@pytest.mark.parametrize("gemma2", [True, False], ids=["paligemma2", "paligemma1"])
def test_loss_is_next_token_cross_entropy_over_caption_tokens(tiny_paligemma, tmp_path, gemma2):
    path = tiny_paligemma if gemma2 else build_tiny_paligemma(tmp_path / "pg1", gemma2=False)
    _, family, _, collator = setup(path)
    model = family.model_class.from_pretrained(path).eval()
    check_loss_is_next_token_cross_entropy(model, collator, training_rows())


def test_paligemma1_on_sdpa_does_not_see_the_caption_ahead_with_the_collators_rows(tmp_path):
    """PaliGemma 1 (Gemma, SDPA) attends both ways over an unpadded row that has no token_type_ids
    (tests/test_paligemma_model.py pins that upstream hazard); the collator's rows always carry them."""
    path = build_tiny_paligemma(tmp_path / "pg1", gemma2=False)
    _, family, _, collator = setup(path)
    model = family.model_class.from_pretrained(path, attn_implementation="sdpa").eval()
    logits = []
    for caption in ("a red dog", "a red cat"):
        batch = collator(training_rows(IMAGES[:1], [caption]))
        assert "token_type_ids" in batch and (batch["attention_mask"] == 1).all()  # no padding to hide a leak
        with torch.no_grad():
            logits.append(model(**batch).logits[0])
    # "dog" / "cat" is the second-to-last token: nothing before it may change.
    torch.testing.assert_close(logits[0][:-2], logits[1][:-2], atol=0, rtol=0)


def test_first_generated_token_is_what_training_teaches_at_the_last_prompt_position(tiny_paligemma):
    processor, family, layout, collator = setup(tiny_paligemma)
    model = sharpen(family.model_class.from_pretrained(tiny_paligemma).eval())
    prompt = collator(generation_rows())
    generated = check_first_token_is_learnt_where_generate_predicts_it(model, layout, collator(training_rows()), prompt)

    # Without token_type_ids generate would run PaliGemma 2's prefix causally: other logits.
    without = {key: value for key, value in generation_inputs(prompt).items() if key != "token_type_ids"}
    with torch.no_grad():
        causal = model.generate(
            **without, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert (causal.logits[0] - generated.logits[0]).abs().max() > 1e-3


# --- end to end: main() ---------------------------------------------------------------------------------------------


def run_card_snippet(code: str, image_path: Path) -> str:
    code = re.sub(r"^image_path = .*$", f"image_path = {json.dumps(str(image_path))}", code, count=1, flags=re.M)
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)
    return namespace["caption"]


def predictions_of(output: Path) -> dict[str, str]:
    lines = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    return {line["image"]: line["prediction"] for line in lines}


@pytest.fixture(scope="module")
def lora_run(tiny_paligemma, caption_folder, tmp_path_factory):
    """LoRA with the default prompt ("caption en"), image-grouped batches (vision tower frozen), a large learning rate
    so that the adapter matters, and 2 beams on batches of 2 (beam search expands token_type_ids too)."""
    output = tmp_path_factory.mktemp("paligemma-lora") / "out"
    argv = tiny_run_argv(
        tiny_paligemma, caption_folder, output, eval_baseline=True, learning_rate=1e-2, max_new_tokens=6, num_beams=2
    )
    return output, main(argv)


@pytest.mark.slow
def test_lora_run_evaluates_predicts_and_writes_a_card_whose_snippet_captions_alike(lora_run, caption_folder):
    output, results = lora_run
    for phase, prefix in (("baseline", "eval"), ("eval", "eval"), ("predict", "test")):
        for key in ("bleu_4", "rouge_l", "cider", "loss"):
            assert f"{prefix}_{key}" in results[phase], (phase, key)
    assert results["eval"]["eval_loss"] < results["baseline"]["eval_loss"]
    settings = json.loads((output / "captioning_config.json").read_text())
    assert settings["family"] == "paligemma" and settings["caption_prompt"] == "caption en"
    assert settings["generation"]["num_beams"] == 2 and settings["generation"]["max_new_tokens"] == 6
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["target_modules"] and all("language_model" in name for name in adapter["target_modules"])
    weights = load_file(output / "adapter_model.safetensors")
    assert all(value.abs().max() > 0 for key, value in weights.items() if "lora_B" in key)

    predictions = predictions_of(output)
    assert len(predictions) == 3 and all(isinstance(caption, str) for caption in predictions.values())
    card = (output / "README.md").read_text()
    assert "paligemma" in ModelCard(card).data.tags and "PaliGemma" in card
    code = explicit_snippet(card)
    assert "token_type_ids=torch.zeros_like(input_ids)" in code
    for image, prediction in list(predictions.items())[:2]:
        assert run_card_snippet(code, caption_folder / image) == prediction

    # caption_images.py on the run's output: the run's prompt and generation settings, the same captions.
    images = caption_folder.parent / "paligemma-test-images"
    images.mkdir(exist_ok=True)
    for image in predictions:
        (images / image).write_bytes((caption_folder / image).read_bytes())
    result = caption_images.main(
        ["--model", str(output), "--images", str(images), "--output", str(images / "captions.jsonl")]
        + ["--num_workers", "0", "--batch_size", "2"]
    )
    assert {Path(path).name: caption for path, caption in result.captions} == predictions


@pytest.mark.slow
def test_merged_model_gives_the_logits_and_captions_of_base_plus_adapter(lora_run, tiny_paligemma, tmp_path):
    output, _ = lora_run
    merged = tmp_path / "merged"
    assert merge_main([str(output), "--output_dir", str(merged)]) == merged
    with_adapter = load_captioner(output, device="cpu")
    standalone = load_captioner(merged, device="cpu")
    assert isinstance(with_adapter.model, PeftModel) and not isinstance(standalone.model, PeftModel)
    assert standalone.caption_prompt == with_adapter.caption_prompt == "caption en"
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]
    images = [Image.new("RGB", (40 + 4 * i, 36), colour) for i, colour in enumerate(colours)]
    captions = ["a red dog", "two green cats on the grass", "a man", "a yellow ball on a white background"]
    batch = with_adapter.collator.collate_training(training_rows(images, captions))
    with torch.no_grad():
        expected = with_adapter.model(**batch).logits
        base = PALIGEMMA.model_class.from_pretrained(tiny_paligemma).eval()
        assert (base(**batch).logits - expected).abs().max() > 1e-3  # the adapter changes the model
        assert (standalone.model(**batch).logits - expected).abs().max() <= 1e-5
    for num_beams in (1, 3):
        assert standalone.caption(images, num_beams=num_beams) == with_adapter.caption(images, num_beams=num_beams)


@pytest.mark.slow
def test_lora_run_pushed_to_a_hub_loads_and_captions(lora_run, tiny_paligemma, tmp_path):
    output, _ = lora_run
    repo = f"{USER}/paligemma-lora"
    with HubServer() as server:
        proc = run_cli(str(output), "--hub_model_id", repo, "--base_model_id", HUB_BASE, server=server, home=tmp_path)
        assert proc.returncode == 0, proc.stderr
        with client_for(server, tmp_path / "client"):
            download = Path(snapshot_download(repo, token=TOKEN, local_dir=tmp_path / "download"))
        assert server.errors == []
    assert json.loads((download / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_BASE
    card = (download / "README.md").read_text()
    assert f'MODEL_ID = "{repo}"' in card and f'BASE_ID = "{HUB_BASE}"' in card
    images = [Image.new("RGB", (40, 36), colour) for colour in ((30, 30, 220), (230, 220, 30))]
    from_hub = load_captioner(download, base_model=str(tiny_paligemma), device="cpu")
    local = load_captioner(output, device="cpu")
    assert from_hub.caption(images) == local.caption(images)


@pytest.mark.slow
def test_4bit_lora_and_full_finetuning_with_a_frozen_vision_tower(tiny_paligemma, caption_folder, tmp_path):
    quick = dict(eval_strategy="no", save_strategy="no", max_new_tokens=4)
    qlora = main(tiny_run_argv(tiny_paligemma, caption_folder, tmp_path / "qlora", load_in_4bit=True, **quick))
    assert qlora["train"]["train_loss"] > 0 and "eval_cider" in qlora["eval"] and "test_cider" in qlora["predict"]
    assert (tmp_path / "qlora" / "adapter_model.safetensors").is_file()

    full = tmp_path / "full"
    results = main(
        tiny_run_argv(tiny_paligemma, caption_folder, full, use_lora=False, freeze_vision_tower=True, **quick)
    )
    assert "eval_cider" in results["eval"] and len(predictions_of(full)) == 3
    # Compared as loaded (the files hold the Hub's key names: vision_tower.*, language_model.model.*).
    trained = dict(PALIGEMMA.model_class.from_pretrained(full).named_parameters())
    base = dict(PALIGEMMA.model_class.from_pretrained(tiny_paligemma).named_parameters())
    assert trained.keys() == base.keys()
    changed = {name for name in base if not torch.equal(trained[name], base[name])}
    vision = {name for name in base if name.startswith("model.vision_tower.")}
    assert vision and not changed & vision  # frozen
    assert any(name.startswith("model.multi_modal_projector.") for name in changed)
    assert any(name.startswith("model.language_model.layers.") for name in changed)


@pytest.mark.slow
def test_overfits_a_handful_of_images_to_a_high_validation_cider(tiny_paligemma, tmp_path):
    """Training and generation agree on the layout: five memorised captions come back, scored on the same images."""
    captions = {
        "red": "a red dog on the grass",
        "green": "two green cats sitting in a field",
        "blue": "a man standing on the beach",
        "yellow": "a yellow ball on the street",
        "white": "a small white square at the top",
    }
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
    colours["white"] = (240, 240, 240)
    data = tmp_path / "data"
    for split in ("train", "validation"):  # the same images and captions in both
        (data / split).mkdir(parents=True)
        with open(data / split / "metadata.jsonl", "w") as handle:
            for name, caption in captions.items():
                Image.new("RGB", (32, 32), colours[name]).save(data / split / f"{name}.png")
                handle.write(json.dumps({"file_name": f"{name}.png", "caption": caption}) + "\n")
    output = tmp_path / "out"
    results = main(
        to_argv(
            model_name_or_path=tiny_paligemma,
            dataset_dir=data,
            output_dir=output,
            do_train=True,
            do_eval=True,
            validation_split_percentage=0,
            test_split_percentage=0,
            use_lora=False,
            num_train_epochs=200,
            learning_rate=3e-3,
            per_device_train_batch_size=5,
            eval_strategy="no",
            save_strategy="no",
            max_new_tokens=12,
            dataloader_num_workers=0,
            compute_meteor=False,
            report_to="none",
            seed=0,
        )
    )
    assert results["eval"]["eval_cider"] >= 1.0, results["eval"]  # 10.0 (every caption back word for word) here
