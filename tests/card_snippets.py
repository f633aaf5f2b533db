"""The model card's usage snippets, read back from a rendered card: the transformers pipeline's three lines first,
the explicit step-by-step code second (model_card_template.md, "How to use")."""

from __future__ import annotations

import re


def usage_snippets(card: str) -> list[str]:
    """The Python code blocks of the card's "How to use" section, in order."""
    section = re.search(r"^## How to use\n(.*?)(?=^## )", card, flags=re.S | re.M).group(1)
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def pipeline_snippet(card: str) -> str:
    return usage_snippets(card)[0]


def explicit_snippet(card: str) -> str:
    return usage_snippets(card)[1]
