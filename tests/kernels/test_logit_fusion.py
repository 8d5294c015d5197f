"""kernels.logit_fusion: the torch reference on hand-made rows, the wrapper's validation
and fallback, and the Triton kernel against the reference on irregular shapes, on CUDA
when there is one and always under ``TRITON_INTERPRET=1`` on CPU (in a subprocess: the
variable must be set before triton is imported).

With explicit Gumbel noise the kernel and the reference must pick the same tokens; the
seeded (Philox) path is checked statistically against the filtered softmax.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernels.logit_fusion import logit_fusion, logit_fusion_reference

ROOT = Path(__file__).resolve().parents[2]
ATOL, RTOL = 1e-4, 1e-5   # fp32 compute in both; only exp/log rounding and sum order differ
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device; the same cases run under TRITON_INTERPRET=1")

# name -> (B, E, V, dtype, temperature, top_k, top_p, contrastive); per-row lists or scalars
CASES = {
    "fp32-V1000-B3-E1-plain": (3, 1, 1000, torch.float32, [0.7, 1.0, 1.6], 0, 1.0, False),
    "bf16-V4099-B7-E3-topk": (7, 3, 4099, torch.bfloat16, [1.0, 0.0, 0.5, 2.0, 1.0, 1.0, 0.9],
                              [1, 5, 50, 0, 4099, 10_000, 2], 1.0, False),
    "fp16-V4099-B3-E3-topp": (3, 3, 4099, torch.float16, [1.0, 0.8, 1.3], 0, [0.9, 0.5, 1e-7], False),
    "fp32-V1000-B7-E3-both-greedy": (7, 3, 1000, torch.float32, [0.0, 1.0, 0.7, 0.0, 1.2, 1.0, 3.0],
                                     [0, 20, 3, 7, 40, 1000, 100], [0.95, 0.8, 1.0, 0.3, 0.99, 0.6, 1.0],
                                     False),
    "bf16-V49152-B1-E3-contrastive": (1, 3, 49152, torch.bfloat16, 0.8, 40, 0.9, True),
    "fp32-V50257-B3-E2-contrastive": (3, 2, 50257, torch.float32, [1.0, 0.0, 0.6], [0, 50, 8], [0.95, 1.0, 0.7],
                                      True),
    "bf16-V131072-B7-E2-both": (7, 2, 131072, torch.bfloat16, 1.0, [0, 50, 1, 200, 0, 7, 3000],
                                [0.9, 1.0, 1.0, 0.95, 0.5, 1.0, 0.8], False),
}
INTERPRETER_GROUPS = {  # a few small cases: the interpreter runs each program in Python
    "plain-and-topk": ["fp32-V1000-B3-E1-plain", "bf16-V4099-B7-E3-topk"],
    "topp-both-greedy": ["fp16-V4099-B3-E3-topp", "fp32-V1000-B7-E3-both-greedy"],
    "contrastive-49152": ["bf16-V49152-B1-E3-contrastive"],
}
# Rows whose first pass is split across programs (merged by the row's program), in the
# split pass's 2048-wide tiles: V = 4099 in 3 splits is 2048 + 2048 + 3 columns (5 asked
# for: no more splits than tiles, so 3 again); 49152 in 7 is 6 splits of 8192.
SPLIT_CASES = [("bf16-V4099-B7-E3-topk", 3), ("fp16-V4099-B3-E3-topp", 5),
               ("bf16-V49152-B1-E3-contrastive", 7)]


def make_inputs(name: str, device: str, seed: int = 0) -> dict:
    """Keyword arguments for ``logit_fusion`` (per-row tensors, explicit Gumbel noise)."""
    B, E, V, dtype, temperature, top_k, top_p, contrastive = CASES[name]
    g = torch.Generator().manual_seed(seed)
    row = lambda x, dt: torch.tensor(x if isinstance(x, list) else [x] * B, dtype=dt)  # noqa: E731
    kw = {
        "expert_logits": (3 * torch.randn(E, B, V, generator=g)).to(dtype),
        "choice": torch.randint(0, E, (B,), generator=g),
        "bias": (0.5 * torch.randn(B, V, generator=g)).to(dtype),
        "temperature": row(temperature, torch.float32),
        "top_k": row(top_k, torch.int64),
        "top_p": row(top_p, torch.float32),
        "weight": 0.5 + torch.rand(B, generator=g),
        "gumbel": -torch.log(-torch.log(torch.rand(B, V, generator=g))),
    }
    if contrastive:
        kw["weak"] = torch.randint(0, E, (B,), generator=g)
        kw["beta"] = 0.3 * torch.rand(B, generator=g)
    return {k: v.to(device) for k, v in kw.items()}


def check_case(name: str, device: str, splits: int | None = None) -> None:
    """Kernel (through the wrapper) against the reference: same tokens, close logprobs."""
    kw = make_inputs(name, device)
    out = logit_fusion(**kw, return_logsoftmax=True, splits=splits)
    ref = logit_fusion_reference(**kw, return_logsoftmax=True)
    assert out.tokens.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert torch.equal(out.tokens.cpu(), ref.tokens.cpu()), f"{name}: {out.tokens} != {ref.tokens}"
    torch.testing.assert_close(out.logprobs.cpu(), ref.logprobs.cpu(), atol=ATOL, rtol=RTOL, msg=name)
    torch.testing.assert_close(out.logsoftmax.cpu(), ref.logsoftmax.cpu(), atol=ATOL, rtol=RTOL, msg=name)
    assert (out.logprobs <= 1e-6).all() and torch.isfinite(out.logprobs).all()


def tiny_row_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The filtered tempered distribution of one row, read off the reference: a +100 Gumbel
    spike on token v returns v (with its filtered logprob) exactly when v is kept."""
    V = len(logits)
    probs = torch.zeros(V)
    for v in range(V):
        spike = torch.zeros(1, V)
        spike[0, v] = 100.0
        ref = logit_fusion_reference(torch.tensor([[logits]]), torch.zeros(1, dtype=torch.long), None,
                                     torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]),
                                     gumbel=spike)
        if ref.tokens.item() == v:
            probs[v] = ref.logprobs.exp().item()
    return probs


