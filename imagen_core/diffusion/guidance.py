"""Classifier-free guidance (Ho & Salimans 2022): train with the condition sometimes dropped, sample with both."""
from __future__ import annotations

import math

import torch

from imagen_core.diffusion.schedule import uniform_per_sample


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond) (Ho & Salimans 2022 eq. 6 with w = scale - 1; Imagen Sec 2.2).

    scale 1 is the plain conditional prediction and returns `cond` itself, bit for bit; scale 0 is unconditional.
    Works on any parameterisation (eps, v or x0) because the combination is linear.
    """
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0 (1 = no guidance), got {scale}")
    if cond.shape != uncond.shape:
        raise ValueError(f"cond shape {tuple(cond.shape)} differs from uncond shape {tuple(uncond.shape)}")
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def drop_condition_mask(
    batch: int, p: float, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """(B,) bool, True where a training sample's condition is replaced by the null one (Imagen: p = 0.1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition drop probability must be in [0, 1], got {p}")
    return uniform_per_sample(batch, generator, device) < p
