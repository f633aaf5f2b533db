"""Self-critical training's pieces (captioning/scst.py): baselines, sampled rows cut at their end, and a
policy-gradient loss whose gradient reaches only the sampled tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captioning.cider_reward import CiderD
from captioning.layout import IGNORE_INDEX
from captioning.scst import SelfCritic, baseline_rewards, mask_unfinished, policy_gradient_loss, split_at_end


def test_mean_of_other_samples_baseline_makes_each_images_advantages_sum_to_zero():
    rewards = np.array([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5], [0.0, 4.0, 1.0, 1.0]])
    baseline = baseline_rewards(rewards)
    assert baseline[0].tolist() == [11 / 3, 10 / 3, 3.0, 2.0]  # the mean of the three others
    np.testing.assert_allclose((rewards - baseline).sum(axis=1), 0.0, atol=1e-12)
    assert (rewards - baseline)[1].tolist() == [0.0] * 4  # equal samples teach nothing


def test_greedy_baseline_is_the_greedy_reward_for_every_sample():
    rewards = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert baseline_rewards(rewards, greedy=np.array([1.5, 5.0])).tolist() == [[1.5, 1.5], [5.0, 5.0]]
    with pytest.raises(ValueError, match="--scst_samples must be at least 2"):
        baseline_rewards(np.ones((2, 1)))


def test_samples_are_cut_before_their_first_end_token():
    tokens = torch.tensor([[5, 6, 2, 7, 0], [5, 2, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, IGNORE_INDEX]])
    captions, ended = split_at_end(tokens, end_ids=[2])
    assert captions == [[5, 6], [5], [5, 6, 7, 8, 9], []]
    assert ended == [True, True, False, True]


def test_a_sample_that_never_ended_learns_no_end_token():
    labels = torch.tensor([[-100, -100, 5, 6, 2, -100], [-100, -100, 5, 6, 7, 2]])
    masked = mask_unfinished(labels, caption_lengths=[2, 3], ended=[True, False])
    assert masked.tolist() == [[-100, -100, 5, 6, 2, -100], [-100, -100, 5, 6, 7, -100]]


@pytest.mark.parametrize("predicts_next_token", [True, False])
def test_policy_gradient_loss_is_advantage_times_mean_token_log_prob_and_touches_only_learnt_tokens(
    predicts_next_token,
):
    torch.manual_seed(0)
    vocab = 11
    # Row 0: prompt (2), caption 5 6, end 2, then padding; row 1: prompt, caption 7 8 9, end; row 2: never ended.
    labels = torch.tensor(
        [[-100, -100, 5, 6, 2, -100, -100], [-100, -100, 7, 8, 9, 2, -100], [-100, -100, 3, 4, 3, 4, 3]]
    )
    logits = torch.randn(3, 7, vocab, requires_grad=True)
    advantages = torch.tensor([0.5, -1.0, 2.0])
    loss, mean_log_prob = policy_gradient_loss(logits, labels, advantages, predicts_next_token)
    log_probs = torch.log_softmax(logits.detach(), dim=-1)
    expected_means = []
    for row in range(3):
        positions = [t for t in range(7) if labels[row, t] != IGNORE_INDEX]
        if predicts_next_token:
            positions = [t for t in positions if t >= 1]
            terms = [log_probs[row, t - 1, labels[row, t]] for t in positions]
        else:
            terms = [log_probs[row, t, labels[row, t]] for t in positions]
        expected_means.append(sum(terms) / len(terms))
    expected_means = torch.stack(expected_means)
    torch.testing.assert_close(mean_log_prob, expected_means)
    torch.testing.assert_close(loss, -(advantages * expected_means).mean())
    loss.backward()
    # Gradient only where a learnt token is predicted: never from the prompt's, the padding's or after-end positions.
    predicting = labels != IGNORE_INDEX
    if predicts_next_token:
        predicting = torch.cat([predicting[:, 1:], torch.zeros(3, 1, dtype=torch.bool)], dim=1)
    touched = logits.grad.abs().sum(dim=-1) > 0
    assert torch.equal(touched, predicting)


def test_rewards_are_cider_plus_the_weighted_sentence_bleu4():
    references = [["a red dog on the grass", "the dog is red"], ["two blue cats", "blue cats sleeping"]]
    reward = CiderD(references)
    captions, images = ["A red dog.", "two cats", "blue cats"], np.array([0, 1, 1])
    plain = SelfCritic(reward=reward, layout=None, tokenizer=None, pad_rows=None)
    weighted = SelfCritic(reward=reward, layout=None, tokenizer=None, pad_rows=None, bleu_weight=0.5)
    cider, bleu = reward.scores(captions, images), reward.bleu4_scores(captions, images)
    assert plain.rewards(captions, images).tolist() == cider.tolist()
    np.testing.assert_allclose(weighted.rewards(captions, images), cider + 0.5 * bleu, rtol=0, atol=1e-12)
    assert (bleu > 0).any()
