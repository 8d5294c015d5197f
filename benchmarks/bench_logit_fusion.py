"""Fused logit addition + sampling (``kernels.logit_fusion``) against eager torch, on CUDA.

Per batch size B (default 1..256), vocabulary V = 131072, E = 2 experts in bf16, one
decode step: gather the chosen expert's row, add the router's bias row (and, with
``--contrastive``, subtract a weak expert's row), temper, log-softmax, sample. Two
configurations: plain sampling (T = 0.8) and filtered sampling (top-k 50 and top-p 0.9).

- fused: ``logit_fusion(..., seed=...)`` (Philox noise drawn in the kernel);
- eager: drawing the same amount of Gumbel noise with torch plus ``logit_fusion_reference``
  (what a torch decode loop does), timed together.

Achieved bandwidth counts every input byte once:

    bytes = B * V * itemsize * (2 + contrastive)     # chosen expert row + bias row (+ weak row)
    GB/s  = bytes / graph fused time;   share = GB/s / peak   (H100 SXM 3350, H200 4800 GB/s)

The filtered kernel re-reads the rows (the exact threshold search takes up to 8 more passes,
served partly from L2), so its share is an effective figure against one read.
Times are medians of ``triton.testing.do_bench`` (one Python call per run: at small B the
wrapper's Python and launches can cost more than the GPU work) and of
``do_bench_cudagraph`` (the same calls replayed from a CUDA graph: the GPU's time, which
the bandwidth figures use), and the fused kernel also with one program per row
(``splits=1``) to show what splitting rows across programs buys. Tokens are first checked
against the reference with explicit noise.

    python benchmarks/bench_logit_fusion.py
    python benchmarks/bench_logit_fusion.py --batch 1 64 --contrastive --no-readme

Results go to ``benchmarks/results/logit_fusion-*.json`` and to the ``logit-fusion``
section of ``benchmarks/README.md``. Without CUDA it exits non-zero and measures nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from _common import git_commit, machine_facts, rewrite_section, save_report

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
README = HERE / "README.md"
RESULTS = HERE / "results"
BEGIN, END = "<!-- logit-fusion:begin -->", "<!-- logit-fusion:end -->"
CONFIGS = {"sample T=0.8": (0.8, 0, 1.0), "top-k 50 + top-p 0.9": (0.8, 50, 0.9)}


def make_inputs(B: int, V: int, E: int, dtype, contrastive: bool, seed: int = 0) -> dict:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = {"expert_logits": (3 * torch.randn(E, B, V, generator=g, device="cuda")).to(dtype),
          "choice": torch.randint(0, E, (B,), generator=g, device="cuda"),
          "bias": (0.5 * torch.randn(B, V, generator=g, device="cuda")).to(dtype)}
    if contrastive:
        kw["weak"] = (kw["choice"] + 1) % E
        kw["beta"] = torch.full((B,), 0.3, device="cuda")
    return kw


def measure(B: int, args: argparse.Namespace) -> list[dict]:
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    from kernels.logit_fusion import logit_fusion, logit_fusion_reference

    dtype = getattr(torch, args.dtype)
    kw = make_inputs(B, args.vocab, args.experts, dtype, args.contrastive)
    rows = []
    for name, (T, k, p) in CONFIGS.items():
        per_row = {"temperature": torch.full((B,), T, device="cuda"),
                   "top_k": torch.full((B,), k, device="cuda", dtype=torch.int64),
                   "top_p": torch.full((B,), p, device="cuda")}
        gumbel = -torch.log(-torch.log(torch.rand(B, args.vocab, device="cuda")))
        fused, ref = logit_fusion(**kw, **per_row, gumbel=gumbel), logit_fusion_reference(**kw, **per_row, gumbel=gumbel)
        if not torch.equal(fused.tokens, ref.tokens):
            raise SystemExit(f"B={B} {name}: fused tokens differ from the reference; not timing a wrong kernel")

        def eager():
            u = torch.rand(B, args.vocab, device="cuda")
            return logit_fusion_reference(**kw, **per_row, gumbel=-torch.log(-torch.log(u)))

        def fused(splits=None):
            return logit_fusion(**kw, **per_row, seed=7, check_values=False, splits=splits)

        t_fused = do_bench(fused, return_mode="median")
        t_eager = do_bench(eager, return_mode="median")
        # The same work replayed from a CUDA graph: the GPU's time without Python's per-call
        # cost (what a decode loop captured in a graph pays), the fused call split across
        # programs as the wrapper chooses and with one program per row.
        g_fused = do_bench_cudagraph(fused, return_mode="median")
        g_row = do_bench_cudagraph(lambda: fused(splits=1), return_mode="median")
        g_eager = do_bench_cudagraph(eager, return_mode="median")
        nbytes = B * args.vocab * kw["expert_logits"].element_size() * (2 + args.contrastive)
        gbps = nbytes / (g_fused * 1e-3) / 1e9
        rows.append({"batch": B, "config": name, "fused_ms": t_fused, "eager_ms": t_eager,
                     "speedup": t_eager / t_fused, "graph_fused_ms": g_fused, "graph_row_ms": g_row,
                     "graph_eager_ms": g_eager, "graph_speedup": g_eager / g_fused, "bytes": nbytes, "gbps": gbps,
                     "peak_share": gbps / args.peak_gbps})
        print(f"B={B:4d} {name:22s} call: fused {t_fused:8.4f} ms eager {t_eager:8.4f} ms x{t_eager / t_fused:6.1f} | "
              f"graph: fused {g_fused:8.4f} ms (one program per row {g_row:8.4f}) eager {g_eager:8.4f} ms "
              f"x{g_eager / g_fused:6.1f}  {gbps:7.1f} GB/s ({100 * gbps / args.peak_gbps:4.1f}% of peak)", flush=True)
    return rows


PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}   # HBM peaks (SXM parts)


def peak_gbps(device_name: str) -> float:
    """The peak memory bandwidth of a GPU known by name; H100's when the name is unknown."""
    for key, value in PEAK_GBPS.items():
        if key in device_name:
            return value
    print(f"bench_logit_fusion: unknown GPU {device_name!r}, using H100's {PEAK_GBPS['H100']} GB/s as the "
          f"peak; pass --peak-gbps", file=sys.stderr)
    return PEAK_GBPS["H100"]


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"Measured {r['date']} on {r['gpu']} (host {m['cpu']}, {m['cores']} cores), commit {r['commit']}, "
             f"`{r['command']}`. V = {r['vocab']}, E = {r['experts']}, {r['dtype']}"
             f"{', contrastive (3 rows read)' if r['contrastive'] else ''}, {r.get('pivots', 16)} pivots per "
             f"threshold search pass. *Call*: one Python call each "
             f"(`do_bench`), Python's per-call work included; *graph*: the same replayed from a CUDA graph "
             f"(`do_bench_cudagraph`), the GPU's time alone; *one per row*: the fused kernel with one program "
             f"per row (`splits=1`) instead of the row split across programs. GB/s = B*V*itemsize*rows read / "
             f"graph fused time; share of a {r['peak_gbps']:.0f} GB/s peak.", "",
             "| batch | config | call: fused ms | call: eager ms | call: speedup | graph: fused ms | "
             "graph: one per row ms | graph: eager ms | graph: speedup | GB/s | % of peak |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        lines.append(f"| {row['batch']} | {row['config']} | {row['fused_ms']:.4f} | {row['eager_ms']:.4f} | "
                     f"{row['speedup']:.1f}x | {row['graph_fused_ms']:.4f} | {row['graph_row_ms']:.4f} | "
                     f"{row['graph_eager_ms']:.4f} | {row['graph_speedup']:.1f}x | {row['gbps']:.0f} | "
                     f"{100 * row['peak_share']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--contrastive", action="store_true", help="also subtract a weak expert's row")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="device peak memory bandwidth in GB/s (default: by GPU name, H100 3350, H200 4800)")
    ap.add_argument("--pivots", type=int, default=None,
                    help="threshold candidates per search pass of the filtered config (default: the kernel's)")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    import torch

    import kernels.logit_fusion as lf

    if args.pivots is not None:
        if args.pivots < 1 or args.pivots & (args.pivots - 1):
            raise SystemExit("--pivots must be a power of two")
        lf.N_PIVOTS = args.pivots
    args.pivots = lf.N_PIVOTS

    if not torch.cuda.is_available():
        raise SystemExit("bench_logit_fusion: no CUDA device; this benchmark measures the Triton kernel on a GPU "
                         "and reports nothing without one (the CPU path is checked by tests/kernels).")
    if args.peak_gbps is None:
        args.peak_gbps = peak_gbps(torch.cuda.get_device_name())
    machine = machine_facts()
    rows = [row for B in args.batch for row in measure(B, args)]
    result = {"date": dt.date.today().isoformat(), "commit": git_commit(), "machine": machine,
              "gpu": torch.cuda.get_device_name(), "vocab": args.vocab, "experts": args.experts, "dtype": args.dtype,
              "contrastive": args.contrastive, "peak_gbps": args.peak_gbps, "pivots": args.pivots,
              "command": "python benchmarks/bench_logit_fusion.py " + " ".join(sys.argv[1:]), "rows": rows}
    out = save_report(result, RESULTS, "logit_fusion")
    section = render(result)
    print(section)
    if not args.no_readme:
        rewrite_section(README, BEGIN, END, section, "### Logit fusion kernel: fused vs eager torch")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
