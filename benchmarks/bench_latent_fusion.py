"""Latent fusion kernel speed: the fused Triton kernel against eager torch and SDPA (CUDA only).

For every cell (B, H, D, T, K experts = the primary + P = K - 1 peers), bf16 by default:

- fused: ``kernels.latent_fusion.latent_fusion`` (the Triton kernel, forward);
- eager: ``latent_fusion_reference`` (peers concatenated, explicit [T, P*T] mask, fp32
  logits materialised); speedup = eager time / fused time ("OOM" when it does not fit);
- SDPA: ``torch.nn.functional.scaled_dot_product_attention`` on the peers concatenated
  along the key axis (a copy, timed with it: that is what a caller without the kernel
  pays) with the equivalent boolean mask; ratio = fused time / SDPA time (goal <= 1.3).

Throughput counts the useful (causal) work only: each query t sees (t + 1) keys in each
of P peers, about P * T / 2 keys per query, two matmuls of 2 FLOPs per multiply-add:

    FLOPs = 4 * B * H * T * (P * T / 2) * D,   TFLOP/s = FLOPs / time / 1e12,

and its share of ``--peak-tflops`` (default 989: H100 SXM, bf16 dense tensor cores).
Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).
Each cell first checks the fused output against SDPA's.

    python benchmarks/bench_latent_fusion.py                       # the default grid
    python benchmarks/bench_latent_fusion.py --batch 1 --k 2 4 --seq 1024 --no-readme
    python benchmarks/bench_latent_fusion.py --peak-tflops 1979 --dtype fp16

Without CUDA it exits with status 2 and says so; it never reports made-up numbers.
Results go to ``benchmarks/results/bench_latent_fusion-*.json`` and to the section of
``benchmarks/README.md`` marked ``kernel-latent-fusion``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

from _common import git_commit, machine_facts, rewrite_section, save_report

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
GOAL_SDPA_RATIO = 1.3
DTYPES = ("bf16", "fp16", "fp32")
# (H, D) pairs: projected widths H * D of 1024, 2048 and 4096
HEADS = ((16, 64), (16, 128), (32, 128))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 3, 4], help="experts K (peers P = K - 1)")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--heads", type=str, nargs="+", default=[f"{h}x{d}" for h, d in HEADS],
                    help="HxD pairs, e.g. 16x64 32x128")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the GPU's dense peak for --dtype (989: H100 SXM bf16)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager reference (slow, memory hungry)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    try:
        args.heads = [tuple(int(x) for x in hd.lower().split("x")) for hd in args.heads]
    except ValueError:
        ap.error(f"--heads takes HxD pairs such as 16x64, got {args.heads}")
    if min(args.k) < 2:
        ap.error("--k counts experts including the primary: at least 2")
    return args


def causal_flops(b: int, h: int, t: int, p: int, d: int) -> float:
    """4 * B * H * T * (P * T / 2) * D: the useful FLOPs of the two matmuls."""
    return 4.0 * b * h * t * (p * t / 2) * d


def sdpa_concat(q, k, v, mask):
    """SDPA over the peers concatenated along the key axis, with the [T, P*T] causal mask."""
    import torch.nn.functional as F

    b, p, h, t, d = k.shape
    kc = k.permute(0, 2, 1, 3, 4).reshape(b, h, p * t, d)
    vc = v.permute(0, 2, 1, 3, 4).reshape(b, h, p * t, d)
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)


def run_cell(b: int, h: int, d: int, t: int, k_experts: int, args: argparse.Namespace) -> dict:
    import torch
    from triton.testing import do_bench

    from kernels.latent_fusion import _use_kernel, latent_fusion, latent_fusion_reference

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    p = k_experts - 1
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, t, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, p, h, t, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, p, h, t, d, device="cuda", dtype=dtype, generator=g)
    assert _use_kernel(q, k, v), "latent_fusion would not take the Triton path for these inputs"
    pos = torch.arange(t, device="cuda")
    mask = (pos[None, :] <= pos[:, None]).repeat(1, p)
    cell = {"B": b, "H": h, "D": d, "width": h * d, "T": t, "K": k_experts, "P": p,
            "gflop": causal_flops(b, h, t, p, d) / 1e9}
    with torch.no_grad():
        err = (latent_fusion(q, k, v).float() - sdpa_concat(q, k, v, mask).float()).abs().max().item()
        cell["max_abs_err_vs_sdpa"] = err
        cell["fused_ms"] = do_bench(lambda: latent_fusion(q, k, v), return_mode="median")
        cell["sdpa_ms"] = do_bench(lambda: sdpa_concat(q, k, v, mask), return_mode="median")
        cell["eager_ms"] = None
        if not args.no_eager:
            try:
                cell["eager_ms"] = do_bench(lambda: latent_fusion_reference(q, k, v), return_mode="median")
            except torch.cuda.OutOfMemoryError:
                cell["eager_ms"] = "OOM"
    torch.cuda.empty_cache()
    cell["tflops"] = cell["gflop"] / cell["fused_ms"]  # GFLOP / ms == TFLOP / s
    cell["peak_share"] = cell["tflops"] / args.peak_tflops
    cell["sdpa_tflops"] = cell["gflop"] / cell["sdpa_ms"]
    cell["ratio_vs_sdpa"] = cell["fused_ms"] / cell["sdpa_ms"]
    cell["speedup_vs_eager"] = (cell["eager_ms"] / cell["fused_ms"]
                                if isinstance(cell["eager_ms"], float) else None)
    return cell


def render(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    cells = report["cells"]
    ratios = [c["ratio_vs_sdpa"] for c in cells]
    met = sum(r <= GOAL_SDPA_RATIO for r in ratios)
    lines = [f"Measured {report['date']} on {m['gpu']} (CUDA {m['cuda']}, torch {m['torch']}, triton {m['triton']}; "
             f"host {m['cpu']}, {m['cores']} cores), commit {report['commit']}, with this command:", "",
             f"    {report['command']}", "",
             f"{s['dtype']} inputs, fp32 accumulation. TFLOP/s = 4 * B * H * T * (P * T / 2) * D / time "
             f"(causal work only); peak share against {s['peak_tflops']:g} TFLOP/s. Times: medians of "
             "`triton.testing.do_bench`. SDPA runs on the peers concatenated along the key axis with the "
             f"[T, P*T] boolean mask (the concatenation timed with it). Raw results: [`{report['json']}`]"
             f"({report['json']}).", "",
             f"Goal: fused within {GOAL_SDPA_RATIO:g}x of SDPA: met in {met} of {len(cells)} cells"
             + (f" (worst {max(ratios):.2f}x)." if ratios else "."), "",
             "| B | H x D | T | K | fused ms | TFLOP/s | peak share | SDPA ms | fused / SDPA | eager ms | "
             "speedup vs eager | max abs err vs SDPA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        eager = (f"{c['eager_ms']:.3f}" if isinstance(c["eager_ms"], float) else c["eager_ms"] or "skipped")
        speedup = f"{c['speedup_vs_eager']:.1f}x" if c["speedup_vs_eager"] else "-"
        lines.append(f"| {c['B']} | {c['H']} x {c['D']} | {c['T']} | {c['K']} | {c['fused_ms']:.3f} | "
                     f"{c['tflops']:.0f} | {c['peak_share']:.0%} | {c['sdpa_ms']:.3f} | {c['ratio_vs_sdpa']:.2f}x | "
                     f"{eager} | {speedup} | {c['max_abs_err_vs_sdpa']:.1e} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    return {**machine_facts(), "gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton.__version__}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_latent_fusion: no CUDA GPU here; this benchmark measures the Triton kernel on a GPU "
              "and reports nothing without one (the CPU path is the torch reference, checked by "
              "tests/kernels/test_latent_fusion.py).", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_latent_fusion: triton is not installed; nothing to measure.", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    report: dict = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "commit": git_commit(),
                    "command": shlex.join(["python", "benchmarks/bench_latent_fusion.py",
                                           *(sys.argv[1:] if argv is None else argv)]),
                    "settings": {"dtype": args.dtype, "peak_tflops": args.peak_tflops}, "cells": []}
    for b in args.batch:
        for h, d in args.heads:
            for t in args.seq:
                for k_experts in args.k:
                    cell = run_cell(b, h, d, t, k_experts, args)
                    report["cells"].append(cell)
                    print(f"B={b} H={h} D={d} T={t} K={k_experts}: fused {cell['fused_ms']:.3f} ms "
                          f"({cell['tflops']:.0f} TFLOP/s), SDPA {cell['sdpa_ms']:.3f} ms, "
                          f"eager {cell['eager_ms']}", flush=True)
    out = save_report(report, args.results, "bench_latent_fusion", started)
    section = render(report)
    print("\n" + section)
    if not args.no_readme:
        rewrite_section(README, "<!-- kernel-latent-fusion:begin -->", "<!-- kernel-latent-fusion:end -->",
                        section, "## Kernel: latent fusion (fused causal cross-attention over peers)")
        print(f"\nwrote {README} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
