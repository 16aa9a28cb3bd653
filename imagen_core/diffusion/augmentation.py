"""Noise-conditioning augmentation of a super-resolution stage's low-resolution input (Imagen Sec 2.5).

The low-resolution image is corrupted by the same variance-preserving forward process as the diffusion,
x_aug = alpha * lowres + sigma * eps, at a time t = aug_level; the stage also receives the corruption's log-SNR,
so at sampling it can be told how much to trust its input. Training draws one level per sample (imagen-pytorch
draws one for the whole batch, a known deviation); sampling uses a fixed level, 0.1-0.3 looking best in the paper.
"""
from __future__ import annotations

import torch

from imagen_core.diffusion.objective import expand_like
from imagen_core.diffusion.schedule import ScheduleConfig, alpha_sigma, logsnr_schedule, uniform_per_sample

SAMPLING_AUG_LEVEL = 0.2
"""Default level at sampling (Imagen Sec 2.5 / Appendix: 0.1-0.3 looks best; 0 gives the best FID)."""


def sample_aug_levels(
    batch: int,
    generator: torch.Generator | None = None,
    max_level: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training levels, uniform in [0, max_level) and independent per sample: (B,)."""
    if not 0.0 < max_level <= 1.0:
        raise ValueError(f"max_level must be in (0, 1], got {max_level}")
    return uniform_per_sample(batch, generator, device) * max_level


def noise_augment(
    lowres: torch.Tensor,
    aug_level: torch.Tensor,
    schedule_config: ScheduleConfig,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha * lowres + sigma * eps, aug_logsnr) with aug_logsnr = logsnr_schedule(aug_level) per sample.

    eps is drawn from `generator` unless given (validation fixes it per sample).

    aug_level 0 means the schedule's t=0, which is nearly but not exactly clean: the cosine schedule gives
    logsnr 8.77 (sigma 0.0125) there and the linear one 9.21 (sigma 0.0100). That keeps level 0 at sampling the
    same corruption the network saw for small levels in training.
    """
    if aug_level.shape != (lowres.shape[0],):
        raise ValueError(
            f"aug_level must hold one level per image, shape ({lowres.shape[0]},), got {tuple(aug_level.shape)}"
        )
    aug_logsnr = logsnr_schedule(aug_level.to(lowres.device, torch.float32), schedule_config)
    alpha, sigma = alpha_sigma(aug_logsnr)
    if eps is None:
        eps = torch.randn(lowres.shape, generator=generator, device=lowres.device, dtype=lowres.dtype)
    elif eps.shape != lowres.shape:
        raise ValueError(f"eps must have the shape of lowres {tuple(lowres.shape)}, got {tuple(eps.shape)}")
    noised = expand_like(alpha, lowres) * lowres + expand_like(sigma, lowres) * eps
    return noised.to(lowres.dtype), aug_logsnr
