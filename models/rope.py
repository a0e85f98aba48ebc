"""Rotary position embedding (rotate-half form) at absolute positions."""
import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    """cos, sin of shape (len(positions), dim) for integer positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of x (..., T, dim) by position; cos/sin are (T, dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
