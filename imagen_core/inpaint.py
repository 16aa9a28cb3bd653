"""Inpainting with an unconditional-on-image stage by RePaint resampling (Lugmayr et al. 2022, Algorithm 1).

No training for inpainting: at every step of the reverse process the known region is replaced by the original
image noised to that step's level (sampled from q(x_s | x0)), and the unknown region by the model's reverse step.
Because the two halves are produced independently, RePaint "resamples": it jumps `jump_length` steps back up the
chain (forward noise q(x_t | x_s)) and denoises again, `resample` times per segment, so the generated content can
harmonise with the known region (their Sec 4.2, Fig. 3). The noise indices here count down from `steps` (pure
noise, t = 1) to 0 (clean), on the samplers' uniform-in-t grid; the reverse step is the ancestral (DDPM) one.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from imagen_core.diffusion.samplers import Ancestral, Level, SamplerConfig, X0Fn, time_grid
from imagen_core.diffusion.schedule import ScheduleConfig
from imagen_core.stage import DiffusionStage


@dataclasses.dataclass(kw_only=True, frozen=True)
class InpaintConfig:
    """RePaint's schedule: denoising steps, jump length j and resampling count r (their Sec 4.2, Table 5)."""

    steps: int = 50
    """Levels of the uniform-in-t grid (the model calls of one plain pass)."""
    jump_length: int = 5
    """j: how many levels each jump goes back up (RePaint: 10 of 250)."""
    resample: int = 5
    """r: how many times each j-level segment is denoised (1 = no resampling; RePaint: 10). Model calls are about
    steps * resample."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"InpaintConfig.steps must be >= 1, got {self.steps}")
        if not 1 <= self.jump_length <= self.steps:
            raise ValueError(f"InpaintConfig.jump_length must be in [1, steps={self.steps}], got {self.jump_length}")
        if self.resample < 1:
            raise ValueError(f"InpaintConfig.resample must be >= 1 (1 = no resampling), got {self.resample}")


def repaint_schedule(config: InpaintConfig) -> list[int]:
    """Noise indices visited, from `steps` (pure noise) to 0 (clean): a -1 move is a model call, a +1 move forward
    noise. As RePaint's `get_schedule_jump`: at every multiple of j below steps - j, jump back j levels r - 1 times."""
    jumps_left = {n: config.resample - 1 for n in range(0, config.steps - config.jump_length, config.jump_length)}
    n, path = config.steps, [config.steps]
    while n > 0:
        n -= 1
        path.append(n)
        if jumps_left.get(n, 0) > 0:
            jumps_left[n] -= 1
            for _ in range(config.jump_length):
                n += 1
                path.append(n)
    return path


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _forward_jump(x_s: torch.Tensor, s: Level, t: Level, generator: torch.Generator | None) -> torch.Tensor:
    """Sample q(x_t | x_s) for t noisier than s (VDM eq. 1-2): alpha_t|s = alpha_t / alpha_s and
    sigma_t|s^2 = sigma_t^2 - alpha_t|s^2 sigma_s^2 (RePaint's x_t ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t I))."""
    ratio = t.alpha / s.alpha
    return ratio * x_s + math.sqrt(max(t.sigma**2 - ratio**2 * s.sigma**2, 0.0)) * _noise(x_s, generator)


@torch.no_grad()
def repaint(
    x0_fn: X0Fn,
    image: torch.Tensor,
    keep: torch.Tensor,
    schedule_config: ScheduleConfig,
    config: InpaintConfig = InpaintConfig(),
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Fill the pixels where `keep` is 0 so they agree with the rest of `image` (B, C, H, W) in [-1, 1].

    `keep` (B or 1, 1 or C, H, W) is 1 on known pixels, 0 on those to generate (fractions blend). Known pixels
    come back exactly as given (the last step pastes the original there). `progress(call, total)` after each
    model call.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W) in [-1, 1], got shape {tuple(image.shape)}")
    if keep.dim() != 4 or keep.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"keep must be (B, 1, H, W) matching the image's {tuple(image.shape[-2:])}, got {tuple(keep.shape)}"
        )
    keep = keep.to(image.device, image.dtype).clamp(0.0, 1.0)
    grid = time_grid(config.steps, schedule_config)

    def level(n: int) -> Level:
        return grid[config.steps - n]  # the grid runs from t = 1 (index steps) to t = 0 (index 0)

    stepper = Ancestral(SamplerConfig(kind="ancestral", steps=config.steps), generator)
    path = repaint_schedule(config)
    total = sum(1 for a, b in zip(path, path[1:]) if b < a)

    def paste_known(x: torch.Tensor, n: int) -> torch.Tensor:
        # Algorithm 1 line 5: x_known ~ N(alpha x0, sigma^2 I) at the current level; line 8: combine by the mask.
        known = level(n).alpha * image + level(n).sigma * _noise(image, generator)
        return keep * known + (1.0 - keep) * x

    x = paste_known(_noise(image, generator), config.steps)
    calls = 0
    for n, m in zip(path, path[1:]):
        if m > n:
            x = _forward_jump(x, level(n), level(m), generator)
            continue
        x0_hat = x0_fn(x, torch.full((x.shape[0],), level(n).logsnr, device=x.device, dtype=torch.float32))
        calls += 1
        if progress is not None:
            progress(calls, total)
        # The last move returns the clean estimate, as the samplers do, with the original pasted back exactly.
        if m == 0:
            x = keep * image + (1.0 - keep) * x0_hat
        else:
            x = paste_known(stepper.step(x, x0_hat, level(n), level(m)), m)
    return x


def inpaint(
    stage: DiffusionStage,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    image: torch.Tensor,
    keep: torch.Tensor,
    *,
    config: InpaintConfig = InpaintConfig(),
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """RePaint with a base stage: `image` at the stage's resolution, text-conditioned with classifier-free guidance."""
    cfg = stage.config
    if cfg.is_super_resolution:
        raise ValueError(f"stage {cfg.name!r} is super-resolution; inpaint with the base stage, then upsample")
    expected = (cfg.unet.in_channels, cfg.image_size, cfg.image_size)
    if tuple(image.shape[1:]) != expected:
        raise ValueError(f"stage {cfg.name!r} inpaints images of shape {expected}, got {tuple(image.shape[1:])}")
    scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
    x0_fn = stage.x0_fn(text_embeds, text_mask, scale)
    return repaint(x0_fn, image, keep, cfg.schedule, config, generator, progress)
