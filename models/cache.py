"""Decode caches. Each layer's cache is a dict of tensors; `nbytes` counts what they hold."""
from __future__ import annotations

import torch


class LayerCache:
    """The tensors one attention layer keeps between calls (names are the variant's)."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors: dict[str, torch.Tensor] = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def append(self, dim: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Grow each named tensor along `dim` by exactly the new tokens (no slack capacity)."""
        for name, value in new.items():
            old = self.tensors.get(name)
            self.tensors[name] = value if old is None else torch.cat([old, value], dim=dim)
        return {name: self.tensors[name] for name in new}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class ModelCache:
    """Per-layer caches plus the number of tokens seen (the next token's position)."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers
        self.seq_len = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
