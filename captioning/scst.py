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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from captioning.cider_reward import CiderD
from captioning.layout import IGNORE_INDEX, CaptionLayout

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


def sample_seeds(seed: int, step: int, images: Sequence[int], samples: int) -> list[int]:
    """One seed per sample row (image-major, as generate's num_return_sequences orders them), a function of the
    run's seed, the training step, the image and the sample number only: the same samples whatever the batch
    layout, the number of processes, or a resume in between."""
    return [
        int(np.random.SeedSequence([seed, step, int(image), k]).generate_state(1, np.uint64)[0] >> 1)
        for image in images
        for k in range(samples)
    ]


class SeededSampling(LogitsProcessor):
    """Multinomial sampling at ``temperature`` as a function of each row's seed and position: Gumbel-max, with the
    noise of row ``r`` at sequence length ``t`` drawn from a generator seeded by ``(seeds[r], t)``. The drawn token
    keeps score 0 and every other -inf, so generate's own sampling step takes it with probability 1. Applied after
    generate's processors (min length, suppressed tokens), whose -inf scores it keeps."""

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0):
        self.seeds = list(seeds)
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"{scores.shape[0]} rows to sample but {len(self.seeds)} seeds")
        length = input_ids.shape[1]
        gumbel = torch.empty(scores.shape, dtype=torch.float64)
        for row, seed in enumerate(self.seeds):
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, length]).generate_state(1)[0]))
            uniform = torch.rand(scores.shape[1], generator=generator, dtype=torch.float64)
            gumbel[row] = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        perturbed = scores.double() / self.temperature + gumbel.to(scores.device)
        drawn = torch.full_like(scores, float("-inf"))
        drawn.scatter_(1, perturbed.argmax(dim=-1, keepdim=True), 0.0)
        return drawn


