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
    GB/s  = bytes / fused time;   share = GB/s / --peak-gbps   (3350 = H100 SXM HBM3)

The filtered kernel re-reads the rows (the exact threshold search takes up to 8 more passes,
served partly from L2), so its share is an effective figure against one read.
Times are medians from ``triton.testing.do_bench``. Tokens are first checked against the
reference with explicit noise.

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
    from triton.testing import do_bench

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

        t_fused = do_bench(lambda: logit_fusion(**kw, **per_row, seed=7, check_values=False), return_mode="median")
        t_eager = do_bench(eager, return_mode="median")
        nbytes = B * args.vocab * kw["expert_logits"].element_size() * (2 + args.contrastive)
        gbps = nbytes / (t_fused * 1e-3) / 1e9
        rows.append({"batch": B, "config": name, "fused_ms": t_fused, "eager_ms": t_eager,
                     "speedup": t_eager / t_fused, "bytes": nbytes, "gbps": gbps, "peak_share": gbps / args.peak_gbps})
        print(f"B={B:4d} {name:22s} fused {t_fused:8.4f} ms  eager {t_eager:8.4f} ms  "
              f"x{t_eager / t_fused:6.1f}  {gbps:7.1f} GB/s ({100 * gbps / args.peak_gbps:4.1f}% of peak)", flush=True)
    return rows


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"Measured {r['date']} on {r['gpu']} (host {m['cpu']}, {m['cores']} cores), commit {r['commit']}, "
             f"`{r['command']}`. V = {r['vocab']}, E = {r['experts']}, {r['dtype']}"
             f"{', contrastive (3 rows read)' if r['contrastive'] else ''}. GB/s = B*V*itemsize*rows read / fused "
             f"time; share of a {r['peak_gbps']:.0f} GB/s peak.", "",
             "| batch | config | fused ms | eager ms | speedup | GB/s | % of peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        lines.append(f"| {row['batch']} | {row['config']} | {row['fused_ms']:.4f} | {row['eager_ms']:.4f} | "
                     f"{row['speedup']:.1f}x | {row['gbps']:.0f} | {100 * row['peak_share']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--contrastive", action="store_true", help="also subtract a weak expert's row")
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="device peak memory bandwidth (H100 SXM: 3350)")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_logit_fusion: no CUDA device; this benchmark measures the Triton kernel on a GPU "
                         "and reports nothing without one (the CPU path is checked by tests/kernels).")
    machine = machine_facts()
    rows = [row for B in args.batch for row in measure(B, args)]
    result = {"date": dt.date.today().isoformat(), "commit": git_commit(), "machine": machine,
              "gpu": torch.cuda.get_device_name(), "vocab": args.vocab, "experts": args.experts, "dtype": args.dtype,
              "contrastive": args.contrastive, "peak_gbps": args.peak_gbps,
              "command": "python benchmarks/bench_logit_fusion.py " + " ".join(sys.argv[1:]), "rows": rows}
    out = save_report(result, RESULTS, "logit_fusion")
    section = render(result)
    print(section)
    if not args.no_readme:
        rewrite_section(README, BEGIN, END, section, "### Logit fusion kernel: fused vs eager torch")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
