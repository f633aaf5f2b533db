"""LoRA targets per family, overrides and errors, k-bit loading, full fine-tuning with a frozen vision tower."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig

from captioning.arguments import LoraArguments, ModelArguments
from captioning.families import detect_family
from captioning.modeling import (
    apply_label_smoothing,
    check_label_smoothing,
    linear_module_names,
    load_model,
    resolve_lora_targets,
)


def _load(path, **lora):
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    model = load_model(ModelArguments(model_name_or_path=str(path)), LoraArguments(**lora), config, family)
    return model, family


def _targets(path, **lora):
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    model = family.model_class.from_pretrained(path)
    return resolve_lora_targets(model, family, LoraArguments(**lora)), model


def test_blip_default_targets_are_text_decoder_query_value(tiny_blip):
    targets, _ = _targets(tiny_blip)
    # 2 layers x (self-attention + cross-attention) x (query, value); never the vision tower's fused qkv
    assert sorted(targets) == sorted(
        f"text_decoder.bert.encoder.layer.{layer}.{block}.self.{name}"
        for layer in (0, 1)
        for block in ("attention", "crossattention")
        for name in ("query", "value")
    )


def test_blip2_defaults_are_language_model_attention_only(tiny_blip2_opt, tiny_blip2_t5):
    opt, _ = _targets(tiny_blip2_opt)
    assert len(opt) == 2 * 4 and all(name.startswith("language_model.") for name in opt)
    assert {name.rsplit(".", 1)[1] for name in opt} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    t5, _ = _targets(tiny_blip2_t5)
    assert all(name.startswith("language_model.") for name in t5)
    assert {name.rsplit(".", 1)[1] for name in t5} == {"q", "k", "v", "o"}
    # encoder self-attention (2 layers) + decoder self- and cross-attention (2 layers each), 4 projections each
    assert len(t5) == (2 + 2 * 2) * 4


def test_override_all_linear_and_vision(tiny_blip):
    everything, model = _targets(tiny_blip, lora_target_modules=["all-linear"])
    linear = linear_module_names(model)
    assert everything == [
        name for name in linear if name.startswith("text_decoder.") and not name.endswith("cls.predictions.decoder")
    ]
    with_vision, _ = _targets(tiny_blip, lora_vision=True)
    assert sorted(set(with_vision) - set(_targets(tiny_blip)[0])) == sorted(
        f"vision_model.encoder.layers.{layer}.self_attn.{name}" for layer in (0, 1) for name in ("qkv", "projection")
    )
    comma, _ = _targets(tiny_blip, lora_target_modules=["query,key"])
    assert {name.rsplit(".", 1)[1] for name in comma} == {"query", "key"}


def test_target_matching_nothing_lists_the_linear_names(tiny_blip):
    with pytest.raises(ValueError) as error:
        _targets(tiny_blip, lora_target_modules=["q_proj"])
    message = str(error.value)
    assert "'q_proj' matches no Linear layer" in message
    for name in ("query", "key", "value", "dense", "qkv", "projection", "fc1", "fc2"):
        assert name in message


def test_lora_model_trains_only_adapters(tiny_blip):
    model, _ = _load(tiny_blip)
    assert isinstance(model, PeftModel)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_full_finetune_with_frozen_vision_tower(tiny_blip2_opt):
    model, family = _load(tiny_blip2_opt, use_lora=False, freeze_vision_tower=True)
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (not name.startswith("vision_model.")), name


@pytest.mark.parametrize(("flag", "layer"), [("load_in_8bit", "Linear8bitLt"), ("load_in_4bit", "Linear4bit")])
def test_kbit_loading_quantizes_and_keeps_lora_trainable(tiny_blip, flag, layer):
    model, _ = _load(tiny_blip, **{flag: True})
    kinds = {type(module).__name__ for module in model.modules()}
    assert layer in kinds
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_label_smoothing_goes_into_blip_loss(tiny_blip, tiny_blip2_t5):
    model, family = _load(tiny_blip, use_lora=False)
    batch = {
        "pixel_values": torch.zeros(1, 3, 32, 32),
        "input_ids": torch.tensor([[model.config.text_config.bos_token_id, 5, 6, 3]]),
        "labels": torch.tensor([[-100, 5, 6, 3]]),
    }
    plain = model(**batch).loss
    apply_label_smoothing(model, family, 0.1)
    smoothed = model(**batch).loss
    logits = model(**batch).logits[:, :-1].reshape(-1, model.config.text_config.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(smoothed, expected)
    assert not torch.isclose(plain, smoothed)
    with pytest.raises(ValueError, match="supported for BLIP only"):
        check_label_smoothing(detect_family(AutoConfig.from_pretrained(tiny_blip2_t5)), 0.1)


def test_unsupported_model_type_is_a_clear_error():
    from transformers import BertConfig

    with pytest.raises(ValueError, match="not a captioner"):
        detect_family(BertConfig())


@pytest.mark.parametrize(
    ("flag", "value", "readers"),
    [("min_pixels", 3136, "Qwen"), ("max_pixels", 200704, "Qwen"), ("image_splitting", True, "SmolVLM")],
)
def test_an_image_flag_of_another_family_is_refused_naming_the_flag_and_who_reads_it(tiny_blip, flag, value, readers):
    from captioning.arguments import DataArguments
    from captioning.families import check_image_flags

    family = detect_family(AutoConfig.from_pretrained(tiny_blip))
    check_image_flags(family, DataArguments())  # the defaults are fine for every family
    with pytest.raises(ValueError, match=rf"--{flag} applies to .*{readers}.*, not to BLIP.*leave it out"):
        check_image_flags(family, DataArguments(**{flag: value}))
