"""Real-size checkpoints through the toolchain on this machine: make the checkpoint (published
architecture, random weights), export it at fp16 (unpruned, then G-Prune at 25% and 11% of the visual
tokens reusing the language-model graphs), build TensorRT-RTX engines, and time the bundles in ONNX Runtime
on the CPU where they fit. Each step runs as its own ``vtprune`` process; its wall time and memory (peak
resident set, and its anonymous part: the file pages of memory-mapped weights are reclaimable) are
sampled from /proc every 0.2 s and attributed to the stage the command last reported.

    python benchmarks/scale.py --configs qwen2.5-vl-3b,llava-1.5-7b --work /data/scale \\
        [--steps make,export,build,bench] [--out benchmarks/results/scale]

Results are merged into ``scale.json`` (one entry per config and step, rewritten after every step, so a
step that fails or is killed is recorded with its exit code and the memory it had reached) and
``scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BUDGETS = {"qwen2.5-vl-3b": (64, 28), "qwen2.5-vl-7b": (64, 28), "llava-1.5-7b": (144, 64),
           "llava-next-7b": ("0.25", "0.11")}  # fmt: skip; 25% and 11% of one image's visual tokens
# (Qwen2.5-VL 256 at 448x448, LLaVA-1.5 576; LLaVA-NeXT's count depends on the image: ratios of its capacity)
STAGE = re.compile(r"^vtprune [\w-]+: (?:\[\d+/\d+\] )?(\w+)(?: (\w+))?")


def memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of ``pid`` in bytes (empty when it has exited)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run(cmd: list[str], log_path: Path) -> dict[str, Any]:
    """Run ``cmd``; its stderr goes to ``log_path``; returns exit code, wall time and per-stage peaks."""
    start = time.perf_counter()
    peaks: dict[str, dict[str, int]] = {}
    stage = ["start"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

        def read_err() -> None:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                m = STAGE.match(line.strip())
                # "exporting vision", "loading", "validating"; not the line after a step
                if m and m.group(1) != "validated" and "exported in" not in line:
                    stage[0] = m.group(1) + (f" {m.group(2)}" if m.group(1) == "exporting" else "")

        reader = threading.Thread(target=read_err, daemon=True)
        reader.start()
        stdout_lines: list[str] = []
        out_reader = threading.Thread(target=lambda: stdout_lines.extend(proc.stdout), daemon=True)
        out_reader.start()
        while proc.poll() is None:
            mem = memory(proc.pid)
            peak = peaks.setdefault(stage[0], {})
            for k, v in mem.items():
                peak[k] = max(peak.get(k, 0), v)
            time.sleep(0.2)
        reader.join()
        out_reader.join()
    gb = {s: {k: round(v / 1e9, 2) for k, v in p.items()} for s, p in peaks.items() if p}
    overall = {k: max((p.get(k, 0) for p in gb.values()), default=0) for k in ("VmRSS", "RssAnon", "RssFile")}
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_gb": overall, "stage_peak_gb": gb, "stdout_tail": "".join(stdout_lines)[-2000:],
            "stderr_tail": log_path.read_text()[-1500:]}  # fmt: skip


def du(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()} if path.is_dir() else {}


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    pkgs = {p: version(p) for p in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")}
    for dist in ("tensorrt_rtx_cu13", "tensorrt_rtx_cu12", "tensorrt_rtx"):
        try:
            pkgs["tensorrt_rtx"] = version(dist)
            break
        except Exception:  # noqa: BLE001 - optional
            pkgs["tensorrt_rtx"] = "absent"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem.split(":")[1].strip(), "date": time.strftime("%F"),
            "packages": pkgs}  # fmt: skip


def bench_image(work: Path) -> Path:
    """A 448x448 scene: 256 visual tokens for Qwen2.5-VL at native resolution (the budgets are 25% and 11%
    of that), LLaVA resizes it to 336."""
    from vtprune.images import scene_image

    folder = work / "images"
    if not (folder / "scene448.png").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        scene_image().resize((448, 448)).save(folder / "scene448.png")
    return folder


Step = tuple[str, list[str], Path | None]


def steps_for(cfg: str, work: Path, steps: list[str], validate: bool = True) -> list[Step]:
    vt = [sys.executable, "-m", "vtprune.cli"]
    images = bench_image(work)
    ckpt, full = work / "ckpt" / cfg, work / "bundles" / f"{cfg}-fp16-none"
    k25, k11 = BUDGETS[cfg]
    out: list[Step] = []
    if "make" in steps:
        out.append(("make-checkpoint", [*vt, "make-checkpoint", "--config", cfg, "--out", str(ckpt), "--force"], ckpt))
    if "export" in steps:
        out.append(("export fp16 unpruned", [*vt, "export", "--model", str(ckpt), "--dtype", "fp16", "--out", str(full),
                                             "--force", *([] if validate else ["--no-validate"])], full))  # fmt: skip
        for k in (k25, k11):
            b = work / "bundles" / f"{cfg}-fp16-gprune-{k}"
            out.append((f"export fp16 gprune {k}", [*vt, "export", "--model", str(ckpt), "--dtype", "fp16", "--method",
                        "gprune", "--keep", str(k), "--reuse-lm-from", str(full), "--out", str(b), "--force"], b))
    if "build" in steps:
        for graph in ("vision", "embed", "decoder"):
            out.append((f"trt-rtx build {graph}", [*vt, "build", str(full), "--target", "sm89", "--graphs", graph,
                        "--max-seq", "1024", "--force"], full))  # fmt: skip
    if "bench" in steps:
        for name in ("none", f"gprune-{k25}", f"gprune-{k11}"):
            b = work / "bundles" / f"{cfg}-fp16-{name}"
            report = work / "reports" / f"{cfg}-{name}"
            out.append((f"ort cpu bench {name}", [*vt, "bench", str(b), "--iters", "2", "--warmup", "1",
                        "--images", str(images), "--num-images", "1", "--new-tokens", "4", "--no-progress",
                        "--out", str(report), "--force"],
                        report))  # fmt: skip
    if "torchbench" in steps:  # PyTorch bf16 on the CPU, for sizes whose fp32 ONNX Runtime sessions do not fit
        report = work / "reports" / f"{cfg}-torch-bf16"
        out.append(("torch cpu bench bf16", [*vt, "bench", "--backend", "torch", "--model", str(ckpt), "--dtype",
                    "bf16", "--budgets", f"all,{k25},{k11}", "--iters", "2", "--warmup", "1", "--images", str(images),
                    "--num-images", "1",
                    "--new-tokens", "4", "--no-progress", "--out", str(report), "--force"], report))  # fmt: skip
    if "predict" in steps:
        budgets = f"all,{k25},{k11}"
        for device in PREDICT_DEVICES:
            for precision in ("fp16", "int8"):
                report = work / "reports" / f"{cfg}-predict-{device}-{precision}"
                out.append((f"predict {device} {precision}", [*vt, "predict", str(full), "--device", device,
                            "--precision", precision, "--budgets", budgets, "--image",
                            str(images / "scene448.png"), "--out", str(report), "--force"],
                            report))  # fmt: skip
    return out


PREDICT_DEVICES = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "thor")


def report_summary(path: Path) -> dict[str, Any] | None:
    """TTFT / prefill / decode per budget (and the memory check of a prediction) from a report directory."""
    file = path / "report.json"
    if not file.is_file():
        return None
    r = json.loads(file.read_text())
    rows = {}
    for b in r["budgets"]:
        st = b["stages"]
        rows[str(b.get("keep") if b.get("keep") is not None else b.get("label"))] = {
            k: round(st[k]["p50_ms"], 1) for k in ("vision_prune", "prefill", "ttft", "decode") if k in st}
    return {"budgets": rows, "memory_check": r.get("memory_check"), "predicted": r.get("predicted", False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="qwen2.5-vl-3b,llava-1.5-7b")
    ap.add_argument("--work", type=Path, required=True, help="where checkpoints and bundles go (tens of GB)")
    ap.add_argument("--steps", default="make,export,build,bench,predict")
    ap.add_argument("--only", help="run only steps whose label contains this text")
    ap.add_argument("--no-validate", action="store_true", help="export without validation (memory beside other work)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / "scale.json"
    results = json.loads(result_file.read_text()) if result_file.is_file() else {"runs": {}}
    results["environment"] = environment()
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for cfg in args.configs.split(","):
        for label, cmd, path in steps_for(cfg, args.work, args.steps.split(","), not args.no_validate):
            if args.only and args.only not in label:
                continue
            print(f"[{cfg}] {label} ...", flush=True)
            r = run(cmd, logs / f"{cfg}-{label.replace(' ', '-')}.log")
            r["files"] = du(path) if path else {}
            r["date"] = time.strftime("%F %T")
            manifest = path / "manifest.json" if path else None
            summary = report_summary(path) if path else None
            if summary:
                r["report"] = summary
            if manifest and manifest.is_file() and label.startswith("export"):
                m = json.loads(manifest.read_text())
                r["validation"] = m.get("validation")
                r["export_memory"] = m.get("export_memory")
            results["runs"].setdefault(cfg, {})[label] = r
            result_file.write_text(json.dumps(results, indent=1) + "\n")
            print(f"  rc {r['rc']}, {r['wall_s']} s, peak {r['peak_gb']}", flush=True)
    write_markdown(results, args.out / "scale.md")


def write_markdown(results: dict[str, Any], path: Path) -> None:
    env = results["environment"]
    lines = ["# Real-size checkpoints on the CPU machine", "",
             f"{env['cpu']}, {env['cores']} cores, {env['memory']}; {env['date']}; " +
             ", ".join(f"{k} {v}" for k, v in env["packages"].items()), "",
             "Random weights at the published configurations (`vtprune make-checkpoint`). Peak memory: resident set "
             "(VmRSS) and its anonymous part (RssAnon; the rest is page cache of memory-mapped weights, which the "
             "kernel reclaims).", "",
             "| config | step | rc | wall s | peak RSS GB | peak anon GB | output GB | notes |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines[6:6] = [f"- {note}" for note in results.get("notes", [])] + ([""] if results.get("notes") else [])
    for cfg, runs in results["runs"].items():
        for label, r in runs.items():
            size = sum(r.get("files", {}).values()) / 1e9
            notes = []
            if r.get("export_memory"):
                em = r["export_memory"]
                notes.append(f"reference {em['reference']}, validation {em['validation']}")
            v = r.get("validation") or {}
            if v.get("checks"):
                notes.append("checks " + ("all ok" if all(c["ok"] for c in v["checks"]) else "FAILED"))
            if r["rc"] != 0:
                notes.append(r["stderr_tail"].strip().splitlines()[-1][:160] if r["stderr_tail"].strip() else "")
            lines.append(f"| {cfg} | {label} | {r['rc']} | {r['wall_s']} | {r['peak_gb'].get('VmRSS')} | "
                         f"{r['peak_gb'].get('RssAnon')} | {size:.2f} | {'; '.join(notes)} |")  # fmt: skip
    lines += ["", "## Latency by budget (ms, medians; predictions are rooflines, `vtprune predict`)", "",
              "| config | step | budget | vision+prune | prefill | TTFT | decode, all new tokens | weights + KV fit |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for cfg, runs in results["runs"].items():
        for label, r in runs.items():
            rep = r.get("report")
            if not rep:
                continue
            mc = rep.get("memory_check") or {}
            fit = ""
            if mc:
                need, have = mc["needed_mb"] / 1024, mc["device_mb"] / 1024
                fit = f"{'yes' if mc['fits'] else 'no'} ({need:.1f} of {have:.0f} GiB)"
            for budget, st in rep["budgets"].items():
                lines.append(f"| {cfg} | {label} | {budget} | {st.get('vision_prune', '')} | {st.get('prefill', '')} "
                             f"| {st.get('ttft', '')} | {st.get('decode', '')} | {fit} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
