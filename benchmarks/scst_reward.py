#!/usr/bin/env python
"""CIDEr-D rewards for self-critical training: seconds to score 5,000 images x 5 sampled captions against 5
references each with ``captioning/cider_reward.py`` (references precomputed once, then array operations), against
pycocoevalcap's ``CiderScorer`` on the same captions (the per-caption loop SCST implementations call per batch).

    .venv/bin/python benchmarks/scst_reward.py            # 5,000 images, 5 samples, 5 references
    .venv/bin/python benchmarks/scst_reward.py --quick    # 500 images

Captions are Flickr-like (benchmarks/common.py make_caption). Scoring is timed from raw text (COCO PTB tokenization
included) and from tokenized text; the largest difference from pycocoevalcap is reported. Prints one JSON line.
"""

from __future__ import annotations

import numpy as np
from common import Stopwatch, base_parser, emit, machine_info, make_caption
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioning.cider_reward import CiderD
from captioning.ptb_tokenizer import tokenize_captions


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--references", type=int, default=5)
    args = parser.parse_args()
    num_images = 500 if args.quick else args.num_images
    rng = np.random.default_rng(0)
    references = [[make_caption(rng) for _ in range(args.references)] for _ in range(num_images)]
    samples = [make_caption(rng) for _ in range(num_images * args.samples)]
    images = np.repeat(np.arange(num_images), args.samples)

    clock = Stopwatch()
    reward = CiderD(references)
    setup_s = clock()
    clock = Stopwatch()
    ours = reward.scores(samples, images)
    score_raw_s = clock()
    tokenized = tokenize_captions({k: [caption] for k, caption in enumerate(samples)})
    tokenized = [tokenized[k][0] for k in range(len(samples))]
    clock = Stopwatch()
    ours_tokenized = reward.scores(tokenized, images, tokenized=True)
    score_tokenized_s = clock()
    assert np.array_equal(ours, ours_tokenized)

    tokenized_refs = tokenize_captions({i: refs for i, refs in enumerate(references)})
    clock = Stopwatch()
    reference_scores = []
    for sample in range(args.samples):  # one scorer per round of one caption per image: the same frequencies
        scorer = CiderScorer(n=4, sigma=6.0)
        for image in range(num_images):
            scorer += (tokenized[image * args.samples + sample], tokenized_refs[image])
        reference_scores.append(scorer.compute_score()[1])
    pycocoevalcap_s = clock()
    expected = np.stack(reference_scores, axis=1).reshape(-1)
    emit(
        {
            "benchmark": "scst_reward",
            "images": num_images,
            "samples_per_image": args.samples,
            "references_per_image": args.references,
            "captions_scored": len(samples),
            "reference_setup_s": round(setup_s, 3),
            "score_s_raw_text": round(score_raw_s, 3),
            "score_s_tokenized": round(score_tokenized_s, 3),
            "rewards_per_s": round(len(samples) / score_raw_s),  # from raw text: tokenization included
            "rewards_per_s_tokenized": round(len(samples) / score_tokenized_s),
            "pycocoevalcap_s_tokenized": round(pycocoevalcap_s, 3),
            "speedup_vs_pycocoevalcap": round(pycocoevalcap_s / score_tokenized_s, 1),
            "max_abs_difference": float(np.abs(ours_tokenized - expected).max()),
            **machine_info(),
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
