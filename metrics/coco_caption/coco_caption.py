"""The COCO caption metrics of this project as an `evaluate` module: `evaluate.load("metrics/coco_caption")`.

Loaded by path, offline, from the repository root (or with the repository on PYTHONPATH): `evaluate` copies this file
into its module cache and runs it there, and it scores with the project's `metrics.compute_metrics`, so the keys and
values are those of `metrics.py` (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D on pycocoevalcap's scale).
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = """\
COCO caption protocol: each prediction is scored against all references of its image, with pycocoevalcap's
PTB tokenization, BLEU-1..4, METEOR 1.5 (needs Java; left out without it or with use_meteor=False), ROUGE-L and
CIDEr-D. CIDEr-D's document frequencies come from the references passed in, so score a whole evaluation set in one
call.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: one generated caption per image (str).
    references: the reference captions of each image (list of str).
    use_meteor: run METEOR (starts a JVM; default True).
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4, meteor, rouge_l, cider: floats (pycocoevalcap's scale: CIDEr-D 1.333 for 133.3).
Example:
    >>> coco = evaluate.load("metrics/coco_caption")
    >>> coco.compute(predictions=["a dog runs"], references=[["a dog is running", "a brown dog runs"]])["cider"]
"""

_CITATION = """\
@inproceedings{vedantam2015cider, title={CIDEr: Consensus-based image description evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi}, booktitle={CVPR}, year={2015}}
@article{chen2015microsoft, title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and others}, journal={arXiv:1504.00325}, year={2015}}
"""


def _project_metrics():
    try:
        import metrics  # this repository's metrics.py
    except ImportError as error:
        raise ImportError(
            "metrics/coco_caption scores with this repository's metrics.py: load it from the repository root, or put "
            "the repository on PYTHONPATH."
        ) from error
    if not hasattr(metrics, "compute_metrics"):
        raise ImportError(
            f"`import metrics` found {getattr(metrics, '__file__', metrics)!r}, not this repository's metrics.py: "
            "load the module from the repository root, or put the repository first on PYTHONPATH."
        )
    return metrics


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions, references, use_meteor: bool = True):
        return _project_metrics().compute_metrics(list(predictions), [list(refs) for refs in references], use_meteor)
