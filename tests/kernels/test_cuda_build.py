"""The Triton kernels compile for NVIDIA GPUs (sm_90: H100/H200, sm_80: A100) with what
their speed depends on: no register spills for the 16-bit configurations the benchmarks
run, tensor-core instructions in latent fusion, vectorised loads. Runs on CPU: Triton's
NVIDIA backend ships ptxas (``kernels.cuda_build``). Whether the kernels compute the right
thing is for test_logit_fusion.py and test_latent_fusion.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import cuda_build


def _ptxas_missing() -> str | None:
    try:
        path = cuda_build.ptxas_path(90)
    except Exception as exc:  # no triton, or a triton without its NVIDIA backend
        return f"{type(exc).__name__}: {exc}"
    return None if os.access(path, os.X_OK) else f"{path} is not executable"


pytestmark = pytest.mark.skipif(_ptxas_missing() is not None, reason=f"no ptxas: {_ptxas_missing()}")


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float16, 128),
                                             (torch.bfloat16, 256)])
def test_latent_fusion_builds_on_tensor_cores_without_spills(arch, dtype, head_dim):
    (call,) = cuda_build.latent_fusion_launch(dtype, head_dim, arch)
    kernel, grid, args, kwargs = call
    assert grid == (4096 // kwargs["BLOCK_M"], 8)
    r = cuda_build.build(kernel, args, kwargs, arch)
    assert r["mma"] == ("wgmma" if arch >= 90 else "mma"), r
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"registers spill: {r}"
    assert r["vector_loads"] == 16, r   # 8 bf16/fp16 values per load and thread
    assert r["shared"] <= (227 if arch >= 90 else 163) * 1024, r   # fits the SM's shared memory


@pytest.mark.parametrize("head_dim", [64, 128])
def test_latent_fusion_fp32_builds_without_spills(head_dim):
    (call,) = cuda_build.latent_fusion_launch(torch.float32, head_dim, 90)
    kernel, _, args, kwargs = call
    assert kwargs["IEEE"] is True   # fp32 products, no TF32 rounding: no tensor cores
    r = cuda_build.build(kernel, args, kwargs, 90)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"registers spill: {r}"


@pytest.mark.parametrize("arch, contrastive", [(90, False), (90, True), (80, False)])
def test_logit_fusion_split_rows_build_without_spills(arch, contrastive):
    calls = cuda_build.logit_fusion_launches(torch.bfloat16, B=64, contrastive=contrastive, splits=8)
    by_name = {kernel.fn.__name__: (kernel, grid, args, kwargs) for kernel, grid, args, kwargs in calls}
    assert by_name["_logit_partial_kernel"][1] == (64, 8) and by_name["_logit_fusion_kernel"][1] == (64,)
    assert by_name["_logit_fusion_kernel"][3]["PARTIALS"] is True
    for name, (kernel, _, args, kwargs) in by_name.items():
        r = cuda_build.build(kernel, args, kwargs, arch)
        # The split pass streams the rows: no spills, 8 bf16 values per load and thread. The
        # row kernel's threshold search holds [tile, pivots] tensors, and ptxas trades a
        # few bytes of spills for occupancy there differently from one Triton release to
        # the next (0-36 bytes seen with Triton 3.6 and 3.9): a few dozen bytes, not more.
        limit = 0 if name == "_logit_partial_kernel" else 64
        assert r["spill_stores"] <= limit and r["spill_loads"] <= limit, f"{name} spills registers: {r}"
        assert r["vector_loads"] == (16 if name == "_logit_partial_kernel" else 8), f"{name}: {r}"


def test_logit_fusion_one_program_per_row_builds_without_spills():
    (call,) = cuda_build.logit_fusion_launches(torch.bfloat16, B=256, splits=1)
    kernel, grid, args, kwargs = call
    assert grid == (256,) and kwargs["PARTIALS"] is False
    r = cuda_build.build(kernel, args, kwargs, 90)
    assert r["spill_stores"] <= 64 and r["spill_loads"] <= 64, r   # as the row kernel above
