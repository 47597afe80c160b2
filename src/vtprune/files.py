"""Small file helpers shared by checkpoints, bundles and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vtprune.errors import VtpruneError


def read_json(path: Path, error: type[VtpruneError], hint: str = "") -> Any:
    """Parse ``path`` as UTF-8 JSON; on failure raise ``error`` naming the file (and ``hint``, if given)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})" + (f"; {hint}" if hint else "")) from None
