"""Decode caches, one small class per kind (after transformers' per-layer cache classes).

- `AppendCache`: grows by exactly the new tokens (full attention's k, v; MLA's latents; TPA's
  factors): no slack capacity, so what it holds is what the variant costs.
- `RingCache`: the W most recent (k, v) pairs in fixed storage; an update hands back the pairs
  that left the window (a Tensor Cache writes them into its L2 memory). With attention sinks it
  also keeps the first n pairs of the sequence in a second fixed buffer.
- `StateCache`: fixed-size state tensors updated in place (linear attention's S, the L2 matrix).
- `SegmentCache`: Infini-attention's memory (M, z) plus the open segment's pairs (fewer than N).
- `PolicyCache`: a full-attention cache cut at inference time (window KV, StreamingLLM).
A layer whose cache has two parts (Tensor Cache: ring + L2) holds a `TwoLevelCache`. Every cache
counts its own bytes (`nbytes`): the memory the tests and the report measure.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class LayerCache:
    """What one attention layer keeps between calls."""

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def map_(self, fn) -> None:
        """Replace every tensor by fn(tensor) (batch reordering, device moves)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class AppendCache(LayerCache):
    """Named tensors that grow along `dim` by exactly the tokens appended."""

    def __init__(self, dim: int, *names: str):
        self.dim, self.names = dim, names
        self.state: dict[str, torch.Tensor] = {}

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append one tensor per name (in `names` order); return everything held, same order."""
        for name, value in zip(self.names, new, strict=True):
            old = self.state.get(name)
            self.state[name] = value if old is None else torch.cat([old, value], dim=self.dim)
        return tuple(self.state[name] for name in self.names)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def map_(self, fn) -> None:
        self.state = {name: fn(t) for name, t in self.state.items()}


class RingUpdate(NamedTuple):
    keys: torch.Tensor  # (B, g, W + T, d): the ring's pairs then the new ones, oldest first
    values: torch.Tensor
    evicted_keys: torch.Tensor  # (B, g, T, d): the pairs that left the window, oldest first
    evicted_values: torch.Tensor


class RingCache(LayerCache):
    """The W most recent (k, v) pairs, oldest first, in storage allocated once: (B, g, W, d).
    Slots not yet filled hold zeros (their positions, pos - W .. -1, are negative).

    With `sinks` = n > 0, also the pairs of positions 0 .. n-1 (attention sinks), (B, g, n, d),
    filled as those positions pass; `sinks_held` of them are filled. A sink still inside the
    window is in both buffers: the reader drops it from one.

    `value_heads` (default `heads`) gives the values their own count of rows per token: a factored
    window keeps R_k rows of key factors and R_v rows of value factors.
    """

    def __init__(self, batch_size: int, heads: int, window: int, dim: int, device, dtype,
                 sinks: int = 0, value_heads: int | None = None):
        value_heads = heads if value_heads is None else value_heads
        self.k = torch.zeros((batch_size, heads, window, dim), device=device, dtype=dtype)
        self.v = torch.zeros((batch_size, value_heads, window, dim), device=device, dtype=dtype)
        self.sink_k = torch.zeros((batch_size, heads, sinks, dim), device=device, dtype=dtype)
        self.sink_v = torch.zeros((batch_size, value_heads, sinks, dim), device=device, dtype=dtype)
        self.sinks_held = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> RingUpdate:
        """Shift T new pairs in (in place); hand back [ring; new] and the T pairs pushed out."""
        T, W = k.shape[2], self.k.shape[2]
        keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k.copy_(keys[:, :, -W:])
        self.v.copy_(values[:, :, -W:])
        new_sinks = min(T, self.sink_k.shape[2] - self.sinks_held)
        if new_sinks > 0:
            held = slice(self.sinks_held, self.sinks_held + new_sinks)
            self.sink_k[:, :, held].copy_(k[:, :, :new_sinks])
            self.sink_v[:, :, held].copy_(v[:, :, :new_sinks])
            self.sinks_held += new_sinks
        return RingUpdate(keys, values, keys[:, :, :T], values[:, :, :T])

    def tensors(self) -> dict[str, torch.Tensor]:
        sinks = {"sink_k": self.sink_k, "sink_v": self.sink_v} if self.sink_k.shape[2] else {}
        return {"k": self.k, "v": self.v, **sinks}

    def map_(self, fn) -> None:
        self.k, self.v = fn(self.k), fn(self.v)
        self.sink_k, self.sink_v = fn(self.sink_k), fn(self.sink_v)


class StateCache(LayerCache):
    """One fixed-size state tensor, e.g. a (B, h, d_h, d_h) memory, updated in place."""

    def __init__(self, shape: tuple[int, ...], device, dtype):
        self.state = torch.zeros(shape, device=device, dtype=dtype)

    def write_(self, new: torch.Tensor) -> None:
        """Keep the storage and dtype whatever the new value's (a kernel may hand back fp32)."""
        self.state.copy_(new)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"state": self.state}

    def map_(self, fn) -> None:
        self.state = fn(self.state)


