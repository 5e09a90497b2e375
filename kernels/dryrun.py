"""Triton's real JIT path without a GPU: every kernel launch pjd makes, compiled for sm_80 / sm_90.

The interpreter (``TRITON_INTERPRET=1``) runs programs one by one in numpy and never does what the
JIT does with the actual arguments on a GPU: an int argument equal to 1 becomes a constexpr,
ints divisible by 16 and aligned pointers get hints, and each distinct specialisation is its own
compile. A dry run does exactly that, on a CPU::

    with dry_run(90) as run:                       # compute capability 9.0 (H100 / H200)
        pjd.generate(model, ..., backend="triton")  # CPU tensors
    run.check()                                    # every variant compiled, no spills, smem in budget

Inside the ``with`` block:

- Triton's active driver is one that reports a CUDA GPU of the given compute capability (no CUDA
  needed), so ``JITFunction.run`` binds, specialises and compiles for that target;
- every launch is turned into a warm-up (``warmup=True``): compiled, never launched, its grid checked
  against CUDA's limits;
- pjd's Triton wrappers return what their pure-torch references compute on the same inputs, so a
  caller -- ``pjd.generate`` included -- runs to the end on real values and every launch gets the
  arguments a GPU run would give it (outputs are never computed by a kernel: correctness stays with
  the interpreter tests);
- ``pjd.ops`` accept CPU tensors with ``backend="triton"``.

Must run in a process WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
Registers and local memory (where spilled registers go) are read from the cubin Triton built -- by the
``cuobjdump`` bundled with Triton, so no second ``ptxas`` run, and a variant loaded from Triton's cache
is checked like a fresh one; shared memory comes from the compiled metadata.
"""
from __future__ import annotations

import contextlib
import importlib
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

ARCHS = (80, 90)
# Usable shared memory per block: A100 (sm_80) 164 KB, H100 (sm_90) 228 KB (227 KB opt-in + 1 KB reserved).
SMEM_LIMIT = {80: 164 * 1024, 90: 228 * 1024}
MAX_REGISTERS = 255
MAX_GRID = (2**31 - 1, 65_535, 65_535)

# One line per shipped kernel module: (module, its Triton wrapper, the reference it must equal).
WRAPPERS = (
    ("pjd.kernels.draft_attention", "draft_attention_triton", "pjd.ops.draft_attention", "draft_attention_reference"),
    ("pjd.kernels.speculative_verify", "speculative_verify_triton",
     "pjd.ops.speculative_verify", "speculative_verify_reference"),
)


@dataclass
class Variant:
    """One compiled kernel variant: what a GPU would have compiled for one specialisation."""
    kernel: str
    arch: int
    signature: dict  # argument -> Triton type, "constexpr" for specialised ones (the JIT's own view)
    constexprs: dict  # specialised values (constexpr parameters and ints the JIT turned into constants)
    num_warps: int
    num_stages: int
    smem_bytes: int
    regs: int = 0
    spill_bytes: int = 0  # local memory per thread (cubin_usage): non-zero when registers spill
    launches: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.spill_bytes:
            out.append(f"spills: {self.spill_bytes} bytes of local memory")
        if not 0 < self.regs <= MAX_REGISTERS:
            out.append(f"{self.regs} registers")
        if self.smem_bytes > SMEM_LIMIT[self.arch]:
            out.append(f"shared memory {self.smem_bytes} > {SMEM_LIMIT[self.arch]}")
        return out

    def row(self) -> dict:
        data = next((t for t in self.signature.values() if t.startswith("*")), "")  # first pointer's type
        return {"kernel": self.kernel, "arch": f"sm_{self.arch}", "data": data, "num_warps": self.num_warps,
                "num_stages": self.num_stages, "regs": self.regs, "spill_bytes": self.spill_bytes,
                "smem_bytes": self.smem_bytes, "launches": self.launches,
                "constexprs": {k: str(v) for k, v in self.constexprs.items()}}


