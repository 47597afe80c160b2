"""The fused pruning kernels (Triton; what the TensorRT plugins launch) against the PyTorch reference on
a GPU: parity of scores, kept sets and kept tokens, and the latency of the whole G-Prune stage.

    python benchmarks/prune_kernels.py [--features FILE] [--out DIR]      # on a CUDA machine
    python benchmarks/prune_kernels.py --quick                            # CPU: small shapes, interpreter

Cases: LLaVA-1.5 (N=576, D=4096), LLaVA-NeXT (5 crops of 576, and 2304 tokens in one group), and real
pocket projector features (``--features``: a safetensors file with ``features`` (M, N, D), one image per
row; ``prune_stage.py --save-features`` makes it from easy-vqa test images). Synthetic tokens are
clustered so the graph has edges. Timings: ``triton.testing.do_bench`` medians, fp32 and fp16 inputs, G-Prune defaults
(theta 0.5, tau 0.03, T 5). Writes prune_kernels.json and prune_kernels.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton reads this when it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from vtprune.export.ops import kernels  # noqa: E402
from vtprune.export.ops.trt_plugins import launch_graph_propagate, launch_topk_route  # noqa: E402
from vtprune.prune import gprune  # noqa: E402
from vtprune.prune.select import gather_tokens, keep_topk  # noqa: E402
from vtprune.runtime.report import environment  # noqa: E402

THETA, TAU, ITERS = 0.5, 0.03, 5
CASES = [("llava-1.5", 1, 576, 4096, (64, 128, 192)), ("llava-next 5 crops", 5, 576, 4096, (64, 128)),
         ("llava-next 2304", 1, 2304, 4096, (320, 640))]  # fmt: skip
QUICK = [("quick", 2, 40, 64, (8, 16))]


def clustered(b: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 16, d, generator=g)
    x = centres[:, torch.randint(0, 16, (n,), generator=g)] + 0.8 * torch.randn(b, n, d, generator=g)
    return x * torch.rand(b, n, 1, generator=g).add(0.5)


def reference(x: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = keep_topk(gprune.scores(x, THETA, TAU, ITERS, "mask", valid), k)
    return gather_tokens(x, idx), idx


def fused(x: torch.Tensor, valid: torch.Tensor, k: int, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.topk_route(x, kernels.graph_propagate(x, valid, THETA, TAU, ITERS, workspace=ws), k)


def same_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Share of rows whose kept sets are identical, and the smallest IoU of a row."""
    inter = torch.tensor([len(set(r.tolist()) & set(s.tolist())) for r, s in zip(a, b, strict=True)])
    iou = inter / (2 * a.shape[1] - inter)
    return float((iou == 1).float().mean()), float(iou.min())


def raw_pointer_launch(x: torch.Tensor, valid: torch.Tensor, k: int) -> bool:
    """The plugin's enqueue path: raw pointers, its own workspace, a side stream; equal to the tensor calls."""
    x = x.contiguous()  # TensorRT's buffers are dense
    b, n, d = x.shape
    ws = torch.empty(kernels.workspace_layout(b, n, d).size, dtype=torch.uint8, device=x.device)
    scores = torch.empty(b, n, device=x.device)
    tokens, idx = torch.empty(b, k, d, dtype=x.dtype, device=x.device), torch.empty(b, k, dtype=torch.int64,
                                                                                    device=x.device)  # fmt: skip
    device = x.device.type
    stream = torch.cuda.Stream() if device == "cuda" else None
    with torch.cuda.stream(stream):  # a no-op for None (CPU)
        launch_graph_propagate((b, n, d), x.dtype, x.data_ptr(), valid.data_ptr(), scores.data_ptr(), ws.data_ptr(),
                               THETA, TAU, ITERS, device=device)  # fmt: skip
        tws = torch.empty(kernels.topk_workspace_bytes(b, n), dtype=torch.uint8, device=x.device)
        launch_topk_route((b, n, d), x.dtype, x.data_ptr(), scores.data_ptr(), tokens.data_ptr(), idx.data_ptr(),
                          tws.data_ptr(), k, device=device)  # fmt: skip
    if stream is not None:
        stream.synchronize()
    want_tokens, want_idx = fused(x, valid, k, ws.clone())
    return bool(torch.equal(idx, want_idx) and torch.equal(tokens, want_tokens))


