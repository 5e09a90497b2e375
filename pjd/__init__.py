"""pjd: Parallel Jacobi Decoding for autoregressive image generators."""
from . import ops

__all__ = ["ops"]
__version__ = "0.1.0"
