"""pjd: Parallel Jacobi Decoding kernels for autoregressive image generators.

`pip install -e .` installs the package; `kernels/` is installed as `pjd.kernels` (never as a
top-level `kernels` module: transformers probes for Hugging Face's package of that name).

Native extensions (csrc/), both optional: pjd works without them through pure-torch fallbacks.
- pjd._C: the schema and CPU kernel of pjd::compact_kv. Built on every install (15-60 s).
- pjd._C_cuda: its CUDA kernel. Built only where torch has CUDA (torch.version.cuda) or with
  PJD_FORCE_CUDA=1; it cannot be linked against a CPU-only torch.
A failed extension build does not fail the install: it prints a warning (pip shows it with -v)
and pjd falls back to torch for that op (pjd.ops.compact_kv_backend(device) says which
implementation runs; backend="native" raises with the reason). So does a GPU the CUDA kernel
has no image for (see the gencode list below). PJD_NO_EXT=1 skips both builds.
"""
import os
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["pjd", "pjd.*"]) + ["pjd.kernels"]


def _has_cuda_headers(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def find_cuda_home():
    """A CUDA toolkit folder that has include/cuda_runtime.h, or None.

    torch guesses CUDA_HOME as the folder above the ``nvcc`` on PATH, which is wrong when that
    nvcc is a wrapper script (e.g. /usr/local/bin/nvcc exec-ing the real one): the CUDA extension
    would then be skipped. Asked in order: $CUDA_HOME / $CUDA_PATH, the toolkit nvcc itself reports
    (``nvcc --dryrun`` prints its TOP folder, through any wrapper), the folder above nvcc (symlinks
    resolved), /usr/local/cuda, then /usr/local/cuda-* newest first.
    """
    import glob
    import shutil
    import subprocess

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    candidates.append(os.path.normpath(line[len("#$ TOP="):].strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((home for home in candidates if _has_cuda_headers(home)), None)


def native_extensions():
    """(ext_modules, cmdclass) for the optional C++/CUDA extensions; empty without torch."""
    if os.environ.get("PJD_NO_EXT") == "1":
        return [], {}
    try:
        import torch
    except ImportError:  # e.g. an isolated build without torch: pure-torch fallbacks only
        print("pjd: torch not importable at build time; skipping the C++/CUDA extensions", file=sys.stderr)
        return [], {}
    want_cuda = bool(torch.version.cuda) or os.environ.get("PJD_FORCE_CUDA") == "1"
    cuda_home = find_cuda_home() if want_cuda else None
    if cuda_home:  # read by torch.utils.cpp_extension when it is imported (next line)
        os.environ["CUDA_HOME"] = cuda_home
        print(f"pjd: CUDA_HOME={cuda_home}", file=sys.stderr)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def warn_failed(name, err):
        bar = "!" * 78
        print(f"\n{bar}\npjd: building the optional extension {name} FAILED:\n  {err}\n"
              f"pjd still works: ops fall back to pure torch (pjd.ops.compact_kv_backend).\n{bar}\n",
              file=sys.stderr)

    class OptionalBuildExtension(BuildExtension):
        # Any build failure degrades to the fallback: per extension (a compile or link error), or
        # for all of them (BuildExtension's compiler checks run before any extension is built).
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001
                warn_failed(", ".join(ext.name for ext in self.extensions), err)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001
                warn_failed(ext.name, err)

    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for's pragmas run in torch's libgomp
    exts = [CppExtension("pjd._C", ["csrc/compact_kv_cpu.cpp"], extra_compile_args=flags,
                         extra_link_args=["-fopenmp"])]
    if want_cuda and cuda_home is None:
        warn_failed("pjd._C_cuda", "no CUDA toolkit with include/cuda_runtime.h found ($CUDA_HOME, $CUDA_PATH, "
                    "nvcc --dryrun, /usr/local/cuda*): set CUDA_HOME to the toolkit's folder")
    elif want_cuda:
        # SASS for 8.x (sm_80 runs on 8.0-8.9) and 9.0, PTX that the driver JITs for >= 9.0. This
        # list is the one source of truth for the GPUs the op runs on: pjd.ops.compact_kv asks the
        # built binary (cudaFuncGetAttributes) whether it has an image for the device, and runs the
        # torch fallback, with a warning, where it has none (e.g. T4 7.5, V100 7.0).
        arch = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"]
        try:  # CUDAExtension itself raises without a CUDA toolkit (CUDA_HOME)
            exts.append(CUDAExtension("pjd._C_cuda", ["csrc/compact_kv_cuda.cpp", "csrc/compact_kv.cu"],
                                      extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *arch]}))
        except Exception as err:  # noqa: BLE001
            warn_failed("pjd._C_cuda", err)
    for ext in exts:
        ext.optional = True  # setuptools then skips its missing output instead of failing the install
    return exts, {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = native_extensions()

setup(
    name="pjd",
    version="0.1.0",
    description="Parallel Jacobi Decoding for autoregressive image generators: Triton kernels + engine",
    packages=packages,
    package_dir={"pjd.kernels": "kernels"},
    package_data={"pjd.fashion": ["assets/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.56", "numpy", "pillow", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        # The benchmarks' charts (optional: their tables need none); the tests draw them too.
        "bench": ["matplotlib"],
        "test": ["pytest", "pytest-xdist", "ninja", "triton>=3.0", "matplotlib"],
    },
    entry_points={"console_scripts": ["pjd=pjd.cli:main"]},
)
