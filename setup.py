"""pjd: Parallel Jacobi Decoding kernels for autoregressive image generators.

`pip install -e .` installs the package; `kernels/` is installed as `pjd.kernels` (never as a
top-level `kernels` module: transformers probes for Hugging Face's package of that name).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["pjd", "pjd.*"]) + ["pjd.kernels"]

setup(
    name="pjd",
    version="0.1.0",
    description="Parallel Jacobi Decoding for autoregressive image generators: Triton kernels + engine",
    packages=packages,
    package_dir={"pjd.kernels": "kernels"},
    package_data={"pjd.models": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.56", "numpy", "pillow", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        # The default model's training data and held-out crops come from photos in the scikit-image wheel.
        "data": ["scikit-image"],
        "test": ["pytest", "pytest-xdist", "ninja", "triton>=3.0", "scikit-image"],
    },
    entry_points={"console_scripts": ["pjd=pjd.cli:main"]},
)
