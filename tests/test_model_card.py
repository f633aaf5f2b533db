"""The model card of a real run: Hub metadata, scores equal to the result files, a working usage snippet."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from captioning.arguments import parse_args
from captioning.data import load_caption_splits
from captioning.families import detect_family
from captioning.images import load_image
from captioning.model_card import (
    adapted_module_names,
    build_card_context,
    count_split_sizes,
    describe_hardware,
    format_duration,
    framework_versions,
    is_hub_id,
    load_card_context,
    publication_context,
    render_model_card,
    write_model_card,
)
from captioning.modeling import load_model
from captioning.outputs import write_captioning_config
from captioning.plots import load_prediction_samples, plot_samples, plot_training_curves
from captioning.trainer import build_generation_kwargs
from collators import CaptionCollator, build_layout
from run_captioning import main
from tests.card_snippets import explicit_snippet
from tests.conftest import tiny_run_argv

pytestmark = pytest.mark.slow

CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "loss")  # METEOR off (no Java)
HUB_BASE = "Salesforce/blip-image-captioning-base"
FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


def _argv(model_dir, data_dir, output_dir, **flags) -> list[str]:
    return tiny_run_argv(model_dir, data_dir, output_dir, logging_steps=1, **flags)


def _finish_run(argv, data_dir, *, plots: bool, **card_flags):
    """What the training script does at the end of a run: plots, then the card. Returns everything tests need."""
    args = parse_args(argv)
    model_args, data_args, _lora_args, _caption_args, training_args = args
    output = Path(training_args.output_dir)
    if plots:
        state = json.loads((output / "trainer_state.json").read_text())
        baseline = json.loads((output / "baseline_results.json").read_text())
        plot_training_curves(state["log_history"], output / "training_curves.png", baseline=baseline)
        plot_samples(load_prediction_samples(output / "predictions.jsonl", data_dir), output / "samples.png")
    family = detect_family(AutoConfig.from_pretrained(model_args.model_name_or_path))
    sizes = count_split_sizes(load_caption_splits(data_args))
    context = build_card_context(
        *args,
        family=family,
        label_smoothing=training_args.label_smoothing_factor,
        split_sizes=sizes,
        **card_flags,
    )
    write_model_card(output, context)
    return SimpleNamespace(output=output, args=args, family=family, sizes=sizes, context=context, data=data_dir)


@pytest.fixture(scope="module")
def adapter_run(tiny_blip, caption_folder, tmp_path_factory):
    """LoRA on BLIP with a prompt, label smoothing, a baseline evaluation, curves and a gallery."""
    argv = _argv(
        tiny_blip,
        caption_folder,
        tmp_path_factory.mktemp("adapter") / "out",
        num_train_epochs=2,
        eval_baseline=True,
        caption_prompt="a picture of ",
        label_smoothing_factor=0.1,
    )
    main(argv)
    return _finish_run(argv, caption_folder, plots=True)


@pytest.fixture(scope="module")
def full_run(tiny_blip, caption_folder, tmp_path_factory):
    """Full fine-tuning, no baseline, no evaluation during training, no plots."""
    argv = _argv(
        tiny_blip,
        caption_folder,
        tmp_path_factory.mktemp("full") / "out",
        use_lora=False,
        learning_rate=1e-4,
        eval_strategy="no",
        save_strategy="no",
    )
    main(argv)
    return _finish_run(argv, caption_folder, plots=False)


def _text(run) -> str:
    return (run.output / "README.md").read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.search(r"^#{1,3} ", text[start + len(heading) :], flags=re.M)
    return text[start : start + len(heading) + following.start()] if following else text[start:]


def _table(text: str) -> list[list[str]]:
    """The first markdown table in ``text``: header and body rows as cell lists."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in rows]
    return [cells[0], *cells[2:]]


RESULT_FILES = {"baseline": "baseline_results.json", "eval": "eval_results.json", "predict": "predict_results.json"}