STAT_ROW = ([2.0, 1.6, 1.2, 0.9, 0.2, -1.0], 1.3, 5, 0.85)  # logits, T, k, p: top-p cuts at 4 tokens


def check_split_sampling_matches_unsplit(device: str) -> None:
    """Seeded (Philox) sampling draws the same tokens however a row's first pass is split:
    the noise is keyed by (seed, row, column), and the merge keeps the lowest index among
    equal maxima as one pass does."""
    kw = make_inputs("bf16-V4099-B7-E3-topk", device)
    del kw["gumbel"]
    one = logit_fusion(**kw, seed=5, splits=1)
    for splits in (2, 3):
        split = logit_fusion(**kw, seed=5, splits=splits)
        assert torch.equal(split.tokens.cpu(), one.tokens.cpu()), f"splits={splits}: {split.tokens} != {one.tokens}"
        torch.testing.assert_close(split.logprobs.cpu(), one.logprobs.cpu(), atol=ATOL, rtol=RTOL)


def check_sampling_statistics(device: str, draws: int) -> None:
    """Seeded path: token frequencies over ``draws`` rows match the filtered softmax
    (Pearson chi-square below the 0.1% critical value), never a filtered-out token, and the
    same seed gives the same tokens."""
    logits, T, k, p = STAT_ROW
    expected = tiny_row_probs(logits, T, k, p)
    kept = expected > 0
    assert 1 < int(kept.sum()) < len(logits), "the statistics row must filter something"
    L = torch.tensor(logits).expand(1, draws, len(logits)).contiguous().to(device)
    choice = torch.zeros(draws, dtype=torch.long, device=device)
    out = logit_fusion(L, choice, None, T, k, p, seed=1234)
    tokens = out.tokens.cpu()
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    assert counts[~kept].sum() == 0, f"filtered-out tokens sampled: {counts}"
    exp_counts = draws * expected[kept].double()
    chi2 = float(((counts[kept] - exp_counts) ** 2 / exp_counts).sum())
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}[int(kept.sum()) - 1]
    assert chi2 < critical, f"chi2={chi2:.2f} >= {critical}: counts {counts.tolist()} vs {exp_counts.tolist()}"
    # Reproducible per (seed, row): the first 40 rows alone draw the same tokens again.
    head, head_choice = L[:, :40].contiguous(), choice[:40]
    assert torch.equal(logit_fusion(head, head_choice, None, T, k, p, seed=1234).tokens.cpu(), tokens[:40])
    assert not torch.equal(logit_fusion(head, head_choice, None, T, k, p, seed=99).tokens.cpu(), tokens[:40])
    torch.testing.assert_close(out.logprobs.cpu(), expected[tokens].log().float(), atol=ATOL, rtol=RTOL)


