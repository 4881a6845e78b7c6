"""The counter stream: random numbers as a pure function of integers, the same on every device.

Rules:
- A draw is a hash of ``(seed, stream, step, index)``: no generator state, so the numbers
  do not depend on the device, on the order of calls, or on how many members are drawn at once.
  ``torch.Generator`` cannot give that: CUDA's Philox stream differs from the CPU's MT19937, so a
  task drawing from it on a GPU would see other data than on the CPU. This stream is therefore a
  *separate* stream from a task's ``torch`` one (``data_stream: counter``, opt-in; the default
  ``torch`` stream is unchanged), and a counter run gets the same batches on a CPU and a GPU.
- The hash is Chris Wellons' ``lowbias32`` (``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
  x *= 0x846ca68b; x ^= x >> 16``, all mod 2^32), a bijection of 32-bit words with low bias.
  Words live in int64 tensors in ``[0, 2^32)``; each 32-bit product is split into 16-bit halves so
  that no intermediate leaves ``[0, 2^49)``: no signed overflow (undefined in C++, so kernels
  could disagree), only ops every device computes exactly (integer ``*``, ``^``, ``>>``, ``&``).
- A key chains the hash over its words: ``h = mix(C ^ seed_lo)``, ``h = mix(h ^ seed_hi)``, then
  ``h = mix(h ^ w_lo)``, ``h = mix(h ^ w_hi)`` for every further word (seeds and words are taken
  mod 2^64, Python's two's complement for negatives); keys are hashed on the host in numpy's
  uint64, exact because every product stays below 2^64, then moved. Element ``i`` of a draw
  under key ``h`` is ``mix(mix(h ^ i) ^ C)``, ``i`` the flat index (below 2^32). A task draws a
  batch as one draw (:func:`draws`): its parts take consecutive indices in the order the task
  lists them.
- From 32-bit words: a uniform is ``((w >> 9) + ½) · 2^-23`` (23 bits, so float32 holds it
  exactly, in (0, 1)); an integer below ``n`` is ``(w · n) >> 32`` (exact; bias at most
  ``n / 2^32``); a normal is Box–Muller of two words taken as ``(w + ½) · 2^-32`` in float64,
  then float32. An ordering (a random permutation, ``k`` distinct items) sorts the unique
  integers ``w · n + j``: ties cannot occur, so every device sorts them alike.
- ``tests/test_counter.py`` pins the hash to a pure-Python transcription of this definition and
  checks the moments of what it draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
C = 0x9E3779B9  # the golden ratio's 32 bits: keeps a zero key away from the hash's fixed point 0
_A, _B = 0x7FEB352D, 0x846CA68B
_A64, _B64, _M32U = np.uint64(_A), np.uint64(_B), np.uint64(M32)


def _mul(x: Tensor, c: int) -> Tensor:
    """``x · c mod 2^32`` for words ``x`` and a 32-bit constant, never above 2^49 on the way."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x & 0xFFFF) * hi) & 0xFFFF) * 65536) & M32


def mix(x: Tensor) -> Tensor:
    """``lowbias32`` of every word of ``x`` (int64 in ``[0, 2^32)``)."""
    x = x ^ (x >> 16)
    x = _mul(x, _A)
    x = x ^ (x >> 15)
    x = _mul(x, _B)
    return x ^ (x >> 16)


def _mix_np(x: np.ndarray) -> np.ndarray:
    """:func:`mix` on uint64 words below 2^32 (products stay below 2^64: numpy's unsigned
    arithmetic is exact there)."""
    s16, s15 = np.uint64(16), np.uint64(15)
    x = x ^ (x >> s16)
    x = (x * _A64) & _M32U
    x = x ^ (x >> s15)
    x = (x * _B64) & _M32U
    return x ^ (x >> s16)


def keys(seeds: Sequence[int], *words: int, device: torch.device | str = "cpu") -> Tensor:
    """One key per seed (``[S]``, int64 words on ``device``): the hash chained over the seed and
    ``words``. Computed on the host (a few vector ops for any number of seeds), then moved."""
    v = np.array([int(s) & M64 for s in seeds], dtype=np.uint64)
    h = _mix_np((v & np.uint64(M32)) ^ np.uint64(C))
    h = _mix_np(h ^ (v >> np.uint64(32)))
    for w in words:
        w = int(w) & M64
        h = _mix_np(h ^ np.uint64(w & M32))
        h = _mix_np(h ^ np.uint64(w >> 32))
    return torch.from_numpy(h.astype(np.int64)).to(device)


def sub(key: Tensor, purpose: int) -> Tensor:
    """The key of one kind of draw within a batch (``purpose`` a small integer)."""
    return mix(key ^ (purpose & M32))


def bits(key: Tensor, shape: tuple[int, ...]) -> Tensor:
    """32-bit words ``[*key.shape, *shape]``: element ``i`` (flat index) of the draw under each key."""
    n = 1
    for d in shape:
        n *= d
    if n > M32:
        raise ValueError(f"a counter draw holds at most 2^32 numbers per key (asked for {n})")
    i = torch.arange(n, dtype=torch.int64, device=key.device)
    return mix(mix(key[..., None] ^ i) ^ C).reshape(*key.shape, *shape)


def draws(key: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    """Several draws of one batch as one: the words of :func:`bits` over the total size, split in
    the order given (the first shape takes indices ``0..``, the next the following ones, …), each
    ``[*key.shape, *shape]``. One hash pass for the whole batch keeps a draw a few dozen ops."""
    sizes = [math.prod(s) for s in shapes]
    flat = bits(key, (sum(sizes),))
    return [part.reshape(*key.shape, *shape) for part, shape in zip(flat.split(sizes, dim=-1), shapes)]


def uniform(w: Tensor) -> Tensor:
    """Float32 uniforms in (0, 1) from words: the top 23 bits, centred in their cell (exact)."""
    return ((w >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def below(w: Tensor, n: int | Tensor) -> Tensor:
    """Integers in ``[0, n)`` from words (multiply-shift; exact in int64 for ``n < 2^31``)."""
    return (w * n) >> 32


def normal(w1: Tensor, w2: Tensor) -> Tensor:
    """Standard normals (float32) from two words each, by Box–Muller in float64."""
    u1 = (w1.to(torch.float64) + 0.5) * (2.0 ** -32)
    u2 = (w2.to(torch.float64) + 0.5) * (2.0 ** -32)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)).to(torch.float32)


def order(w: Tensor) -> Tensor:
    """Unique sort keys along the last axis (``w · n + j``): ``order(w).argsort(-1)`` is a random
    permutation and ``order(w).topk(k).indices`` ``k`` distinct positions, alike on every device."""
    n = w.shape[-1]
    return w * n + torch.arange(n, dtype=torch.int64, device=w.device)


def seed_list(seeds: Sequence[int] | int) -> list[int]:
    return [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
