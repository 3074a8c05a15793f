"""`sdd analyze`: what each stage changed, and what it lost. (Being written.)"""

from __future__ import annotations

from pathlib import Path

from sdd.errors import SddError


def run(path: Path, **options) -> None:
    raise SddError("sdd analyze is not implemented yet")


def report_section(root: Path, out: Path) -> tuple[str, dict, list[Path]]:
    """Markdown, JSON-able data and plot paths for `sdd report`; empty where nothing was analysed."""
    return "", {}, []
