"""How analysis numbers and paths read on the console and in `sdd report` tables."""

from __future__ import annotations

from pathlib import Path


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def rel(root: Path, path: str | None) -> str:
    """A path as the report shows it: relative to the analysed root when inside it (run trees move)."""
    if not path:
        return "?"
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix() or "."
    except ValueError:
        return str(path)
