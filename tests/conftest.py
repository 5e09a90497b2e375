"""Test-wide settings: one intra-op thread per test process.

pytest runs with -n 2 on 2-core machines; two workers each spinning two OpenMP threads make tiny
matmuls over 100x slower than one thread each.
"""
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
