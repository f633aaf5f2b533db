"""The shapes of Hugging Face tokens, in one pattern shared by everything that keeps them out of what leaves the
machine: the push's scan of the files it uploads, its error messages, and the model card."""

from __future__ import annotations

import re

# User access tokens (hf_ + 34 letters and digits), OAuth tokens (hf_oauth_...), JWTs the Hub issues (hf_jwt_ + three
# base64url parts joined by dots) and organisation API tokens (api_org_...). No word boundary on the left, so that a
# token glued to other text ("--hub_token=hf_...", "tokenhf_...") is found too; 20 characters at least, so that
# identifiers such as hf_hub_download never match.
TOKEN_PATTERN = re.compile(
    r"hf_jwt_[A-Za-z0-9_\-]{10,}(?:\.[A-Za-z0-9_\-]+){0,2}"
    r"|hf_oauth_[A-Za-z0-9]{20,}"
    r"|hf_[A-Za-z0-9]{20,}"
    r"|api_org_[A-Za-z0-9]{20,}"
)


def mask_tokens(text: str, replacement: str = "hf_***") -> tuple[str, int]:
    """``text`` with every token-shaped string replaced, and how many there were."""
    return TOKEN_PATTERN.subn(replacement, text)
