"""Human-readable ``report.md`` and ``compare.md``: tables a person reads, with the environment spelled out."""

from __future__ import annotations

from typing import Any

SUMMARY_STAGES = ("preprocess", "vision_prune", "prefill", "ttft", "decode_per_token", "e2e")
STAGE_TITLES = {"preprocess": "preprocess", "vision": "vision", "prune": "prune", "vision_prune": "vision+prune",
                "embed": "embed+merge", "prefill": "prefill", "ttft": "TTFT", "decode": "decode (all tokens)",
                "decode_per_token": "decode / token", "e2e": "end-to-end"}  # fmt: skip


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def fmt_rate(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def title_of(report: dict[str, Any]) -> str:
    s = report["subject"]
    what = f"{s['model']} ({s['method']}), {s['backend']} {s.get('provider', '')}, {s.get('precision', '')}"
    return f"{'Predicted' if report['predicted'] else 'Measured'} latency: {what}"


def report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: notes, workload, a p50 summary per budget, full stage statistics, environment."""
    lines = [f"# {title_of(report)}", ""]
    lines += [f"> **Note:** {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    lines += workload_lines(report) + ["", "## Summary (p50)", ""]
    lines += summary_table(report) + ["", "## Stages (ms)", ""]
    lines += stage_table(report) + [""]
    if report["predicted"]:
        lines += prediction_lines(report)
    lines += ["## Environment", ""] + environment_lines(report["environment"]) + [""]
    lines += [f"Schema v{report['schema_version']}; created {report.get('created', '?')} by vtprune "
              f"{report.get('vtprune_version', '?')}.", ""]  # fmt: skip
    return "\n".join(lines)


def workload_lines(report: dict[str, Any]) -> list[str]:
    w, s = report["workload"], report["subject"]
    sizes = ", ".join("x".join(map(str, size)) for size in w.get("image_sizes", []))
    prompt = f'"{w["prompt"]}"' if w.get("prompt") else f"{w.get('num_prompts', '?')} dataset questions"
    runs = f"warm-up {w['warmup']}, iterations {w['iters']} per budget" if not report["predicted"] else "predicted"
    prune = ", ".join(f"{k}={v}" for k, v in s.get("prune", {}).items())
    return [f"- **Subject:** `{s['model']}` ({s.get('family', '?')}), backend `{s['backend']}`, provider "
            f"`{s.get('provider')}`, precision `{s.get('precision')}`, threads {s.get('threads') or 'default'}"
            + (f"; {s['method']} {prune}" if prune else ""),
            f"- **Workload:** {w.get('num_images', '?')} image(s) from {w.get('images', '?')} ({sizes}), prompt "
            f"{prompt}, {w['new_tokens']} new tokens (EOS ignored); {runs}"
            + (f"; {w['background_load']} busy background processes." if w.get("background_load") else ".")]


def summary_table(report: dict[str, Any]) -> list[str]:
    header = ["budget", "visual kept / total", "prefill tokens", "prefill GFLOPs", "vision+prune ms",
              "prefill ms", "prefill tok/s", "TTFT ms", "decode ms/tok", "decode tok/s", "e2e ms",
              "peak RSS MB"]  # fmt: skip
    rows = []
    for b in report["budgets"]:
        t, th, p50 = b["tokens"], b["throughput"], lambda s, b=b: b["stages"].get(s, {}).get("p50_ms")
        rss = b["memory"].get("peak_rss_mb")
        prefill = f"{t['prefill']} ({t['cached']} cached)" if t.get("cached") else str(t["prefill"])
        rows.append([b["label"], f"{t['visual_kept']} / {t['visual_total']}", prefill,
                     f"{b['flops']['prefill_flops'] / 1e9:.4g}", fmt_ms(p50("vision_prune")), fmt_ms(p50("prefill")),
                     fmt_rate(th.get("prefill_tok_per_s")), fmt_ms(p50("ttft")), fmt_ms(p50("decode_per_token")),
                     fmt_rate(th.get("decode_tok_per_s")), fmt_ms(p50("e2e")),
                     f"{rss:,.0f}" if rss is not None else "–"])  # fmt: skip
    return table(header, rows)


def stage_table(report: dict[str, Any]) -> list[str]:
    from vtprune.bench.schema import STAGES

    rows = []
    for b in report["budgets"]:
        for stage in STAGES:
            st = b["stages"].get(stage)
            if st is not None:
                rows.append([b["label"], STAGE_TITLES[stage]] + [fmt_ms(st.get(k)) for k in
                            ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms")])  # fmt: skip
    return table(["budget", "stage", "p50", "p90", "p99", "mean", "min"], rows)


def prediction_lines(report: dict[str, Any]) -> list[str]:
    """Device peaks, the roofline terms per stage, and the calibration, for predicted reports."""
    d = report["device"]
    lines = ["## Roofline model", "", f"Device `{d['name']}`: {d['description']}. Peaks used: "
             f"{fmt_si(d['peak_flops'], 'FLOP/s')} ({d['precision']}), {fmt_si(d['mem_bandwidth'], 'B/s')}, "
             f"efficiency compute {d['efficiency']['compute']:g} / memory {d['efficiency']['memory']:g}, "
             f"overhead {d['op_overhead_us']:.3g} µs per op, {d['run_overhead_us']:.3g} µs per graph run and "
             f"{d.get('io_overhead_us', 0):.3g} µs per bound tensor.", ""]  # fmt: skip
    rows = []
    for b in report["budgets"]:
        for stage, st in b["stages"].items():
            r = st.get("roofline")
            if r:
                rows.append([b["label"], STAGE_TITLES[stage], fmt_si(r["flops"], "FLOP"), fmt_si(r["bytes"], "B"),
                             fmt_ms(r["compute_ms"]), fmt_ms(r["memory_ms"]), fmt_ms(r["overhead_ms"]), r["bound"],
                             f"{r.get('time_scale', 1.0):.3g}", fmt_ms(st["p50_ms"])])  # fmt: skip
    header = ["budget", "stage", "FLOPs", "bytes", "compute ms", "memory ms", "overhead ms", "bound", "scale",
              "predicted ms"]  # fmt: skip
    lines += table(header, rows) + [""]
    cal = report.get("calibration")
    if cal:
        lines += [f"Calibrated on `{cal['report']}` (budgets {', '.join(cal['budgets'])}): time scale per stage "
                  + ", ".join(f"{k} {v:.3g}" for k, v in cal["time_scale"].items()) + ".", ""]  # fmt: skip
        rows = [[STAGE_TITLES[stage]] + [f"{errs[b]:+.0f}%" if b in errs else "–" for b in cal["budgets"]]
                for stage, errs in cal.get("loo_error_pct", {}).items()]  # fmt: skip
        if rows:
            lines += ["Leave-one-budget-out error of the calibrated model (scale fitted on the other budgets, "
                      "predicted / measured - 1):", ""] + table(["stage", *cal["budgets"]], rows) + [""]  # fmt: skip
    return lines


def environment_lines(env: dict[str, Any]) -> list[str]:
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items())
    acc = env.get("accelerator") or {}
    lines = [f"- Host `{env.get('host')}`: {env.get('cpu')} ({env.get('cores')} cores"
             + (f"; {', '.join(env['cpu_isa'])}" if env.get("cpu_isa") else "") + f"), "
             f"{(env.get('memory_mb') or 0) / 1024:.1f} GiB RAM, {env.get('os')}",
             f"- GPU: {env.get('gpu') or acc.get('name') or 'none'}"
             + (f", driver {acc['driver']}" if acc.get("driver") else "")
             + (f", CUDA {env['cuda_runtime']}" if env.get("cuda_runtime") else ""),
             f"- Execution provider: {env.get('execution_provider')}; precision: {env.get('precision')}",
             f"- Libraries: {libs}"]  # fmt: skip
    return lines + jetson_lines(env.get("jetson"))


def jetson_lines(j: dict[str, Any] | None) -> list[str]:
    if not j:
        return ["- Jetson: no (not a Jetson board)"]
    pm = j.get("power_mode") or {}
    jc = j.get("jetson_clocks") or {}
    clocks = j.get("clocks") or {}
    gpu = clocks.get("gpu_hz") or {}
    return [f"- Jetson: {j.get('board')}, L4T {j.get('l4t')}, JetPack {j.get('jetpack')} "
            f"(from {j.get('jetpack_source')})",
            f"- Power mode: {pm.get('name', 'unknown')} (id {pm.get('id')}); jetson_clocks: "
            f"{ {True: 'on', False: 'off'}.get(jc.get('enabled'), 'unknown') }; GPU clock "
            f"{fmt_si(gpu.get('cur_freq'), 'Hz')} (max {fmt_si(gpu.get('max_freq'), 'Hz')}); "
            f"EMC {fmt_si(clocks.get('emc_hz'), 'Hz')}"]  # fmt: skip
