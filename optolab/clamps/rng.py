"""The randomness channel: random numbers for clamp ops that are the same on every path.

Rules:
- A call's key is made outside any trace or compiled graph from ``(seeds.init, seeds.data,
  step, phase)`` (:func:`call_key`): an int64 tensor ``[2]`` of two 32-bit words. An ensemble
  stacks its members' keys (``[member, 2]``), so under ``vmap`` each member gets its own run's.
- An op draws with :func:`normal` (``ctx.normal(shape, stream)`` or ``ctx.normal_like(x,
  stream)``; ``stream`` is the clamp's index in its protocol, ``c.index``), on the key's device
  (the batch's) or the tensor's it fills: the numbers are a counter-based function of (key, stream, element
  index) — integer hashing, then Box–Muller — built from plain tensor ops. No generator state
  exists, so the same call gives the same numbers eagerly, through nnsight, compiled (the key is
  a graph input: no recompiles) and vmapped, and a resumed run draws exactly what the
  uninterrupted one drew. Compiled results differ only by float rounding of ``log``/``cos``.
- Integer arithmetic stays below 2**63 (32-bit words, 16-bit limbs for products), so it never
  overflows int64 on any backend.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


def call_key(init_seed: int, data_seed: int, step: int, training: bool, device=None) -> Tensor:
    """The key of one forward call of one run (see the module rules), on ``device``."""
    digest = hashlib.blake2b(f"optolab-clamp-rng/{init_seed}/{data_seed}/{step}/{int(training)}".encode(),
                             digest_size=8).digest()
    return torch.tensor([int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")],
                        dtype=torch.int64, device=device)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for ``0 <= x, c < 2**32`` without leaving int64's positive range."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniform(key: Tensor, stream: int, counter: Tensor) -> Tensor:
    """Floats in (0, 1), 24 random bits each."""
    h = _hash32(counter ^ key[..., 0, None])
    h = _hash32(h ^ ((key[..., 1, None] + stream * 0x9E3779B9) & MASK32))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def normal(key: Tensor, stream: int, shape: tuple[int, ...], device=None) -> Tensor:
    """Standard normal numbers of ``shape`` for ``(key, stream)`` (see the module rules), on
    ``device`` (default: the key's)."""
    n = math.prod(shape)
    counter = torch.arange(2 * n, dtype=torch.int64, device=key.device if device is None else device)
    u = _uniform(key, stream, counter)
    u1, u2 = u[..., :n], u[..., n:]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
    return z.reshape(*key.shape[:-1], *shape)
