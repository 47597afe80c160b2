"""Regenerate this folder: the pocket VLM at K=64 exported in fp32 and fp16, compared.

    .venv/bin/python benchmarks/results/pocket/fp16/measure.py WORK_DIR [--parity-only]

One process, in order: export both bundles (validated) into WORK_DIR; file sizes; each bundle's
validation figures; parity of the fp16 bundle with the fp32 PyTorch reference on 16 easy-vqa images;
ONNX Runtime CPU latency of both with ``vtprune bench`` (written to bench-fp32/ and bench-fp16/); then
TensorRT-RTX engine builds (sm89) of both bundles. Writes report.json; report.md is written by hand
from it. ``--parity-only`` reruns the parity step on the bundles in WORK_DIR and updates report.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from vtprune.api import export_bundle
from vtprune.cli import main
from vtprune.config import PruneConfig
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import read_manifest
from vtprune.runtime.report import environment

OUT = Path(__file__).resolve().parent
CFG = PruneConfig(method="gprune", keep=64)
DTYPES = ("fp32", "fp16")
NOTE = "pocket VLM (untrained projector: latency only), ONNX Runtime CPU, default threads, {dtype} bundle"


def export(work: Path, dtype: str) -> tuple[Path, float]:
    start = time.perf_counter()
    export_bundle("pocket", CFG, ExportConfig(dtype=dtype, force=True), work / f"k64-{dtype}")
    return work / f"k64-{dtype}", time.perf_counter() - start


def sizes(bundle: Path) -> dict[str, int]:
    graphs = {p.name: p.stat().st_size for p in sorted(bundle.glob("*.onnx*"))}
    return graphs | {"total_bytes": sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())}


def parity(bundle: Path, num_images: int) -> list[dict]:
    """The validation rows of the fp16 bundle on easy-vqa images (not only the export sample)."""
    from vtprune.bench.workload import easy_vqa_samples
    from vtprune.check.validate import compare_backends
    from vtprune.models import load_vlm

    adapter, cfg = load_vlm("pocket"), PruneConfig.from_dict(read_manifest(bundle, verify=False)["prune"])
    out = []
    for sample in easy_vqa_samples(num_images):
        rows = compare_backends(adapter, cfg, bundle, sample.image, sample.prompt, 32)
        out.append({"image": sample.source, "prompt": sample.prompt, "checks": rows})
    return out


def bench(bundle: Path, dtype: str) -> dict:
    argv = ["bench", str(bundle), "--dataset", "easy-vqa", "--num-images", "4", "--new-tokens", "32",
            "--warmup", "2", "--iters", "8", "--out", str(OUT / f"bench-{dtype}"), "--force", "--no-progress",
            "--note", NOTE.format(dtype=dtype)]  # fmt: skip
    assert main(argv) == 0, f"vtprune bench failed for {dtype}"
    report = json.loads((OUT / f"bench-{dtype}" / "report.json").read_text())
    budget = report["budgets"][0]
    return {"stages": budget["stages"], "throughput": budget["throughput"], "memory": budget["memory"],
            "load_avg": report["environment"]["load_avg"]}  # fmt: skip


def engines(bundle: Path) -> dict:
    from vtprune.backends.trt.engines import BuildConfig, build_bundle

    start = time.perf_counter()
    built = build_bundle(bundle, BuildConfig(target="sm89", force=True))
    return {"seconds": round(time.perf_counter() - start, 1), "engines": built}


def run(work: Path) -> dict:
    report: dict = {"model": "pocket", "prune": CFG.to_dict(), "environment_start": environment("CPUExecutionProvider")}
    bundles = {}
    for dtype in DTYPES:
        bundles[dtype], seconds = export(work, dtype)
        manifest = read_manifest(bundles[dtype])
        report[dtype] = {"export_seconds": round(seconds, 1), "sizes": sizes(bundles[dtype]),
                         "validation": manifest["validation"], "graphs": manifest["graphs"]}  # fmt: skip
    report["fp16"]["parity_easy_vqa"] = parity(bundles["fp16"], 16)
    for dtype in DTYPES:
        report[dtype]["ort_cpu_bench"] = bench(bundles[dtype], dtype)
    for dtype in DTYPES:
        report[dtype]["tensorrt_rtx"] = engines(bundles[dtype])
    report["environment_end"] = environment("CPUExecutionProvider")
    return report


def rerun_parity(work: Path) -> dict:
    report = json.loads((OUT / "report.json").read_text())
    report["fp16"]["parity_easy_vqa"] = parity(work / "k64-fp16", 16)
    report["fp16"]["parity_environment"] = environment("CPUExecutionProvider")
    return report


if __name__ == "__main__":
    work = Path(sys.argv[1])
    result = rerun_parity(work) if "--parity-only" in sys.argv[2:] else run(work)
    (OUT / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
