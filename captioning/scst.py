"""Self-critical sequence training (SCST): the pieces that do not depend on the Trainer.

A step samples ``K`` captions per image, rewards each with its CIDEr-D against the image's training references
(captioning/cider_reward.py), and pushes up the samples that beat a baseline:

    loss = - mean over samples k of  (r_k - b_k) * (1 / T_k) * sum_t log p(w_k,t | image, w_k,<t)

``T_k`` is the number of learnt tokens of sample ``k`` (its caption tokens and its end token, when it ended): the
per-caption *mean* of token log-probabilities, as self-critical.pytorch and Luo (2020) average it, so that long
samples do not outweigh short ones. The baseline ``b_k`` is the mean reward of the image's other samples (Luo 2020,
"a better variant of SCST"; the advantages of an image's samples then sum to zero) or the reward of the greedy
caption (Rennie et al. 2017).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from captioning.layout import IGNORE_INDEX

BASELINES = ("mean", "greedy")


def baseline_rewards(rewards: np.ndarray, greedy: np.ndarray | None = None) -> np.ndarray:
    """(images, K) baselines for (images, K) sample rewards: the mean of the other K - 1 samples of the same image,
    or, given ``greedy`` (images,), the greedy caption's reward for every sample."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if greedy is not None:
        return np.broadcast_to(np.asarray(greedy, dtype=np.float64)[:, None], rewards.shape).copy()
    samples = rewards.shape[1]
    if samples < 2:
        raise ValueError(
            "--scst_samples must be at least 2 for the mean-of-other-samples baseline (or use --scst_baseline greedy)"
        )
    return (rewards.sum(axis=1, keepdims=True) - rewards) / (samples - 1)


def split_at_end(tokens: torch.Tensor, end_ids: Iterable[int]) -> tuple[list[list[int]], list[bool]]:
    """Each row of sampled caption tokens cut before its first end token (anything after it is padding), and
    whether the row ended (False when it ran into max_new_tokens)."""
    end_ids = set(end_ids)
    captions, ended = [], []
    for row in tokens.tolist():
        cut = next((i for i, token in enumerate(row) if token in end_ids), None)
        captions.append([token for token in row[: len(row) if cut is None else cut] if token >= 0])
        ended.append(cut is not None)
    return captions, ended


def mask_unfinished(labels: torch.Tensor, caption_lengths: Sequence[int], ended: Sequence[bool]) -> torch.Tensor:
    """Labels of sampled rows where a sample that never ended learns no end token: of its learnt positions, only the
    first ``caption_length`` (its sampled tokens) stay."""
    labels = labels.clone()
    for row, (length, done) in enumerate(zip(caption_lengths, ended, strict=True)):
        if not done:
            learnt = torch.nonzero(labels[row] != IGNORE_INDEX).flatten()
            labels[row, learnt[length:]] = IGNORE_INDEX
    return labels


def policy_gradient_loss(
    logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, predicts_next_token: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per-sample mean token log-probability)``: minus the mean over samples of advantage x the mean
    log-probability of the sample's learnt tokens (labels -100 everywhere else: prompt, padding, after the end)."""
    if predicts_next_token:  # position t predicts label t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    log_probs = -torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    learnt = (labels != IGNORE_INDEX).float()
    mean_log_prob = (log_probs * learnt).sum(dim=1) / learnt.sum(dim=1).clamp(min=1.0)
    loss = -(advantages.to(mean_log_prob) * mean_log_prob).mean()
    return loss, mean_log_prob.detach()
