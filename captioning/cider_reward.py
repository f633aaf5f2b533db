"""CIDEr-D rewards for self-critical training: each caption scored against its own image's references, with the
document frequencies of a fixed corpus (the training split's references), as self-critical.pytorch's ``CiderD``.

The arithmetic is pycocoevalcap's ``CiderScorer`` (n-grams 1..4, tf-idf vectors, clipped overlap
``min(h, r) * r``, cosine per n-gram order, Gaussian length penalty on bigram counts with sigma 6, mean over orders
and references, times 10), tested equal per caption. Here the references are counted, weighted and normed once per
run; a batch of captions is then scored with array operations only (no Java, no subprocess): every (caption,
reference) pair's shared n-grams are found by one sorted intersection of ``pair * vocabulary + n-gram`` keys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from captioning.ptb_tokenizer import tokenize_captions

MAX_N = 4
SIGMA = 6.0


def ngram_counts(tokens: Sequence[str], max_n: int = MAX_N) -> Counter:
    """Every n-gram of 1..max_n words (as a tuple) with its count."""
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - n + 1):
            counts[tuple(tokens[start : start + n])] += 1
    return counts


class _Vectors:
    """Sparse tf-idf vectors of many captions, flat: entry ``k`` is n-gram ``ids[k]`` (order ``orders[k]``, 0-based)
    of caption ``owner[k]`` with weight ``weights[k]``; per caption its norm per order and its bigram count."""

    def __init__(self, ids, weights, orders, owner, norms, bigrams):
        self.ids, self.weights, self.orders, self.owner = ids, weights, orders, owner
        self.norms, self.bigrams = norms, bigrams
        self.starts = np.searchsorted(owner, np.arange(len(norms) + 1))  # owner is sorted: caption c is a slice


class CiderD:
    """CIDEr-D of captions against the references of their images.

    ``references[i]`` are image ``i``'s reference captions (raw text, tokenized here as the COCO protocol does, or
    already tokenized with ``tokenized=True``); their document frequencies and ``log(len(references))`` are those of
    every score. ``scores(captions, images)`` gives caption ``k``'s CIDEr-D against ``references[images[k]]``.
    """

    def __init__(self, references: Sequence[Sequence[str]], *, tokenized: bool = False, sigma: float = SIGMA):
        if not references or any(len(refs) == 0 for refs in references):
            raise ValueError("CIDEr-D rewards need at least one reference caption for every training image")
        self.sigma = sigma
        if not tokenized:
            tokenized_refs = tokenize_captions({i: list(refs) for i, refs in enumerate(references)})
            references = [tokenized_refs[i] for i in range(len(references))]
        counts = [[ngram_counts(ref.split()) for ref in refs] for refs in references]
        self.vocabulary: dict[tuple[str, ...], int] = {}
        document_frequency: Counter = Counter()
        for refs in counts:
            seen = {ngram for ref in refs for ngram in ref}
            document_frequency.update(seen)
            for ngram in seen:
                self.vocabulary.setdefault(ngram, len(self.vocabulary))
        self.ref_len = float(np.log(len(references)))
        df = np.ones(len(self.vocabulary))
        for ngram, index in self.vocabulary.items():
            df[index] = document_frequency[ngram]
        self.idf = self.ref_len - np.log(np.maximum(df, 1.0))
        self.first_ref = np.cumsum([0] + [len(refs) for refs in counts])  # image i: references first_ref[i]:[i+1]
        self.refs = self._vectors([ref for refs in counts for ref in refs])

    def _vectors(self, counts: Sequence[Counter]) -> _Vectors:
        """tf-idf vectors of n-gram counts; n-grams outside the corpus weigh ``count * log(#images)`` (document
        frequency 0, clamped to 1 as pycocoevalcap does) and only count in the norm, since no reference has them."""
        ids, weights, orders, owner = [], [], [], []
        norms = np.zeros((len(counts), MAX_N))
        bigrams = np.zeros(len(counts))
        for caption, ngrams in enumerate(counts):
            for ngram, count in ngrams.items():
                order = len(ngram) - 1
                index = self.vocabulary.get(ngram)
                weight = count * (self.idf[index] if index is not None else self.ref_len)
                norms[caption, order] += weight * weight
                if order == 1:
                    bigrams[caption] += count
                if index is not None:
                    ids.append(index)
                    weights.append(weight)
                    orders.append(order)
                    owner.append(caption)
        return _Vectors(
            np.asarray(ids, dtype=np.int64),
            np.asarray(weights, dtype=np.float64),
            np.asarray(orders, dtype=np.int64),
            np.asarray(owner, dtype=np.int64),
            np.sqrt(norms),
            bigrams,
        )

    def scores(self, captions: Sequence[str], images: Sequence[int], *, tokenized: bool = False) -> np.ndarray:
        """CIDEr-D of ``captions[k]`` against the references of image ``images[k]``, as float64 (K,)."""
        images = np.asarray(images, dtype=np.int64)
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions but {len(images)} image indices")
        if len(captions) == 0:
            return np.zeros(0)
        if not tokenized:
            tokenized_captions = tokenize_captions({k: [caption] for k, caption in enumerate(captions)})
            captions = [tokenized_captions[k][0] for k in range(len(captions))]
        hyp = self._vectors([ngram_counts(caption.split()) for caption in captions])
        # Every (caption, reference of its image) pair.
        refs_per_caption = self.first_ref[images + 1] - self.first_ref[images]
        pair_caption = np.repeat(np.arange(len(captions)), refs_per_caption)
        pair_ref = _ranges(self.first_ref[images], refs_per_caption)
        overlap = self._clipped_overlap(hyp, pair_caption, pair_ref)  # (pairs, MAX_N)
        norm_products = hyp.norms[pair_caption] * self.refs.norms[pair_ref]
        cosine = np.divide(overlap, norm_products, out=overlap.copy(), where=norm_products != 0)
        delta = hyp.bigrams[pair_caption] - self.refs.bigrams[pair_ref]
        per_pair = cosine * np.exp(-(delta**2) / (2 * self.sigma**2))[:, None]
        totals = np.zeros((len(captions), MAX_N))
        np.add.at(totals, pair_caption, per_pair)
        return totals.mean(axis=1) / refs_per_caption * 10.0

    def _clipped_overlap(self, hyp: _Vectors, pair_caption: np.ndarray, pair_ref: np.ndarray) -> np.ndarray:
        """``sum min(h, r) * r`` over the n-grams a pair's caption and reference share, per n-gram order."""
        vocabulary = max(len(self.vocabulary), 1)
        hyp_keys, hyp_entries = _pair_entries(hyp, pair_caption, vocabulary)
        ref_keys, ref_entries = _pair_entries(self.refs, pair_ref, vocabulary)
        _, in_hyp, in_ref = np.intersect1d(hyp_keys, ref_keys, assume_unique=True, return_indices=True)
        h, r = hyp.weights[hyp_entries[in_hyp]], self.refs.weights[ref_entries[in_ref]]
        overlap = np.zeros((len(pair_caption), MAX_N))
        np.add.at(overlap, (hyp_keys[in_hyp] // vocabulary, hyp.orders[hyp_entries[in_hyp]]), np.minimum(h, r) * r)
        return overlap


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without the loop."""
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(lengths.sum())


def _pair_entries(vectors: _Vectors, pair_owner: np.ndarray, vocabulary: int) -> tuple[np.ndarray, np.ndarray]:
    """For each pair, the entries of its caption in ``vectors``: keys ``pair * vocabulary + n-gram id`` (unique, since
    a caption holds an n-gram once) and the entry positions."""
    starts, ends = vectors.starts[pair_owner], vectors.starts[pair_owner + 1]
    lengths = ends - starts
    entries = _ranges(starts, lengths)
    pairs = np.repeat(np.arange(len(pair_owner)), lengths)
    return pairs * vocabulary + vectors.ids[entries], entries
