"""RoPE re-rotation of cached keys and queries (in-cache positions, pre-RoPE codecs)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE helper in transformers' layout (first half / second half of the head dimension)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_shift(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE-encoded vectors by ``delta`` more positions (rotations compose: R(a)R(b) = R(a+b)).

    Parameters
    ----------
    x:
        ``[..., N, D]`` vectors already rotated at their original positions.
    delta:
        ``[..., N]`` position shifts (may be negative).
    inv_freq:
        ``[D/2]`` the model's RoPE inverse frequencies.
    """
    angles = delta.to(torch.float32).unsqueeze(-1) * inv_freq.to(x.device)
    angles = torch.cat((angles, angles), dim=-1)
    return (x * angles.cos().to(x.dtype)) + (rotate_half(x) * angles.sin().to(x.dtype))
