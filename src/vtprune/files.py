"""Small file helpers shared by checkpoints, bundles and reports."""

from __future__ import annotations

import hashlib
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


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