def _read(run, name: str) -> dict:
    """A JSON file of the run's output_dir, by file name or by baseline / eval / predict."""
    return json.loads((run.output / RESULT_FILES.get(name, name)).read_text())


def _run_snippet(code: str, image_path: Path, **ids) -> str:
    code = re.sub(r"^image_path = .*$", f"image_path = {json.dumps(str(image_path))}", code, count=1, flags=re.M)
    for name, value in ids.items():
        code, found = re.subn(rf"^{name} = .*$", f"{name} = {json.dumps(str(value))}", code, count=1, flags=re.M)
        assert found, name
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)
    return namespace["caption"]


# --------------------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------------------


def test_adapter_card_metadata(adapter_run):
    data = ModelCard.load(adapter_run.output / "README.md").data
    assert data.library_name == "peft"
    assert data.pipeline_tag == "image-text-to-text"
    assert "base_model" not in data.to_dict()  # the base is a local folder, not a Hub id
    assert {"image-captioning", "blip", "lora", "peft"} <= set(data.tags)
    assert not any(tag.startswith("base_model:") for tag in data.tags)
    assert data.license is None and data.datasets is None


def test_full_fine_tune_card_metadata(full_run):
    data = ModelCard.load(full_run.output / "README.md").data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-text-to-text"
    assert "base_model" not in data.to_dict()
    assert "lora" not in data.tags and "peft" not in data.tags


def test_hub_base_model_hub_dataset_and_license(adapter_run, tmp_path):
    model_args, data_args, *rest = adapter_run.args
    context = build_card_context(
        dataclasses.replace(model_args, model_name_or_path=HUB_BASE),
        dataclasses.replace(data_args, dataset_name="someone/stickers", dataset_dir=None),
        *rest,
        family=adapter_run.family,
        label_smoothing=0.1,
        output_dir=adapter_run.output,
        hub_model_id="someone/blip-stickers",
        license="apache-2.0",
        language="en",
    )
    data = ModelCard(render_model_card(context, tmp_path)).data
    assert data.base_model == HUB_BASE
    assert f"base_model:adapter:{HUB_BASE}" in data.tags
    assert data.datasets == ["someone/stickers"]
    assert (data.license, data.language, data.model_name) == ("apache-2.0", "en", "blip-stickers")
    assert {result.dataset_type for result in data.eval_results} == {"someone/stickers"}


def test_base_model_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "blip").mkdir(parents=True)
    assert is_hub_id(HUB_BASE) and is_hub_id("gpt2") and is_hub_id("models/other")
    assert not is_hub_id("models/blip")  # an existing local folder, though shaped like owner/name
    assert not is_hub_id("/data/models/blip") and not is_hub_id("../blip") and not is_hub_id("")


# --------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_name", ["adapter_run", "full_run"])
def test_model_index_equals_the_result_files(run_name, request):
    run = request.getfixturevalue(run_name)
    results = ModelCard.load(run.output / "README.md").data.eval_results
    for split, file, prefix in (
        ("validation", "eval_results.json", "eval_"),
        ("test", "predict_results.json", "test_"),
    ):
        expected = _read(run, file)
        card = {r.metric_type: r.metric_value for r in results if r.dataset_split == split}
        assert set(card) == set(CAPTION_METRICS)
        for metric in CAPTION_METRICS:
            assert card[metric] == expected[prefix + metric], (split, metric)
        assert all(r.task_type == "image-text-to-text" for r in results)


def test_results_table_shows_baseline_fine_tuned_delta_and_test(adapter_run):
    header, *rows = _table(_section(_text(adapter_run), "## Evaluation results"))
    assert header == ["Metric", "Before fine-tuning", "Fine-tuned", "Δ", "Test (fine-tuned)"]
    table = {row[0]: row[1:] for row in rows}
    baseline, evaluation, test = (_read(adapter_run, name) for name in ("baseline", "eval", "predict"))
    names = {"bleu_1": "BLEU-1", "bleu_4": "BLEU-4", "rouge_l": "ROUGE-L", "cider": "CIDEr-D", "loss": "Loss"}
    assert set(names.values()) <= set(table) and "METEOR" not in table
    for key, name in names.items():
        before, after, now_test = baseline[f"eval_{key}"], evaluation[f"eval_{key}"], test[f"test_{key}"]
        assert table[name] == [f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}", f"{now_test:.4f}"]