@dataclass
class SelfCritic:
    """One SCST step on a batch of training images (a generation batch: pixels, prompt, ``image_index`` into the
    training split): sample, reward, baseline, and the policy-gradient loss through the image-grouped forward.

    Samples are drawn with dropout off (the policy being judged), from softmax(logits / ``temperature``) with no
    top-k / top-p, by seeded Gumbel-max (SeededSampling: the same draws whatever the batch layout), with evaluation's
    max/min new tokens; the loss forward then runs in training mode, one image pass per image for all its samples.
    Families whose prompt depends on more than the batch's image inputs (SmolVLM / Idefics3 with --image_splitting,
    whose tile grids the collator reads from the image processor) are not covered yet."""

    reward: CiderD
    layout: CaptionLayout
    tokenizer: object
    pad_rows: Callable[[list[dict]], dict[str, torch.Tensor]]  # the collator's right padding of token rows
    samples: int = 5
    temperature: float = 1.0
    baseline: str = "mean"
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    end_ids: tuple[int, ...] = ()
    bleu_weight: float = 0.0  # reward = CIDEr-D + bleu_weight x sentence BLEU-4
    stats: dict[str, list[float]] = field(default_factory=dict)  # per step, emptied by take_stats()

    def rewards(self, captions: list[str], images: np.ndarray) -> np.ndarray:
        """CIDEr-D of each caption against its image's training references, plus the weighted BLEU-4 if asked."""
        tokenized = self.reward.tokenize(captions)
        rewards = self.reward.scores(tokenized, images, tokenized=True)
        if self.bleu_weight:
            rewards = rewards + self.bleu_weight * self.reward.bleu4_scores(tokenized, images, tokenized=True)
        return rewards

    def generate(
        self, model, inputs: dict[str, torch.Tensor], greedy: bool, seeds: Sequence[int] = ()
    ) -> tuple[list[list[int]], list[bool]]:
        sequences = model.generate(**inputs, **self.generation_settings(greedy, seeds))
        return self.sampled_captions(sequences, inputs["input_ids"])

    def sampled_captions(self, sequences: torch.Tensor, input_ids: torch.Tensor) -> tuple[list[list[int]], list[bool]]:
        """The caption tokens of ``generate``'s output, as ``layout.training_row`` takes them (no decoder start, no
        forced first token: the row puts those back), each cut at its end, and whether it ended."""
        tokens = self.layout.caption_tokens(sequences, input_ids)
        if self.layout.forced_first_token is not None:
            tokens = tokens[:, 1:]
        return split_at_end(tokens, self.end_ids)

    def generation_settings(self, greedy: bool, seeds: Sequence[int] = ()) -> dict:
        settings = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, num_beams=1)
        if self.layout.forced_first_token is not None:
            settings["forced_bos_token_id"] = self.layout.forced_first_token
        if self.layout.image_token_id is not None:
            # A sampled image placeholder would make the loss forward's placeholders outnumber the image features.
            settings["suppress_tokens"] = [self.layout.image_token_id]
        if greedy:
            settings.update(do_sample=False)
        else:
            settings.update(
                do_sample=True,
                num_return_sequences=self.samples,
                temperature=1.0,  # applied by SeededSampling, which draws the token
                top_k=0,
                top_p=1.0,
                logits_processor=LogitsProcessorList([SeededSampling(seeds, self.temperature)]),
            )
        return settings

    def loss(
        self,
        model: torch.nn.Module,
        generator: torch.nn.Module,
        inputs: dict,
        shared_features,
        seed: int = 0,
        step: int = 0,
    ) -> torch.Tensor:
        """``model`` runs the loss forward (DDP-wrapped in training); ``generator`` is the unwrapped model that
        samples; ``shared_features(model, inputs, image_group)`` is the trainer's grouped-forward context; ``seed``
        and ``step`` (the run's seed and the global step) fix the samples (sample_seeds)."""
        inputs = dict(inputs)
        image_index = inputs.pop("image_index").cpu().numpy()
        images, samples = len(image_index), self.samples
        was_training = model.training
        model.eval()
        with torch.no_grad():
            seeds = sample_seeds(seed, step, image_index, self.samples)
            caption_ids, ended = self.generate(generator, inputs, greedy=False, seeds=seeds)
            greedy = None
            if self.baseline == "greedy":
                greedy_ids, _ = self.generate(generator, inputs, greedy=True)
                greedy = self.rewards(self.layout.decode_captions(greedy_ids, self.tokenizer), image_index)
        model.train(was_training)
        sample_images = np.repeat(image_index, samples)
        rewards = self.rewards(self.layout.decode_captions(caption_ids, self.tokenizer), sample_images)
        rewards = rewards.reshape(images, samples)
        baseline = baseline_rewards(rewards, greedy)
        advantages = rewards - baseline

        image_inputs = {key: inputs[key] for key in self.layout.image_input_keys}
        counts = self.layout.image_token_counts(image_inputs)
        rows = [
            self.layout.training_row(ids, None if counts is None else counts[k // samples])
            for k, ids in enumerate(caption_ids)
        ]
        device = image_inputs["pixel_values"].device
        batch = {key: value.to(device) for key, value in self.pad_rows(rows).items()}
        batch["labels"] = mask_unfinished(batch["labels"], [len(ids) for ids in caption_ids], ended)
        image_group = torch.arange(images, device=device).repeat_interleave(samples)
        with shared_features(model, {**batch, **image_inputs}, image_group) as grouped:
            logits = model(**grouped).logits
        loss, _ = policy_gradient_loss(
            logits,
            batch["labels"],
            torch.as_tensor(advantages.reshape(-1), device=device),
            self.layout.predicts_next_token,
        )
        self._record(rewards, baseline, advantages, caption_ids)
        return loss

    def _record(self, rewards, baseline, advantages, caption_ids) -> None:
        for key, value in (
            ("scst_reward", rewards.mean()),
            ("scst_baseline", baseline.mean()),
            ("scst_advantage_std", advantages.std()),
            ("scst_sample_length", float(np.mean([len(ids) for ids in caption_ids]))),
        ):
            self.stats.setdefault(key, []).append(float(value))

    def take_stats(self) -> dict[str, float]:
        """The mean of each statistic over the steps since the last call (for the Trainer's log)."""
        means = {key: float(np.mean(values)) for key, values in self.stats.items() if values}
        self.stats = {}
        return means
