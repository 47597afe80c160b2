"""What a benchmark feeds the model: images and prompts from a directory, easy-vqa, or a generated scene."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtprune.errors import BackendUnavailableError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class Sample:
    """One benchmark input: an RGB PIL image, the question asked about it, and where it came from."""

    image: Any
    prompt: str
    source: str


def images_from_dir(directory: Path, prompt: str, limit: int) -> list[Sample]:
    """The first ``limit`` images of ``directory`` in name order, each asked ``prompt``."""
    from vtprune.images import load_image

    if not directory.is_dir():
        raise InputError(f"--images {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"--images {directory} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return [Sample(load_image(p), prompt, p.name) for p in files[:limit]]


def easy_vqa_samples(limit: int) -> list[Sample]:
    """The first ``limit`` easy-vqa test questions on distinct images (deterministic)."""
    try:
        import easy_vqa
    except ImportError:
        msg = "--dataset easy-vqa needs the easy-vqa package: pip install easy-vqa==1.0"
        raise BackendUnavailableError(msg) from None
    from vtprune.images import load_image

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    samples, seen = [], set()
    for question, image_id in zip(questions, image_ids, strict=True):
        if image_id not in seen:
            seen.add(image_id)
            samples.append(Sample(load_image(paths[image_id]), question, f"easy-vqa:test:{image_id}"))
        if len(samples) == limit:
            break
    return samples


def generated_scene(prompt: str) -> list[Sample]:
    from vtprune.images import scene_image

    return [Sample(scene_image(), prompt, "generated-scene")]


def load_samples(images: Path | None, dataset: str | None, prompt: str, limit: int) -> list[Sample]:
    if images is not None:
        return images_from_dir(images, prompt, limit)
    if dataset == "easy-vqa":
        return easy_vqa_samples(limit)
    return generated_scene(prompt)


def describe(samples: list[Sample], images: Path | None, dataset: str | None) -> dict[str, Any]:
    """The workload block of a report: which inputs, how many, what sizes."""
    kind = "directory" if images is not None else dataset or "generated-scene"
    sizes = sorted({tuple(s.image.size) for s in samples})
    prompts = sorted({s.prompt for s in samples})
    return {"images": kind, "images_dir": str(images) if images else None, "num_images": len(samples),
            "image_sizes": [list(s) for s in sizes], "sources": [s.source for s in samples],
            "prompt": prompts[0] if len(prompts) == 1 else None, "num_prompts": len(prompts)}  # fmt: skip