class TwoLevelCache(LayerCache):
    """A window ring (L1) and a fixed memory (L2): the Tensor Cache's state."""

    def __init__(self, ring: RingCache, memory: StateCache):
        self.ring, self.memory = ring, memory

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.ring.tensors(), "A": self.memory.state}

    def map_(self, fn) -> None:
        self.ring.map_(fn)
        self.memory.map_(fn)


class SegmentCache(LayerCache):
    """Infini-attention's state: the memory of every completed segment, `M` (B, g, d, d) and its
    normaliser `z` (B, g, d), in storage allocated once and updated in place; and the open
    segment's (k, v) pairs, (B, g, n, d) with n < N, which grow with each call and are dropped
    once their segment is complete and written into M, z."""

    def __init__(self, batch_size: int, heads: int, dim: int, device, dtype):
        self.M = torch.zeros((batch_size, heads, dim, dim), device=device, dtype=dtype)
        self.z = torch.zeros((batch_size, heads, dim), device=device, dtype=dtype)
        self.k = torch.zeros((batch_size, heads, 0, dim), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, M: torch.Tensor, z: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the memory after a call and the pairs of the segment still open (copied, so no
        view keeps a whole prefill alive)."""
        self.M.copy_(M)
        self.z.copy_(z)
        self.k, self.v = k.clone(), v.clone()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"M": self.M, "z": self.z, "k": self.k, "v": self.v}

    def map_(self, fn) -> None:
        self.M, self.z, self.k, self.v = fn(self.M), fn(self.z), fn(self.k), fn(self.v)


class PolicyCache(LayerCache):
    """A full-attention layer's cache cut down at inference time (`CachePolicy`): the first
    `sinks` pairs and the `window` most recent, keys stored BEFORE RoPE with their positions in
    the text, so the reader can rotate them by text position (window KV) or by cache index
    (StreamingLLM). Holds at most sinks + window pairs, (B, g, L, d) each."""

    def __init__(self, policy):
        self.policy = policy
        self.k = self.v = None
        self.positions: list[int] = []  # text position of each held pair (bookkeeping, not bytes)

    def update(self, k: torch.Tensor, v: torch.Tensor, position: int):
        """Add T pairs (B, g, T, d) at text positions `position` .. + T - 1. Return what the cache
        held followed by them, (keys, values, their text positions), for the reader to mask; then
        keep the policy's pairs: the first `sinks` and the `window` most recent (what one token at
        a time, each dropping the oldest pair after the sinks once over budget, would keep)."""
        keys = k if self.k is None else torch.cat([self.k, k], dim=2)
        values = v if self.v is None else torch.cat([self.v, v], dim=2)
        positions = self.positions + list(range(position, position + k.shape[2]))
        n, W = self.policy.sinks, self.policy.window
        if len(positions) > n + W:
            self.k = torch.cat([keys[:, :, :n], keys[:, :, -W:]], dim=2)
            self.v = torch.cat([values[:, :, :n], values[:, :, -W:]], dim=2)
            self.positions = positions[:n] + positions[-W:]
        else:
            self.k, self.v, self.positions = keys, values, positions
        return keys, values, positions

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.k is None else {"k": self.k, "v": self.v}

    def map_(self, fn) -> None:
        if self.k is not None:
            self.k, self.v = fn(self.k), fn(self.v)


class ModelCache:
    """Per-layer caches plus the number of tokens seen (the next token's position)."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers
        self.seq_len = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