def test_results_table_without_baseline(full_run):
    text = _text(full_run)
    header, *rows = _table(_section(text, "## Evaluation results"))
    assert header == ["Metric", "Validation", "Test"]
    table = {row[0]: row[1:] for row in rows}
    evaluation, test = _read(full_run, "eval_results.json"), _read(full_run, "predict_results.json")
    assert table["CIDEr-D"] == [f"{evaluation['eval_cider']:.4f}", f"{test['test_cider']:.4f}"]
    assert "PTB-tokenized" in text and "pycocoevalcap" in text and "all references of its image" in text


# --------------------------------------------------------------------------------------------------------------
# The usage snippet
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_name", ["adapter_run", "full_run"])
def test_snippet_reproduces_the_evaluated_captions(run_name, request):
    run = request.getfixturevalue(run_name)
    code = explicit_snippet(_text(run))
    assert ("PeftModel.from_pretrained" in code) == (run_name == "adapter_run")
    predictions = [json.loads(line) for line in (run.output / "predictions.jsonl").read_text().splitlines()]
    for row in predictions[:2]:
        caption = _run_snippet(code, run.data / row["image"])
        assert isinstance(caption, str) and caption
        assert caption == row["prediction"]  # same prompt, layout and generation settings as the evaluation


def test_snippet_with_hub_ids_runs_once_they_point_at_local_copies(adapter_run, tmp_path):
    model_args, *rest = adapter_run.args
    context = build_card_context(
        dataclasses.replace(model_args, model_name_or_path=HUB_BASE),
        *rest,
        family=adapter_run.family,
        label_smoothing=0.1,
        output_dir=adapter_run.output,
        hub_model_id="someone/blip-stickers",
    )
    code = explicit_snippet(render_model_card(context))
    assert 'MODEL_ID = "someone/blip-stickers"' in code and f'BASE_ID = "{HUB_BASE}"' in code
    image = tmp_path / "green.png"
    Image.new("RGB", (40, 36), (30, 200, 30)).save(image)
    caption = _run_snippet(code, image, MODEL_ID=adapter_run.output, BASE_ID=model_args.model_name_or_path)
    assert isinstance(caption, str) and caption


@pytest.mark.parametrize("family_name", ["blip2-opt", "blip2-t5"])
def test_blip2_snippet_captions_like_training(tiny_models, caption_folder, tmp_path, family_name):
    """The snippet builds BLIP-2's image tokens + prompt exactly as the collator does, and strips the prompt."""
    model_dir = tiny_models[family_name]
    output = tmp_path / "out"
    args = parse_args(_argv(model_dir, caption_folder, output, caption_prompt="a photo of "))
    model_args, data_args, lora_args, caption_args, _training_args = args
    config = AutoConfig.from_pretrained(model_dir)
    family = detect_family(config)
    torch.manual_seed(0)
    model = load_model(model_args, lora_args, config, family).eval()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so that loading it matters
            parameter.data.normal_(0, 0.5)
    processor = AutoProcessor.from_pretrained(model_dir)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    generation = build_generation_kwargs(caption_args, family)
    write_captioning_config(
        output,
        family=family.name,
        base_model=str(model_dir),
        caption_prompt=data_args.caption_prompt,
        generation_kwargs=generation,
        max_caption_length=data_args.max_caption_length,
    )
    image_path = caption_folder / "img_001.png"
    layout = build_layout(family, model.config, processor.tokenizer, data_args.caption_prompt)
    batch = CaptionCollator(processor.image_processor, processor.tokenizer, layout)(
        [{"image": load_image(image_path), "image_index": 0}]
    )
    batch.pop("image_index")
    with torch.no_grad():
        expected = layout.decode(model.generate(**batch, **generation), processor.tokenizer)[0]

    names = adapted_module_names(model)
    assert names and all(name.endswith(family.lora_target_modules) for name in names)
    context = build_card_context(*args, family=family, label_smoothing=0.0, lora_target_modules=names)
    write_model_card(output, context)
    text = _text(SimpleNamespace(output=output))
    assert "No evaluation was run." in text and ModelCard(text).data.eval_results is None
    assert f"({len(names)} layers)" in _rows(text, "### LoRA and quantization")["Target modules"]
    assert _run_snippet(explicit_snippet(text), image_path) == expected


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