def bench(fn, timed: bool) -> float | None:  # noqa: ANN001
    if not timed:
        return None
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def run_case(name: str, x32: torch.Tensor, budgets: tuple[int, ...], timed: bool) -> list[dict]:
    rows = []
    b, n, d = x32.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=x32.device)
    ws = torch.empty(kernels.workspace_layout(b, n, d).size, dtype=torch.uint8, device=x32.device)
    for dtype in (torch.float32, torch.float16):
        x = x32.to(dtype)
        ref_scores = gprune.scores(x, THETA, TAU, ITERS, "mask", valid)
        got_scores = kernels.graph_propagate(x, valid, THETA, TAU, ITERS, workspace=ws)
        rel = float(((got_scores - ref_scores).abs() / ref_scores.abs().clamp_min(1e-12)).max())
        for k in budgets:
            ref_tokens, ref_idx = reference(x, valid, k)
            tokens, idx = kernels.topk_route(x, got_scores, k)
            route_tokens, route_idx = kernels.topk_route(x, ref_scores, k)  # the top-k kernel alone
            rows_equal, min_iou = same_rows(idx, ref_idx)
            cpu_idx = keep_topk(gprune.scores(x.cpu(), THETA, TAU, ITERS, "mask", valid.cpu()), k)
            floor, _ = same_rows(cpu_idx, ref_idx.cpu())  # how often two correct fp32 runs disagree
            t_ref = bench(lambda x=x, k=k: reference(x, valid, k), timed)
            t_fused = bench(lambda x=x, k=k: fused(x, valid, k, ws), timed)
            rows.append({
                "case": name, "B": b, "N": n, "D": d, "K": k, "dtype": str(dtype).removeprefix("torch."),
                "scores_max_rel_diff": rel, "kept_rows_identical": rows_equal, "kept_min_iou": min_iou,
                "eager_cpu_vs_device_rows_identical": floor,
                "tokens_equal_where_kept_equal": bool(torch.equal(tokens[idx == ref_idx], ref_tokens[idx == ref_idx])),
                "topk_kernel_equals_reference": bool(torch.equal(route_idx, ref_idx)
                                                     and torch.equal(route_tokens, ref_tokens)),
                "torch_eager_ms": t_ref, "fused_ms": t_fused,
                "speedup": t_ref / t_fused if timed else None,
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    rows[0]["raw_pointer_launch_equal"] = raw_pointer_launch(x32, valid, budgets[0])
    return rows


def breakdown(x: torch.Tensor, k: int) -> dict[str, float]:
    """do_bench median of each kernel launch of the fused stage, for one input (where the time goes)."""
    b, n, d = x.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
    lay = kernels.workspace_layout(b, n, d)
    ws = torch.empty(lay.size, dtype=torch.uint8, device=x.device)
    u, p = kernels._view(ws, lay.u, (b, n, d)), kernels._view(ws, lay.p, (b, n, n))
    norm, deg, s0, s1 = (kernels._view(ws, off, (b, n)) for off in (lay.norm, lay.deg, *lay.s))
    scores = kernels.graph_propagate(x, valid, THETA, TAU, ITERS)
    keep = torch.empty(b, n, dtype=torch.int32, device=x.device)
    idx, tokens = torch.empty(b, k, dtype=torch.int64, device=x.device), torch.empty(b, k, d, device=x.device)
    rows = (b, -(-n // kernels.BLOCK_ROWS))
    soft = min(kernels.BLOCK_SOFTMAX, triton.next_power_of_2(n))
    steps = {
        "unit_rows": lambda: kernels._unit_rows[(b * n,)](x, valid, u, norm, s0, d, kernels.TINY,
                                                          BLOCK=kernels.BLOCK_D),
        "cosines (torch.bmm, fp32)": lambda: torch.bmm(u, u.transpose(1, 2), out=p),
        "mask_softmax": lambda: kernels._mask_softmax[(b * n,)](p, valid, deg, n, THETA, TAU, -1e4, BLOCK=soft),
        "propagate (one step)": lambda: kernels._propagate[rows](s0, p, s1, deg, valid, n, FINAL=False,
                                                                 BLOCK=kernels.BLOCK_ROWS),
        "topk_flags": lambda: kernels._topk_flags[rows](scores, keep, n, k, BLOCK=kernels.BLOCK_ROWS),
        "compact": lambda: kernels._compact[(b,)](keep, idx, n, k, BLOCK=kernels.BLOCK_SOFTMAX),
        "gather_rows": lambda: kernels._gather_rows[(b * k, -(-d // kernels.BLOCK_D))](x, idx, tokens, n, k, d,
                                                                                       BLOCK=kernels.BLOCK_D),
    }  # fmt: skip
    return {name: bench(fn, True) for name, fn in steps.items()}


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Fused pruning kernels (Triton) vs PyTorch eager: G-Prune stage (scores + top-k + gather)", "",
             f"Device: {result['device']}; torch {torch.__version__}, triton {triton.__version__}; "
             f"theta {THETA}, tau {TAU}, T {ITERS}; do_bench medians. Host: {env.get('cpu')}.", "",
             "Kept rows identical: share of batch rows whose kept set equals eager's on the same device; eager "
             "CPU vs device: the same share between two eager fp32 runs (CPU and this device), the noise floor "
             "of near-tied scores.", "",
             "| case | B×N×D | dtype | K | eager ms | fused ms | speedup | kept rows identical | min IoU | "
             "eager CPU vs device | scores max rel diff | top-k kernel = reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        t = (f"{r['torch_eager_ms']:.3f} | {r['fused_ms']:.3f} | {r['speedup']:.2f}×" if r["fused_ms"] is not None
             else "– | – | –")  # fmt: skip
        lines.append(f"| {r['case']} | {r['B']}×{r['N']}×{r['D']} | {r['dtype']} | {r['K']} | {t} | "
                     f"{r['kept_rows_identical']:.3f} | {r['kept_min_iou']:.3f} | "
                     f"{r['eager_cpu_vs_device_rows_identical']:.3f} | {r['scores_max_rel_diff']:.1e} | "
                     f"{r['topk_kernel_equals_reference']} |")  # fmt: skip
    if result.get("breakdown"):
        lines += ["", f"Where the fused time goes ({result['breakdown_case']}, do_bench medians, ms): "
                  + ", ".join(f"{name} {ms:.3f}" for name, ms in result["breakdown"].items()) + "."]  # fmt: skip
    raw = [r["case"] for r in result["rows"] if r.get("raw_pointer_launch_equal") is not None]
    ok = all(r.get("raw_pointer_launch_equal", True) for r in result["rows"])
    lines += ["", f"Plugin launch path over raw pointers on a side stream equals the tensor calls: {ok} "
              f"({', '.join(raw)})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, help="safetensors with 'features' (M, N, D): real projector outputs")
    ap.add_argument("--quick", action="store_true", help="small shapes only (CPU interpreter check)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timed = device == "cuda"
    rows = []
    for name, b, n, d, budgets in QUICK if args.quick else CASES:
        rows += run_case(name, clustered(b, n, d).to(device), budgets, timed)
    if args.features:
        from safetensors.torch import load_file

        feats = load_file(str(args.features))["features"].float()
        feats = feats[:2, :40] if args.quick else feats
        budgets = (8, 16) if args.quick else (16, 32, 64)
        rows += run_case(f"pocket real ({feats.shape[0]} images)", feats.to(device), budgets, timed)
    name = torch.cuda.get_device_name(0) if timed else "CPU (Triton interpreter, untimed)"
    result = {"device": name, "environment": environment(provider=f"triton-{device}"), "rows": rows,
              "similarity_tile_sweep": "similarity_tiles_h100.json (the Triton tile kernel this replaced)"}
    if timed:
        _, b, n, d, budgets = CASES[0]
        result["breakdown_case"] = f"{CASES[0][0]} {b}x{n}x{d} fp32, K={budgets[0]}"
        result["breakdown"] = breakdown(clustered(b, n, d).to(device), budgets[0])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "prune_kernels.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
