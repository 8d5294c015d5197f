"""Latent fusion: the primary expert's projection cross-attends causally over its peers'.

After every stack of layers each active expert's hidden states are normed and projected
to a shared width (matmuls outside this module). The primary's projection gives the
queries, its ``P = K - 1`` peers' projections give keys and values, and every query
position ``t`` attends to positions ``s <= t`` of *all* peer streams in one softmax:

    out[b, h, t] = sum_{p < P, s <= t} softmax_{(p, s)}(scale * q[b, h, t] . k[b, p, h, s]) v[b, p, h, s]

Shapes: ``q: [B, H, T, D]``, ``k, v: [B, P, H, T, D]`` -> ``out: [B, H, T, D]`` (dtype of
``q``); ``scale = 1 / sqrt(D)`` unless given. Peers are a separate axis rather than heads
because they share the query's heads: peer ``p`` of head ``h`` is just more keys for
head ``h``. Any strides are accepted (``torch.stack`` of per-expert projections, or a
slice of a bigger buffer, needs no copy).

- ``latent_fusion_reference``: plain torch (autograd, any device); first, as the spec.
- ``_latent_fusion_kernel``: Triton, flash-attention forward with online softmax.
  **Forward only**: ``latent_fusion`` uses the reference whenever a gradient is needed.
- ``latent_fusion``: validates, then runs the kernel on CUDA tensors (or on CPU tensors
  under ``TRITON_INTERPRET=1``), else the reference.

Nothing happens at import: triton is imported on the first kernel launch, and the
device is never queried here.
"""

from __future__ import annotations

import functools
import math
import os

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_KERNEL_HEAD_DIM = 256  # past this the tiles no longer fit in registers/shared memory


# Memory traffic and FLOPs of the reference, per (b, h), with N = P * T keys:
#   reads q, k, v once: (T + 2 N) * D elements; writes out: T * D;
#   materialises the [T, N] logits in fp32 and passes over them ~5 times (matmul write,
#   masked fill, softmax read + write, matmul read): ~20 * T * N bytes, which dominates
#   (T = 4096, P = 3, B*H = 64: ~200 GB moved for 2 * 12.9 TFLOP-worth of dense matmul).
#   FLOPs: 2 * T * N * D for q.k^T plus 2 * T * N * D for p.v = 4 * T * N * D, half of
#   them on masked-out (s > t) entries.
# The kernel keeps the logits on chip: it reads q once, k/v once per query block (about
# T / (2 * BLOCK_M) times each on average, causal) and does ~2 * T * N * D FLOPs.
def latent_fusion_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """Causal cross-attention of ``q [B, H, T, D]`` over the peers ``k, v [B, P, H, T, D]``,
    all peers in one softmax, in plain torch (differentiable). Computes in fp32 (fp64 for
    fp64 inputs), returns ``q.dtype``."""
    b, h, t, d = q.shape
    p = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    work = torch.promote_types(q.dtype, torch.float32)
    # Peers concatenated along the key axis: key index p * T + s.
    kc = k.to(work).permute(0, 2, 1, 3, 4).reshape(b, h, p * t, d)
    vc = v.to(work).permute(0, 2, 1, 3, 4).reshape(b, h, p * t, d)
    pos = torch.arange(t, device=q.device)
    allowed = (pos[None, :] <= pos[:, None]).repeat(1, p)  # [T, P*T]: s <= t for every peer
    logits = torch.matmul(q.to(work), kc.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), vc).to(q.dtype)


