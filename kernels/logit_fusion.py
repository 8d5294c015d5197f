"""Fused logit addition + temperature + log-softmax + top-k/top-p sampling (one pass family
over the vocabulary per sequence), for the "logit addition" collaboration mode (after
FusionRoute; the contrastive variant, strong minus weak, after SCMoE).

For sequence ``b`` with experts' logits ``L [E, B, V]``::

    z[b]  = w[b] * L[choice[b], b, :] + bias[b, :]  (- beta[b] * L[weak[b], b, :])
    s[b]  = z[b] / T[b]              (computed as z * (1/T); T[b] == 0: greedy, s = z)
    kept  = {v : s[b, v] >= max(t_k, t_p)}
    token = argmax_{v in kept} s[b, v] + g[b, v]        (Gumbel-max; g = 0 when greedy)

``t_k`` is the k-th largest value of ``s[b]`` (with multiplicity; k = 0 or k >= V: off),
``t_p`` the largest value ``t`` whose mass ``P(s >= t) >= p`` (p = 1: off). Ties at a
threshold are kept, so a filter may keep more than k tokens; top-k and top-p are applied
jointly (both against the unfiltered distribution). Equal maxima in the argmax go to the
lowest index. Returned logprob: ``log softmax(s)[token]`` renormalised over ``kept``.

Layout: ``logit_fusion_reference`` (torch); ``_logit_partial_kernel`` (Triton, the first
pass over a row split across several programs, so that a small batch still fills a big GPU)
and ``_logit_fusion_kernel`` (one program per row: merges the splits' partial results, or
makes the first pass itself, then the threshold search and the sample); ``logit_fusion``
(validating wrapper). Triton is imported on first use only.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_V = 1024       # vocabulary tile per loop step
SPLIT_BLOCK_V = 2048  # ... in the split first pass: 16-byte loads of 16-bit logits on 8 warps
# Threshold candidates per search pass. The search costs passes * pivots comparisons per
# logit, passes = log_{pivots+1}(2^32 keys): 4 pivots, 14 passes, 56 per logit; 16 pivots,
# 8 passes, 128 per logit. A pass re-reads the rows (mostly from L2), the comparisons are
# ALU work on one program per row: fewer pivots should be the cheaper trade on a GPU
# (bench_logit_fusion.py --pivots compares; not yet measured on one).
N_PIVOTS = 4
PROGRAMS_PER_SM = 4  # first-pass programs per SM when rows are split (see _splits)


class LogitFusionOutput(NamedTuple):
    tokens: torch.Tensor        # [B] int64
    logprobs: torch.Tensor      # [B] fp32, under the filtered tempered distribution
    logsoftmax: torch.Tensor | None  # [B, V] fp32 tempered, unfiltered; when asked


# Memory traffic of the eager reference, per row of V logits (bf16 inputs, E experts):
# reads 2V (gathered expert row) + 2V (bias) [+ 2V weak] bytes, then about ten fp32 passes
# of 4V bytes each (upcast, scale, add, temper, log-softmax, sort, softmax, cumsum, masks,
# argmax), plus the sort itself. The kernel reads the input rows once per pass and
# writes 12 bytes per row (16V more when the log-softmax row is asked for).
def logit_fusion_reference(expert_logits, choice, bias, temperature, top_k, top_p, *, weight=None,
                           weak=None, beta=None, gumbel=None, return_logsoftmax=False) -> LogitFusionOutput:
    """Plain torch; per-row tensors already shaped [B] (see ``logit_fusion`` for the
    contract). ``gumbel [B, V]`` or None (no noise: the argmax of the kept logits)."""
    E, B, V = expert_logits.shape
    rows = torch.arange(B, device=expert_logits.device)
    w = torch.ones(B, device=expert_logits.device) if weight is None else weight.float()
    z = w[:, None] * expert_logits[choice, rows].float()
    if bias is not None:
        z = z + bias.float()
    if weak is not None:
        z = z - beta.float()[:, None] * expert_logits[weak, rows].float()
    temperature = temperature.float()
    greedy = temperature == 0   # T == 0: greedy, scaled by 1 (the kernel: the same IEEE 1/T)
    scale = torch.where(greedy, torch.ones_like(temperature), 1.0 / temperature)
    s = z * scale[:, None]
    # Thresholds on the sorted row: t_k = k-th largest, t_p = first value whose cumulative mass >= p.
    sv = s.sort(dim=-1, descending=True).values
    neg_inf = torch.full((B,), float("-inf"), device=s.device)
    k = top_k.long()
    t_k = sv.gather(1, (k.clamp(1, V) - 1)[:, None]).squeeze(1)
    t_k = torch.where((k > 0) & (k < V), t_k, neg_inf)
    p = top_p.float()
    cums = sv.softmax(dim=-1).cumsum(dim=-1)
    first = (cums < p[:, None]).sum(dim=-1).clamp(max=V - 1)
    t_p = torch.where(p < 1, sv.gather(1, first[:, None]).squeeze(1), neg_inf)
    kept = s >= torch.maximum(t_k, t_p)[:, None]
    y = s if gumbel is None else torch.where(greedy[:, None], s, s + gumbel.float())
    tokens = torch.where(kept, y, float("-inf")).argmax(dim=-1)  # first index among equal maxima
    kept_lse = torch.where(kept, s, float("-inf")).logsumexp(dim=-1)
    logprobs = s.gather(1, tokens[:, None]).squeeze(1) - kept_lse
    row = s.log_softmax(dim=-1) if return_logsoftmax else None
    return LogitFusionOutput(tokens, logprobs, row)


# ---------------------------------------------------------------------------------------
# Triton. The functions below are plain Python until _compiled() binds `tl` and jits them.
tl = None
_tempered = _to_key = _from_key = _noise = _setup = _scan = _start = None


def _tempered_block(strong, weak, bias, offs, mask, w, beta, scale,
                    HAS_BIAS: tl.constexpr, HAS_WEAK: tl.constexpr):
    """s = (w*L_strong + bias - beta*L_weak) * scale on one tile, -inf outside the row.
    The same operation order as the reference, and no FMA contraction (see the launch)."""
    z = w * tl.load(strong + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(bias + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEAK:
        z = z - beta * tl.load(weak + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, z * scale, float("-inf"))


def _noise_block(noise, seed, offs, mask, NOISE: tl.constexpr):
    """Gumbel noise on one tile: 0 = none, 1 = given tensor row, 2 = Philox (seed, offs)."""
    if NOISE == 1:
        g = tl.load(noise + offs, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 2:
        g = -tl.log(-tl.log(tl.rand(seed, offs)))
    else:
        g = tl.zeros(offs.shape, tl.float32)
    return g


def _float_to_key(x):
    """fp32 -> int64 whose order is the float order (negative floats: low 31 bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


def _key_to_float(key):
    bits = key.to(tl.int32)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


def _row_setup(logits, stride_le, stride_lb, choice_ptr, weight_ptr, bias_ptr, stride_bias, weak_ptr,
               beta_ptr, temp_ptr, noise_ptr, stride_noise, seed_ptr, b, HAS_WEAK: tl.constexpr):
    """Row ``b``'s pointers and scalars: chosen (and weak) expert rows, bias and noise rows,
    Philox key, weight, contrast weight, 1/T (1 for a greedy row, T == 0) and greediness."""
    strong = logits + tl.load(choice_ptr + b) * stride_le + b * stride_lb
    w = tl.load(weight_ptr + b)
    weak = strong
    beta = w * 0.0
    if HAS_WEAK:
        weak = logits + tl.load(weak_ptr + b) * stride_le + b * stride_lb
        beta = tl.load(beta_ptr + b)
    t = tl.load(temp_ptr + b)
    greedy = t == 0.0
    scale = tl.where(greedy, 1.0, tl.div_rn(1.0, tl.where(greedy, 1.0, t)))   # IEEE, as torch's 1.0 / T
    seed = tl.load(seed_ptr) + b * 4294967296  # Philox key: (seed, row)
    return (strong, weak, bias_ptr + b * stride_bias, noise_ptr + b * stride_noise, seed, w, beta, scale,
            greedy)


def _pass_start(scale, b):
    """The state of a first pass before any column: (max, sum-exp, minimum, best noisy
    logit, candidate, candidate's logit), typed like the row's scalars."""
    m = scale * 0.0 - 3.0e38
    return m, scale * 0.0, scale * 0.0 + float("inf"), scale * 0.0 + float("-inf"), b * 0, m


def _scan_block(strong, weak, bias, noise, seed, w, beta, scale, greedy, lo_off, hi_off, b,
                HAS_BIAS: tl.constexpr, HAS_WEAK: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over columns [lo_off, hi_off) of a row: running max and sum-exp (online
    softmax), the minimum, and the unfiltered Gumbel-max candidate (lowest index among
    equal maxima) with its tempered logit."""
    cols = tl.arange(0, BLOCK)
    m, sumexp, lo_val, best, cand, cand_s = _start(scale, b)
    for start in range(lo_off, hi_off, BLOCK):
        offs = start + cols
        mask = offs < hi_off
        s = _tempered(strong, weak, bias, offs, mask, w, beta, scale, HAS_BIAS, HAS_WEAK)
        m_new = tl.maximum(m, tl.max(s, 0))
        sumexp = sumexp * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), 0)
        m = m_new
        lo_val = tl.minimum(lo_val, tl.min(tl.where(mask, s, float("inf")), 0))
        y = tl.where(greedy, s, s + _noise(noise, seed, offs, mask, NOISE))
        blk_best = tl.max(y, 0)
        blk_idx = tl.argmax(y, 0)
        take = blk_best > best  # strict: equal maxima keep the lower index
        best = tl.where(take, blk_best, best)
        cand = tl.where(take, start + blk_idx, cand)
        cand_s = tl.where(take, tl.max(tl.where(cols == blk_idx, s, float("-inf")), 0), cand_s)
    return m, sumexp, lo_val, best, cand, cand_s


def _logit_partial_kernel(
    logits, stride_le, stride_lb, choice_ptr, weight_ptr, bias_ptr, stride_bias, weak_ptr, beta_ptr,
    temp_ptr, noise_ptr, stride_noise, seed_ptr, part_f_ptr, part_i_ptr, V, CHUNK,
    HAS_BIAS: tl.constexpr, HAS_WEAK: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (row b, split j): the first pass over the row's columns [j*CHUNK, (j+1)*CHUNK),
    written as 5 floats (max, sum-exp, min, best, candidate's logit) and the candidate."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    n_splits = tl.num_programs(1)
    strong, weak, bias, noise, seed, w, beta, scale, greedy = _setup(
        logits, stride_le, stride_lb, choice_ptr, weight_ptr, bias_ptr, stride_bias, weak_ptr, beta_ptr,
        temp_ptr, noise_ptr, stride_noise, seed_ptr, b, HAS_WEAK)
    lo_off = j * CHUNK
    m, sumexp, lo_val, best, cand, cand_s = _scan(
        strong, weak, bias, noise, seed, w, beta, scale, greedy, lo_off, tl.minimum(lo_off + CHUNK, V), b,
        HAS_BIAS, HAS_WEAK, NOISE, BLOCK)
    slot = b * n_splits + j
    tl.store(part_f_ptr + slot * 5 + 0, m)
    tl.store(part_f_ptr + slot * 5 + 1, sumexp)
    tl.store(part_f_ptr + slot * 5 + 2, lo_val)
    tl.store(part_f_ptr + slot * 5 + 3, best)
    tl.store(part_f_ptr + slot * 5 + 4, cand_s)
    tl.store(part_i_ptr + slot, cand)


def _logit_fusion_kernel(
    logits, stride_le, stride_lb, choice_ptr, weight_ptr, bias_ptr, stride_bias, weak_ptr, beta_ptr,
    temp_ptr, top_k_ptr, top_p_ptr, noise_ptr, stride_noise, seed_ptr,
    part_f_ptr, part_i_ptr, n_splits,
    tokens_ptr, logprobs_ptr, row_ptr, stride_row, V,
    HAS_BIAS: tl.constexpr, HAS_WEAK: tl.constexpr, NOISE: tl.constexpr,
    WRITE_ROW: tl.constexpr, BLOCK: tl.constexpr, PIVOTS: tl.constexpr, PARTIALS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    strong, weak, bias, noise, seed, w, beta, scale, greedy = _setup(
        logits, stride_le, stride_lb, choice_ptr, weight_ptr, bias_ptr, stride_bias, weak_ptr, beta_ptr,
        temp_ptr, noise_ptr, stride_noise, seed_ptr, b, HAS_WEAK)

    # Pass 1: online max / sum-exp, row minimum, and the unfiltered Gumbel-max candidate;
    # with PARTIALS, merged from the per-split passes of _logit_partial_kernel (in split
    # order, strict comparison: the lowest index still wins among equal maxima).
    if PARTIALS:
        m, sumexp, lo_val, best, cand, cand_s = _start(scale, b)
        for split in range(0, n_splits):
            slot = b * n_splits + split
            m_j = tl.load(part_f_ptr + slot * 5 + 0)
            m_new = tl.maximum(m, m_j)
            sumexp = sumexp * tl.exp(m - m_new) + tl.load(part_f_ptr + slot * 5 + 1) * tl.exp(m_j - m_new)
            m = m_new
            lo_val = tl.minimum(lo_val, tl.load(part_f_ptr + slot * 5 + 2))
            best_j = tl.load(part_f_ptr + slot * 5 + 3)
            take = best_j > best
            best = tl.where(take, best_j, best)
            cand = tl.where(take, tl.load(part_i_ptr + slot), cand)
            cand_s = tl.where(take, tl.load(part_f_ptr + slot * 5 + 4), cand_s)
    else:
        m, sumexp, lo_val, best, cand, cand_s = _scan(
            strong, weak, bias, noise, seed, w, beta, scale, greedy, 0, V, b, HAS_BIAS, HAS_WEAK, NOISE, BLOCK)

    # Threshold: the largest fp32 t with count(s >= t) >= k or mass(s >= t) >= p, found
    # exactly by multi-section over the order-preserving integer keys of fp32 (no sort).
    kept_mass = sumexp
    lo = _to_key(lo_val)          # condition holds at the row minimum
    hi = _to_key(m) + 1           # and fails above the row maximum
    k = tl.load(top_k_ptr + b)
    p = tl.load(top_p_ptr + b)
    k_need = tl.where((k > 0) & (k < V), k, V + 1)
    p_need = tl.where(p < 1.0, p, 2.0) * sumexp
    if (k_need > V) & (p >= 1.0):
        hi = lo + 1
    j = (tl.arange(0, PIVOTS) + 1).to(tl.int64)
    while hi - lo > 1:
        piv_key = lo + ((hi - lo) * j) // (PIVOTS + 1)
        piv = _from_key(piv_key)
        cnt = tl.zeros((PIVOTS,), tl.int64)
        mass = tl.zeros((PIVOTS,), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            s = _tempered(strong, weak, bias, offs, offs < V, w, beta, scale, HAS_BIAS, HAS_WEAK)
            ge = s[:, None] >= piv[None, :]
            cnt += tl.sum(ge.to(tl.int32), 0).to(tl.int64)   # a tile counts < 2^31
            mass += tl.sum(tl.where(ge, tl.exp(s - m)[:, None], 0.0), 0)
        ok = (cnt >= k_need) | (mass >= p_need)
        new_lo = tl.max(tl.where(ok, piv_key, lo), 0)
        kept_mass = tl.where(new_lo > lo, tl.max(tl.where(piv_key == new_lo, mass, 0.0), 0), kept_mass)
        hi = tl.min(tl.where(~ok & (piv_key > new_lo), piv_key, hi), 0)
        lo = new_lo
    thr = _from_key(lo)

    # The unfiltered candidate is the answer when it survives the filter; else resample.
    if cand_s < thr:
        best = scale * 0.0 + float("-inf")
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            s = _tempered(strong, weak, bias, offs, mask, w, beta, scale, HAS_BIAS, HAS_WEAK)
            y = tl.where(s >= thr, s + _noise(noise, seed, offs, mask, NOISE), float("-inf"))
            blk_best = tl.max(y, 0)
            blk_idx = tl.argmax(y, 0)
            take = blk_best > best
            best = tl.where(take, blk_best, best)
            cand = tl.where(take, start + blk_idx, cand)
            cand_s = tl.where(take, tl.max(tl.where(cols == blk_idx, s, float("-inf")), 0), cand_s)
    tl.store(tokens_ptr + b, cand)
    tl.store(logprobs_ptr + b, (cand_s - m) - tl.log(kept_mass))
    if WRITE_ROW:
        lse = m + tl.log(sumexp)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            s = _tempered(strong, weak, bias, offs, mask, w, beta, scale, HAS_BIAS, HAS_WEAK)
            tl.store(row_ptr + b * stride_row + offs, s - lse, mask=mask)


@functools.cache
def _compiled():
    """Import triton, bind `tl` and jit the kernel and its helpers (once per process)."""
    global tl, _tempered, _to_key, _from_key, _noise, _setup, _scan, _start
    import triton
    import triton.language as language

    tl = language
    _tempered, _noise = triton.jit(_tempered_block), triton.jit(_noise_block)
    _to_key, _from_key = triton.jit(_float_to_key), triton.jit(_key_to_float)
    _setup, _scan, _start = triton.jit(_row_setup), triton.jit(_scan_block), triton.jit(_pass_start)
    return triton.jit(_logit_fusion_kernel), triton.jit(_logit_partial_kernel)


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _per_row(value, B: int, device: torch.device, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A Python number broadcast to [B], or a [B] tensor checked and cast."""
    if isinstance(value, torch.Tensor):
        if value.shape != (B,):
            raise ValueError(f"{name} must have shape [B]=({B},), got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, expert_logits on {device}")
        if dtype == torch.int64 and (value.is_floating_point() or value.is_complex()):
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        return value.to(dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a [B] tensor, got {type(value).__name__}")
    return torch.full((B,), value, dtype=dtype, device=device)


def _check_rows(t: torch.Tensor | None, B: int, V: int, device: torch.device, name: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor")
    if t.shape != (B, V):
        raise ValueError(f"{name} must have shape [B, V]=({B}, {V}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expert_logits on {device}")


def logit_fusion(expert_logits: torch.Tensor, choice: torch.Tensor, bias: torch.Tensor | None = None,
                 temperature: torch.Tensor | float = 1.0, top_k: torch.Tensor | int = 0,
                 top_p: torch.Tensor | float = 1.0, *, weight: torch.Tensor | float = 1.0,
                 weak: torch.Tensor | None = None, beta: torch.Tensor | float | None = None,
                 gumbel: torch.Tensor | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, return_logsoftmax: bool = False,
                 check_values: bool = True, splits: int | None = None) -> LogitFusionOutput:
    """Fuse the chosen expert's logits with the router's, temper, filter and sample.

    ``z[b] = weight[b]*L[choice[b], b] + bias[b] - beta[b]*L[weak[b], b]``, then
    ``s = z / T``, top-k/top-p filtering and Gumbel-max sampling (module docstring).

    Args:
        expert_logits: ``[E, B, V]`` fp32/bf16/fp16, last dimension contiguous.
        choice: ``[B]`` int, expert per row, in ``[0, E)``.
        bias: ``[B, V]`` float, the router's complementary logits, or None.
        temperature: ``[B]`` or a number, >= 0; 0 = greedy (logprobs then use T = 1).
        top_k: ``[B]`` int or a number, >= 0; 0 = off. top_p: ``[B]`` or a number in (0, 1]; 1 = off.
        weight: ``[B]`` or a number, the chosen expert's weight.
        weak, beta: contrastive variant: ``[B]`` int expert and ``[B]`` (or number) weight.
        gumbel: ``[B, V]`` explicit Gumbel noise (tests; exact agreement with the
            reference). Otherwise Philox noise from ``seed``, or from a seed drawn from
            ``generator`` / torch's default generator (the reference path draws torch noise).
        return_logsoftmax: also return ``log_softmax(s)`` as ``[B, V]`` fp32.
        check_values: check index ranges and parameter values (reads them: a device sync).
        splits: programs sharing each row's first pass over the vocabulary (kernel path
            only); None: enough to give every SM of the GPU about four programs (1 on CPU).

    Returns:
        ``LogitFusionOutput(tokens [B] int64, logprobs [B] fp32, logsoftmax [B, V] | None)``.
    """
    if not isinstance(expert_logits, torch.Tensor) or expert_logits.dtype not in FLOAT_DTYPES:
        raise TypeError("expert_logits must be a float32/bfloat16/float16 tensor")
    if expert_logits.dim() != 3 or expert_logits.numel() == 0:
        raise ValueError(f"expert_logits must be a non-empty [E, B, V] tensor, got {tuple(expert_logits.shape)}")
    E, B, V = expert_logits.shape
    dev = expert_logits.device
    if not isinstance(choice, torch.Tensor):
        raise TypeError("choice must be a [B] integer tensor")
    choice = _per_row(choice, B, dev, torch.int64, "choice")
    _check_rows(bias, B, V, dev, "bias")
    _check_rows(gumbel, B, V, dev, "gumbel")
    if (weak is None) != (beta is None):
        raise ValueError("the contrastive variant needs both weak and beta (or neither)")
    if weak is not None and not isinstance(weak, torch.Tensor):
        raise TypeError("weak must be a [B] integer tensor")
    if gumbel is not None and (seed is not None or generator is not None):
        raise ValueError("pass either gumbel noise or seed/generator, not both")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be a positive integer or None, got {splits!r}")
    temperature = _per_row(temperature, B, dev, torch.float32, "temperature")
    top_k = _per_row(top_k, B, dev, torch.int64, "top_k")
    top_p = _per_row(top_p, B, dev, torch.float32, "top_p")
    weight = _per_row(weight, B, dev, torch.float32, "weight")
    if weak is not None:
        weak = _per_row(weak, B, dev, torch.int64, "weak")
        beta = _per_row(beta, B, dev, torch.float32, "beta")
    if check_values:
        for name, idx in (("choice", choice), ("weak", weak)):
            if idx is not None and ((idx < 0) | (idx >= E)).any():
                raise ValueError(f"{name} values must lie in [0, E) = [0, {E})")
        if not torch.isfinite(temperature).all() or (temperature < 0).any():
            raise ValueError("temperature must be finite and >= 0 (0 = greedy)")
        if (top_k < 0).any():
            raise ValueError("top_k must be >= 0 (0 = off)")
        if not ((top_p > 0) & (top_p <= 1)).all():
            raise ValueError("top_p must lie in (0, 1] (1 = off)")
    if expert_logits.stride(-1) != 1:
        expert_logits = expert_logits.contiguous()
    if not _use_triton(dev):
        if gumbel is None:
            u = torch.rand((B, V), generator=_cpu_generator(seed, generator), device="cpu").to(dev)
            gumbel = -torch.log(-torch.log(u))
        return logit_fusion_reference(expert_logits, choice, bias, temperature, top_k, top_p, weight=weight,
                                      weak=weak, beta=beta, gumbel=gumbel, return_logsoftmax=return_logsoftmax)
    return _launch(expert_logits, choice, bias, temperature, top_k, top_p, weight, weak, beta, gumbel,
                   _seed_tensor(seed, generator, dev), return_logsoftmax, splits)


def _cpu_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and generator.device.type == "cpu":
        return generator
    if seed is None and generator is None:
        return None
    drawn = seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator,
                                                                  device=generator.device).item())
    return torch.Generator().manual_seed(drawn)


def _seed_tensor(seed: int | None, generator: torch.Generator | None, dev: torch.device) -> torch.Tensor:
    """The Philox seed as a 1-element int64 tensor (read in the kernel: no recompile, no sync)."""
    if seed is not None:
        return torch.full((1,), seed & 0xFFFFFFFF, dtype=torch.int64, device=dev)  # no host sync
    gen_dev = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_dev, dtype=torch.int64).to(dev)


def _launch(logits, choice, bias, temperature, top_k, top_p, weight, weak, beta, gumbel, seed,
            return_logsoftmax, splits=None) -> LogitFusionOutput:
    E, B, V = logits.shape
    kernel, partial_kernel = _compiled()
    block = min(BLOCK_V, _next_pow2(V))
    split_block = min(SPLIT_BLOCK_V, _next_pow2(V))
    n_splits = (_splits(B, V, split_block, logits.device) if splits is None
                else max(1, min(int(splits), -(-V // split_block))))
    chunk = -(-V // n_splits)
    chunk = -(-chunk // split_block) * split_block   # whole tiles per split
    n_splits = -(-V // chunk)                   # no empty split
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    row = torch.empty((B, V), dtype=torch.float32, device=logits.device) if return_logsoftmax else logprobs
    bias_t = logits[0] if bias is None else (bias if bias.stride(-1) == 1 else bias.contiguous())
    noise = logits[0] if gumbel is None else gumbel.float().contiguous()
    row_args = (logits, logits.stride(0), logits.stride(1), choice, weight, bias_t, bias_t.stride(0),
                choice if weak is None else weak, weight if beta is None else beta, temperature)
    flags = {"HAS_BIAS": bias is not None, "HAS_WEAK": weak is not None, "NOISE": 1 if gumbel is not None else 2}
    part_f, part_i = logprobs, tokens           # unused unless split
    if n_splits > 1:
        part_f = torch.empty((B, n_splits, 5), dtype=torch.float32, device=logits.device)
        part_i = torch.empty((B, n_splits), dtype=torch.int64, device=logits.device)
        partial_kernel[(B, n_splits)](*row_args, noise, noise.stride(0), seed, part_f, part_i, V, chunk,
                                      **flags, BLOCK=split_block, num_warps=8, enable_fp_fusion=False)
    kernel[(B,)](
        *row_args, top_k, top_p, noise, noise.stride(0), seed, part_f, part_i, n_splits,
        tokens, logprobs, row, row.stride(0), V, **flags,
        WRITE_ROW=return_logsoftmax, BLOCK=block, PIVOTS=N_PIVOTS, PARTIALS=n_splits > 1,
        num_warps=8, enable_fp_fusion=False,
    )
    return LogitFusionOutput(tokens, logprobs, row if return_logsoftmax else None)


def _splits(B: int, V: int, block: int, device: torch.device) -> int:
    """How many programs share a row's first pass: enough that the B rows give every SM
    about four programs, none with less than 8 tiles of work. One program per row leaves
    most of a big GPU idle at small B, and one program alone keeps too few loads in flight
    to draw its SM's share of the memory bandwidth. 1 (no split) off CUDA."""
    if device.type != "cuda":
        return 1
    index = torch.cuda.current_device() if device.index is None else device.index
    want = -(-PROGRAMS_PER_SM * _sm_count(index) // B)
    return max(1, min(want, V // (8 * block)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _next_pow2(n: int) -> int:
    return max(16, 1 << max(n - 1, 1).bit_length())