def run_under_interpreter(body: str) -> None:
    """Run ``body`` in a fresh Python with TRITON_INTERPRET=1 and check it used the kernel."""
    code = "\n".join([
        "import sys", f"sys.path.insert(0, {str(ROOT)!r})", "import kernels.logit_fusion as lf",
        "from tests.kernels.test_logit_fusion import check_case, check_sampling_statistics, "
        "check_split_sampling_matches_unsplit", "calls = []", "kernel, partial = lf._compiled()",
        "class Spy:", "    def __getitem__(self, grid):", "        calls.append(grid)", "        return partial[grid]",
        "lf._compiled = lambda: (kernel, Spy())", body,
        f"assert bool(calls) == {'splits=' in body}, f'split first passes: {{calls}}'"])
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


# --- the reference, on rows small enough to check by hand ---------------------------------

def ref1(logits, *, T=1.0, k=0, p=1.0, gumbel=None):
    V = len(logits)
    return logit_fusion_reference(torch.tensor([[logits]]), torch.zeros(1, dtype=torch.long), None,
                                  torch.tensor([T]), torch.tensor([k]), torch.tensor([p]),
                                  gumbel=None if gumbel is None else torch.tensor([gumbel]).reshape(1, V))


def test_reference_greedy_takes_the_lowest_index_of_equal_maxima():
    out = ref1([1.0, 3.0, 0.5, 3.0], T=0.0, gumbel=[0.0, 0.0, 0.0, 9.0])  # noise ignored when greedy
    assert out.tokens.item() == 1
    assert out.logprobs.item() == pytest.approx(math.log(math.exp(3) / (2 * math.exp(3) + math.e + math.exp(.5))))


def test_reference_top_k_keeps_ties_at_the_threshold():
    logits = [3.0, 2.0, 2.0, 1.0]
    assert tiny_row_probs(logits, 1.0, 2, 1.0).gt(0).tolist() == [True, True, True, False]
    assert tiny_row_probs(logits, 1.0, 1, 1.0).gt(0).tolist() == [True, False, False, False]
    assert torch.equal(tiny_row_probs(logits, 1.0, 9, 1.0), tiny_row_probs(logits, 1.0, 0, 1.0))  # k > V: off


def test_reference_top_p_keeps_the_smallest_head_reaching_p():
    logits = [math.log(x) for x in (0.5, 0.3, 0.15, 0.05)]
    probs = tiny_row_probs(logits, 1.0, 0, 0.75)
    torch.testing.assert_close(probs, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]))
    assert tiny_row_probs(logits, 1.0, 0, 1e-7).gt(0).tolist() == [True, False, False, False]
    joint = tiny_row_probs(logits, 1.0, 3, 0.9)  # top-p alone keeps 3 of 4, top-k 3 as well
    assert joint.gt(0).tolist() == [True, True, True, False]


def test_reference_fuses_weights_bias_contrast_and_temperature():
    g = torch.Generator().manual_seed(1)
    L, bias = torch.randn(3, 2, 50, generator=g), torch.randn(2, 50, generator=g)
    choice, weak = torch.tensor([2, 0]), torch.tensor([1, 2])
    w, beta, T = torch.tensor([0.7, 1.2]), torch.tensor([0.5, 0.25]), torch.tensor([0.8, 1.5])
    out = logit_fusion_reference(L, choice, bias, T, torch.zeros(2), torch.ones(2), weight=w, weak=weak,
                                 beta=beta, return_logsoftmax=True)
    z = torch.stack([w[b] * L[choice[b], b] + bias[b] - beta[b] * L[weak[b], b] for b in range(2)])
    torch.testing.assert_close(out.logsoftmax, torch.log_softmax(z / T[:, None], dim=-1))
    assert torch.equal(out.tokens, z.argmax(dim=-1))  # no noise, no filter: the argmax


def test_reference_sampling_frequencies_match_the_filtered_softmax():
    # The wrapper's CPU fallback (no interpreter): torch Gumbel noise through the reference.
    env_before = os.environ.pop("TRITON_INTERPRET", None)
    try:
        check_sampling_statistics("cpu", draws=20_000)
    finally:
        if env_before is not None:
            os.environ["TRITON_INTERPRET"] = env_before


# --- the wrapper --------------------------------------------------------------------------

