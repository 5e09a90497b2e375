"""Per-image counter-based randomness: every draw is a pure function of (seed, image index, counter).

An image's tokens then depend only on its seed, its image index and its own trajectory, never on
the batch it shares, its position in that batch, the number of ranks or the device: the same image
decoded alone, in a batch of 64 or on rank 3 of 8 sees the same random numbers.

Derivation (SplitMix64, Steele et al. 2014; all arithmetic modulo 2**64):

    mix(z)          = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ z >> 31
    output(s, n)    = mix(s + (n + 1) * 0x9E3779B97F4A7C15)      n-th output of SplitMix64 seeded with s
    key(seed, i)    = output(seed, i)                             image i's stream
    draw(seed, i, c) = output(key(seed, i), c)                    the c-th draw of image i

Each 64-bit draw becomes either a uniform ``(draw >> 40) * 2**-24`` (24 bits: an exact float32 in
[0, 1), as ``torch.rand`` gives) or an image token ``lo + (draw >> 1) % (hi - lo)`` (bias below
``(hi - lo) / 2**63``). The ops are int64 torch ops (wrapping multiply, masked shifts), so CPU and
CUDA give bit-identical numbers, and a whole step's draws for the whole batch cost a constant number
of tensor ops with no host synchronisation and no per-image loop.

How the engine numbers the counter ``c`` of an image: ``c = (step * L + lane) * (3W + 1) + d``, with
``L`` lanes of ``W`` drafts; ``d < W`` acceptance uniforms, ``W <= d < 2W + 1`` sampling uniforms,
``2W + 1 <= d`` uniform draft tokens. Step 0 holds the initial drafts; decoding steps count from 1.
Coupled draws (``coupled_draws=True``, SCD) are keyed by position instead of step: the exponential
variate of image token ``v`` (``v < Vi = hi - lo``) at image slot ``s`` is ``-log(1 - u)`` of the
draw with counter ``c = -1 - (s * Vi + v)`` (negative counters: disjoint from the step counters), so a
slot sees the same noise at every step. Every image of a ``pjd.generate`` call starts at step 0
together and keeps its own lane frontiers, so the draws an image consumes at its step t do not
depend on the other images.
"""
from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
UNIFORM_BITS = 24


def _i64(value: int) -> int:
    """A 64-bit pattern as the signed Python int torch's int64 holds."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: mask the sign copies away)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on an int64 tensor (wrapping arithmetic), elementwise."""
    x = (x ^ _shr(x, 30)) * _i64(MIX1)
    x = (x ^ _shr(x, 27)) * _i64(MIX2)
    return x ^ _shr(x, 31)


def mix64_int(z: int) -> int:
    """Pure-Python SplitMix64 finaliser on a 64-bit unsigned int (the reference for ``mix64``)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def check_seed(seed) -> int:
    """``seed`` must be a non-negative int below 2**64 (Python int, numpy int or 0-d int tensor).
    Returns it as a Python int. A wrong kind is a TypeError, a wrong value a ValueError (pjd._checks)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.is_complex() or seed.dtype == torch.bool:
            raise TypeError(f"seed: expected a non-negative integer, got a tensor of {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"seed: expected one integer, got a tensor of shape {tuple(seed.shape)}")
        seed = int(seed)
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed: expected a non-negative integer, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed}")
    return seed


