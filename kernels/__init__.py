"""Triton kernels of pjd, installed as ``pjd.kernels``. Import them through ``pjd.ops``."""
