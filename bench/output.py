"""Output of the small benchmark scripts: their result as JSON on stdout and, if asked, in a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: Any, path: str | None) -> int:
    """Print ``result`` as indented JSON, also write it to ``path`` when given; exit code 0."""
    text = json.dumps(result, indent=1)
    if path:
        Path(path).write_text(text)
    print(text)
    return 0
