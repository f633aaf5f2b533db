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

from captioning.ptb_tokenizer import ptb_tokenize_each, tokenize_captions

MAX_N = 4
SIGMA = 6.0


def ngram_counts(tokens: Sequence[str], max_n: int = MAX_N) -> Counter:
    """Every n-gram of 1..max_n words (as a tuple) with its count (the definition the arrays below implement)."""
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - n + 1):
            counts[tuple(tokens[start : start + n])] += 1
    return counts


class _Tokens:
    """Captions as one flat array of word ids: ``words[i]`` belongs to caption ``caption[i]``. Words outside
    ``vocabulary`` get ids after it (the same word, the same id)."""

    def __init__(self, captions: Sequence[str], vocabulary: dict[str, int]):
        unknown: dict[str, int] = {}
        words: list[int] = []
        lengths = np.zeros(len(captions), dtype=np.int64)
        for k, caption in enumerate(captions):
            tokens = caption.split()
            lengths[k] = len(tokens)
            for token in tokens:
                index = vocabulary.get(token)
                words.append(index if index is not None else unknown.setdefault(token, len(vocabulary) + len(unknown)))
        self.words = np.asarray(words, dtype=np.int64)
        self.caption = np.repeat(np.arange(len(captions)), lengths)
        self.count = len(captions)

    def ngram_starts(self, n: int) -> np.ndarray:
        """Positions where an n-gram within one caption starts."""
        starts = np.arange(max(len(self.words) - n + 1, 0))
        return starts[self.caption[starts] == self.caption[starts + n - 1]]


def _pair_keys(prefix: np.ndarray, word: np.ndarray) -> np.ndarray:
    """One int64 per (id of an n-gram's first n-1 words, id of its last word); both are below 2**31."""
    return (prefix << 32) | word


class _Vectors:
    """Sparse tf-idf vectors of many captions, flat and sorted by caption: entry ``k`` is corpus n-gram ``ids[k]``
    (order ``orders[k]``, 0-based) of caption ``owner[k]`` with weight ``weights[k]``; per caption its norm per order
    (n-grams outside the corpus included) and its bigram count."""

    def __init__(self, ids, weights, orders, owner, norms, bigrams):
        self.ids, self.weights, self.orders, self.owner = ids, weights, orders, owner
        self.norms, self.bigrams = norms, bigrams
        self.starts = np.searchsorted(owner, np.arange(len(norms) + 1))  # caption c: entries starts[c]:starts[c+1]


