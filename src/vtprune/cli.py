"""``vtprune`` command line: a thin shell over the library API.

Every user error becomes one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from vtprune import __version__
from vtprune.bench.cli import BENCH_COMMANDS
from vtprune.bench.cli import add_commands as add_bench_commands
from vtprune.calib.cli import add_calib_command, cmd_calib
from vtprune.cliargs import add_model_args, add_prune_args, count, new_tokens, prune_config, seed, text, threads
from vtprune.config import (
    PruneConfig,
    SamplingConfig,
    parse_keep,
)
from vtprune.errors import AccuracyError, VtpruneError
from vtprune.eval.cli import add_eval_command, cmd_eval

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vtprune", description="Export and run vision-language models with visual-token pruning.")
    parser.add_argument("--version", action="version", version=f"vtprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="answer a prompt about an image: a bundle (ONNX Runtime) or --model (PyTorch)")
    run.add_argument("bundle", nargs="?", type=Path, help="bundle directory from 'vtprune export' (ONNX Runtime)")
    add_model_args(run, required=False)
    run.add_argument("--backend", choices=("ort", "trt"), default="ort",
                     help="bundle only: ort = ONNX Runtime (default), trt = the bundle's TensorRT engines (GPU)")
    run.add_argument("--provider", default="cpu", help="bundle only: ONNX Runtime provider cpu | cuda | tensorrt")
    run.add_argument("--threads", type=threads, help="bundle only: ONNX Runtime intra-op threads (default: all cores)")
    run.add_argument("--device", help="--model only: where PyTorch runs, cpu | cuda | cuda:N (default: cpu)")
    run.add_argument("--image", required=True, type=Path, help="image file (PNG, JPEG, ...)")
    run.add_argument("--prompt", required=True, type=text, help="the question; wrapped in the model's chat template")
    run.add_argument("--raw-prompt", action="store_true", help="use --prompt verbatim; it must hold the image slot")
    run.add_argument("--max-new-tokens", type=new_tokens, default=32, help="greedy decoding length limit")
    run.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    g = run.add_argument_group("sampling (default greedy)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=count(0), default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--seed", type=seed, default=0, help="sampling seed")
    add_prune_args(run)

    exp = sub.add_parser("export", help="export vision+pruning, embedding and decoder ONNX graphs into a bundle")
    add_model_args(exp)
    exp.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset (18..23)")
    exp.add_argument("--inline", action="store_true", help="also write vision.inlined.onnx without local functions")
    exp.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    exp.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    exp.add_argument("--reuse-lm-from", help="bundle of the same model whose embed/decoder graphs to reuse")
    exp.add_argument("--weights", choices=["int8", "int4", "w8a8", "int4-trt", "int8-trt"],
                     help="quantized language model: int8 / int4 weights for ONNX Runtime (MatMulNBits), w8a8: "
                          "int8 weights and activations (MatMulInteger; SmoothQuant calibrated on --calib-data); "
                          "Q/DQ forms that vtprune build takes: int4-trt (int4 weights) and int8-trt (SmoothQuant, "
                          "int8 weights and static int8 activations calibrated on --calib-data); the vision graph, "
                          "pruning and selectors stay fp32")  # fmt: skip
    exp.add_argument("--vision", choices=["int8", "int8-trt"],
                     help="int8 vision encoder and projector, static activation scales calibrated on --calib-data: "
                          "int8 for ONNX Runtime on CPUs (uint8 activations), int8-trt for TensorRT (symmetric Q/DQ, "
                          "which vtprune build takes); the pruning stage stays fp32")  # fmt: skip
    exp.add_argument("--calib-data", default="easy-vqa", metavar="easy-vqa|DIR",
                     help="images --vision and --weights w8a8|int8-trt calibrate on: easy-vqa's train split or "
                          "a directory")  # fmt: skip
    exp.add_argument("--calib-n", type=count(1, 4096), default=32, help="calibration images (default: 32)")
    exp.add_argument("--decoder", choices=["traced", "fused"],
                     help="decoder graph: traced (portable ONNX; TensorRT builds it) or fused (ONNX Runtime's "
                          "GroupQueryAttention, RotaryEmbedding and skip-RMSNorm, KV cache updated in place; Llama-"
                          "family decoders; in-LLM methods: the decode graph, the routed prefill stays traced). "
                          "Default: fused with --weights, else traced")  # fmt: skip
    exp.add_argument("--external-data", action="store_true",
                     help="keep every graph's weights in <graph>.onnx.data beside it (always done above 2 GB)")
    add_prune_args(exp)

    build = sub.add_parser("build", help="build TensorRT engines for a bundle (TensorRT, or TensorRT for RTX)")
    build.add_argument("bundle", type=Path, help="bundle directory from 'vtprune export'")
    build.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 (full TensorRT) | typed")
    build.add_argument("--target", help="TensorRT-RTX compute capabilities, e.g. sm89 or sm86,sm120")
    build.add_argument("--workspace", type=int, dest="workspace_mb", help="builder workspace limit in MiB")
    build.add_argument("--max-batch", type=int, default=1, help="largest batch the engines accept")
    build.add_argument("--max-seq", type=int, help="longest prompt and KV cache (default: model max, <= 4096)")
    build.add_argument("--graphs", help="comma-separated graphs to build (default: every graph of the bundle)")
    build.add_argument("--force", action="store_true", help="rebuild engines that exist")
    build.add_argument("--timing-cache", type=Path, metavar="FILE",
                       help="TensorRT timing cache: reused if it exists, created otherwise, updated after the build")
    build.add_argument("--plugins", action="store_true",
                       help="fused Triton plugins for GraphPropagate/TopKRoute (full TensorRT; needs vtprune[gpu])")

    check = sub.add_parser("check", help="parity of a bundle in ONNX Runtime against the PyTorch source model")
    check.add_argument("bundle", type=Path, help="bundle directory")
    check.add_argument("--model", help="source checkpoint (default: the manifest's source)")
    check.add_argument("--backend", choices=("ort", "trt"), default="ort",
                       help="the bundle on ONNX Runtime (default) or its TensorRT engines (GPU; vtprune build); "
                            "trt also compares every engine with ONNX Runtime through Polygraphy")
    check.add_argument("--image", type=Path, help="image file (default: a generated scene)")
    check.add_argument("--prompt", type=text, default="what is in the image ?", help="the question")
    check.add_argument("--steps", type=count(1, 4096), default=32, help="greedy tokens compared")
    check.add_argument("--cache-dir", type=Path, help="where built-in models are written")
    check.add_argument("--json", action="store_true", help="print the table as JSON")

    demo = sub.add_parser("demo", help="export unpruned, G-Prune and ALVTS bundles, run them in ONNX Runtime (CPU)")
    demo.add_argument("--model", default="pocket", help="model to demo (default: pocket, real weights)")
    demo.add_argument("--image", type=Path, help="image file (default: an easy-vqa test image and a photo)")
    demo.add_argument("--prompt", type=text, help="the question (with --image)")
    demo.add_argument("--keep", default="64", help="G-Prune budget (count or ratio; default 64 of 256)")
    demo.add_argument("--alvts-keep", type=count(1),
                      help="ALVTS visual tokens per routed layer (default 28; tiny models 4)")
    demo.add_argument("--cache-dir", type=Path, help="where built-in tiny models are written")
    mk = sub.add_parser("make-checkpoint",
                        help="write a published VLM architecture with seeded random weights (real-size tests)")
    mk.add_argument("--config", required=True, metavar="NAME",
                    help="llava-1.5-7b | llava-next-7b | qwen2.5-vl-3b | qwen2.5-vl-7b")
    mk.add_argument("--out", required=True, type=Path, help="checkpoint directory to create")
    mk.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="weight dtype (default bf16)")
    mk.add_argument("--seed", type=seed, default=0, help="weight seed (default 0)")
    mk.add_argument("--force", action="store_true", help="replace a checkpoint this command wrote at --out")
    add_bench_commands(sub)
    add_eval_command(sub)
    add_calib_command(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from vtprune.api import open_runner
    from vtprune.images import load_image

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    if (args.bundle is None) == (args.model is None):
        raise VtpruneError("give either a bundle directory (ONNX Runtime) or --model (PyTorch), not both or neither")
    if args.bundle is None and args.backend != "ort":
        raise VtpruneError("--backend trt runs a bundle's engines; --model runs PyTorch")
    if args.bundle is not None:
        if args.method or args.keep:
            raise VtpruneError("a bundle's pruning is fixed at export; drop --method/--keep or re-export")
        if args.device:
            raise VtpruneError("--device is for --model (PyTorch); a bundle picks its device with --provider")
        if args.backend == "trt" and (args.provider != "cpu" or args.threads):
            raise VtpruneError("--provider and --threads are ONNX Runtime settings; --backend trt takes neither")
        source, backend, prune = args.bundle, args.backend, None
        label = f"{args.bundle} (tensorrt)" if backend == "trt" else f"{args.bundle} (onnxruntime {args.provider})"
    else:
        source, backend, prune = args.model, "torch", prune_config(args)
        label = f"{args.model} (pytorch {args.device or 'cpu'})"
    with open_runner(source, backend, provider=args.provider, threads=args.threads, sampling=sampling, prune=prune,
                     dtype=args.dtype, device=args.device or "cpu", cache_dir=args.cache_dir,
                     allow_pickle=args.allow_pickle) as runner:  # fmt: skip
        image = load_image(args.image, runner.adapter.min_image_side)
        result = runner.generate(image, args.prompt, args.max_new_tokens, args.raw_prompt)
    if args.json:
        print(json.dumps({"model": label, "family": runner.adapter.family} | result.to_dict(), indent=2))
    else:
        print(format_result(label, runner.adapter.family, result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vtprune.api import export_bundle
    from vtprune.export.bundle import ExportConfig

    export = ExportConfig(opset=args.opset, dtype=args.dtype, inline=args.inline, validate=not args.no_validate,
                          force=args.force, reuse_lm_from=args.reuse_lm_from, weights=args.weights,
                          vision=args.vision, calib_data=args.calib_data, calib_n=args.calib_n,
                          external_data=args.external_data, decoder=args.decoder)  # fmt: skip

    def log(msg: str) -> None:
        print(f"vtprune export: {msg}", file=sys.stderr, flush=True)

    from vtprune.check.validate import format_rows

    manifest = export_bundle(args.model, prune_config(args), export, args.out, args.cache_dir, log)
    checks = manifest.get("validation", {}).get("checks", [])
    if checks:
        print(format_rows(checks))
    top = sorted({f.split("/")[0] + ("/" if "/" in f else "") for f in manifest["files"]})  # processor/ once
    print(f"wrote {args.out} ({', '.join(top)})")
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from vtprune.models.published import published, write_checkpoint

    spec = published(args.config)
    rec = write_checkpoint(spec.name, args.out, args.dtype, args.seed, args.force)
    print(f"wrote {args.out}: {spec.name} ({spec.source} architecture), {rec['parameters'] / 1e9:.2f} B parameters, "
          f"{rec['bytes'] / 1e9:.1f} GB {args.dtype} in {rec['shards']} shard(s), random weights (seed {args.seed})")
    return 0


def format_result(model: str, family: str, r: Any) -> str:
    f = r.flops
    stages = " | ".join(f"{k} {v:.1f}" for k, v in r.timings_ms.items())
    budget = "" if r.keep is None else f" (--keep {r.keep})"
    return "\n".join([
        f"answer: {r.answer}",
        f"model: {model} ({family}); method: {r.method}{budget}",
        f"visual tokens kept: {r.visual_tokens_kept} / {r.visual_tokens_total}; "
        f"prefill tokens: {r.prefill_tokens} / {r.prompt_tokens}",
        f"prefill GMACs: {f.prefill_macs_pruned / 1e9:.4g} pruned vs {f.prefill_macs_unpruned / 1e9:.4g} unpruned; "
        f"pruning stage {f.prune_stage_macs / 1e9:.3g}; saved {100 * f.saved_fraction:.1f}%",
        f"stage ms: {stages} | total {sum(r.timings_ms.values()):.1f} ({len(r.token_ids)} new tokens)",
        f"time to first token {r.ttft_ms:.1f} ms; decode "
        + (f"{r.decode_tokens_per_s:.1f} tokens/s" if r.decode_tokens_per_s else "n/a (one token)")
        + f"; peak RSS {r.peak_rss_mb:.0f} MiB",
    ])  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> int:
    from vtprune.demo import run_demo

    return run_demo(args.model, args.image, args.prompt, parse_keep(args.keep), args.cache_dir, args.alvts_keep)


def cmd_build(args: argparse.Namespace) -> int:
    from vtprune.backends.trt.engines import BuildConfig, build_bundle

    cfg = BuildConfig(args.precision, args.target, args.workspace_mb, args.max_batch, args.max_seq,
                      None if args.graphs is None else tuple(g.strip() for g in args.graphs.split(",") if g.strip()),
                      args.force,
                      args.timing_cache, args.plugins)  # fmt: skip
    engines = build_bundle(args.bundle, cfg, lambda msg: print(f"vtprune build: {msg}", file=sys.stderr, flush=True))
    for graph, meta in engines.items():
        print(f"{graph}.engine: {meta['engine_size'] / 1e6:.1f} MB, {meta['flavour']} {meta['trt_version']}, "
              f"target {meta['target'] or 'default'}, {meta['precision']}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from vtprune.check.validate import compare_backends, format_rows
    from vtprune.images import load_image, scene_image
    from vtprune.manifest import read_manifest
    from vtprune.models import load_vlm

    manifest = read_manifest(args.bundle)
    runner = None
    if args.backend == "trt":  # loaded first: a machine without a GPU is told before the model loads
        from vtprune.backends.trt.runner import TrtVlm

        runner = TrtVlm(args.bundle, verify=False)
    adapter = load_vlm(args.model or manifest["model"]["source"], cache_dir=args.cache_dir)
    image = load_image(args.image, adapter.min_image_side) if args.image else scene_image()
    cfg = PruneConfig.from_dict(manifest["prune"])
    rows = compare_backends(adapter, cfg, args.bundle, image, args.prompt, args.steps, runner)
    if runner is not None:  # and every engine against ONNX Runtime on ONNX Runtime's own feeds
        from vtprune.check.parity import engine_parity

        rows += engine_parity(args.bundle, runner, image, args.prompt)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0 if all(r["ok"] for r in rows) else 1


COMMANDS = {"run": cmd_run, "export": cmd_export, "build": cmd_build, "check": cmd_check, "demo": cmd_demo,
            "eval": cmd_eval, "calib": cmd_calib, "make-checkpoint": cmd_make_checkpoint, **BENCH_COMMANDS}  # fmt: skip


def _quiet_libraries() -> None:
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):  # "torchvision is not installed"
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _print_table(exc: VtpruneError) -> None:
    """A failed validation's per-check table, after its one-line error."""
    if isinstance(exc, AccuracyError) and exc.table:
        from vtprune.check.validate import format_rows

        print(format_rows(exc.table), file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so every writer cleans up as for Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application): its own handlers stay
        previous = None
    try:
        if not args.debug:
            _quiet_libraries()
        return COMMANDS[args.command](args)
    except VtpruneError as exc:
        if args.debug:
            _print_table(exc)
            raise
        _error(str(exc))
        _print_table(exc)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # stdout closed early (``| head``): stop quietly, without a traceback at exit
        _silence_stdout()
        _error("the output pipe was closed before vtprune finished writing")
        return EXIT_USER_ERROR
    except OSError as exc:  # the filesystem or the OS refused: disk full, read-only, permissions, ...
        if args.debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}")
        return EXIT_USER_ERROR
    except Terminated:
        _error("terminated", prefix="vtprune: ")
        return 143
    except KeyboardInterrupt:
        _error("interrupted", prefix="vtprune: ")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _error(msg: str, prefix: str = "vtprune: error: ") -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):  # stderr closed too: nothing left to tell
        print(prefix + msg, file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not raise on the closed pipe."""
    import os

    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