@functools.cache
def _build_kernel():
    """The Triton kernel, compiled lazily so that importing this module needs no triton.
    (One jit function: the interpreter re-executes its source without this closure, so a
    nested helper would not resolve there.)"""
    import triton
    import triton.language as tl

    @triton.jit
    def _latent_fusion_kernel(Q, K, V, Out, qk_scale,
                              sqb, sqh, sqt, sqd,
                              skb, skp, skh, skt, skd,
                              svb, svp, svh, svt, svd,
                              sob, soh, sot, sod,
                              H, P, T, D,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              PAD_D: tl.constexpr, DOT_IN_FP32: tl.constexpr, IEEE: tl.constexpr):
        """Program (query block m, b * H + h): loop over peers, then over key blocks up to
        the diagonal, one running (max, sum, fp32 accumulator) across all of them."""
        # Last query blocks first: they see the most keys, so the long programs start early
        # and the short ones fill the tail (causal load balance).
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)  # int64 base offsets: k/v may pass 2**31 elements
        h = (bh % H).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd
        q_mask = offs_m[:, None] < T
        if PAD_D:
            q_mask = q_mask & (offs_d[None, :] < D)
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        diag_lo = start_m * BLOCK_M  # keys below it are visible to every row (BLOCK_M % BLOCK_N == 0)
        diag_hi = tl.minimum(diag_lo + BLOCK_M, T)
        for peer in range(0, P):
            k_base = K + b * skb + peer * skp + h * skh
            v_base = V + b * svb + peer * svp + h * svh
            # phase 0: key blocks fully below the diagonal, no masks (but D padding);
            # phase 1: the diagonal block(s), causal and T masks.
            for phase in tl.static_range(2):
                lo = 0 if phase == 0 else diag_lo
                hi = diag_lo if phase == 0 else diag_hi
                for start_n in range(lo, hi, BLOCK_N):
                    cols = start_n + offs_n
                    k_ptrs = k_base + cols[None, :] * skt + offs_d[:, None] * skd  # [BLOCK_D, BLOCK_N]
                    v_ptrs = v_base + cols[:, None] * svt + offs_d[None, :] * svd  # [BLOCK_N, BLOCK_D]
                    if phase == 1:
                        k_mask = cols[None, :] < T
                        v_mask = cols[:, None] < T
                        if PAD_D:
                            k_mask = k_mask & (offs_d[:, None] < D)
                            v_mask = v_mask & (offs_d[None, :] < D)
                        kt = tl.load(k_ptrs, mask=k_mask, other=0.0)
                        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
                    elif PAD_D:
                        kt = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
                        v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
                    else:
                        kt = tl.load(k_ptrs)
                        v = tl.load(v_ptrs)
                    if DOT_IN_FP32:
                        kt = kt.to(tl.float32)
                    if IEEE:
                        qk = tl.dot(q, kt, input_precision="ieee")
                    else:
                        qk = tl.dot(q, kt)
                    qk = qk * qk_scale  # log2 domain: exp2(x * log2(e)) == exp(x)
                    if phase == 1:
                        keep = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] < T)
                        qk = tl.where(keep, qk, float("-inf"))
                    # Every row has seen a finite logit before any fully masked block (key 0,
                    # or the diagonal's first column), so m_new is finite: no NaN below.
                    m_new = tl.maximum(m_i, tl.max(qk, 1))
                    alpha = tl.math.exp2(m_i - m_new)
                    p = tl.math.exp2(qk - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    # p @ v accumulates into the rescaled accumulator (the dot's own
                    # accumulator operand, rather than a second fp32 tile added after).
                    acc = acc * alpha[:, None]
                    if DOT_IN_FP32:
                        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
                    elif IEEE:
                        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(p.to(v.dtype), v, acc)
                    m_i = m_new
        acc = acc / l_i[:, None]
        o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod
        o_mask = offs_m[:, None] < T
        if PAD_D:
            o_mask = o_mask & (offs_d[None, :] < D)
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=o_mask)

    return triton, _latent_fusion_kernel


