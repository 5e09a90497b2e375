"""Ahead-of-time compile gate for every Triton kernel pjd ships (works without a GPU).

Each kernel module listed in KERNEL_MODULES exposes ``aot_configs() -> list[KernelConfig]``: one entry
per (kernel, tile config, dtype, variant) that its wrapper can launch. ``compile_report`` compiles an
entry for one CUDA arch with ``triton.compile`` and reads registers and spills from the ptxas bundled
with triton (``-v`` on the PTX) and shared memory from the compiled metadata.

Must run in a process WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

# One line per shipped kernel module.
KERNEL_MODULES = (
    "pjd.kernels.draft_attention",
    "pjd.kernels.speculative_verify",
)

ARCHS = (80, 90)
# Usable shared memory per block: A100 (sm_80) 164 KB, H100 (sm_90) 228 KB (227 KB opt-in + 1 KB reserved).
SMEM_LIMIT = {80: 164 * 1024, 90: 228 * 1024}


@dataclass(frozen=True)
class KernelConfig:
    """One compilable instance of a shipped kernel.

    signature: every runtime argument of ``fn`` in order, name -> triton type ("*fp16", "i32", "fp32").
    constexprs: name -> value for the constexpr arguments.
    divisible: runtime arguments the JIT would see as multiples of 16 (pointers from the torch
        allocator, strides of contiguous tensors with D in {64, 128}); passed as divisibility hints so
        the AOT build vectorises like the JIT build.
    """
    kernel: str
    config: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple = field(default=())


def shipped_configs() -> list[KernelConfig]:
    configs = []
    for name in KERNEL_MODULES:
        configs.extend(importlib.import_module(name).aot_configs())
    return configs


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) of the single kernel in ``ptx``, from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True)
    text = log.stdout + log.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{text}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_report(cfg: KernelConfig, arch: int) -> dict:
    """Compile ``cfg`` for sm_<arch> and return its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compile needs a process without TRITON_INTERPRET")
    arg_names = cfg.fn.arg_names
    missing = set(arg_names) - set(cfg.signature) - set(cfg.constexprs)
    if missing:
        raise ValueError(f"{cfg.kernel}/{cfg.config}: signature lacks arguments {sorted(missing)}")
    signature = {name: cfg.signature.get(name, "constexpr") for name in arg_names}
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in cfg.divisible}
    src = ASTSource(cfg.fn, signature, constexprs=cfg.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    regs, spill = _ptxas_usage(compiled.asm["ptx"], arch)
    return {"kernel": cfg.kernel, "config": cfg.config, "arch": f"sm_{arch}", "regs": regs,
            "spill_bytes": spill, "smem_bytes": compiled.metadata.shared}
