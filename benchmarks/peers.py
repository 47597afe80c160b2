"""vtprune beside OpenVINO GenAI on the same pocket checkpoint, the same images and the same CPU.

    python benchmarks/peers.py --openvino-python /path/to/ov-venv/bin/python [--ortgenai-python /path/to/gai/bin/python]
                               [--rounds 5] [--background-load 2]

OpenVINO GenAI runs in its own virtual environment (never a vtprune dependency); make one with
``python -m venv V && V/bin/pip install openvino-genai "optimum-intel[openvino]"`` plus a CPU torch. The
script copies the pocket checkpoint, adds the ``preprocessor_config.json`` OpenVINO reads (transformers 5
writes ``processor_config.json``), converts it with ``optimum-cli export openvino`` (fp32 and int8 weights)
and measures:

- vtprune's ONNX Runtime bundles from ``benchmarks/quantized.py`` (fp32, int8, int4, w8a8, w8a8 with an int8
  vision graph; unpruned, G-Prune 64 and ALVTS 28; a few with the traced decoder beside the fused one
  quantized bundles get by default, and fp32 with the fused one, ``F@fused``); ``--only`` picks configurations
  by label. A worker keeps its runner open, so from the warm-up round on the text before the image comes from
  the runner's prefix cache (the system prompt: 24 rows); the ``no prefix cache`` rows prefill every prompt
  whole. OpenVINO GenAI 2026.4's ``VLMPipeline`` caches prompt prefixes by default too (left as it is:
  measured beside a run, its int8 TTFT was 435 ms with it off and 360-375 ms with it on);
- OpenVINO GenAI's ``VLMPipeline``: fp32 weights computed in fp32 (``INFERENCE_PRECISION_HINT=f32``), fp32
  weights with its default precision (bf16 on CPUs with AMX/AVX-512 BF16), and int8 weights;
- with ``--ortgenai-python`` (a venv with ``onnxruntime-genai``, torch, transformers, onnx), ONNX Runtime
  GenAI on the pocket's *language model only* (its model builder, fp32 and int4, both cores): ORT-GenAI has
  no pipeline for this vision tower, so its rows are the prefill of a text prompt as long as vtprune's
  prompts (unpruned: every visual token; G-Prune 64) plus the decode, with no vision or preprocessing.

Each configuration lives in one worker process, loaded once; rounds alternate the workers (A, B, C, ...,
A, B, C, ...), each round answering the same 4 easy-vqa images with 16 new tokens, EOS ignored, greedy; one
warm-up round. Medians over rounds; ratios within this run. With ``--background-load N`` the rounds are then
repeated with N busy processes and each configuration's slowdown is reported. Peak RSS per worker from
/proc. Writes peers.json and peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "describe the image in detail."
NEW_TOKENS = 16
VTPRUNE = {"vtprune fp32, unpruned": "none-fp32", "vtprune fp32, G-Prune 64": "gprune-64-fp32",
           "vtprune int8, unpruned": "none-int8", "vtprune int4, unpruned": "none-int4",
           "vtprune int4, G-Prune 64": "gprune-64-int4", "vtprune w8a8, unpruned": "none-w8a8",
           "vtprune w8a8, G-Prune 64": "gprune-64-w8a8", "vtprune w8a8 + int8 vision, unpruned": "none-w8a8+v8",
           "vtprune w8a8 + int8 vision, G-Prune 64": "gprune-64-w8a8+v8",
           "vtprune w8a8, ALVTS 28": "alvts-28-w8a8",
           "vtprune w8a8 + int8 vision, ALVTS 28": "alvts-28-w8a8+v8", "vtprune int4, ALVTS 28": "alvts-28-int4",
           # the same formats with the traced decoder (quantized bundles get the fused one by default)
           "vtprune w8a8 + int8 vision, G-Prune 64, traced decoder": "gprune-64-w8a8+v8@traced",
           "vtprune int4, G-Prune 64, traced decoder": "gprune-64-int4@traced",
           "vtprune w8a8 + int8 vision, ALVTS 28, traced decode graph": "alvts-28-w8a8+v8@traced",
           # fp32 with the fused decoder (fp32 bundles get the portable traced one by default, which TensorRT builds)
           "vtprune fp32 fused decoder, unpruned": "none-fp32@fused",
           "vtprune fp32 fused decoder, G-Prune 64": "gprune-64-fp32@fused",
           # every prompt prefilled whole (the runner's prefix cache off: the rows above reuse the text before
           # the image from the previous request, as a runner kept open does)
           "vtprune fp32, unpruned, no prefix cache": "none-fp32#whole",
           "vtprune fp32, G-Prune 64, no prefix cache": "gprune-64-fp32#whole",
           "vtprune w8a8 + int8 vision, G-Prune 64, no prefix cache": "gprune-64-w8a8+v8#whole"}  # fmt: skip
ORTGENAI = {"ORT-GenAI fp32, LM only, unpruned-length prompt": ("fp32", "unpruned"),
            "ORT-GenAI fp32, LM only, G-Prune-64-length prompt": ("fp32", "gprune-64"),
            "ORT-GenAI int4, LM only, unpruned-length prompt": ("int4", "unpruned"),
            "ORT-GenAI int4, LM only, G-Prune-64-length prompt": ("int4", "gprune-64")}  # fmt: skip
OPENVINO = {"OpenVINO fp32 (f32 compute)": ("fp32", {"INFERENCE_PRECISION_HINT": "f32"}),
            "OpenVINO fp32 (default compute)": ("fp32", {}),
            "OpenVINO int8": ("int8", {})}  # fmt: skip


# --- workers (one configuration each; one JSON line per request) ------------------------------------------
def vtprune_worker(bundle: str, images: list[str]) -> None:
    from PIL import Image

    from vtprune.backends.ort import OrtVlm
    from vtprune.runtime.generate import generate

    bundle, _, whole = bundle.partition("#")
    vlm = OrtVlm(bundle, prefix_cache=not whole)
    pics = [Image.open(p).convert("RGB") for p in images]

    def one(img: Any) -> dict[str, float]:
        gen = generate(vlm, img, PROMPT, NEW_TOKENS, eos=set())
        return {"ttft_ms": gen.ttft_ms, "decode_tok_s": gen.decode_tokens_per_s}

    serve(lambda: [one(img) for img in pics])


def openvino_worker(model: str, props: str, images: list[str]) -> None:
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai
    from PIL import Image

    pipe = ov_genai.VLMPipeline(model, "CPU", **json.loads(props))
    config = ov_genai.GenerationConfig()
    config.max_new_tokens, config.ignore_eos = NEW_TOKENS, True
    pics = [ov.Tensor(np.array(Image.open(p).convert("RGB"))[None]) for p in images]

    def one(img: Any) -> dict[str, float]:
        metrics = pipe.generate(PROMPT, images=[img], generation_config=config).perf_metrics
        return {"ttft_ms": metrics.get_ttft().mean, "decode_tok_s": 1e3 / metrics.get_tpot().mean}

    serve(lambda: [one(img) for img in pics])


def ortgenai_worker(model: str, tokens: str) -> None:
    """ONNX Runtime GenAI on a text prompt of ``tokens`` ids: TTFT is appending them and choosing the first
    new token; decode is the rest (EOS suppressed by ``min_length``)."""
    import numpy as np
    import onnxruntime_genai as og

    lm = og.Model(model)
    n = int(tokens)
    ids = (np.arange(n, dtype=np.int32) % 2000) + 1000  # ordinary text tokens; their values do not change the cost

    def one() -> dict[str, float]:
        params = og.GeneratorParams(lm)
        params.set_search_options(max_length=n + NEW_TOKENS, min_length=n + NEW_TOKENS, do_sample=False)
        gen = og.Generator(lm, params)
        start = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        first = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            gen.generate_next_token()
        return {"ttft_ms": (first - start) * 1e3, "decode_tok_s": (NEW_TOKENS - 1) / (time.perf_counter() - first)}

    serve(lambda: [one() for _ in range(4)])


def serve(run: Any) -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps({"results": run()}), flush=True)


# --- the driver --------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, label: str, cmd: list[str]) -> None:
        self.label = label
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: the worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def run(self) -> list[dict[str, float]]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()["results"]

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def convert_openvino(ov_python: str, work: Path, fmt: str, log: Any) -> Path:
    """The pocket checkpoint as an OpenVINO model with ``fmt`` weights (converted once)."""
    out = work / f"openvino-{fmt}"
    if (out / "openvino_language_model.xml").is_file():
        return out
    src = work / "pocket-hf"
    if not src.is_dir():
        from vtprune.models import pocket

        shutil.copytree(pocket.materialize(None, log=lambda _: None), src)
        processor = json.loads((src / "processor_config.json").read_text())
        (src / "preprocessor_config.json").write_text(json.dumps(processor["image_processor"], indent=2))
    log(f"converting the pocket checkpoint to OpenVINO ({fmt} weights)")
    cmd = [ov_python, "-m", "optimum.commands.optimum_cli", "export", "openvino", "-m", str(src),
           "--task", "image-text-to-text", "--weight-format", fmt, str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    if not (out / "preprocessor_config.json").is_file():  # optimum-intel 2.2 writes only processor_config.json;
        # without this file OpenVINO GenAI falls back to a default image size (576 image tokens, not 256)
        shutil.copy(src / "preprocessor_config.json", out / "preprocessor_config.json")
    return out


def convert_ortgenai(gai_python: str, work: Path, fmt: str, log: Any) -> Path:
    """The pocket's language model built by ORT-GenAI's model builder with ``fmt`` weights (once; int4 at
    accuracy level 4), its sessions told to use both cores."""
    out = work / f"ortgenai-{fmt}"
    if (out / "genai_config.json").is_file():
        return out
    src = work / "pocket-lm"
    if not (src / "model.safetensors").is_file():
        extract_language_model(src)
    log(f"building the pocket language model with ORT-GenAI's model builder ({fmt})")
    cmd = [gai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", fmt,
           "-e", "cpu", "-c", str(work / "ortgenai-cache")]  # fmt: skip
    if fmt == "int4":  # int8 activations in MatMulNBits: ORT-GenAI's recommended CPU setting
        cmd += ["--extra_options", "int4_accuracy_level=4"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = os.cpu_count()
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out


def extract_language_model(dest: Path) -> None:
    """The pocket checkpoint's language model as a plain Llama checkpoint (config, tokenizer, weights)."""
    from safetensors.torch import load_file, save_file

    from vtprune.models import pocket

    src = Path(pocket.materialize(None, log=lambda _: None))
    dest.mkdir(parents=True, exist_ok=True)
    text = json.loads((src / "config.json").read_text())["text_config"]
    text |= {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    (dest / "config.json").write_text(json.dumps(text, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(src / name, dest / name)
    prefix = "language_model."
    weights = {k[len(prefix):]: v for k, v in load_file(str(src / "model.safetensors")).items() if k.startswith(prefix)}
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})


def rounds(workers: list[Worker], count: int, log: Any) -> dict[str, dict[str, list[float]]]:
    out = {w.label: {"ttft_ms": [], "decode_tok_s": []} for w in workers}
    for r in range(count + 1):
        for w in workers:
            results = w.run()
            if r == 0:
                continue  # warm-up
            out[w.label]["ttft_ms"].append(statistics.median(x["ttft_ms"] for x in results))
            out[w.label]["decode_tok_s"].append(statistics.median(x["decode_tok_s"] for x in results))
        log(f"round {r}/{count}" + (" (warm-up)" if r == 0 else ""))
    return out


def prompt_lengths(bundles: Path) -> dict[str, int]:
    """Tokens entering vtprune's decoder for the benchmark prompt on the first image: unpruned and G-Prune 64."""
    from vtprune.backends.ort import OrtVlm
    from vtprune.eval.data import load_questions
    from vtprune.images import load_image
    from vtprune.runtime.timing import StageTimer

    image = next(q.image_path for q in load_questions("test"))
    out = {}
    for key, name in (("unpruned", "none-fp32"), ("gprune-64", "gprune-64-fp32")):
        vlm = OrtVlm(bundles / name, only=("vision", "embed"))
        out[key] = int(vlm.prefill_inputs(vlm.inputs(load_image(image), PROMPT), StageTimer())["embeds"].shape[1])
    return out


def summarize(measured: dict) -> dict[str, dict[str, float]]:
    return {k: {"ttft_ms": statistics.median(v["ttft_ms"]), "decode_tok_s": statistics.median(v["decode_tok_s"])}
            for k, v in measured.items()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--openvino-python", help="python of a venv with openvino-genai and optimum-intel")
    ap.add_argument("--ortgenai-python", help="python of a venv with onnxruntime-genai, torch, transformers, onnx")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--background-load", type=int, default=2, help="busy processes for the loaded rounds (0: skip)")
    ap.add_argument("--bundles", type=Path, default=Path(".bench/quantized"), help="benchmarks/quantized.py's work")
    ap.add_argument("--work", type=Path, default=Path(".bench/peers"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/peers"))
    ap.add_argument("--only", help="semicolon-separated configuration labels to run (default: every one available)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # internal: KIND TARGET [PROPS] -- IMAGES
    args = ap.parse_args()
    if args.worker:
        kind, target, *rest = args.worker
        if kind == "vtprune":
            return vtprune_worker(target, rest)
        if kind == "ortgenai":
            return ortgenai_worker(target, rest[0])
        return openvino_worker(target, rest[0], rest[1:])
    run_driver(args)


def run_driver(args: argparse.Namespace) -> None:
    from vtprune.bench.load import background_load
    from vtprune.eval.data import load_questions
    from vtprune.runtime.report import environment

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    images = list(dict.fromkeys(q.image_path for q in load_questions("test")))[:4]
    me = os.path.abspath(__file__)
    only = set(args.only.split(";")) if args.only else None

    def wanted(label: str) -> bool:
        return only is None or label in only

    workers = [Worker(label, [sys.executable, me, "--worker", "vtprune", str(args.bundles / name), *images])
               for label, name in VTPRUNE.items()
               if wanted(label) and (args.bundles / name.partition("#")[0] / "manifest.json").is_file()]  # fmt: skip
    if args.openvino_python:
        for label, (fmt, props) in OPENVINO.items():
            if not wanted(label):
                continue
            model = convert_openvino(args.openvino_python, args.work, fmt, log)
            cmd = [args.openvino_python, me, "--worker", "openvino", str(model), json.dumps(props), *images]
            workers.append(Worker(label, cmd))
    if args.ortgenai_python:
        lengths = prompt_lengths(args.bundles)
        for label, (fmt, length) in ORTGENAI.items():
            if wanted(label):
                model = convert_ortgenai(args.ortgenai_python, args.work, fmt, log)
                cmd = [args.ortgenai_python, me, "--worker", "ortgenai", str(model), str(lengths[length])]
                workers.append(Worker(label, cmd))
    log(f"{len(workers)} workers loaded")
    quiet = rounds(workers, args.rounds, log)
    loaded = None
    if args.background_load:
        with background_load(args.background_load):
            loaded = rounds(workers, args.rounds, log)
    rss = {w.label: w.peak_rss_mb() for w in workers}
    for w in workers:
        w.close()
    result = {"date": time.strftime("%Y-%m-%d"), "environment": environment(), "rounds": args.rounds,
              "images": images, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "background_load": args.background_load,
              "quiet": {"rounds": quiet, "medians": summarize(quiet)},
              "loaded": None if loaded is None else {"rounds": loaded, "medians": summarize(loaded)},
              "peak_rss_mb": rss}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "peers.md").write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    env, quiet, loaded = result["environment"], result["quiet"]["medians"], result["loaded"]
    ov = {k: v for k, v in quiet.items() if k.startswith("OpenVINO")}  # ORT-GenAI rows are LM-only: not "best"
    best_ttft = min((v["ttft_ms"] for v in ov.values()), default=None)
    best_decode = max((v["decode_tok_s"] for v in ov.values()), default=None)
    busy_cols = f" TTFT, {result['background_load']} busy processes | slowdown |" if loaded else ""
    lines = ["# vtprune beside OpenVINO GenAI and ORT-GenAI: pocket VLM, CPU", "",
             f"{result['date']}; {env['cpu']}, {env['cores']} cores, {env['memory_mb'] / 1024:.0f} GiB. Same 4 "
             f"easy-vqa images, prompt \"{result['prompt']}\", {result['new_tokens']} new tokens (EOS ignored), "
             f"greedy; medians of {result['rounds']} alternating rounds after one warm-up round, one process per "
             "configuration. Ratios are against OpenVINO's best configuration in this run (TTFT: lower is "
             "better, so < 1 favours the row; decode: > 1 favours the row). ORT-GenAI rows run the language "
             "model alone (no vision, no preprocessing) on a text prompt as long as vtprune's decoder input.", "",
             "| configuration | TTFT ms | TTFT vs best OpenVINO | decode tok/s | decode vs best OpenVINO "
             "| peak RSS MB |" + busy_cols,
             "|---|---|---|---|---|---|" + ("---|---|" if loaded else "")]  # fmt: skip
    for label, m in quiet.items():
        ttft_ratio = f"{m['ttft_ms'] / best_ttft:.2f}" if best_ttft else "-"
        dec_ratio = f"{m['decode_tok_s'] / best_decode:.2f}" if best_decode else "-"
        row = (f"| {label} | {m['ttft_ms']:.0f} | {ttft_ratio} | {m['decode_tok_s']:.1f} | {dec_ratio} | "
               f"{result['peak_rss_mb'][label]:.0f} |")  # fmt: skip
        if loaded:
            busy = loaded["medians"][label]["ttft_ms"]
            row += f" {busy:.0f} | {busy / m['ttft_ms']:.2f}x |"
        lines.append(row)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
