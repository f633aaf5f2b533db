"""Evaluation: generate sees only image + prompt, one caption per image, scored against all of its references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import BlipForConditionalGeneration

import metrics
from captioning.arguments import to_argv
from captioning.trainer import CaptioningTrainer
from collators import CaptionLayout
from run_captioning import main
from tests.conftest import make_caption_folder


def _run(model_dir, data_dir, output_dir, *extra):
    argv = to_argv(
        model_name_or_path=model_dir,
        dataset_dir=data_dir,
        output_dir=output_dir,
        do_eval=True,
        validation_split_percentage=40,
        test_split_percentage=0,
        per_device_eval_batch_size=3,
        max_new_tokens=4,
        num_beams=2,
        dataloader_num_workers=0,
        compute_meteor=False,
    )
    return main(argv + list(extra))


def test_generate_never_sees_a_reference_caption(tiny_blip, tmp_path, monkeypatch):
    data = make_caption_folder(tmp_path / "data", num_images=10, captions_per_image=5)
    calls = []
    original = BlipForConditionalGeneration.generate

    def spy(self, pixel_values, input_ids=None, attention_mask=None, **kwargs):
        calls.append(input_ids.clone())
        return original(self, pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", spy)
    _run(tiny_blip, data, tmp_path / "out", "--caption_prompt", "a photo of ")

    from transformers import AutoConfig, AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_blip).tokenizer
    config = AutoConfig.from_pretrained(tiny_blip)
    prompt = tokenizer("a photo of", add_special_tokens=False)["input_ids"]
    expected = [config.text_config.bos_token_id, *prompt, config.text_config.sep_token_id]
    rows = torch.cat(calls)
    assert len(rows) == 4  # 4 validation images, one generation each (not 4 x 5 caption rows)
    assert rows.tolist() == [expected] * 4


def test_every_reference_is_scored(tiny_blip, tmp_path, monkeypatch):
    data = make_caption_folder(tmp_path / "data", num_images=10, captions_per_image=5)
    seen = []
    original = metrics.CaptionScorer.__call__

    def spy(self, predictions, references):
        seen.append((list(predictions), [list(refs) for refs in references]))
        return original(self, predictions, references)

    monkeypatch.setattr(metrics.CaptionScorer, "__call__", spy)
    results = _run(tiny_blip, data, tmp_path / "out")
    predictions, references = seen[-1]
    assert len(predictions) == len(references) == 4
    assert all(len(refs) == 5 for refs in references)
    by_file = {
        json.loads(line)["file_name"]: json.loads(line)["caption"]
        for line in (data / "metadata.jsonl").read_text().splitlines()
    }
    assert all(tuple(refs) in {tuple(captions) for captions in by_file.values()} for refs in references)
    assert results["eval"]["eval_cider"] == pytest.approx(
        metrics.compute_metrics(predictions, references, use_meteor=False)["cider"]
    )


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


class _Processor:
    tokenizer = _Tokenizer()


def _bare_trainer():
    trainer = CaptioningTrainer.__new__(CaptioningTrainer)
    trainer.layout = CaptionLayout(kind="encoder_decoder", bos_id=None, eos_id=1, pad_id=0)
    trainer.processing_class = _Processor()
    return trainer


def test_gathered_captions_are_put_back_in_dataset_order_once():
    trainer = _bare_trainer()
    sequences = np.array([[12, -100], [10, 11], [13, 14], [12, -100]])  # last row: duplicate from batch padding
    index = np.array([2, 0, 1, 2])
    assert trainer.captions_in_dataset_order(sequences, index, 3) == ["w10 w11", "w13 w14", "w12"]


def test_a_missing_image_is_an_error():
    trainer = _bare_trainer()
    with pytest.raises(RuntimeError, match="no caption for 1 of 3 images"):
        trainer.captions_in_dataset_order(np.array([[5], [6]]), np.array([0, 2]), 3)


def _linear_trainer(output_dir) -> CaptioningTrainer:
    """A CaptioningTrainer around a plain module (saved as model.safetensors), enough to exercise save_model."""
    from transformers import Seq2SeqTrainingArguments

    return CaptioningTrainer(
        model=torch.nn.Linear(2, 2),
        args=Seq2SeqTrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True),
        layout=CaptionLayout(kind="encoder_decoder", bos_id=None, eos_id=1, pad_id=0),
        generation_kwargs={},
        scorer=None,
        run_id="run",
    )


def _top_files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_a_crash_during_the_final_save_keeps_the_old_model_set(tmp_path, monkeypatch):
    old = {"adapter_model.safetensors": b"old weights", "adapter_config.json": b"{}"}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    trainer = _linear_trainer(tmp_path)

    def killed(*args, **kwargs):  # training_args.bin is written after the weights: the crash comes mid-save
        raise OSError("killed")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(OSError, match="killed"):
        trainer.save_model()
    assert _top_files(tmp_path) == old
    assert (tmp_path / ".final-run" / "model.safetensors").is_file()  # the new set was being written aside

    monkeypatch.undo()
    trainer.save_model()
    assert sorted(_top_files(tmp_path)) == ["model.safetensors", "training_args.bin"]  # the adapter set is gone
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == []
