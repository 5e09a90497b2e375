"""Compile checks of csrc/ without a GPU: every .cu builds with nvcc for sm_80 and sm_90 with no
register spills or stack frame, the CUDA binding parses against torch's headers, and the kernel-image
probe runs.

Runtime correctness of the CUDA op is covered by tests/test_compact_kv.py on machines with a GPU.
"""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def find_nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (neither on PATH nor /usr/local/cuda/bin)")


def test_csrc_has_cuda_sources():
    assert CU_FILES, f"no .cu files in {CSRC}"


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles(cu, arch, tmp_path):
    cc = arch.split("_")[1]
    cmd = [NVCC, f"-gencode=arch=compute_{cc},code={arch}", "-O3", "-Xptxas", "-v", "-Werror", "all-warnings",
           "-c", str(cu), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)]
    assert spills and not any(spills), f"register spills for {arch}:\n{result.stderr}"
    # No local memory either: e.g. a kernel parameter array indexed at run time must be read from the
    # parameter bank, not copied to a stack frame.
    frames = [int(n) for n in re.findall(r"(\d+) bytes stack frame", result.stderr)]
    assert frames and not any(frames), f"stack frames for {arch}:\n{result.stderr}"


PROBE_MAIN = """
#include <cstdio>
#include "compact_kv.h"
int main() {
  const int err = pjd_compact_kv_cuda_kernel_image();
  std::printf("%d %s\\n", err, cudaGetErrorName(static_cast<cudaError_t>(err)));
  return 0;
}
"""


@needs_nvcc
def test_kernel_image_probe_runs(tmp_path):
    """The probe pjd.ops.compact_kv asks before choosing the CUDA op links and runs: it answers with a
    CUDA error where the kernel cannot run (here: no GPU, no driver), never crashes."""
    main = tmp_path / "probe.cpp"
    main.write_text(PROBE_MAIN)
    exe = tmp_path / "probe"
    cmd = [NVCC, "-gencode=arch=compute_90,code=sm_90", f"-I{CSRC}", str(CSRC / "compact_kv.cu"), str(main),
           "-o", str(exe)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    code, name = run.stdout.split()
    assert (int(code) == 0) == (name == "cudaSuccess"), run.stdout
    if shutil.which("nvidia-smi") is None:  # no GPU on this machine
        assert int(code) != 0, run.stdout


@pytest.mark.slow
@needs_nvcc
def test_cuda_binding_parses_against_torch_headers(tmp_path):
    """compact_kv_cuda.cpp is only built where torch has CUDA; check its syntax and types here.

    CPU wheels of torch ship c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h,
    so a stand-in for it goes first on the include path.
    """
    import torch.utils.cpp_extension as cpp

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             Path(NVCC).resolve().parents[1]]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()),
                        None)
    if cuda_include is None:
        pytest.skip(f"cuda_runtime.h not found under any of {homes}")
    includes = [tmp_path, *cpp.include_paths(), cuda_include, sysconfig.get_paths()["include"]]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", *[f"-I{p}" for p in includes],
           str(CSRC / "compact_kv_cuda.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"


def _setup_py_function(name):
    """A top-level function of setup.py, without running setup() (setup.py is a script)."""
    import ast

    source = (CSRC.parent / "setup.py").read_text()
    tree = ast.parse(source)
    module = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef)], type_ignores=[])
    scope = {"os": os, "sys": __import__("sys")}
    exec(compile(module, "setup.py", "exec"), scope)
    return scope[name]


def test_setup_finds_cuda_home_through_an_nvcc_wrapper(tmp_path, monkeypatch):
    """nvcc on PATH is a wrapper script in a folder without headers (torch's guess): setup.py asks
    the real nvcc (--dryrun prints its TOP folder) and takes the toolkit that has cuda_runtime.h."""
    toolkit = tmp_path / "toolkit-13.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin").mkdir()
    real = toolkit / "bin" / "nvcc"
    real.write_text(f'#!/bin/sh\necho "#$ _HERE_={toolkit}/bin"\necho "#$ TOP={toolkit}/bin/.."\n')
    wrapper_dir = tmp_path / "wrappers" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    for f in (real, wrapper):
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    find_cuda_home = _setup_py_function("find_cuda_home")
    assert os.path.realpath(find_cuda_home()) == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "wrappers"))  # no headers there: not taken
    assert os.path.realpath(find_cuda_home()) == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert find_cuda_home() == str(toolkit)
