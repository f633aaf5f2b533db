"""The pure-Python PTB tokenizer against pycocoevalcap's Java PTBTokenizer (Stanford CoreNLP 3.4.1)."""

import random
import shutil
from pathlib import Path

import pytest

from captioning.ptb_tokenizer import ptb_tokenize, ptb_tokenize_each, tokenize_captions

CASES_FILE = Path(__file__).parent / "data" / "ptb_cases.txt"

java = pytest.mark.skipif(shutil.which("java") is None, reason="needs `java` on PATH to run pycocoevalcap's PTB jar")

WORDS = [
    "a", "an", "the", "man", "woman", "dog", "cat", "people", "group", "of", "two", "on", "in", "at", "with", "near",
    "sitting", "standing", "riding", "holding", "large", "small", "red", "white", "black", "young", "old", "street",
    "table", "plate", "pizza", "bus", "train", "horse", "field", "beach", "kitchen", "giraffe", "kite", "surfboard",
]  # fmt: skip
FRAGMENTS = [
    "man's", "isn't", "won't", "can't", "don't", "it's", "they're", "we've", "I'll", "she'd", "I'm", "dogs'",
    "cannot", "gonna", "wanna", "gotta", "o'clock", "rock 'n' roll", "y'all", "'90s", "'em", "black-and-white",
    "t-shirt", "2-year-old", "mid-1990s", "3-D", "3.5", "1,000", "$5", "5%", "10:30", "a.m.", "1/2", "5 7/8", "½",
    "10th", "3d", "a/c", "555-1234", "#1", "@user", "#tag", "Mr.", "Dr.", "St.", "U.S.", "e.g.", "etc.", "Jr.",
    "Inc.", "No. 5", "J. K.", "\"quoted\"", "'single'", "“curly”", "it’s", "(parens)", "[brackets]", "{braces}",
    "<b>", "</b>", "...", ". . .", "…", "--", "—", "-", "/", "&", "*", "=", "+", ",", ".", "!", "?", ";", ":", "°",
    "café", "naïve", "😀", "☺", "http://www.example.com", "www.google.com", "foo@bar.com", "file.jpg", "AT&T",
    "&amp;", "&quot;", "C++", ":)", ":D", "^_^", "hello.world", "I.", "A.", "The", "He", "She", "\u00a0", "\u00ad",
]  # fmt: skip
FUZZ_CHARS = list("aAbcdeIlmnosSTtxyY019 .,;:!?'\"`-_/\\()[]{}<>@#$%&*+=~^|") + [
    "\u00a0", "\u2019", "\u2018", "\u201c", "\u201d", "\u2026", "\u2014", "\u00ad", "\u00e9", "\u00bd", "\u00b2",
    "&amp;", "n't", "'s", "U.S.", "http://", "www.", ".com", "Mr.", " The ", "cannot", "gonna", "\t", "  ",
]  # fmt: skip


def load_cases() -> list[str]:
    # split("\n"), not splitlines(): some cases hold characters that splitlines() treats as line breaks
    return CASES_FILE.read_text(encoding="utf-8").split("\n")[:-1]


def random_captions(seed: int, n: int) -> list[str]:
    """Caption-like sentences made of common words and tricky fragments, with occasional odd joins and casing."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        parts = [rng.choice(WORDS) if rng.random() < 0.6 else rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))]
        text = parts[0]
        for part in parts[1:]:
            text += (" " if rng.random() < 0.85 else rng.choice(["", "  ", "\t", "-", ".", ",", "'", "/"])) + part
        text = text[0].upper() + text[1:] + rng.choice([".", ".", " .", "!", "?", "...", "", " "])
        if rng.random() < 0.1:
            text = text.lower() if rng.random() < 0.7 else text.upper()
        captions.append(text)
    return captions


def random_strings(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_CHARS) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def java_tokenize(captions: list[str]) -> list[str]:
    """pycocoevalcap's own tokenizer (it runs the jar), one image per caption, in order."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [tokenized[i][0] for i in range(len(captions))]


def python_tokenize(captions: list[str]) -> list[str]:
    tokenized = tokenize_captions({i: [c] for i, c in enumerate(captions)})
    return [tokenized[i][0] for i in range(len(captions))]


def assert_same_tokens(captions: list[str]) -> None:
    expected, actual = java_tokenize(captions), python_tokenize(captions)
    mismatches = [(c, e, a) for c, e, a in zip(captions, expected, actual, strict=True) if e != a]
    assert not mismatches, f"{len(mismatches)} of {len(captions)} differ from Java, e.g. {mismatches[:5]}"


@pytest.mark.java
@java
def test_tricky_cases_match_java() -> None:
    cases = load_cases()
    assert len(cases) > 150
    assert_same_tokens(cases)


@pytest.mark.java
@java
@pytest.mark.parametrize("seed", [0, 1])
def test_random_captions_match_java(seed: int) -> None:
    assert_same_tokens(random_captions(seed, 2000))


@pytest.mark.java
@java
def test_random_strings_match_java() -> None:
    assert_same_tokens(random_strings(7, 2000))