@dataclass
class DryRun:
    """What one ``dry_run`` block compiled: ``variants`` keyed by the JIT's own cache key."""
    arch: int
    variants: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise if a variant spills, uses more than 255 registers or too much shared memory."""
        bad = [f"{v.kernel} {v.constexprs}: {', '.join(v.problems())}" for v in self.variants.values() if v.problems()]
        if bad:
            raise AssertionError(f"sm_{self.arch}: " + "; ".join(bad))

    def count(self, kernel: str | None = None) -> int:
        return sum(kernel is None or v.kernel == kernel for v in self.variants.values())


class _TargetDriver:
    """A Triton driver that reports one CUDA GPU of compute capability ``arch`` and launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = 1000 + arch  # Triton keys its per-device kernel caches by this id: one per arch

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local memory bytes per thread) of the one kernel in ``cubin``.

    Read by ``cuobjdump --dump-resource-usage`` (bundled with Triton 3.6 and 3.9) from the binary
    Triton's own ``ptxas`` produced, with the options Triton compiled it with. Local memory is the
    stack frame plus any ``.local`` data: a register spill stores into it, so a variant that spills
    has non-zero local memory (``ptxas -v``'s "bytes spill stores" imply a frame). It is what Triton
    reports as ``n_spills`` once the binary is loaded on a GPU (``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES``;
    tests/test_gpu.py checks that figure on the device).
    """
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    usage = re.findall(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if len(usage) != 1:
        raise RuntimeError(f"expected one kernel's resource usage from cuobjdump, got:\n{text}")
    regs, stack, local = map(int, usage[0])
    return regs, stack + local


def _check_grid(kernel: str, grid) -> None:
    grid = tuple(grid) + (1,) * (3 - len(grid))
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if not 0 <= size <= limit:
            raise ValueError(f"{kernel}: grid axis {axis} = {size} is outside CUDA's [0, {limit}] (grid {grid})")


def _with_reference(wrapper, reference):
    def run(*args, **kwargs):
        wrapper(*args, **kwargs)  # every launch compiles (and is checked); no kernel output exists
        return reference(*args)
    return run


@contextlib.contextmanager
def dry_run(arch: int):
    """Compile every Triton launch in the block for ``sm_<arch>``; see the module docstring."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from pjd.ops import _backend

    if _backend.triton_interpreting():
        raise RuntimeError("a dry run compiles for a GPU: run it in a process without TRITON_INTERPRET")
    if arch not in SMEM_LIMIT:
        raise ValueError(f"arch must be one of {sorted(SMEM_LIMIT)}, got {arch}")
    record = DryRun(arch)
    original_run = JITFunction.run

    def warmup_run(fn, *args, grid, warmup, **kwargs):
        name = fn.__name__
        _check_grid(name, grid(args) if callable(grid) else grid)
        kernel = original_run(fn, *args, grid=grid, warmup=True, **kwargs)
        variant = record.variants.get(kernel.hash)
        if variant is None:
            meta = kernel.metadata
            signature = dict(kernel.src.signature)
            variant = Variant(
                kernel=name, arch=arch, signature=signature,
                constexprs={fn.arg_names[path[0]]: value for path, value in kernel.src.constants.items()},
                num_warps=meta.num_warps, num_stages=meta.num_stages,
                smem_bytes=meta.shared)
            variant.regs, variant.spill_bytes = cubin_usage(kernel.asm["cubin"])
            record.variants[kernel.hash] = variant
        variant.launches += 1
        return kernel

    patched = []
    for module_name, wrapper_name, ref_module, ref_name in WRAPPERS:
        module = importlib.import_module(module_name)
        reference = getattr(importlib.import_module(ref_module), ref_name)
        patched.append((module, wrapper_name, getattr(module, wrapper_name)))
        setattr(module, wrapper_name, _with_reference(getattr(module, wrapper_name), reference))
    saved_driver = driver._active
    driver.set_active(_TargetDriver(arch))
    JITFunction.run = warmup_run
    _backend.DRY_RUN_ARCH = arch
    try:
        yield record
    finally:
        _backend.DRY_RUN_ARCH = None
        JITFunction.run = original_run
        driver._active = saved_driver
        for module, wrapper_name, wrapper in patched:
            setattr(module, wrapper_name, wrapper)
