"""Samplers driven by an x0-predictor: ancestral (DDPM), DDIM and DPM-Solver++(2M).

A sampler never sees a network: it calls `x0_fn(x_t, logsnr) -> x0_hat`, into which the caller folds the
prediction type, classifier-free guidance and dynamic thresholding (docs/architecture.md). Every sampler walks the
same grid, uniform in t from 1 to 0 with `steps` model calls, and its last step returns the last x0_hat (the jump to
clean data), not a noisy sample. All randomness comes from the given generator, so a seed fixes the output.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, get_args

import torch

from imagen_core.diffusion.objective import eps_from_x0
from imagen_core.diffusion.schedule import ScheduleConfig, alpha_sigma, logsnr_schedule

SamplerKind = Literal["ancestral", "ddim", "dpmpp_2m"]
X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""x0_fn(x_t (B, ...), logsnr (B,)) -> x0_hat (B, ...)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class SamplerConfig:
    """How to sample a stage. Defaults are the user-facing ones: DDIM, 50 steps, deterministic (eta 0)."""

    kind: SamplerKind = "ddim"
    """"ancestral" (DDPM posterior), "ddim" (Song et al. 2021) or "dpmpp_2m" (Lu et al. 2022, 2nd-order multistep)."""
    steps: int = 50
    """Number of model calls; the grid is uniform in t from 1 to 0."""
    eta: float = 0.0
    """DDIM only: 0 is the deterministic DDIM ODE, 1 the ancestral sampler (Song et al. 2021 eq. 16)."""

    def __post_init__(self) -> None:
        if self.kind not in get_args(SamplerKind):
            raise ValueError(f"SamplerConfig.kind must be one of {get_args(SamplerKind)}, got {self.kind!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SamplerConfig.steps must be a positive int, got {self.steps!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"SamplerConfig.eta must be in [0, 1], got {self.eta}")
        if self.eta != 0.0 and self.kind != "ddim":
            raise ValueError(f"SamplerConfig.eta applies to kind='ddim' only; got eta={self.eta} with {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class Level:
    """One point of the time grid: its log-SNR and the matching alpha, sigma (Python floats: same for the batch)."""

    logsnr: float
    alpha: float
    sigma: float


def time_grid(steps: int, schedule_config: ScheduleConfig) -> list[Level]:
    """steps + 1 levels at t = 1, 1 - 1/steps, ..., 0 (computed in float64 so step sizes are exact)."""
    logsnr = logsnr_schedule(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), schedule_config)
    alpha, sigma = alpha_sigma(logsnr)
    return [Level(*level) for level in zip(logsnr.tolist(), alpha.tolist(), sigma.tolist())]


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _posterior_fraction(t: Level, s: Level) -> float:
    """c = 1 - SNR_t / SNR_s = -expm1(logsnr_t - logsnr_s), in [0, 1) for s less noisy than t (VDM Appendix A)."""
    return -math.expm1(t.logsnr - s.logsnr)


class Stepper(Protocol):
    def step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: Level, s: Level) -> torch.Tensor:
        """Move x_t at level t to level s (less noisy), given the model's x0_hat at t."""
        ...


class Ancestral:
    """Sample the DDPM posterior q(x_s | x_t, x0 = x0_hat) (Ho et al. 2020 eq. 6-7), in log-SNR form (VDM eq. 32-33):
    c = -expm1(logsnr_t - logsnr_s), mean = alpha_s (x_t (1 - c) / alpha_t + c x0_hat), var = sigma_s^2 c.
    """

    def __init__(self, config: SamplerConfig, generator: torch.Generator | None) -> None:
        self.generator = generator

    def step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: Level, s: Level) -> torch.Tensor:
        c = _posterior_fraction(t, s)
        mean = s.alpha * (x_t * ((1.0 - c) / t.alpha) + c * x0_hat)
        return mean + s.sigma * math.sqrt(c) * _noise_like(x_t, self.generator)


