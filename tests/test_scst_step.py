"""One self-critical step (captioning/scst.py SelfCritic) on tiny models: samples per image in order, rewards
against the right image's references, and a loss equal to the policy-gradient loss computed sample by sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from captioning.arguments import DataArguments, LoraArguments, ModelArguments
from captioning.cider_reward import CiderD
from captioning.families import detect_family
from captioning.grouping import shared_image_features
from captioning.modeling import image_feature_module, load_model
from captioning.scst import SeededSampling, SelfCritic, mask_unfinished, policy_gradient_loss, sample_seeds
from collators import CaptionCollator, build_layout
from tests.conftest import FAMILY_FIXTURES

REFERENCES = [["a red dog", "the dog is red"], ["two blue cats"], ["a man on the grass"]]


def critic_for(path, samples=3, baseline="mean"):
    config = AutoConfig.from_pretrained(path)
    family = detect_family(config)
    torch.manual_seed(0)
    model = load_model(ModelArguments(model_name_or_path=str(path)), LoraArguments(lora_dropout=0.0), config, family)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    processor = AutoProcessor.from_pretrained(path)
    if family.configure_processor is not None:  # as run_captioning does: the flags' defaults
        family.configure_processor(processor, DataArguments())
    layout = build_layout(family, config, processor)
    collator = CaptionCollator(processor.image_processor, processor.tokenizer, layout)
    end = model.generation_config.eos_token_id
    critic = SelfCritic(
        reward=CiderD(REFERENCES),
        layout=layout,
        tokenizer=processor.tokenizer,
        pad_rows=collator.pad_rows,
        samples=samples,
        baseline=baseline,
        max_new_tokens=6,
        end_ids=tuple({layout.eos_id, *([end] if isinstance(end, int) else end or [])}),
    )
    feature_module = image_feature_module(model, family)

    def shared(model_, inputs, group):
        return shared_image_features(model_, inputs, group, layout, feature_module)

    return model, collator, critic, shared


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_scst_loss_equals_the_policy_gradient_loss_of_each_sample_alone(request, fixture):
    model, collator, critic, shared = critic_for(request.getfixturevalue(fixture))
    images = [Image.new("RGB", (40, 30), colour) for colour in [(200, 20, 20), (20, 20, 200)]]
    batch = collator([{"image": image, "image_index": i} for i, image in zip([2, 0], images, strict=True)])
    drawn: list = []
    original = critic.generate

    def recording(generator, inputs, greedy, seeds=()):
        result = original(generator, inputs, greedy, seeds)
        drawn.append(result)
        return result

    critic.generate = recording
    recorded_rewards: list = []
    critic.rewards = lambda captions, image_ids: (
        recorded_rewards.append((list(captions), list(image_ids))) or CiderD.scores(critic.reward, captions, image_ids)
    )
    model.eval()  # no dropout: the grouped and the one-by-one forward must agree exactly
    torch.manual_seed(1)
    loss = critic.loss(model, model, batch, shared)
    ((caption_ids, ended),) = drawn
    captions, image_ids = recorded_rewards[0]
    assert image_ids == [2, 2, 2, 0, 0, 0]  # K samples per image, in batch order, scored against that image
    assert len(caption_ids) == 6
    rewards = critic.reward.scores(captions, image_ids).reshape(2, 3)
    advantages = rewards - (rewards.sum(1, keepdims=True) - rewards) / 2
    stats = critic.take_stats()
    assert stats["scst_reward"] == pytest.approx(rewards.mean())
    assert stats["scst_sample_length"] == pytest.approx(np.mean([len(ids) for ids in caption_ids]))
    # The same loss, one sample at a time through the plain (ungrouped) forward.
    expected = []
    for k, ids in enumerate(caption_ids):
        image_inputs, counts = collator.processed_images([{"image": images[k // 3]}])
        row = collator.pad_rows([critic.layout.training_row(ids, None if counts is None else counts[0])])
        if not ended[k]:
            row["labels"] = mask_unfinished(row["labels"], [len(ids)], [False])
        logits = model(**row, **image_inputs).logits
        single, _ = policy_gradient_loss(
            logits, row["labels"], torch.tensor([advantages.reshape(-1)[k]]), critic.layout.predicts_next_token
        )
        expected.append(single)
    torch.testing.assert_close(loss, torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)


def test_seeded_sampling_draws_from_the_softmax_and_depends_only_on_seed_and_position():
    """Gumbel-max with per-row, per-position noise: the drawn tokens follow softmax(scores / T) (checked by
    frequency over many seeds), and a row's draw does not depend on the other rows of the batch."""
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).float()
    input_ids = torch.zeros(1, 7, dtype=torch.long)
    counts = torch.zeros(4)
    for seed in range(4000):
        drawn = SeededSampling([seed], temperature=1.0)(input_ids, scores.clone())
        assert torch.isinf(drawn).sum() == 3 and drawn.max() == 0
        counts[drawn.argmax()] += 1
    torch.testing.assert_close(counts / 4000, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03, rtol=0)
    batch = torch.randn(3, 50)
    together = SeededSampling([11, 12, 13], 0.7)(input_ids.repeat(3, 1), batch.clone()).argmax(-1)
    alone = [
        SeededSampling([seed], 0.7)(input_ids[:1], batch[i : i + 1].clone()).argmax(-1)
        for i, seed in enumerate([11, 12, 13])
    ]
    assert together.tolist() == torch.cat(alone).tolist()
    later = SeededSampling([11, 12, 13], 0.7)(torch.zeros(3, 8, dtype=torch.long), batch.clone()).argmax(-1)
    assert later.tolist() != together.tolist()  # another position, other noise


