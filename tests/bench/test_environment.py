"""Environment capture: Jetson facts from a faked filesystem root and faked commands; timing helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtprune.runtime import report as rep

NVPMODEL = "NVPM WARN: fan mode is not set!\nNV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n"
JETSON_CLOCKS = """SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
cpu11: Online=0 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=729600 IdleStates: WFI=0 c7=0
GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
DLA0_CORE:  Online=1 MinFreq=0 MaxFreq=1600000000 CurrentFreq=1600000000
NV Power Mode: MAXN
"""


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def orin_root(tmp_path: Path) -> Path:
    write(tmp_path, "proc/device-tree/model", "NVIDIA Jetson AGX Orin Developer Kit\x00")
    write(tmp_path, "etc/nv_tegra_release", "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, "
                                            "EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n")  # fmt: skip
    gpu = "sys/class/devfreq/17000000.ga10b"
    for name, value in (("cur_freq", "1300500000"), ("min_freq", "306000000"), ("max_freq", "1300500000")):
        write(tmp_path, f"{gpu}/{name}", value + "\n")
    write(tmp_path, "sys/class/devfreq/15340000.vic/cur_freq", "115200000\n")  # not the GPU
    write(tmp_path, "sys/kernel/debug/bpmp/debug/clk/emc/rate", "3199000000\n")
    write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "2201600\n")
    write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", "schedutil\n")
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nFeatures\t: fp asimd\n")
    write(tmp_path, "proc/meminfo", "MemTotal:       64335836 kB\n")
    return tmp_path


def fake_runner(outputs: dict[str, str | None]):
    calls = []

    def run(argv):
        calls.append(list(argv))
        return outputs.get(argv[0])

    run.calls = calls
    return run


def test_jetson_is_detected_from_files_and_commands(orin_root):
    run = fake_runner({"nvpmodel": NVPMODEL, "jetson_clocks": JETSON_CLOCKS})
    j = rep.jetson_info(orin_root, run)
    assert j["board"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert (j["l4t"], j["jetpack"], j["jetpack_source"]) == ("36.4.3", "6.2", "L4T release table")
    assert j["power_mode"] == {"name": "MAXN", "id": 0}
    assert j["jetson_clocks"]["enabled"] is True  # online CPUs and GPU pinned; cpu11 offline is ignored
    assert j["jetson_clocks"]["emc"]["CurrentFreq"] == 3_199_000_000
    assert j["clocks"]["gpu_hz"] == {"cur_freq": 1_300_500_000, "min_freq": 306_000_000, "max_freq": 1_300_500_000,
                                     "device": "17000000.ga10b"}  # fmt: skip
    assert (j["clocks"]["emc_hz"], j["clocks"]["cpu0_khz"], j["clocks"]["cpu_governor"]) == (
        3_199_000_000, 2_201_600, "schedutil")  # fmt: skip


def test_jetpack_package_version_wins_over_the_table(orin_root):
    run = fake_runner({"dpkg-query": "6.2.1+b38", "nvpmodel": NVPMODEL})
    j = rep.jetson_info(orin_root, run)
    assert (j["jetpack"], j["jetpack_source"]) == ("6.2.1", "nvidia-jetpack package")
    assert ["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"] in run.calls


def test_missing_tools_and_files_degrade_to_none(orin_root):
    (orin_root / "sys/kernel/debug/bpmp/debug/clk/emc/rate").unlink()
    j = rep.jetson_info(orin_root, fake_runner({}))  # no nvpmodel / jetson_clocks / dpkg (or not root)
    assert j["power_mode"] is None and j["jetson_clocks"] is None and j["clocks"]["emc_hz"] is None
    assert j["jetpack"] == "6.2"


def test_clocks_not_pinned_and_unknown_release(orin_root):
    write(orin_root, "etc/nv_tegra_release", "# R99 (release), REVISION: 1.0, GCID: 1\n")
    unpinned = JETSON_CLOCKS.replace("GPU MinFreq=1300500000", "GPU MinFreq=306000000")
    j = rep.jetson_info(orin_root, fake_runner({"jetson_clocks": unpinned}))
    assert j["jetson_clocks"]["enabled"] is False
    assert (j["l4t"], j["jetpack"], j["jetpack_source"]) == ("99.1.0", None, None)


def test_parsers_on_variants():
    assert rep.parse_nvpmodel("NV Power Mode: 15W\n2\n") == {"name": "15W", "id": 2}
    assert rep.parse_nvpmodel("NV Power Mode: MAXN_SUPER") == {"name": "MAXN_SUPER", "id": None}
    assert rep.parse_nvpmodel("nvpmodel: command failed") is None
    assert rep.parse_jetson_clocks("nothing useful")["enabled"] is None


def test_not_a_jetson(tmp_path):
    assert rep.jetson_info(tmp_path, fake_runner({"nvpmodel": NVPMODEL})) is None
    write(tmp_path, "proc/device-tree/model", "Raspberry Pi 5 Model B Rev 1.0\x00")
    assert rep.jetson_info(tmp_path, fake_runner({})) is None


def test_environment_block_is_backward_compatible_and_records_provider(orin_root):
    smi = "NVIDIA H100 80GB HBM3, 550.54.15, 81559\n"
    env = rep.environment("onnxruntime:CPUExecutionProvider", "fp16", orin_root,
                          fake_runner({"nvidia-smi": smi, "nvpmodel": NVPMODEL}))  # fmt: skip
    assert {"host", "os", "python", "cpu", "cores", "gpu", "libraries"} <= set(env)  # the original keys
    assert env["cpu"] == "ARMv8 Processor rev 1 (v8l)" and env["cpu_isa"] == ["asimd"]
    assert (env["execution_provider"], env["precision"]) == ("onnxruntime:CPUExecutionProvider", "fp16")
    assert env["accelerator"] == {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "memory_mb": 81559.0}
    assert env["jetson"]["power_mode"]["name"] == "MAXN" and env["memory_mb"] == pytest.approx(62828.0, abs=1)
    assert set(rep.environment()) == set(env)  # the real machine: same keys, no failure


def test_summarize_and_measure_stages():
    t = rep.summarize([1.0, 2.0, 3.0, 4.0, 100.0], warmup=2)
    assert (t.warmup, t.iters, t.p50_ms, t.mean_ms, t.min_ms) == (2, 5, 3.0, 22.0, 1.0)
    # inclusive quantiles: position (n - 1) * q = 3.6 -> 4 + 0.6 * 96; 3.96 -> 4 + 0.96 * 96
    assert t.p90_ms == pytest.approx(61.6) and t.p99_ms == pytest.approx(96.16)
    runs = iter([{"a": 100.0}, {"a": 1.0, "b": 5.0}, {"a": 3.0}, {"a": 2.0, "b": 7.0}])
    ticks = []
    stats = rep.measure_stages(lambda: next(runs), warmup=1, iters=3, tick=lambda: ticks.append(1))
    assert len(ticks) == 4 and list(stats) == ["a", "b"]
    assert (stats["a"].p50_ms, stats["a"].iters, stats["b"].iters, stats["b"].mean_ms) == (2.0, 3, 2, 6.0)


def test_peak_rss_can_be_reset():
    import mmap

    # 64 MiB of anonymous pages, every one touched, then unmapped: the peak now lies at least 64 MiB above
    # the current RSS, whatever ran before (a freed Python buffer may stay in the heap, and in the RSS, when
    # a library earlier in the process has raised malloc's mmap threshold)
    transient = mmap.mmap(-1, 64 * 2**20)
    for i in range(0, len(transient), mmap.PAGESIZE):
        transient[i] = 1
    transient.close()
    high = rep.peak_rss_mb()
    if rep.reset_peak_rss():
        assert rep.peak_rss_mb() < high