def image_keys(seed: int, image_index: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: ``key(seed, i)`` for each image index (int64 ``[B]``, any device)."""
    return mix64(image_index.long() * _i64(GAMMA) + _i64(seed + GAMMA))


def draws(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """int64: ``draw(seed, i, c)`` for keys broadcast against counters (both int64, same device)."""
    return mix64(keys + (counters + 1) * _i64(GAMMA))


def to_uniform(z: torch.Tensor) -> torch.Tensor:
    """64-bit draws -> float32 uniforms in [0, 1), exact multiples of 2**-24."""
    return _shr(z, 64 - UNIFORM_BITS).float() * (2.0 ** -UNIFORM_BITS)


def to_tokens(z: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """64-bit draws -> int64 tokens uniform over ``[lo, hi)``."""
    return _shr(z, 1) % (hi - lo) + lo


class DrawStream:
    """The engine's per-step draws for a batch of images (see the module docstring for the layout).

    Args:
        seed: non-negative int (see ``check_seed``).
        image_index: int64 ``[B]`` global image indices, on the decoding device.
        lanes, window: ``L`` and ``W`` of the decode plan.
        token_range: ``(lo, hi)`` image token ids for uniform draft tokens.
    """

    def __init__(self, seed: int, image_index: torch.Tensor, lanes: int, window: int, token_range: tuple[int, int]):
        self.W, self.lo, self.hi = window, *token_range
        per_lane = 3 * window + 1
        self.per_step = lanes * per_lane
        counters = torch.arange(self.per_step, device=image_index.device).view(lanes, per_lane)
        # keys + (c + 1) * GAMMA for step 0; step t adds t * per_step * GAMMA (one add per step).
        self.keys = image_keys(seed, image_index)
        self.base = self.keys[:, None, None] + (counters + 1) * _i64(GAMMA)

    def reseed(self, seed: int, image_index: torch.Tensor) -> None:
        """Make this the stream of ``(seed, image_index)`` (same B), in place: a compiled step keeps
        reading the same tensors (pjd.compiler)."""
        fresh = DrawStream(seed, image_index, self.base.shape[1], self.W, (self.lo, self.hi))
        self.keys.copy_(fresh.keys)
        self.base.copy_(fresh.base)

    def step(self, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draws of step ``t`` (an int, or an int64 0-d tensor on the stream's device: the fixed-shape
        step's counter, never read back): u_accept float32 ``[B, L, W]``, u_sample float32
        ``[B, L, W + 1]``, tokens int64 ``[B, L, W]``."""
        W = self.W
        if isinstance(t, torch.Tensor):  # wrapping int64 multiply: the same offset modulo 2**64
            z = mix64(self.base + t * _i64(self.per_step * GAMMA))
        else:
            z = mix64(self.base + _i64(t * self.per_step * GAMMA))
        u = to_uniform(z[..., :2 * W + 1])
        return u[..., :W], u[..., W:], to_tokens(z[..., 2 * W + 1:], self.lo, self.hi)

    def sample_uniform(self, t: int | torch.Tensor) -> torch.Tensor:
        """Step ``t``'s sampling uniform of slot ``n + 0`` of every lane, the same number ``step(t)[1][..., 0]``
        holds, computed alone (the one-draw steps of ar). ``t`` an int: float32 ``[B, L]``; ``t`` an int64
        ``[T]`` tensor of steps (on the stream's device): float32 ``[T, B, L]``, every step at once."""
        base = self.base[..., self.W]
        if isinstance(t, torch.Tensor):  # wrapping int64 multiply: the same offsets modulo 2**64
            return to_uniform(mix64(base + t.long()[:, None, None] * _i64(self.per_step * GAMMA)))
        return to_uniform(mix64(base + _i64(t * self.per_step * GAMMA)))

    def coupled(self, slots: torch.Tensor, num_slots: int) -> torch.Tensor:
        """Coupled draws (module docstring): float32 ``[B, A, num_slots, Vi]`` exponential variates
        (rate 1) of image slots ``slots[b, a] + k``, ``k < num_slots``, for every image token.
        ``slots``: int ``[B, A]`` image-slot indices. The same slot gives the same noise at every step,
        whatever lane or batch holds it."""
        vocab = self.hi - self.lo
        s = slots.long()[..., None, None] + torch.arange(num_slots, device=slots.device)[:, None]
        index = s * vocab + torch.arange(vocab, device=slots.device)  # c = -1 - index: c + 1 = -index
        u = to_uniform(mix64(self.keys[:, None, None, None] - index * _i64(GAMMA)))
        return -torch.log1p(-u)
