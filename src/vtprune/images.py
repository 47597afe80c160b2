"""Images: reading the user's with errors they can act on, and the generated scene used by default."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from vtprune.errors import InputError

# Larger images are refused before they are decoded (a 144-megapixel RGB image takes ~2.5 GB at load);
# every supported model resizes to well under one megapixel anyway. Raise it with VTPRUNE_MAX_IMAGE_PIXELS.
MAX_PIXELS = 50_000_000


def max_pixels() -> int:
    raw = os.environ.get("VTPRUNE_MAX_IMAGE_PIXELS")
    if raw is None:
        return MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"VTPRUNE_MAX_IMAGE_PIXELS={raw!r} must be a positive pixel count, e.g. 100000000")
    return value


def load_image(path: str | Path, min_side: int = 1) -> Any:
    """Open ``path`` as an RGB PIL image, fully decoded, at least ``min_side`` pixels on each side and at
    most ``max_pixels()`` pixels (checked from the header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p} does not exist or is not a file")
    cap = max_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap below decides
            with Image.open(p) as im:
                w, h = im.size
                if w * h > cap:
                    raise _too_large(p, w, h, cap)
                image = to_rgb(im)  # forces a full decode, so truncated files fail here
    except Image.DecompressionBombError:
        raise InputError(f"image {p} declares more than {cap} pixels; refusing to decode it "
                         "(raise VTPRUNE_MAX_IMAGE_PIXELS if it is genuine)") from None  # fmt: skip
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read image {p}: {exc}; is it a PNG/JPEG/BMP/WebP file?") from None
    check_image_size(image, min_side, str(p))
    return image


def _too_large(p: Path, w: int, h: int, cap: int) -> InputError:
    return InputError(f"image {p} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the {cap / 1e6:.0f} MP limit; "
                      "downscale it, or raise VTPRUNE_MAX_IMAGE_PIXELS")  # fmt: skip


def to_rgb(im: Any) -> Any:
    """8-bit RGB from any PIL mode. Wide grey modes (16-bit PNGs open as ``I;16*`` or ``I``, float ``F``)
    are scaled to 0..255 first: Pillow's own conversion clips them, turning a 16-bit scan white."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if a.size and float(np.nanmax(a)) <= 1.0 else 255.0
        else:
            top = 65535.0 if im.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
        grey = np.clip(np.nan_to_num(a) * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def check_image_size(image: Any, min_side: int, label: str = "image") -> None:
    w, h = image.size
    if min(w, h) < min_side:
        raise InputError(f"{label} is {w}x{h} px; this model needs at least {min_side} px on each side")
    if w * h > max_pixels():
        raise _too_large(Path(label), w, h, max_pixels())


def scene_image(width: int = 320, height: int = 240) -> Any:
    """A synthetic scene: a red circle and a blue rectangle on a gray background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 140, 160), fill=(220, 30, 30))
    draw.rectangle((190, 40, 290, 200), fill=(30, 60, 220))
    return image


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def calibration_images(source: str, n: int, seed: int = 0) -> list[Path]:
    """``n`` images drawn with ``seed`` from ``source``: ``easy-vqa`` (its train split, so the test split
    stays unseen) or a directory of images (searched recursively); fewer when the source has fewer."""
    import random

    if source == "easy-vqa":
        import importlib.util

        spec = importlib.util.find_spec("easy_vqa")
        if spec is None or spec.origin is None:
            raise InputError("--calib-data easy-vqa needs the easy-vqa package; pip install --no-deps easy-vqa==1.0, "
                             "or pass a directory of your own images")  # fmt: skip
        root = Path(spec.origin).parent / "data" / "train" / "images"
    else:
        root = Path(source)
        if not root.is_dir():
            raise InputError(f"--calib-data {source}: not a directory of images (or easy-vqa)")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise InputError(f"--calib-data {source}: no .png/.jpg/.jpeg/.bmp/.webp images under {root}")
    return sorted(random.Random(seed).sample(found, min(n, len(found))))
