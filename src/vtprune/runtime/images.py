"""Reading user images with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vtprune.errors import InputError


def load_image(path: str | Path, min_side: int = 1) -> Any:
    """Open ``path`` as an RGB PIL image, fully decoded, at least ``min_side`` pixels on each side."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p} does not exist or is not a file")
    try:
        with Image.open(p) as im:
            image = im.convert("RGB")  # forces a full decode, so truncated files fail here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read image {p}: {exc}; is it a PNG/JPEG/BMP/WebP file?") from None
    check_image_size(image, min_side, str(p))
    return image


def check_image_size(image: Any, min_side: int, label: str = "image") -> None:
    w, h = image.size
    if min(w, h) < min_side:
        raise InputError(f"{label} is {w}x{h} px; this model needs at least {min_side} px on each side")