def _interpreting() -> bool:
    """Triton's own switch (read per call, as triton reads it at its import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _block_sizes(d: int, dtype: torch.dtype, interpret: bool,
                 capability: tuple[int, int] = (9, 0)) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): FA2-style tiles, not autotuned, chosen so
    that ptxas spills no registers on sm_80 and sm_90 (checked on CPU by
    ``kernels.cuda_build`` in tests/kernels/test_cuda_build.py); small tiles under the
    interpreter so short T still spans several blocks. fp32 tiles are twice the bytes and
    get smaller tiles. ``capability``: the GPU's (major, minor)."""
    if interpret:
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return (64, 32, 8, 2) if d <= 64 else (64, 16, 4, 2) if d <= 128 else (32, 16, 4, 1)
    if d <= 64:
        return 128, 64, 8, 3
    if d <= 128:   # Hopper's warp-group MMA leaves room for the wider key tile
        return (128, 64, 8, 2) if capability >= (9, 0) else (128, 32, 8, 2)
    return 64, 32, 8, 2


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Run the Triton kernel (inputs already validated). ``block_m``/``block_n`` override
    the tile sizes (tests use it to cover BLOCK_M > BLOCK_N); BLOCK_M % BLOCK_N == 0."""
    triton, kernel = _build_kernel()
    b, h, t, d = q.shape
    p = k.shape[1]
    interpret = _interpreting()
    bm, bn, warps, stages = _block_sizes(d, q.dtype, interpret, _capability(q.device))
    bm, bn = block_m or bm, block_n or bn
    if bm % bn or bn < 16:
        raise ValueError(f"block_m ({bm}) must be a multiple of block_n ({bn}), and block_n >= 16")
    block_d = max(16, triton.next_power_of_2(d))
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(t, bm), b * h)
    kernel[grid](
        q, k, v, out, scale * 1.4426950408889634,  # scale * log2(e)
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, p, t, d,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PAD_D=block_d != d,
        # The interpreter's dot is numpy matmul on bf16's raw uint16 storage: upcast there.
        DOT_IN_FP32=interpret and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,  # fp32 in, fp32 products (no TF32 rounding)
        num_warps=warps, num_stages=stages,
    )
    return out


def _validate(q, k, v, scale) -> float:
    """Raise TypeError/ValueError on anything the op cannot take; return the scale."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"latent_fusion: {name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"latent_fusion: q must be [B, H, T, D], got shape {tuple(q.shape)}")
    if k.dim() != 5:
        raise ValueError(f"latent_fusion: k must be [B, P, H, T, D] (P = peers), got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"latent_fusion: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    b, h, t, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3], k.shape[4]) != (b, h, t, d):
        raise ValueError(f"latent_fusion: k/v [B, P, H, T, D] = {tuple(k.shape)} do not match "
                         f"q [B, H, T, D] = {tuple(q.shape)} in B, H, T or D")
    if k.shape[1] < 1:
        raise ValueError("latent_fusion: need at least one peer stream (P >= 1)")
    if d < 1:
        raise ValueError("latent_fusion: head dim D must be >= 1")
    allowed = KERNEL_DTYPES + (torch.float64,)
    if q.dtype not in allowed:
        raise TypeError(f"latent_fusion: dtype must be one of {[str(x) for x in allowed]}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"latent_fusion: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"latent_fusion: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"latent_fusion: scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"latent_fusion: scale must be finite, got {scale}")
    return float(scale)


def _use_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``latent_fusion`` runs the Triton kernel for these (validated) inputs."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False  # forward-only kernel: the reference carries the gradient
    if q.dtype not in KERNEL_DTYPES or q.shape[-1] > MAX_KERNEL_HEAD_DIM:
        return False
    return q.device.type == "cuda" or (q.device.type == "cpu" and _interpreting())


def latent_fusion(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
    """Fused causal cross-attention of the primary over its peers (see the module docstring).

    ``q [B, H, T, D]``, ``k, v [B, P, H, T, D]`` (same dtype and device), ``scale``
    (default ``1/sqrt(D)``) -> ``[B, H, T, D]`` in ``q.dtype``:

        out[b, h, t] = sum_{p, s <= t} softmax_{(p, s)}(scale * q[b, h, t] . k[b, p, h, s]) v[b, p, h, s]

    Runs the Triton kernel (fp32 accumulation) for fp32/bf16/fp16 with D <= 256 on CUDA,
    or on CPU under ``TRITON_INTERPRET=1``; otherwise, and whenever autograd needs a
    gradient (the kernel is forward only), ``latent_fusion_reference``. fp64 always takes
    the reference. Raises ``TypeError``/``ValueError`` on bad inputs.
    """
    scale = _validate(q, k, v, scale)
    if q.numel() == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if _use_kernel(q, k, v):
        return _launch(q, k, v, scale)
    return latent_fusion_reference(q, k, v, scale)