def test_sample_seeds_name_image_and_sample_not_batch_position():
    seeds = sample_seeds(42, step=3, images=[7, 2], samples=2)
    assert len(set(seeds)) == 4
    assert sample_seeds(42, 3, [2], 2) == seeds[2:]  # image 2's samples, wherever it sits in the batch
    assert sample_seeds(42, 4, [2], 2) != seeds[2:] and sample_seeds(43, 3, [2], 2) != seeds[2:]


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_the_training_row_of_a_sample_replays_what_generate_wrote(request, fixture):
    """The loss scores the tokens that were sampled: a sample's training row feeds the model exactly the sequence
    ``generate`` wrote (a decoder's input ids; an encoder-decoder's decoder start then its labels), up to its end.
    Neither a decoder start token (Flan-T5's pad, Florence-2's </s>) nor Florence-2's forced <s> is a caption token."""
    model, collator, critic, _ = critic_for(request.getfixturevalue(fixture))
    layout = critic.layout
    images = [Image.new("RGB", (40, 30), colour) for colour in [(200, 20, 20), (20, 20, 200)]]
    batch = collator([{"image": image, "image_index": i} for i, image in enumerate(images)])
    inputs = {key: value for key, value in batch.items() if key != "image_index"}
    model.eval()
    seeds = sample_seeds(0, 0, np.arange(2), critic.samples)
    with torch.no_grad():
        generated = model.generate(**inputs, **critic.generation_settings(greedy=False, seeds=seeds))
    caption_ids, ended = critic.sampled_captions(generated, inputs["input_ids"])
    _, counts = collator.processed_images([{"image": image} for image in images])
    decoder_start = model.generation_config.decoder_start_token_id
    lengths = []
    for k, ids in enumerate(caption_ids):
        row = layout.training_row(ids, None if counts is None else counts[k // critic.samples])
        learnt = [position for position, label in enumerate(row["labels"]) if label != -100]
        wrote = generated[k].tolist()
        if layout.predicts_next_token:
            padding = int((inputs["attention_mask"][k // critic.samples] == 0).sum())
            replayed, wrote = row["input_ids"][: learnt[-1] + 1], wrote[padding:]
        else:
            replayed = [decoder_start, *[row["labels"][position] for position in learnt]]
        if not ended[k]:
            replayed = replayed[:-1]  # its end token is the row's, not sampled (and not learnt: mask_unfinished)
        assert wrote[: len(replayed)] == replayed, k
        lengths.append(len(ids))
    assert any(lengths)  # not all samples empty
