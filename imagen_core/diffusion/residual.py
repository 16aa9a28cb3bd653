"""Residual super-resolution: diffuse the scaled difference from the bicubic upsample, not the image.

Not in Imagen, whose super-resolution stages diffuse the high-resolution image itself and see the upsampled
low-resolution image only as network input. SRDiff (Li et al. 2022, "SRDiff: Single Image Super-Resolution with
Diffusion Probabilistic Models", Sec 3.2) diffuses x - upsample(lowres) instead: the network no longer has to learn
to reproduce its input, and an untrained network's x0 estimate is already the bicubic upsample. The residual of
natural images is small (std ~0.04 on the demo corpus against ~0.7 for the images), so it is multiplied by a
`scale` to give the diffusion unit-scale data (EDM's sigma_data argument, Karras et al. 2022, Sec 5): network
errors then shrink by that factor on the way back to pixels.

The upsample is of the clean low-resolution image; noise-conditioning augmentation (augmentation.py) still
corrupts the copy the network sees.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_lowres(lowres: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsample of (B, C, h, w) images in [-1, 1] to (B, C, size, size), clipped to [-1, 1]."""
    return F.interpolate(lowres, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def to_residual(images: torch.Tensor, upsampled: torch.Tensor, scale: float) -> torch.Tensor:
    """What the diffusion models: (images - upsampled) * scale."""
    return (images - upsampled) * scale


def from_residual(residual: torch.Tensor, upsampled: torch.Tensor, scale: float) -> torch.Tensor:
    """Back to images: upsampled + residual / scale (the inverse of `to_residual`)."""
    return upsampled + residual / scale