def test_import_and_cpu_fallback_never_touch_triton():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from tests.kernels.test_logit_fusion import make_inputs
        from kernels.logit_fusion import logit_fusion, logit_fusion_reference
        kw = make_inputs("fp32-V1000-B7-E3-both-greedy", "cpu")
        out, ref = logit_fusion(**kw), logit_fusion_reference(**kw)
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.logprobs, ref.logprobs)
        assert "triton" not in sys.modules, "triton imported off the kernel path"
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]


def _valid() -> dict:
    return {"expert_logits": torch.randn(2, 3, 10), "choice": torch.tensor([0, 1, 1]), "bias": torch.randn(3, 10),
            "temperature": torch.ones(3), "top_k": 0, "top_p": 1.0}


@pytest.mark.parametrize("change, error, message", [
    ({"expert_logits": torch.randn(3, 10)}, ValueError, r"\[E, B, V\]"),
    ({"expert_logits": torch.zeros(2, 3, 10, dtype=torch.int32)}, TypeError, "float32/bfloat16/float16"),
    ({"choice": torch.tensor([0, 1])}, ValueError, r"choice must have shape \[B\]"),
    ({"choice": torch.tensor([0.0, 1.0, 1.0])}, TypeError, "choice must be an integer"),
    ({"choice": torch.tensor([0, 2, 1])}, ValueError, r"choice values must lie in \[0, E\)"),
    ({"choice": torch.tensor([0, -1, 1])}, ValueError, r"choice values must lie in \[0, E\)"),
    ({"bias": torch.randn(3, 11)}, ValueError, r"bias must have shape \[B, V\]"),
    ({"temperature": torch.tensor([1.0, -0.5, 1.0])}, ValueError, "temperature must be finite and >= 0"),
    ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
    ({"top_p": 0.0}, ValueError, r"top_p must lie in \(0, 1\]"),
    ({"top_p": torch.tensor([0.5, 1.5, 0.5])}, ValueError, r"top_p must lie in \(0, 1\]"),
    ({"top_k": -1}, ValueError, "top_k must be >= 0"),
    ({"top_k": "5"}, TypeError, "top_k must be a number"),
    ({"weak": torch.tensor([0, 0, 1])}, ValueError, "needs both weak and beta"),
    ({"weak": torch.tensor([0, 0, 5]), "beta": 0.5}, ValueError, r"weak values must lie in \[0, E\)"),
    ({"gumbel": torch.randn(3, 10), "seed": 1}, ValueError, "either gumbel noise or seed"),
    ({"gumbel": torch.randn(3, 9)}, ValueError, r"gumbel must have shape \[B, V\]"),
    ({"splits": 0}, ValueError, "splits must be a positive integer or None"),
    ({"splits": True}, ValueError, "splits must be a positive integer or None"),
    ({"splits": 2.0}, ValueError, "splits must be a positive integer or None"),
])
def test_wrapper_rejects_bad_inputs_with_clear_errors(change, error, message):
    logit_fusion(**_valid())  # the unchanged call is fine
    with pytest.raises(error, match=message):
        logit_fusion(**{**_valid(), **change})


# --- the kernel ---------------------------------------------------------------------------

@pytest.mark.parametrize("group", sorted(INTERPRETER_GROUPS))
def test_kernel_matches_reference_under_triton_interpreter(group):
    run_under_interpreter("\n".join(f"check_case({n!r}, 'cpu')" for n in INTERPRETER_GROUPS[group]))


def test_kernel_with_split_rows_matches_reference_under_triton_interpreter():
    run_under_interpreter("\n".join([*(f"check_case({n!r}, 'cpu', splits={k})" for n, k in SPLIT_CASES),
                                      "check_split_sampling_matches_unsplit('cpu')  # splits=2, 3"]))


def test_kernel_sampling_statistics_under_triton_interpreter():
    run_under_interpreter("check_sampling_statistics('cpu', draws=150)")


@needs_cuda
@pytest.mark.parametrize("splits", [None, 1, 3])   # None: as many as fill the GPU
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference_on_cuda(name, splits):
    check_case(name, "cuda", splits)


@needs_cuda
def test_split_sampling_matches_unsplit_on_cuda():
    check_split_sampling_matches_unsplit("cuda")


@needs_cuda
def test_kernel_sampling_statistics_on_cuda():
    check_sampling_statistics("cuda", draws=50_000)
