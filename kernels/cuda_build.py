"""Compile the Triton kernels for NVIDIA GPUs on a machine without one, and read what
the compiler made of them: registers, spills, shared memory, tensor-core instructions.

Triton's NVIDIA backend ships its own ``ptxas``, so the whole pipeline (Triton IR, PTX,
machine code) runs on any CPU. A launch is captured with meta tensors (shapes, dtypes and
strides, no memory) and specialised exactly as the JIT would specialise it on a GPU
(integers equal to 1 become constants, 16-divisible pointers and integers are marked),
then compiled for a chosen compute capability (90 = H100/H200, 80 = A100).

This says whether a kernel builds for a GPU and whether its tiles fit in registers
(a spill goes to local memory: slow), nothing about its speed. The interpreter tests
(``TRITON_INTERPRET=1``) say whether it computes the right thing.

    python -m kernels.cuda_build            # the table for every benchmarked configuration
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from typing import Any, Iterator
from unittest import mock

import torch


class Launch:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` appends the call
    to ``calls``."""

    def __init__(self, kernel: Any, calls: list) -> None:
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid: Any):
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((self.kernel, grid, args, kwargs))
        return record


@contextlib.contextmanager
def captured(module: Any, builder: str) -> Iterator[list]:
    """Within the block, the jitted kernels that ``module.<builder>()`` returns (alone or in
    a tuple) are recorded instead of launched; yields the ``(kernel, grid, args, kwargs)``
    calls in launch order."""
    from triton.runtime.jit import JITFunction

    calls: list = []
    built = getattr(module, builder)()

    def swap(x: Any) -> Any:
        return Launch(x, calls) if isinstance(x, JITFunction) else x

    stand_in = tuple(map(swap, built)) if isinstance(built, tuple) else swap(built)
    with mock.patch.object(module, builder, lambda: stand_in):
        yield calls


def ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def build(kernel: Any, args: tuple, kwargs: dict, arch: int = 90) -> dict:
    """Compile one captured launch for ``sm_<arch>`` and report what the compiler made:
    ``{"regs", "spill_stores", "spill_loads", "shared", "mma", "vector_loads"}`` where
    ``mma`` is ``"wgmma"`` (Hopper warp-group MMA), ``"mma"`` (Ampere-style) or None and
    ``vector_loads`` the widest global load per thread in bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}",
                               f.name, "-o", os.devnull], capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    widths = [int(n) * int(bits) // 8 for n, bits in re.findall(r"ld\.global(?:\.\w+)*?\.v(\d)\.[bfu](\d+)", ptx)]
    return {"regs": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "shared": compiled.metadata.shared,
            "mma": "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else None,
            "vector_loads": max(widths, default=0)}


def latent_fusion_launch(dtype: torch.dtype, head_dim: int, arch: int = 90, peers: int = 3,
                         T: int = 4096) -> list:
    """The launch ``kernels.latent_fusion`` makes on an ``sm_<arch>`` GPU for
    ``q [1, 8, T, D]`` and ``peers`` peers (its tiles depend on the GPU)."""
    import kernels.latent_fusion as lat

    q = torch.empty(1, 8, T, head_dim, dtype=dtype, device="meta")
    kv = torch.empty(1, peers, 8, T, head_dim, dtype=dtype, device="meta")
    with captured(lat, "_build_kernel") as calls, \
            mock.patch.object(lat, "_capability", lambda _: divmod(arch, 10)):
        lat._launch(q, kv, kv, head_dim ** -0.5)
    return calls


def logit_fusion_launches(dtype: torch.dtype, B: int = 64, V: int = 131072, contrastive: bool = False,
                          splits: int | None = 8) -> list:
    """The launches ``kernels.logit_fusion`` makes for B rows of V logits (E = 2): the
    split first pass and the merging kernel with ``splits`` > 1, the one kernel with 1."""
    import kernels.logit_fusion as lf

    meta = {"device": "meta"}
    logits = torch.empty(2, B, V, dtype=dtype, **meta)
    rows = torch.empty(B, **meta)
    choice = torch.empty(B, dtype=torch.int64, **meta)
    with captured(lf, "_compiled") as calls:
        lf._launch(logits, choice, torch.empty(B, V, dtype=dtype, **meta), rows, choice, rows, rows,
                   choice if contrastive else None, rows if contrastive else None, None,
                   torch.empty(1, dtype=torch.int64, **meta), False, splits)
    return calls


def configurations(arch: int) -> Iterator[tuple[str, list]]:
    """Every configuration the GPU benchmarks run on an ``sm_<arch>`` GPU, by name, with
    its captured launches."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for d in (64, 128, 256):
            yield f"latent_fusion {name} D={d}", latent_fusion_launch(dtype, d, arch)
        for contrastive in (False, True):
            for splits in (1, 8):
                yield (f"logit_fusion {name}{' contrastive' if contrastive else ''} splits={splits}",
                       logit_fusion_launches(dtype, contrastive=contrastive, splits=splits))


def main() -> None:
    print("| configuration | kernel | arch | registers | spill stores / loads (bytes) | shared (bytes) "
          "| tensor cores | widest load (bytes) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch in (90, 80):
        for name, calls in configurations(arch):
            for kernel, _, args, kwargs in calls:
                r = build(kernel, args, kwargs, arch)
                print(f"| {name} | {kernel.fn.__name__} | sm_{arch} | {r['regs']} | {r['spill_stores']} / "
                      f"{r['spill_loads']} | {r['shared']} | {r['mma'] or '-'} | {r['vector_loads']} |", flush=True)


if __name__ == "__main__":
    main()
