"""Keeping the x0 estimate inside the data range at each sampling step (Imagen Sec 2.3)."""
from __future__ import annotations

import torch


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    """Clip x0 to [-1, 1] (Imagen Sec 2.3 "static thresholding"; over-saturates at high guidance scales)."""
    return x0.clamp(-1.0, 1.0)


def per_sample_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each sample's values (B, ...) -> (B,), linear interpolation like `torch.quantile`.

    Sorting by hand because `torch.quantile` refuses inputs above 2^24 elements (a batch of 1024 px images).
    """
    flat = values.reshape(values.shape[0], -1).sort(dim=1).values
    position = q * (flat.shape[1] - 1)
    low = int(position)
    high = min(low + 1, flat.shape[1] - 1)
    return flat[:, low] + (position - low) * (flat[:, high] - flat[:, low])


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen Sec 2.3 dynamic thresholding: s = percentile of |x0| per sample, s = max(s, 1), x0 <- clip(x0, -s, s) / s.

    Samples with s <= 1 are unchanged; the others are pulled back into [-1, 1], which lets large guidance scales
    keep their saturation instead of clipping to flat colours. Default 0.995 as in the paper (imagen-pytorch's
    default of 0.95 is a known deviation).
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile} (the paper uses 0.995)")
    s = per_sample_quantile(x0.abs(), percentile).clamp(min=1.0)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s
