"""Latent fusion (causal cross-attention of the primary over its peers): the reference
against a naive loop, the Triton kernel against the reference on irregular shapes (under
``TRITON_INTERPRET=1`` on CPU, natively on CUDA), gradients, and input validation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernels.latent_fusion import _use_kernel, latent_fusion, latent_fusion_reference

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Kernel vs reference (the reference run in fp32 on the same low-precision inputs): the
# kernel rounds the probabilities to the input dtype before p @ v and the output to it.
TOL = {"fp32": dict(atol=2e-5, rtol=1e-4), "bf16": dict(atol=2e-2, rtol=2e-2),
       "fp16": dict(atol=3e-3, rtol=3e-3)}


def naive_latent_fusion(q, k, v, scale=None):
    """Loop over (b, h, t): gather the logits of every peer position s <= t, one softmax.
    Torch ops on scalars and rows, so autograd runs through it; tiny shapes only."""
    b_, h_, t_, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = []
    for b in range(b_):
        for h in range(h_):
            for t in range(t_):
                logits, values = [], []
                for p in range(k.shape[1]):
                    for s in range(t + 1):
                        logits.append((q[b, h, t] * k[b, p, h, s]).sum() * scale)
                        values.append(v[b, p, h, s])
                w = torch.softmax(torch.stack(logits), dim=0)
                rows.append((w[:, None] * torch.stack(values)).sum(0))
    return torch.stack(rows).reshape(b_, h_, t_, d)


def make_inputs(b, h, t, d, p, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, p, h, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, p, h, t, d, generator=g, dtype=torch.float64)
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


# ---- the reference -----------------------------------------------------------------------

@pytest.mark.parametrize("b, h, t, d, p, scale", [
    (1, 1, 1, 4, 1, None), (2, 1, 5, 3, 2, None), (1, 2, 6, 4, 3, 0.7), (2, 3, 4, 2, 2, 1.9),
])
def test_reference_matches_naive_loop(b, h, t, d, p, scale):
    q, k, v = make_inputs(b, h, t, d, p, seed=b * 100 + t)
    torch.testing.assert_close(latent_fusion_reference(q, k, v, scale), naive_latent_fusion(q, k, v, scale),
                               atol=1e-12, rtol=1e-12)


def test_reference_peers_share_one_softmax():
    """Two identical peers are one peer counted twice: the same output as one peer (two
    separate softmaxes averaged would agree too, so also check a lopsided pair)."""
    q, k, v = make_inputs(1, 1, 5, 4, 1)
    twice = latent_fusion_reference(q, torch.cat([k, k], 1), torch.cat([v, v], 1))
    torch.testing.assert_close(twice, latent_fusion_reference(q, k, v), atol=1e-12, rtol=0)
    # Peer 1's keys dominate: with one softmax its values win; averaging would give ~half.
    k2, v2 = torch.cat([k, 1000 * q[:, None]], 1), torch.cat([v, torch.ones_like(v)], 1)
    out = latent_fusion_reference(q, k2, v2)
    torch.testing.assert_close(out, torch.ones_like(out), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_peer_single_position_returns_v(dtype):
    q, k, v = make_inputs(2, 3, 1, 8, 1, dtype=dtype)
    assert torch.equal(latent_fusion(q, k, v), v[:, 0])
    # and position 0 of a longer sequence sees only position 0 of its one peer
    q, k, v = make_inputs(2, 3, 7, 8, 1, dtype=dtype)
    assert torch.equal(latent_fusion(q, k, v)[:, :, 0], v[:, 0, :, 0])


@pytest.mark.parametrize("t", [0, 3, 8])
def test_causal_future_peer_positions_do_not_matter(t):
    q, k, v = make_inputs(2, 2, 9, 4, 3, dtype=torch.float32)
    out = latent_fusion(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :, t + 1:] += 3.0
    v2[:, :, :, t + 1:] -= 5.0
    out2 = latent_fusion(q, k2, v2)
    torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], atol=0, rtol=0)
    if t + 1 < q.shape[2]:  # the later positions do see the change (so this test can fail)
        assert (out2[:, :, t + 1:] - out[:, :, t + 1:]).abs().max() > 0.1


# ---- gradients (requires_grad -> the reference path) ----------------------------------------

def test_gradient_flows_through_wrapper_and_matches_naive_loop():
    q, k, v = make_inputs(1, 2, 6, 4, 2, dtype=torch.float32, seed=3)
    w = torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(9))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    assert not _use_kernel(*leaves)
    (latent_fusion(*leaves) * w).sum().backward()
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    (naive_latent_fusion(*exact) * w.double()).sum().backward()
    for got, want in zip(leaves, exact):
        assert got.grad is not None and got.grad.abs().sum() > 0
        torch.testing.assert_close(got.grad, want.grad.float(), atol=1e-5, rtol=1e-4)


def test_gradcheck_fp64():
    q, k, v = (x.requires_grad_() for x in make_inputs(1, 1, 4, 3, 2, seed=4))
    assert torch.autograd.gradcheck(lambda a, b, c: latent_fusion(a, b, c, 0.8), (q, k, v))


# ---- validation ------------------------------------------------------------------------------

def _bad_inputs():
    q, k, v = make_inputs(1, 2, 5, 4, 2, dtype=torch.float32)
    return [
        ("q not a tensor", (q.tolist(), k, v), {}, TypeError, "q must be a torch.Tensor"),
        ("q 3-D", (q[0], k, v), {}, ValueError, r"q must be \[B, H, T, D\]"),
        ("k 4-D", (q, k[:, 0], v[:, 0]), {}, ValueError, r"k must be \[B, P, H, T, D\]"),
        ("v shape", (q, k, v[:, :1]), {}, ValueError, "v must have k's shape"),
        ("T mismatch", (q, k[:, :, :, :3], v[:, :, :, :3]), {}, ValueError, "do not match"),
        ("no peers", (q, k[:, :0], v[:, :0]), {}, ValueError, "at least one peer"),
        ("int dtype", (q.int(), k.int(), v.int()), {}, TypeError, "dtype must be one of"),
        ("mixed dtype", (q, k.half(), v), {}, TypeError, "share a dtype"),
        ("device", (q.to("meta"), k, v), {}, ValueError, "one device"),
        ("scale str", (q, k, v), {"scale": "0.1"}, TypeError, "scale must be a float"),
        ("scale inf", (q, k, v), {"scale": float("inf")}, ValueError, "scale must be finite"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_validation_raises_clear_errors(case):
    _, args, kwargs, exc, message = case
    with pytest.raises(exc, match=message):
        latent_fusion(*args, **kwargs)


def test_empty_sequence_gives_empty_output():
    q, k, v = make_inputs(2, 3, 0, 8, 2, dtype=torch.float32)
    assert latent_fusion(q, k, v).shape == (2, 3, 0, 8)


def test_import_needs_no_triton_and_touches_no_device():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        import kernels.latent_fusion as lf
        assert not torch.cuda.is_initialized()
        q, k, v = torch.ones(1, 1, 3, 4), torch.ones(1, 2, 1, 3, 4), torch.ones(1, 2, 1, 3, 4)
        assert torch.equal(lf.latent_fusion(q, k, v), torch.ones(1, 1, 3, 4))
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---- the Triton kernel against the reference -----------------------------------------------

# (name, B, H, T, D, P, dtype, block_m, block_n, extra): small enough for the interpreter,
# together covering T = 1/17/70, D = 16/32/64 (and 24, padded), P = 1/2/3, H = 1/3, every
# dtype, BLOCK_M > BLOCK_N, strided (non-contiguous) peers and a custom scale.
INTERPRETER_CASES = [
    ("T1-fp32", 1, 1, 1, 16, 1, "fp32", None, None, ""),
    ("T17-D32-P2-H3-fp32", 2, 3, 17, 32, 2, "fp32", None, None, ""),
    ("T70-D64-P3-H3-fp32-bm32", 1, 3, 70, 64, 3, "fp32", 32, 16, ""),
    ("T70-D16-P3-bf16", 1, 1, 70, 16, 3, "bf16", None, None, ""),
    ("T17-D64-P2-fp16", 2, 1, 17, 64, 2, "fp16", None, None, ""),
    ("T17-D16-P1-H3-bf16-bm32", 1, 3, 17, 16, 1, "bf16", 32, 16, ""),
    ("T33-D24-P2-fp32-padded-D", 1, 1, 33, 24, 2, "fp32", None, None, ""),
    ("T17-D32-P3-fp16-strided-scale", 1, 3, 17, 32, 3, "fp16", None, None, "strided"),
]

KERNEL_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from kernels import latent_fusion as lf

    cases, out_path = json.loads(sys.argv[1]), sys.argv[2]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    results = {}
    for name, b, h, t, d, p, dt, bm, bn, extra in cases:
        g = torch.Generator().manual_seed(len(results))
        dtype = dtypes[dt]
        q = torch.randn(b, h, t, d, generator=g).to(dtype)
        if extra == "strided":  # peers stored [B, H, P, T, D], seen as [B, P, H, T, D]
            k = torch.randn(b, h, p, t, d, generator=g).to(dtype).transpose(1, 2)
            v = torch.randn(b, h, p, t, d, generator=g).to(dtype).transpose(1, 2)
            assert not k.is_contiguous()
        else:
            k = torch.randn(b, p, h, t, d, generator=g).to(dtype)
            v = torch.randn(b, p, h, t, d, generator=g).to(dtype)
        scale = 0.37 if extra == "strided" else None
        assert lf._use_kernel(q, k, v)
        if bm is None:
            got = lf.latent_fusion(q, k, v, scale)
        else:
            got = lf._launch(q, k, v, scale or d ** -0.5, block_m=bm, block_n=bn)
        want = lf.latent_fusion_reference(q.float(), k.float(), v.float(), scale)
        results[name] = (got, want)
    # requires_grad: the wrapper must leave the kernel for the reference, and backprop
    q, k, v = (torch.randn(1, 1, 5, 16) for _ in range(3))
    k, v = k[:, None].clone().requires_grad_(), v[:, None]
    assert not lf._use_kernel(q, k, v)
    lf.latent_fusion(q, k, v).sum().backward()
    assert k.grad is not None
    torch.save(results, out_path)
    print("ok")
""")


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory):
    """All interpreter cases in one subprocess (triton reads TRITON_INTERPRET at import)."""
    import json

    out_path = tmp_path_factory.mktemp("latent_fusion") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT, json.dumps(INTERPRETER_CASES), str(out_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
    return torch.load(out_path)


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: c[0])
def test_kernel_matches_reference_under_interpreter(case, interpreted_results):
    name, b, h, t, d, p, dt = case[:7]
    got, want = interpreted_results[name]
    assert got.dtype == DTYPES[dt] and got.shape == (b, h, t, d)
    torch.testing.assert_close(got.float(), want, **TOL[dt])


CUDA_SHAPES = [(b, h, t, d, p) for b, h in ((1, 1), (2, 3)) for t in (1, 17, 70, 300)
               for d in (16, 32, 64, 128) for p in (1, 2, 3)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; on CPU the same kernel "
                    "is checked under TRITON_INTERPRET=1 (test_kernel_matches_reference_under_interpreter)")
@pytest.mark.parametrize("dt", list(DTYPES))
def test_kernel_matches_reference_on_cuda(dt):
    for i, (b, h, t, d, p) in enumerate(CUDA_SHAPES):
        q, k, v = make_inputs(b, h, t, d, p, dtype=DTYPES[dt], seed=i, device="cuda")
        assert _use_kernel(q, k, v)
        got = latent_fusion(q, k, v)
        want = latent_fusion_reference(q.float(), k.float(), v.float())
        assert got.dtype == DTYPES[dt]
        torch.testing.assert_close(got.float(), want, **TOL[dt], msg=lambda m: f"{(b, h, t, d, p)}: {m}")
