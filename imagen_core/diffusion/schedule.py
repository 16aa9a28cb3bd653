"""Continuous-time noise schedules expressed as log-SNR (Kingma et al. 2021, "Variational Diffusion Models").

Convention (docs/architecture.md): t in [0, 1], t=0 clean and t=1 noise; `x_t = alpha * x0 + sigma * eps` with
alpha^2 = sigmoid(logsnr) and sigma^2 = sigmoid(-logsnr), so alpha^2 + sigma^2 = 1 (variance preserving).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

import torch

ScheduleKind = Literal["cosine", "linear"]

COSINE_OFFSET = 0.008
"""Nichol & Dhariwal 2021 eq. 17 offset s: keeps the noise at t=0 small but non-zero (logsnr(0) = 8.77)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class ScheduleConfig:
    """Which log-SNR schedule a stage trains and samples with (Imagen: cosine for 64 and 256, linear for 1024)."""

    kind: ScheduleKind = "cosine"
    """"cosine" (Nichol & Dhariwal 2021) or "linear" (continuous form of linear betas 1e-4 .. 0.02, Ho et al. 2020)."""
    logsnr_min: float = -20.0
    """Lower clip of the log-SNR; the cosine schedule reaches -inf at t=1 without it."""
    logsnr_max: float = 20.0
    """Upper clip of the log-SNR (neither default schedule reaches it: cosine(0)=8.77, linear(0)=9.21)."""

    def __post_init__(self) -> None:
        if self.kind not in get_args(ScheduleKind):
            raise ValueError(f"ScheduleConfig.kind must be one of {get_args(ScheduleKind)}, got {self.kind!r}")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"ScheduleConfig needs logsnr_min < logsnr_max, got {self.logsnr_min} and {self.logsnr_max}"
            )


def cosine_logsnr(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021 eq. 17) as log-SNR: -log(cos(theta)^-2 - 1), theta=(t+s)/(1+s)*pi/2.

    cos^-2 - 1 = tan^2, and tan(theta) = 1 / tan(pi/2 - theta), so logsnr = 2 log tan((1-t)/(1+s) * pi/2).
    That form is exact at t=1 (log 0 = -inf, clipped later) where float32 cos(pi/2) would give a negative tan^2.
    """
    return 2.0 * torch.log(torch.tan((1.0 - t) / (1.0 + COSINE_OFFSET) * (math.pi / 2)))


def linear_logsnr(t: torch.Tensor) -> torch.Tensor:
    """Linear-beta schedule in continuous time (imagen-pytorch `beta_linear_log_snr`): -log(expm1(1e-4 + 10 t^2)).

    DDPM's betas 1e-4 .. 0.02 over 1000 steps are beta(t) ~ 20 t per unit time; its integral, plus 1e-4 for the first
    step, gives alpha^2 = exp(-(1e-4 + 10 t^2)), hence SNR = alpha^2 / (1 - alpha^2) = 1 / expm1(1e-4 + 10 t^2).
    Its range is 9.21 at t=0 to -10.0 at t=1 (inside the default clip).
    """
    return -torch.log(torch.expm1(1e-4 + 10.0 * t**2))


_SCHEDULES = {"cosine": cosine_logsnr, "linear": linear_logsnr}


def logsnr_schedule(t: torch.Tensor, config: ScheduleConfig) -> torch.Tensor:
    """log(alpha^2 / sigma^2) at continuous times t in [0, 1], clipped to [logsnr_min, logsnr_max]."""
    if not torch.is_floating_point(t):
        raise TypeError(f"t must be a floating-point tensor of times in [0, 1], got dtype {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"t must lie in [0, 1], got values in [{t.min().item()}, {t.max().item()}]")
    return _SCHEDULES[config.kind](t).clamp(config.logsnr_min, config.logsnr_max)


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) = (sqrt(sigmoid(logsnr)), sqrt(sigmoid(-logsnr))) (VDM eq. 3-4).

    Computing both from sigmoid keeps each accurate at either end, where 1 - alpha^2 would cancel.
    """
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def uniform_per_sample(
    batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """U[0, 1) values, one per sample, on `device` (default: the generator's device, else torch's default)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if device is None and generator is not None:
        device = generator.device
    return torch.rand(batch, generator=generator, device=device)


def sample_times(
    batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Training times t ~ U(0, 1), one per sample (continuous-time diffusion, Imagen Sec 2.1 / VDM)."""
    return uniform_per_sample(batch, generator, device)