def test_images_are_linked_only_when_present(adapter_run, full_run, tmp_path):
    text = _text(adapter_run)
    assert "](training_curves.png)" in text and "](samples.png)" in text
    assert (adapter_run.output / "training_curves.png").is_file() and (adapter_run.output / "samples.png").is_file()
    full_text = _text(full_run)  # run_captioning writes both pictures after every run; the card links what exists
    for name in ("training_curves.png", "samples.png"):
        assert (f"]({name})" in full_text) == (full_run.output / name).is_file()
    assert ".png)" not in render_model_card(adapter_run.context, tmp_path)  # an empty folder: nothing to link


def _rows(text: str, heading: str) -> dict[str, str]:
    return {row[0]: row[1] for row in _table(_section(text, heading))[1:]}


def test_hyperparameters_are_the_real_values(adapter_run):
    text = _text(adapter_run)
    rows = _rows(text, "### Hyper-parameters")
    assert rows["Learning rate"] == "0.001"
    assert rows["Epochs"] == "2"
    assert rows["Batch size per device (train / eval)"] == "4 / 2"
    assert rows["Gradient accumulation steps"] == "1"
    assert rows["Total train batch size"] == "4"
    assert rows["Learning-rate schedule"] == "linear"
    assert rows["Warmup"] == "none"
    assert rows["Weight decay"] == "0"
    assert rows["Precision"] == "fp32"
    assert rows["Seed"] == "42"
    assert rows["Label smoothing"].startswith("0.1")  # the value the loss used, not the zeroed training argument
    assert rows["Max caption length"] == "64 tokens"
    assert rows["Caption prompt"].startswith('`"a picture of "`')
    assert rows["Checkpoint kept"].startswith("best validation `cider`")

    splits = _table(_section(text, "## Training data"))
    assert {row[0]: (int(row[1]), int(row[2])) for row in splits[1:]} == adapter_run.sizes
    assert adapter_run.sizes["validation"] == (3, 9)

    generation = _rows(text, "### Generation")
    assert generation["`num_beams`"] == "3" and generation["`max_new_tokens`"] == "5"


def test_lora_quantization_hardware_and_versions(adapter_run, full_run):
    text = _text(adapter_run)
    lora = _rows(text, "### LoRA and quantization")
    assert (lora["Rank r"], lora["Alpha"], lora["Dropout"]) == ("16", "32 (scale 2)", "0.05")
    assert set(re.findall(r"`(\w+)`", lora["Target modules"])) == {"query", "value"}
    assert lora["Quantization"] == "none"
    assert f"**Hardware:** {describe_hardware()}" in text
    train = _read(adapter_run, "train_results.json")
    assert f"**Training time:** {format_duration(train['train_runtime'])}" in text
    assert f"{train['train_samples_per_second']:g} training samples per second" in text
    for package, version in framework_versions().items():
        assert f"- {package} {version}\n" in text
    assert "bitsandbytes" not in _section(text, "### Framework versions")
    assert "No LoRA: all weights were trained. Quantization: none." in _text(full_run)
    assert _rows(_text(full_run), "### Hyper-parameters")["Checkpoint kept"] == "the last"


