"""Names sdd derives from free text: stage, file and plot names built from labels and paths.

A leaf module so that every layer (recipes, stages, analysis) can name things the same way
without importing each other.
"""

from __future__ import annotations

import re


def slug(text: str) -> str:
    """`text` as a file-name-safe token: runs of anything but letters, digits, '.', '_' and '-' become one '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


# The run dir under an experiment's root that holds the stages its variants share (`sdd run`'s layout:
# <root>/shared, and with seed_scope chain <root>/shared/seed<k>); the planner, the report and analysis read it.
SHARED_DIR = "shared"