class DDIM:
    """Song et al. 2021 eq. 12: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat + std * noise.

    Their eq. 16 noise, std = eta * sqrt((1 - a_s)/(1 - a_t)) * sqrt(1 - a_t/a_s) with a = alpha^2, equals
    eta * sigma_s * sqrt(c) with the posterior fraction c: eta = 1 is exactly the ancestral step.
    """

    def __init__(self, config: SamplerConfig, generator: torch.Generator | None) -> None:
        self.eta = config.eta
        self.generator = generator

    def step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: Level, s: Level) -> torch.Tensor:
        eps_hat = eps_from_x0(x0_hat, x_t, t.alpha, t.sigma)
        c = _posterior_fraction(t, s)
        std = self.eta * s.sigma * math.sqrt(c)
        # sqrt(sigma_s^2 - std^2) = sigma_s sqrt(1 - eta^2 c), real since c < 1 and eta <= 1.
        x_s = s.alpha * x0_hat + s.sigma * math.sqrt(1.0 - self.eta**2 * c) * eps_hat
        if std > 0.0:
            x_s = x_s + std * _noise_like(x_t, self.generator)
        return x_s


class DPMSolverPP2M:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++"), Algorithm 2, with lambda = log(alpha/sigma) = logsnr / 2:

    h = lambda_s - lambda_t; D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev with r = h_prev / h (first order, D =
    x0_hat, on the first step); x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D.
    """

    def __init__(self, config: SamplerConfig, generator: torch.Generator | None) -> None:
        self.previous: tuple[torch.Tensor, float] | None = None

    def step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: Level, s: Level) -> torch.Tensor:
        h = (s.logsnr - t.logsnr) / 2.0
        d = x0_hat
        # A zero-length step (neighbouring times clipped to the same log-SNR) has no slope to reuse.
        if self.previous is not None and self.previous[1] > 0.0 and h > 0.0:
            x0_prev, h_prev = self.previous
            half_inv_r = h / (2.0 * h_prev)
            d = (1.0 + half_inv_r) * x0_hat - half_inv_r * x0_prev
        self.previous = (x0_hat, h)
        return (s.sigma / t.sigma) * x_t - (s.alpha * math.expm1(-h)) * d


STEPPERS: dict[str, Callable[[SamplerConfig, torch.Generator | None], Stepper]] = {
    "ancestral": Ancestral,
    "ddim": DDIM,
    "dpmpp_2m": DPMSolverPP2M,
}


def _initial_noise(
    shape: Sequence[int],
    generator: torch.Generator | None,
    x_T: torch.Tensor | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but the sample shape is {tuple(shape)}")
        return x_T
    if device is None and generator is not None:
        device = generator.device
    return torch.randn(tuple(shape), generator=generator, device=device)


@torch.no_grad()
def sample(
    x0_fn: X0Fn,
    shape: Sequence[int],
    schedule_config: ScheduleConfig,
    sampler_config: SamplerConfig,
    generator: torch.Generator | None,
    x_T: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw samples of `shape` (B, ...) from x_T ~ N(0, I) at t=1 (or the given x_T) down to t=0.

    `device` defaults to x_T's, else the generator's; `progress(step, total)` is called after each model call.
    Runs under no_grad: a sampling loop kept in the autograd graph would hold every step's activations.
    """
    x = _initial_noise(shape, generator, x_T, device)
    if x.dtype in (torch.float16, torch.bfloat16):
        # The sampler's state stays fp32 whatever the network runs in: 16-bit x_t would round every update
        # (bf16: 8 bits of mantissa) and the error compounds over the steps. x0_fn casts at the network.
        x = x.float()
    grid = time_grid(sampler_config.steps, schedule_config)
    stepper = STEPPERS[sampler_config.kind](sampler_config, generator)
    last = sampler_config.steps - 1

    def predict(x_t: torch.Tensor, i: int) -> torch.Tensor:
        x0_hat = x0_fn(x_t, torch.full((x_t.shape[0],), grid[i].logsnr, device=x_t.device, dtype=torch.float32))
        if x0_hat.shape != x_t.shape:
            raise ValueError(f"x0_fn returned shape {tuple(x0_hat.shape)} for x_t of shape {tuple(x_t.shape)}")
        if progress is not None:
            progress(i + 1, sampler_config.steps)
        return x0_hat

    for i in range(last):
        x = stepper.step(x, predict(x, i), grid[i], grid[i + 1])
    return predict(x, last)