@pytest.mark.parametrize(("flag", "shown"), [("load_in_8bit", "8-bit base weights"), ("load_in_4bit", "4-bit NF4")])
def test_quantization_is_stated(adapter_run, tmp_path, flag, shown):
    model_args, data_args, lora_args, *rest = adapter_run.args
    context = build_card_context(
        model_args,
        data_args,
        dataclasses.replace(lora_args, **{flag: True}),
        *rest,
        family=adapter_run.family,
        label_smoothing=0.1,
        output_dir=adapter_run.output,
    )
    text = render_model_card(context, tmp_path)
    assert _rows(text, "### LoRA and quantization")["Quantization"].startswith(shown)
    assert "bitsandbytes" in _section(text, "### Framework versions")
    assert "bitsandbytes" in ModelCard(text).data.tags


def test_no_token_in_the_card(adapter_run, tmp_path):
    model_args, data_args, lora_args, caption_args, training_args = adapter_run.args
    training_args = dataclasses.replace(training_args, hub_token=FAKE_TOKEN, push_to_hub=False)
    context = build_card_context(
        model_args,
        dataclasses.replace(data_args, dataset_dir=f"data/{FAKE_TOKEN}"),
        lora_args,
        caption_args,
        training_args,
        family=adapter_run.family,
        label_smoothing=0.1,
        output_dir=adapter_run.output,
    )
    text = render_model_card(context, tmp_path)
    assert FAKE_TOKEN not in text and not re.search(r"hf_[A-Za-z0-9]{20,}", text)
    assert "[REDACTED]" in text
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", _text(adapter_run))


def test_the_card_context_is_kept_for_a_later_push(adapter_run):
    assert load_card_context(adapter_run.output) == adapter_run.context
    assert adapter_run.context.data_paths == [str(adapter_run.data.resolve())]
    assert load_card_context(adapter_run.output.parent) is None


@pytest.mark.parametrize("shared", [False, True], ids=["no-samples", "samples"])
def test_a_card_for_a_push_names_hub_ids_and_what_of_the_data_it_shares(adapter_run, shared):
    files = {"predictions.jsonl": "the test predictions", "samples.png": "a gallery"} if shared else {}
    context = publication_context(
        adapter_run.context,
        repo_id="someone/blip-stickers",
        base_model_id=HUB_BASE,
        shared_data_files=files,
        shared_data_note="Because reasons.",
    )
    text = render_model_card(context, adapter_run.output)
    local = _text(adapter_run)
    code = explicit_snippet(text)
    assert 'MODEL_ID = "someone/blip-stickers"' in code and f'BASE_ID = "{HUB_BASE}"' in code
    assert text.count("\n# blip-stickers\n") == 1 and ModelCard(text).data.base_model == HUB_BASE
    folder = adapter_run.data.name  # the local dataset folder: named in the local card only
    assert f"`{folder}` (local folder)" in local and folder not in text
    assert "trained on unpublished data (local folder)" in text
    assert "A local dataset folder; it is not published with this model." in text
    section = _section(text, "### Dataset content in this repository")
    assert "### Dataset content in this repository" not in local
    if shared:
        assert section.split("\n", 2)[2].strip() == (
            "Besides the model, these files of this repository hold content of the training data:\n\n"
            "- `predictions.jsonl`: the test predictions\n- `samples.png`: a gallery"
        )
        assert "### Example predictions (test split)" in text and "](samples.png)" in text
    else:
        assert section.split("\n", 2)[2].strip() == (
            "None: no file derived from the training data (test images, captions, file names) is in this "
            "repository. Because reasons."
        )
        assert "Example predictions" not in text and "samples.png" not in text
    assert "### Example predictions (test split)" in local and "](samples.png)" in local


def test_split_sizes_fall_back_on_the_result_files(adapter_run):
    context = build_card_context(*adapter_run.args, family=adapter_run.family, label_smoothing=0.1)
    train_images, train_captions = adapter_run.sizes["train"]
    assert context.splits["train"] == (train_images, train_captions)
    assert context.splits["validation"][0] == adapter_run.sizes["validation"][0]


def test_format_duration():
    assert [format_duration(s) for s in (5.4, 61, 3600 * 2 + 300)] == ["5 s", "1 min 01 s", "2 h 05 min"]
