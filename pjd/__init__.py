"""pjd: Parallel Jacobi Decoding for autoregressive image generators."""
from . import ops
from .engine import GenerationResult, generate
from .plan import METHODS

__all__ = ["ops", "generate", "GenerationResult", "METHODS"]
__version__ = "0.1.0"
