"""The one timing primitive for benchmarks, and the environment block every result carries.

``measure`` times one callable; ``measure_stages`` repeats a callable that times its own stages (a
``StageTimer``) and summarises every stage the same way. ``environment`` records where a number was
taken: host, CPU, GPU, library versions, execution provider and precision, and on Jetson the board,
L4T/JetPack release, power mode, ``jetson_clocks`` state and clocks. Every Jetson fact is read through a
function that takes a filesystem root and a command runner, so tests fake them in a temp dir; each one
returns ``None`` where the file or command is absent instead of failing.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CommandRunner = Callable[[Sequence[str]], "str | None"]


@dataclass(frozen=True)
class Timing:
    """Wall-clock statistics of repeated calls, in milliseconds."""

    warmup: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(samples_ms: Sequence[float], warmup: int = 0) -> Timing:
    """p50/p90/p99 (inclusive quantiles), mean and min of timed samples (milliseconds)."""
    if not samples_ms:
        raise ValueError("summarize needs at least one sample")
    samples = list(samples_ms)
    q = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else samples * 99
    return Timing(warmup, len(samples), statistics.median(samples), q[89], q[98], statistics.fmean(samples),
                  min(samples))  # fmt: skip


def measure(fn: Callable[[], Any], warmup: int = 3, iters: int = 20, sync: Callable[[], None] | None = None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times timed (``sync`` after each, e.g. CUDA)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples, warmup)


def measure_stages(
    fn: Callable[[], Mapping[str, float]], warmup: int = 3, iters: int = 20, tick: Callable[[], None] | None = None
) -> dict[str, Timing]:
    """Per-stage statistics of a callable that times itself: ``fn`` returns ``{stage: ms}`` for one run
    (e.g. a ``StageTimer``'s ``ms``, CUDA-synchronised there when on a GPU). The first ``warmup`` runs are
    discarded; ``tick`` is called after every run (progress bars, memory probes). Stages missing from some
    runs are summarised over the runs that have them."""
    for _ in range(warmup):
        fn()
        if tick is not None:
            tick()
    runs = []
    for _ in range(iters):
        runs.append(dict(fn()))
        if tick is not None:
            tick()
    names = list(dict.fromkeys(k for run in runs for k in run))
    return {k: summarize([run[k] for run in runs if k in run], warmup) for k in names}


# --- memory ----------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last successful ``reset_peak_rss``, else since process start."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    import resource  # not on Windows; macOS reports bytes, Linux KiB

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if platform.system() == "Darwin" else rss / 1024


# --- environment -------------------------------------------------------------------------------------
LIBRARIES = ("vtprune", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "tensorrt-rtx", "tensorrt_rtx_cu13", "tensorrt_rtx_cu12", "polygraphy", "numpy", "matplotlib")  # fmt: skip


def run_command(argv: Sequence[str], timeout: float = 5.0) -> str | None:
    """stdout+stderr of a command that exited 0, or None (absent, failed, timed out)."""
    import shutil
    import subprocess

    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout or "") + (done.stderr or "") if done.returncode == 0 else None


def environment(
    provider: str | None = None, precision: str | None = None, root: str | Path = "/", run: CommandRunner | None = None
) -> dict[str, Any]:
    """Host, CPU, accelerator and library versions, so a number can be traced to where it ran.

    Args:
        provider: execution provider the numbers were taken with (e.g. ``CPUExecutionProvider``, ``torch-cpu``).
        precision: weights/activations precision of what ran (``fp32``, ``fp16``, ``int8``).
        root: filesystem root for ``/proc``, ``/sys`` and ``/etc`` reads (tests pass a temp dir).
        run: command runner for ``nvidia-smi``, ``nvpmodel``, ``jetson_clocks``, ``dpkg-query``.
    """
    run = run or run_command
    return {"host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_model(root), "cpu_isa": _cpu_isa(root), "cores": os.cpu_count(), "gpu": _gpu_name(),
            "libraries": _libraries(),
            "execution_provider": provider, "precision": precision, "machine": platform.machine(),
            "memory_mb": _mem_total_mb(root), "accelerator": nvidia_smi(run), "cuda_runtime": _torch_cuda(),
            "ort_providers": _ort_providers(), "load_avg": _load_avg(), "jetson": jetson_info(root, run)}  # fmt: skip


def _load_avg() -> list[float] | None:
    """1/5/15-minute load averages when the environment was captured: other work competing for the CPU."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _libraries() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for pkg in LIBRARIES:
        try:
            libs[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return libs


def _read(root: str | Path, rel: str) -> str | None:
    try:
        return (Path(root) / rel.lstrip("/")).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _cpu_model(root: str | Path = "/") -> str:
    text = _read(root, "proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name") or line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cpu_isa(root: str | Path) -> list[str]:
    """The SIMD extensions that decide CPU matmul throughput (x86 flags / Arm features)."""
    match = re.search(r"^(?:flags|Features)\s*:(.*)$", _read(root, "proc/cpuinfo") or "", re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    return sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "asimd", "sve", "sve2"})


def _mem_total_mb(root: str | Path) -> float | None:
    match = re.search(r"^MemTotal:\s+(\d+)\s+kB", _read(root, "proc/meminfo") or "", re.MULTILINE)
    return round(int(match.group(1)) / 1024, 1) if match else None


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


def _torch_cuda() -> str | None:
    try:
        import torch

        return torch.version.cuda
    except ImportError:
        return None


def _ort_providers() -> list[str] | None:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return None


def nvidia_smi(run: CommandRunner) -> dict[str, Any] | None:
    """GPU name, driver and memory from ``nvidia-smi`` (first GPU), or None."""
    out = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"])
    if not out or "," not in out:
        return None
    name, driver, mem = (part.strip() for part in out.strip().splitlines()[0].split(",")[:3])
    return {"name": name, "driver": driver, "memory_mb": _number(mem)}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# --- Jetson ------------------------------------------------------------------------------------------
# L4T release -> JetPack, from NVIDIA's JetPack archive (developer.nvidia.com/embedded/jetpack-archive).
# Used only when the ``nvidia-jetpack`` package version cannot be read; unknown releases give None.
L4T_TO_JETPACK = {
    "32.6.1": "4.6", "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4",
    "32.7.5": "4.6.5", "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2",
    "35.5.0": "5.1.3", "35.6.0": "5.1.4", "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1",
    "36.4.3": "6.2", "36.4.4": "6.2.1",  # 6.2.1 <- 36.4.4 per the archive page; less sure than the rows above
    "38.2.0": "7.0",  # Jetson Thor launch release
}  # fmt: skip
GPU_DEVFREQ = re.compile(r"gpu|ga10b|gv11b|gp10b|gb10b", re.IGNORECASE)
EMC_RATE_FILES = ("sys/kernel/debug/bpmp/debug/clk/emc/rate", "sys/kernel/debug/clk/emc/clk_rate",
                  "sys/kernel/debug/clock/emc/rate")  # fmt: skip


def jetson_info(root: str | Path = "/", run: CommandRunner | None = None) -> dict[str, Any] | None:
    """Board, L4T/JetPack, power mode, jetson_clocks state and clocks; None when this is not a Jetson."""
    run = run or run_command
    board, l4t = read_board_model(root), read_l4t_release(root)
    if l4t is None and (board is None or "jetson" not in board.lower()):
        return None
    jetpack = read_jetpack_package(run)
    source = "nvidia-jetpack package" if jetpack else "L4T release table" if l4t in L4T_TO_JETPACK else None
    return {"board": board, "l4t": l4t, "jetpack": jetpack or L4T_TO_JETPACK.get(l4t or ""),
            "jetpack_source": source, "power_mode": read_power_mode(run), "jetson_clocks": read_jetson_clocks(run),
            "clocks": read_clocks(root)}  # fmt: skip


def read_board_model(root: str | Path = "/") -> str | None:
    """``/proc/device-tree/model`` (NUL-terminated), e.g. ``NVIDIA Jetson AGX Orin Developer Kit``."""
    text = (_read(root, "proc/device-tree/model") or "").replace("\x00", "").strip()
    return text or None


def read_l4t_release(root: str | Path = "/") -> str | None:
    """``/etc/nv_tegra_release`` ``# R36 (release), REVISION: 4.3, ...`` -> ``36.4.3``."""
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", _read(root, "etc/nv_tegra_release") or "")
    if not match:
        return None
    rev = match.group(2).split(".")
    return ".".join([match.group(1), *rev, *(["0"] * (2 - len(rev)))][:3])


def read_jetpack_package(run: CommandRunner) -> str | None:
    """Version of the ``nvidia-jetpack`` meta package (``6.2+b77`` -> ``6.2``), where it is installed."""
    out = run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"])
    match = re.match(r"\s*(\d+(?:\.\d+)*)", out or "")
    return match.group(1) if match else None


def parse_nvpmodel(text: str) -> dict[str, Any] | None:
    """``nvpmodel -q`` output (``NV Power Mode: MAXN`` then the mode id) -> ``{"name", "id"}``."""
    match = re.search(r"NV Power Mode:\s*(\S[^\n]*)", text)
    if not match:
        return None
    after = text[match.end():].split()
    mode_id = int(after[0]) if after and after[0].isdigit() else None
    return {"name": match.group(1).strip(), "id": mode_id}


def read_power_mode(run: CommandRunner) -> dict[str, Any] | None:
    out = run(["nvpmodel", "-q"])
    return parse_nvpmodel(out) if out else None


def parse_jetson_clocks(text: str) -> dict[str, Any]:
    """``jetson_clocks --show``: per-domain Min/Max/Current frequencies, and whether clocks are pinned at
    maximum (what ``jetson_clocks`` does: MinFreq raised to MaxFreq for the online CPUs and the GPU)."""
    domains: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        match = re.match(r"\s*(cpu\d+|GPU|EMC|DLA\d+\w*|PVA\w*)\s*:?\s+(.*)", line)
        if match:
            fields = dict(re.findall(r"(\w+)=(\d+)", match.group(2)))
            domains[match.group(1)] = {k: int(v) for k, v in fields.items() if k.endswith("Freq") or k == "Online"}
    pinned = [d["MinFreq"] == d["MaxFreq"] for name, d in domains.items()
              if _clock_domain(name, d) and "MinFreq" in d and "MaxFreq" in d]  # fmt: skip
    return {"enabled": all(pinned) if pinned else None, "gpu": domains.get("GPU"), "emc": domains.get("EMC"),
            "cpu0": domains.get("cpu0")}  # fmt: skip


def _clock_domain(name: str, fields: dict[str, int]) -> bool:
    """The domains jetson_clocks pins: the GPU and every online CPU."""
    return name == "GPU" or (name.startswith("cpu") and bool(fields.get("Online", 1)))


def read_jetson_clocks(run: CommandRunner) -> dict[str, Any] | None:
    """``jetson_clocks --show`` parsed; None where it is absent or not permitted (it needs root)."""
    out = run(["jetson_clocks", "--show"])
    return parse_jetson_clocks(out) if out else None


def read_clocks(root: str | Path = "/") -> dict[str, Any]:
    """GPU devfreq and EMC clock (Hz) and CPU0 frequency (kHz) and governor from sysfs; None where unreadable."""
    gpu = None
    for path in sorted(glob.glob(str(Path(root) / "sys/class/devfreq/*"))):
        if GPU_DEVFREQ.search(Path(path).name):
            rel = os.path.relpath(path, root)
            gpu = {k: _int(_read(root, f"{rel}/{k}")) for k in ("cur_freq", "min_freq", "max_freq")}
            gpu["device"] = Path(path).name
            break
    emc = next((_int(_read(root, f)) for f in EMC_RATE_FILES if _read(root, f) is not None), None)
    cpu = "sys/devices/system/cpu/cpu0/cpufreq"
    return {"gpu_hz": gpu, "emc_hz": emc, "cpu0_khz": _int(_read(root, f"{cpu}/scaling_cur_freq")),
            "cpu_governor": (_read(root, f"{cpu}/scaling_governor") or "").strip() or None}  # fmt: skip


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None
