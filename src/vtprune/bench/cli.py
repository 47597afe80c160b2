"""``vtprune bench | compare | predict``: argparse flags mapped 1:1 onto the config dataclasses.

``add_commands(subparsers)`` registers the three sub-commands and returns ``{name: function}`` for the
main CLI's dispatch table. Each function builds its (validated) config, refuses an existing ``--out``
without ``--force`` before doing any work, calls the library, writes the report directory atomically and
prints a short summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtprune import methods
from vtprune.bench.config import (
    BACKENDS,
    DATASETS,
    DEFAULT_PROMPT,
    DTYPES,
    PRECISIONS,
    PROVIDERS,
    BenchConfig,
    CompareConfig,
    PredictConfig,
    parse_budgets,
)
from vtprune.cliargs import count, new_tokens, text, threads


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


# Flags whose argparse value needs converting into the config field's type (inside the command, where a
# VtpruneError becomes one clean line; argparse ``type=`` would let it escape as a traceback).
CONVERT: dict[str, Callable[[Any], Any]] = {
    "budgets": lambda v: parse_budgets(v) if v else (),
    "bundles": lambda v: tuple(Path(p) for p in v or ()),
    "reports": lambda v: tuple(Path(p) for p in v or ()),
    "labels": _split,
    "notes": lambda v: tuple(v or ()),
}


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls(**{field: args.field})``: every dataclass field has exactly one flag of the same name."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        values[f.name] = CONVERT[f.name](value) if f.name in CONVERT else value
    return cls(**values)


def add_bench(sub: Any) -> None:
    d = BenchConfig.__dataclass_fields__
    p = sub.add_parser("bench", help="measure per-stage latency of bundles or a model at several budgets")
    p.add_argument("bundles", nargs="*", help="bundle directories (ONNX Runtime), one budget each")
    p.add_argument("--backend", choices=BACKENDS, default=d["backend"].default,
                   help="ort (bundles), trt (built bundles, GPU) or torch (--model)")
    p.add_argument("--model", help="tiny-llava | tiny-llava-next | tiny-qwen2.5-vl | pocket | checkpoint DIR")
    p.add_argument("--budgets", help="visual tokens kept, e.g. all,256,128,64 or 0.25 (one bundle per budget)")
    p.add_argument("--method", choices=methods.names(), default="gprune", help="pruning method")
    p.add_argument("--provider", choices=PROVIDERS, default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--threads", type=threads, help="intra-op threads (default: the runtime's)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="--backend torch: weights dtype")
    p.add_argument("--device", default="cpu", help="--backend torch: cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--images", type=Path, help="directory of images (name order; see --num-images)")
    p.add_argument("--dataset", choices=DATASETS, help="easy-vqa test questions (needs the easy-vqa package)")
    p.add_argument("--num-images", dest="num_images", type=count(1, 100000), default=4,
                   help="images taken from --images/--dataset")
    p.add_argument("--prompt", type=text, default=DEFAULT_PROMPT,
                   help="question asked about each image (not with --dataset)")
    p.add_argument("--new-tokens", dest="new_tokens", type=new_tokens, default=16,
                   help="tokens decoded per request (no EOS)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per budget")
    p.add_argument("--iters", type=int, default=10, help="timed runs per budget")
    p.add_argument("--work-dir", dest="work_dir", type=Path, help="where per-budget bundles are exported/reused")
    p.add_argument("--cache-dir", dest="cache_dir", type=Path, help="where built-in tiny models are written")
    p.add_argument("--no-validate", dest="no_validate", action="store_true", help="skip validation of new exports")
    p.add_argument("--out", required=True, type=Path, help="report directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing report directory at --out")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--note", dest="notes", action="append", help="a note to print in the report (repeatable)")
    p.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="N busy processes (one core each) run while measuring, as on a shared robot computer")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="bundles on ONNX Runtime: prefill each prompt whole, without the keys and values kept "
                        "from the previous prompt's text before the image")


def add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare two or more latency reports side by side, with ratios")
    p.add_argument("reports", nargs="+", help="report.json files or report directories; the first is the baseline")
    p.add_argument("--out", required=True, type=Path, help="comparison directory to create")
    p.add_argument("--labels", help="comma-separated names of the reports (default: machine/backend/precision)")
    p.add_argument("--force", action="store_true", help="compare reports that measure different things; replace --out")


def add_predict(sub: Any) -> None:
    from vtprune.bench.devices import DEVICES

    p = sub.add_parser("predict", help="roofline latency prediction of bundles on a device you may not have")
    p.add_argument("bundles", nargs="+", help="bundle directories, one budget each")
    p.add_argument("--device", required=True, choices=list(DEVICES), help="device peaks (cpu-host: measured here)")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 | fp16 | int8 (default: the device's)")
    p.add_argument("--budgets", help="predict these budgets from one bundle by substituting kept-token counts")
    p.add_argument("--calibrate", type=Path, help="a measured report.json: fit per-stage time scales on it")
    p.add_argument("--prompt", type=text, help="question (default: the calibration report's, else bench's default)")
    p.add_argument("--new-tokens", dest="new_tokens", type=new_tokens,
                   help="decoded tokens (default: report's, else 16)")
    p.add_argument("--image", type=Path, help="image file (default: bench's generated scene)")
    p.add_argument("--threads", type=threads, help="cpu-host: threads of the peak microbenchmarks")
    p.add_argument("--out", required=True, type=Path, help="report directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing report directory at --out")


def _argv() -> list[str] | None:
    """The command line, for the report; None when called in-process (e.g. from tests)."""
    name = Path(sys.argv[0]).name if sys.argv else ""
    return ["vtprune", *sys.argv[1:]] if name in ("vtprune", "cli.py", "__main__.py") else None


def _stderr(msg: str) -> None:
    print(f"vtprune: {msg}", file=sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    from vtprune.bench.run import run_bench

    return _report_command(BenchConfig, run_bench, args)


def cmd_predict(args: argparse.Namespace) -> int:
    from vtprune.bench.predict import run_predict

    return _report_command(PredictConfig, run_predict, args)


def _report_command(config_cls: type, runner: Any, args: argparse.Namespace) -> int:
    """Shared shape of ``bench`` and ``predict``: config, refuse a bad --out early, run, write, summarise."""
    from vtprune.bench.output import warn_if_no_plots, write_report
    from vtprune.bench.schema import check_out_dir

    cfg = config_from_args(config_cls, args)
    check_out_dir(cfg.out, cfg.force)
    warn_if_no_plots()
    report = runner(cfg, argv=_argv())
    files = write_report(report, cfg.out, cfg.force)
    return _summary(report, cfg.out, files)


def _summary(report: dict[str, Any], out: Path, files: list[str]) -> int:
    from vtprune.bench.markdown import summary_table, title_of

    print("\n".join([title_of(report), *summary_table(report), f"wrote {out} ({', '.join(files)})"]))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vtprune.bench.compare import compare_reports, stage_rows, write_comparison
    from vtprune.bench.schema import check_out_dir, load_report

    cfg = config_from_args(CompareConfig, args)
    check_out_dir(cfg.out, cfg.force, kind="comparison")
    reports = [load_report(p) for p in cfg.reports]
    comparison = compare_reports(reports, [str(p) for p in cfg.reports], list(cfg.labels) or None, cfg.force)
    files = write_comparison(comparison, reports, cfg.out, cfg.force)
    labels = [r["label"] for r in comparison["reports"]]
    if comparison["forced"]:
        _stderr(f"warning: compared with --force although: {'; '.join(comparison['refusals'])}")
    for row in comparison["budgets"]:
        print(f"budget {row['budget']}:")
        print("\n".join(stage_rows(row, labels)))
    print(f"wrote {cfg.out} ({', '.join(files)})")
    return 0


BENCH_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "bench": cmd_bench, "compare": cmd_compare, "predict": cmd_predict}  # fmt: skip


def add_commands(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Register ``bench``, ``compare`` and ``predict`` on ``subparsers``; returns their command functions
    (also ``BENCH_COMMANDS``, for the main CLI's dispatch table)."""
    add_bench(subparsers)
    add_compare(subparsers)
    add_predict(subparsers)
    return dict(BENCH_COMMANDS)