@pytest.mark.java
@java
def test_grouped_captions_match_java() -> None:
    """Several captions per image, non-integer keys, in pycocoevalcap's dict format."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cases = load_cases()[:60]
    grouped = {f"img{i}": cases[i : i + 5] for i in range(0, len(cases), 5)}
    expected = PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in grouped.items()})
    assert tokenize_captions(grouped) == expected


# Words of generated captions, with those the lexer treats specially: the split words, and abbreviations that a final
# period joins (some only in one case).
PLAIN_WORDS = WORDS + [
    "A", "The", "Dog", "cannot", "Cannot", "GONNA", "wanna", "gotta", "lemme", "Gimme", "mr", "Mr", "MR", "co", "Co",
    "St", "no", "No", "I", "x", "e", "etc", "Inc", "Jan", "pte", "Pty", "vs", "Ltd", "about", "About", "Jr", "Dr",
]  # fmt: skip


def plain_captions(seed: int, n: int) -> list[str]:
    """ASCII words and single spaces, perhaps a final period (what ptb_tokenize_each shortcuts), and near misses."""
    rng = random.Random(seed)
    endings = ["", ".", ".", " .", "!", ". ", ",", "  "]
    return [" ".join(rng.choice(PLAIN_WORDS) for _ in range(rng.randint(1, 8))) + rng.choice(endings) for _ in range(n)]


def test_each_caption_alone_is_tokenized_as_the_lexer_does() -> None:
    captions = plain_captions(0, 20000) + random_captions(3, 2000) + ["ends with A.", "The cat", "", " a dog"]
    assert ptb_tokenize_each(captions) == [ptb_tokenize(caption) for caption in captions]
    assert ptb_tokenize_each(["He cannot see Mr.", "A dog on the grass.", "ends with A.", "The cat"]) == [
        "he can not see mr.", "a dog on the grass", "ends with a.", "the cat",
    ]  # fmt: skip


@pytest.mark.java
@java
def test_each_plain_caption_alone_matches_java() -> None:
    """Each caption followed by a lowercase line, which ends no sentence: Java then reads it as if alone."""
    captions = plain_captions(1, 3000)
    expected = java_tokenize([line for caption in captions for line in (caption, "x")])[::2]
    assert ptb_tokenize_each(captions) == expected


# Expected values below were produced by the Java tokenizer (each caption alone, as ptb_tokenize does).
KNOWN = [
    ("A man's dog isn't running.", "a man 's dog is n't running"),
    ("A black-and-white photo of a man in a t-shirt.", "a black-and-white photo of a man in a t-shirt"),
    ("The clock reads 10:30 a.m. on the wall.", "the clock reads 10:30 a.m. on the wall"),
    ("A flag of the U.S. flies over the building.", "a flag of the u.s. flies over the building"),
    ('He said "hello" to the dog.', "he said hello to the dog"),
    ("A man (in a hat) by [a] {red} car.", "a man -lrb- in a hat -rrb- by -lsb- a -rsb- -lcb- red -rcb- car"),
    ("He cannot swim, he is gonna drown.", "he can not swim he is gon na drown"),
    ("It is five o'clock somewhere.", "it is five o'clock somewhere"),
    ("The dogs' toys and James' hat.", "the dogs toys and james hat"),
    ("Rock 'n' roll music playing loudly.", "rock 'n' roll music playing loudly"),
    ("There are 1,000 birds and $5 worth of seeds, 5% off.", "there are 1,000 birds and $ 5 worth of seeds 5 % off"),
    ("Wait... what is that?!", "wait what is that ?!"),
    ("A café with naïve art 😀.", "a café with naïve art"),
    ("A recipe with 1/2 cup and ½ teaspoon.", "a recipe with 1/2 cup and 1/2 teaspoon"),
    ("Salt & pepper -- AT&T.", "salt & pepper at&t"),
    ("A sign that reads <b>OPEN</b>.", "a sign that reads <b> open </b>"),
    ("Visit www.google.com or http://example.com/a.", "visit www.google.com or http://example.com/a"),
    ("“Curly quotes” and it’s fine.", "curly quotes and it 's fine"),
    ("", ""),
    ("!!!", "!!!"),
    ("  Two   spaces\tand a tab.  ", "two spaces and a tab"),
    ("Smileys :) and :D", "smileys :-rrb- and d"),
    ("In the '90s.", "in the '90s"),
    ("Mr. Smith and Dr. Who.", "mr. smith and dr. who"),
    ("A 5 7/8 inch pipe.", "a 5\u00a07/8 inch pipe"),
    ("ΟΔΟΣ", "οδος"),
]  # fmt: skip


@pytest.mark.parametrize(("caption", "expected"), KNOWN)
def test_known_outputs(caption: str, expected: str) -> None:
    assert ptb_tokenize(caption) == expected


def test_context_of_the_next_caption_is_used() -> None:
    """As in pycocoevalcap's one-file run, "A." before a line starting with "The" ends a sentence."""
    assert ptb_tokenize("ends with A.") == "ends with a."
    assert tokenize_captions({1: ["ends with A.", "The cat"]}) == {1: ["ends with a", "the cat"]}
    assert tokenize_captions({1: ["ends with A.", "the cat"]}) == {1: ["ends with a.", "the cat"]}


def test_shape_and_line_breaks() -> None:
    captions = {"x": ["A dog.", "Two\ncats\r\non a\u2028mat."], 7: [""]}
    assert tokenize_captions(captions) == {"x": ["a dog", "two cats on a mat"], 7: [""]}
    assert tokenize_captions({}) == {}