class CiderD:
    """CIDEr-D of captions against the references of their images.

    ``references[i]`` are image ``i``'s reference captions (raw text, tokenized here as the COCO protocol does, or
    already tokenized with ``tokenized=True``); their document frequencies and ``log(len(references))`` are those of
    every score. ``scores(captions, images)`` gives caption ``k``'s CIDEr-D against ``references[images[k]]``.

    N-grams are numbered once, from the references: a unigram is its word's id; an n-gram of order n is its
    (first n-1 words' n-gram, last word) pair, looked up in the sorted pairs of the corpus (``pair_keys[n]``) and
    numbered after every shorter n-gram.
    """

    def __init__(self, references: Sequence[Sequence[str]], *, tokenized: bool = False, sigma: float = SIGMA):
        if not references or any(len(refs) == 0 for refs in references):
            raise ValueError("CIDEr-D rewards need at least one reference caption for every training image")
        self.sigma = sigma
        if not tokenized:
            tokenized_refs = tokenize_captions({i: list(refs) for i, refs in enumerate(references)})
            references = [tokenized_refs[i] for i in range(len(references))]
        flat = [ref for refs in references for ref in refs]
        self.first_ref = np.cumsum([0] + [len(refs) for refs in references])  # image i: first_ref[i]:first_ref[i+1]
        self.words = {word: i for i, word in enumerate(dict.fromkeys(word for ref in flat for word in ref.split()))}
        tokens = _Tokens(flat, self.words)
        self.pair_keys: dict[int, np.ndarray] = {}
        self.first_id = {1: 0}
        previous, next_id = tokens.words, len(self.words)
        for n in range(2, MAX_N + 1):
            starts = tokens.ngram_starts(n)
            keys = _pair_keys(previous[starts], tokens.words[starts + n - 1])
            self.pair_keys[n], self.first_id[n] = np.unique(keys), next_id
            next_id += len(self.pair_keys[n])
            previous = np.full(len(tokens.words), -1, dtype=np.int64)
            previous[starts] = self.first_id[n] + np.searchsorted(self.pair_keys[n], keys)
        self.num_ngrams = next_id
        self.ref_len = float(np.log(len(references)))
        ids, _, owner, counts = self._ngrams(tokens)
        image = np.repeat(np.arange(len(references)), np.diff(self.first_ref))[owner]
        in_images = np.unique(image * self.num_ngrams + ids) % self.num_ngrams  # each n-gram once per image
        document_frequency = np.bincount(in_images, minlength=self.num_ngrams)
        self.idf = self.ref_len - np.log(np.maximum(document_frequency, 1.0))
        self.refs = self._vectors(tokens)
        # For BLEU-4 (bleu4_scores): each image's largest count of each n-gram over its references, and the
        # references' lengths in tokens.
        keys, inverse = np.unique(image * self.num_ngrams + ids, return_inverse=True)
        self.max_ref_keys, self.max_ref_counts = keys, np.zeros(len(keys), dtype=np.int64)
        np.maximum.at(self.max_ref_counts, inverse, counts)
        self.ref_lengths = np.bincount(tokens.caption, minlength=len(flat))

    def _ngrams(self, tokens: _Tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each distinct n-gram of each caption: its corpus id (-1 outside the corpus), order (0-based), caption and
        count. Within a batch, identical n-grams share a raw id (pairs numbered by np.unique), so n-grams outside
        the corpus are counted too."""
        known_word = tokens.words < len(self.words)
        known = np.where(known_word, tokens.words, -1)
        raw = tokens.words
        starts = np.arange(len(tokens.words))
        parts = []
        for n in range(1, MAX_N + 1):
            if n > 1:
                starts = tokens.ngram_starts(n)
                last = tokens.words[starts + n - 1]
                _, raw_ids = np.unique(_pair_keys(raw[starts], last), return_inverse=True)
                keys = _pair_keys(np.maximum(known[starts], 0), last)
                position = np.minimum(np.searchsorted(self.pair_keys[n], keys), max(len(self.pair_keys[n]) - 1, 0))
                found = (known[starts] >= 0) & known_word[starts + n - 1]
                if len(self.pair_keys[n]):
                    found &= self.pair_keys[n][position] == keys
                else:
                    found[:] = False
                raw = np.full(len(tokens.words), -1, dtype=np.int64)
                raw[starts] = raw_ids
                known = np.full(len(tokens.words), -1, dtype=np.int64)
                known[starts] = np.where(found, self.first_id[n] + position, -1)
            if len(starts) == 0:
                continue
            width = int(raw[starts].max()) + 1
            _, first, counts = np.unique(
                tokens.caption[starts] * width + raw[starts], return_index=True, return_counts=True
            )
            parts.append((known[starts][first], np.full(len(first), n - 1), tokens.caption[starts][first], counts))
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty, empty
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))

    def _vectors(self, tokens: _Tokens) -> _Vectors:
        """tf-idf vectors; an n-gram outside the corpus weighs ``count * log(#images)`` (document frequency 0,
        clamped to 1 as pycocoevalcap does) and only counts in the norm, since no reference has it."""
        ids, orders, owner, counts = self._ngrams(tokens)
        weights = counts * np.where(ids >= 0, self.idf[np.maximum(ids, 0)], self.ref_len)
        norms = np.zeros((tokens.count, MAX_N))
        np.add.at(norms, (owner, orders), weights * weights)
        bigrams = np.bincount(owner[orders == 1], weights=counts[orders == 1], minlength=tokens.count)
        keep = np.flatnonzero(ids >= 0)
        keep = keep[np.argsort(owner[keep], kind="stable")]
        return _Vectors(ids[keep], weights[keep], orders[keep], owner[keep], np.sqrt(norms), bigrams)

    @staticmethod
    def tokenize(captions: Sequence[str]) -> list[str]:
        """Captions as the COCO protocol tokenizes them (pycocoevalcap's PTB tokenizer, in Python), each alone: a
        sample's reward does not depend on the samples next to it."""
        return ptb_tokenize_each(captions)

    def _checked(self, captions: Sequence[str], images: Sequence[int], tokenized: bool) -> tuple[list[str], np.ndarray]:
        images = np.asarray(images, dtype=np.int64)
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions but {len(images)} image indices")
        return (list(captions) if tokenized else self.tokenize(captions)), images

    def _pairs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (caption, reference of its image) pair, and each caption's number of references."""
        refs_per_caption = self.first_ref[images + 1] - self.first_ref[images]
        pair_caption = np.repeat(np.arange(len(images)), refs_per_caption)
        return pair_caption, _ranges(self.first_ref[images], refs_per_caption), refs_per_caption

    def bleu4_scores(self, captions: Sequence[str], images: Sequence[int], *, tokenized: bool = False) -> np.ndarray:
        """Sentence BLEU-4 of each caption against its image's references, as pycocoevalcap's ``Bleu(4)`` gives it
        per caption (clipped n-gram matches, the closest reference length, its 1e-15 / 1e-9 smoothing): the
        optional second reward of self-critical.pytorch."""
        captions, images = self._checked(captions, images, tokenized)
        if len(captions) == 0:
            return np.zeros(0)
        tokens = _Tokens(captions, self.words)
        ids, orders, owner, counts = self._ngrams(tokens)
        keys = images[owner] * self.num_ngrams + np.maximum(ids, 0)
        position = np.minimum(np.searchsorted(self.max_ref_keys, keys), len(self.max_ref_keys) - 1)
        found = (ids >= 0) & (self.max_ref_keys[position] == keys)
        clipped = np.where(found, np.minimum(counts, self.max_ref_counts[position]), 0)
        correct = np.zeros((len(captions), MAX_N))
        np.add.at(correct, (owner, orders), clipped)
        length = np.bincount(tokens.caption, minlength=len(captions)).astype(np.float64)
        guess = np.maximum(length[:, None] - np.arange(MAX_N), 0)
        bleu = np.prod((correct + 1e-15) / (guess + 1e-9), axis=1) ** (1.0 / MAX_N)
        pair_caption, pair_ref, _ = self._pairs(images)
        ref_length = self.ref_lengths[pair_ref]
        # The closest reference length (the shorter one on a tie), as one sortable key per pair.
        closeness = np.abs(ref_length - length[pair_caption]) * (self.ref_lengths.max() + 1) + ref_length
        best = np.full(len(captions), np.iinfo(np.int64).max)
        np.minimum.at(best, pair_caption, closeness.astype(np.int64))
        reflen = best % (self.ref_lengths.max() + 1)
        ratio = (length + 1e-15) / (reflen + 1e-9)
        return np.where(ratio < 1, bleu * np.exp(1 - 1 / ratio), bleu)

    def scores(self, captions: Sequence[str], images: Sequence[int], *, tokenized: bool = False) -> np.ndarray:
        """CIDEr-D of ``captions[k]`` against the references of image ``images[k]``, as float64 (K,)."""
        captions, images = self._checked(captions, images, tokenized)
        if len(captions) == 0:
            return np.zeros(0)
        hyp = self._vectors(_Tokens(captions, self.words))
        pair_caption, pair_ref, refs_per_caption = self._pairs(images)
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
        vocabulary = max(self.num_ngrams, 1)
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
