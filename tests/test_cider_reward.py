"""CIDEr-D rewards (captioning/cider_reward.py) equal pycocoevalcap's CiderScorer per caption, with the document
frequencies of the training references."""

from __future__ import annotations

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioning.cider_reward import CiderD, ngram_counts
from captioning.ptb_tokenizer import tokenize_captions

WORDS = "a an the dog dogs cat red blue green man woman on in with grass ball runs sits water".split()


def corpus(seed: int, images: int = 40, refs: int = 5) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [
        [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(rng.integers(1, refs + 1))]
        for _ in range(images)
    ]


def pycocoevalcap_scores(references: list[list[str]], captions: list[str]) -> np.ndarray:
    """One CiderScorer over every training image (its document frequencies are those of all the references)."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for caption, refs in zip(captions, references, strict=True):
        scorer += (caption, refs)
    return scorer.compute_score()[1]


def test_ngram_counts():
    assert ngram_counts("a dog a dog".split()) == {
        ("a",): 2,
        ("dog",): 2,
        ("a", "dog"): 2,
        ("dog", "a"): 1,
        ("a", "dog", "a"): 1,
        ("dog", "a", "dog"): 1,
        ("a", "dog", "a", "dog"): 1,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_caption_rewards_equal_pycocoevalcap_with_the_training_document_frequencies(seed):
    references = corpus(seed)
    rng = np.random.default_rng(100 + seed)
    reward = CiderD(references, tokenized=True)
    for _ in range(3):  # several sampled captions per image: each round is one caption per image
        captions = [" ".join(rng.choice(WORDS + ["unseen", "words"], size=rng.integers(0, 10))) for _ in references]
        captions[0] = references[0][0]  # a caption equal to a reference
        captions[1] = "dog"  # no bigram at all
        expected = pycocoevalcap_scores(references, captions)
        np.testing.assert_allclose(
            reward.scores(captions, range(len(references)), tokenized=True), expected, rtol=0, atol=1e-6
        )


def test_captions_of_any_images_in_any_order_and_repeated():
    references = corpus(3)
    reward = CiderD(references, tokenized=True)
    captions = [references[5][0], "a red dog on the grass", references[5][0], references[5][0]]
    images = [5, 7, 5, 9]
    expected = {}
    for caption, image in zip(captions, images, strict=True):
        round_ = [references[i][0] for i in range(len(references))]
        round_[image] = caption
        expected[(caption, image)] = pycocoevalcap_scores(references, round_)[image]
    scores = reward.scores(captions, images, tokenized=True)
    np.testing.assert_allclose(scores, [expected[pair] for pair in zip(captions, images, strict=True)], atol=1e-6)
    assert scores[0] == scores[2] and scores[0] != scores[3]  # the same caption, scored against another image


def test_raw_text_is_tokenized_as_the_coco_protocol_does():
    references = [["A dog, running on the grass."], ["Two cats sit."], ["A man's hat."]]
    reward = CiderD(references)
    tokenized = tokenize_captions({i: refs for i, refs in enumerate(references)})
    plain = CiderD([tokenized[i] for i in range(3)], tokenized=True)
    captions = ["A DOG running on the grass!", "two cats"]
    assert np.array_equal(
        reward.scores(captions, [0, 1]),
        plain.scores(["a dog running on the grass", "two cats"], [0, 1], tokenized=True),
    )
    assert reward.scores([], []).shape == (0,)


def test_a_caption_is_tokenized_alone_whatever_samples_follow_it():
    """pycocoevalcap reads "A." before a line starting with "The" as a sentence end; a reward must not see that."""
    reward = CiderD([["a man holding the letter a."], ["the cat"]])
    alone = reward.scores(["a man holding the letter A."], [0])
    assert reward.scores(["a man holding the letter A.", "The cat"], [0, 0])[0] == alone[0]
    assert reward.tokenize(["holding A.", "The cat"]) == ["holding a.", "the cat"]


def test_an_image_without_references_is_refused():
    with pytest.raises(ValueError, match="at least one reference"):
        CiderD([["a dog"], []])


@pytest.mark.parametrize("seed", [0, 1])
def test_sentence_bleu4_equals_pycocoevalcap_per_caption(seed):
    references = corpus(seed)
    rng = np.random.default_rng(200 + seed)
    reward = CiderD(references, tokenized=True)
    captions = [" ".join(rng.choice(WORDS + ["unseen"], size=rng.integers(1, 14))) for _ in references]
    captions[0] = references[0][0]  # exact: 1.0 up to the smoothing
    captions[1] = "dog"  # one word: no bigram to match
    captions[2] = "a a a a a a a"  # clipping by the most a reference holds
    _, per_caption = Bleu(4).compute_score(
        {i: refs for i, refs in enumerate(references)}, {i: [c] for i, c in enumerate(captions)}, verbose=0
    )
    np.testing.assert_allclose(
        reward.bleu4_scores(captions, range(len(references)), tokenized=True), per_caption[3], rtol=0, atol=1e-9
    )
