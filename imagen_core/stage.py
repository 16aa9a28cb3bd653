"""One cascade stage: a U-Net with its diffusion objective, its training loss and its sampler.

Base and super-resolution stages are the same class; a super-resolution stage has `lowres_size` set
and is conditioned on the noise-augmented low-resolution image (Imagen Sec 2.5).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagen_core.diffusion.augmentation import noise_augment, sample_aug_levels
from imagen_core.diffusion.guidance import apply_guidance, drop_condition_mask
from imagen_core.diffusion.objective import Prediction, diffusion_loss, min_snr_weight, training_target, x0_from_output
from imagen_core.diffusion.residual import from_residual, to_residual, upsample_lowres
from imagen_core.diffusion.samplers import SamplerConfig, sample
from imagen_core.diffusion.schedule import ScheduleConfig, alpha_sigma, logsnr_schedule
from imagen_core.diffusion.thresholding import dynamic_threshold, static_threshold
from imagen_core.text_encoder import TextEncoderConfig
from imagen_core.unet import EfficientUNet, UNetConfig


@dataclasses.dataclass(kw_only=True, frozen=True)
class StageConfig:
    """Everything needed to rebuild, train and sample one stage (stored in its checkpoint)."""

    name: str
    """Stage name in the cascade and the registry: "base", "sr1", "sr2"."""
    unet: UNetConfig
    """The denoising network."""
    text_encoder: TextEncoderConfig
    """The frozen text encoder whose per-token embeddings condition this stage."""
    schedule: ScheduleConfig = ScheduleConfig()
    """Noise schedule for training and sampling (paper: cosine for base and 256, linear for 1024)."""
    prediction: Prediction = "eps"
    """Network output parameterisation (paper: eps; v-prediction is the common alternative)."""
    cond_drop_prob: float = 0.1
    """Probability of dropping the text condition in training, for classifier-free guidance (paper: 10%)."""
    lowres_size: int | None = None
    """Resolution of the conditioning image for a super-resolution stage; None for the base stage."""
    train_max_aug_level: float = 1.0
    """Noise-conditioning augmentation: levels drawn uniformly per sample in [0, this] in training."""
    sample_aug_level: float = 0.2
    """Noise-conditioning augmentation level at sampling (paper: 0.1-0.3 looks best, 0 gives best FID)."""
    residual_scale: float | None = None
    """Super-resolution only: None diffuses the image (Imagen); a number diffuses (x - bicubic(lowres)) * it
    (SRDiff, diffusion/residual.py)."""
    sampler: SamplerConfig = SamplerConfig()
    """Default sampler for this stage (DDIM, 50 steps)."""
    guidance_scale: float = 7.5
    """Default classifier-free guidance scale at sampling (1.0 = plain conditional)."""
    min_snr_gamma: float | None = None
    """Training loss weighting: None is the unweighted MSE (Imagen); a number weighs each sample by Min-SNR-gamma
    (Hang et al. 2023; diffusion/objective.py::min_snr_weight). Validation and evaluation losses stay unweighted,
    so they compare across settings."""
    threshold_percentile: float | None = 0.995
    """Dynamic thresholding percentile (paper: 99.5%; imagen-pytorch's 0.95 is a known deviation); None clips
    to [-1, 1] (static thresholding, the paper's baseline)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if (self.lowres_size is not None) != self.unet.lowres_cond:
            raise ValueError(
                f"stage {self.name!r}: lowres_size={self.lowres_size} but unet.lowres_cond={self.unet.lowres_cond}; "
                "a super-resolution stage needs both, a base stage neither"
            )
        if self.lowres_size is not None and self.lowres_size >= self.unet.image_size:
            raise ValueError(f"stage {self.name!r}: lowres_size {self.lowres_size} must be below image_size {self.unet.image_size}")
        if self.residual_scale is not None and (self.lowres_size is None or not self.residual_scale > 0):
            raise ValueError(
                f"stage {self.name!r}: residual_scale={self.residual_scale} needs a super-resolution stage "
                "(lowres_size set) and a positive scale; use None to diffuse the image itself"
            )
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive (or None: unweighted), got {self.min_snr_gamma}")
        if self.threshold_percentile is not None and not 0.0 < self.threshold_percentile <= 1.0:
            raise ValueError(f"threshold_percentile must be in (0, 1], got {self.threshold_percentile}")

    @property
    def image_size(self) -> int:
        return self.unet.image_size

    @property
    def is_super_resolution(self) -> bool:
        return self.lowres_size is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageConfig":
        from imagen_core.config_io import build

        return build(cls, data)


def null_condition(text_embeds: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The "no text" condition: zeroed embeddings (paper Sec 2.3), one visible token so attention is defined."""
    mask = torch.zeros_like(text_mask)
    mask[:, 0] = True
    return torch.zeros_like(text_embeds), mask


def drop_condition(
    text_embeds: torch.Tensor, text_mask: torch.Tensor, drop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the condition of the samples where `drop` is true by the null condition."""
    null_embeds, null_mask = null_condition(text_embeds, text_mask)
    keep = ~drop
    embeds = torch.where(keep[:, None, None], text_embeds, null_embeds)
    mask = torch.where(keep[:, None], text_mask, null_mask)
    return embeds, mask


def resize_lowres(images: torch.Tensor, size: int) -> torch.Tensor:
    """Downsample high-resolution training images to the stage's conditioning resolution."""
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class DiffusionStage(nn.Module):
    """A stage's U-Net plus its objective. `forward` is the training loss, so a data-parallel engine can wrap it."""

    def __init__(self, config: StageConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = EfficientUNet(config.unet)

    def forward(
        self,
        images: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        lowres: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample training loss (B,), Imagen Sec 2.1: noise at a random time, predict eps (or v).

        A super-resolution stage takes `lowres` (default: `images` downsampled) and draws a noise-conditioning
        augmentation level per sample (not one level per batch).
        """
        cfg = self.config
        images = images.float()  # the diffusion maths is fp32 whatever the weights' dtype (see loss_at)
        batch, device = images.shape[0], images.device
        t = torch.rand(batch, device=device, generator=generator)
        eps = torch.randn(images.shape, device=device, generator=generator, dtype=torch.float32)
        drop = drop_condition_mask(batch, cfg.cond_drop_prob, generator=generator, device=device)
        text_embeds, text_mask = drop_condition(text_embeds, text_mask, drop)
        aug_level = aug_eps = None
        if cfg.is_super_resolution:
            lowres = resize_lowres(images, cfg.lowres_size) if lowres is None else lowres.float()
            aug_level = sample_aug_levels(batch, generator=generator, max_level=cfg.train_max_aug_level, device=device)
            aug_eps = torch.randn(lowres.shape, device=device, generator=generator, dtype=torch.float32)
        loss = self.loss_at(images, text_embeds, text_mask, t, eps, lowres, aug_level, aug_eps)
        if cfg.min_snr_gamma is not None:
            loss = loss * min_snr_weight(logsnr_schedule(t, cfg.schedule), cfg.min_snr_gamma, cfg.prediction)
        return loss

    def loss_at(
        self,
        images: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        lowres: torch.Tensor | None = None,
        aug_level: torch.Tensor | None = None,
        aug_eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss (B,) at given times and noise, as given (no condition dropping).

        A super-resolution stage also takes the clean `lowres` image, which is noised at `aug_level` (B,) with
        `aug_eps` (lowres's shape) before the network sees it. `forward` draws all of these at random; validation
        fixes them.

        Precision: the diffusion maths (the schedule, alpha and sigma, x_t, the target) and the MSE run in fp32
        whatever the weights' dtype; the U-Net casts its inputs to its weights' dtype (bf16 under DeepSpeed's
        bf16 mode) and its output comes back to fp32 before the loss. Inputs in bf16 or fp16 are upcast first.
        """
        cfg = self.config
        images, eps = images.float(), eps.float()
        lowres_noised = lowres_logsnr = None
        if cfg.is_super_resolution:
            if lowres is None or aug_level is None or aug_eps is None:
                raise ValueError(f"stage {cfg.name!r} is super-resolution: give lowres, aug_level and aug_eps")
            lowres, aug_eps = lowres.float(), aug_eps.float()
            lowres_noised, lowres_logsnr = noise_augment(lowres, aug_level, cfg.schedule, eps=aug_eps)
            if cfg.residual_scale is not None:
                images = to_residual(images, upsample_lowres(lowres, images.shape[-1]), cfg.residual_scale)  # crops too
        logsnr = logsnr_schedule(t.float(), cfg.schedule)
        alpha, sigma = alpha_sigma(logsnr)
        x_t = alpha.view(-1, 1, 1, 1) * images + sigma.view(-1, 1, 1, 1) * eps
        output = self.unet(x_t, logsnr, text_embeds, text_mask, lowres=lowres_noised, lowres_logsnr=lowres_logsnr)
        return diffusion_loss(output, training_target(images, eps, alpha, sigma, cfg.prediction))  # fp32 MSE

    def x0_fn(
        self,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        guidance_scale: float,
        lowres: torch.Tensor | None = None,
        lowres_logsnr: torch.Tensor | None = None,
        upsampled: torch.Tensor | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The x0-predictor a sampler drives: network, classifier-free guidance, thresholding.

        `lowres` is the noise-augmented conditioning image. A residual stage also takes `upsampled`, the bicubic
        upsample of the clean one: its x0 lives in residual space and is thresholded as the image it stands for.
        """
        cfg = self.config
        if (upsampled is None) != (cfg.residual_scale is None):
            raise ValueError(f"stage {cfg.name!r}: pass `upsampled` exactly when residual_scale is set")
        null_embeds, null_mask = null_condition(text_embeds, text_mask)
        guided = guidance_scale != 1.0
        embeds = torch.cat([text_embeds, null_embeds]) if guided else text_embeds
        mask = torch.cat([text_mask, null_mask]) if guided else text_mask
        if lowres is not None and guided:
            lowres, lowres_logsnr = torch.cat([lowres, lowres]), torch.cat([lowres_logsnr, lowres_logsnr])

        def predict_x0(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
            # The sampler's state x_t and everything from here on is fp32; the U-Net runs in its weights' dtype
            # (it casts its inputs) and its output is upcast before guidance, whose scale amplifies rounding.
            alpha, sigma = alpha_sigma(logsnr.float())
            if guided:
                out = self.unet(torch.cat([x_t, x_t]), torch.cat([logsnr, logsnr]), embeds, mask, lowres, lowres_logsnr)
                output = apply_guidance(*out.float().chunk(2), guidance_scale)
            else:
                output = self.unet(x_t, logsnr, embeds, mask, lowres, lowres_logsnr).float()
            x0 = x0_from_output(output, x_t, alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1), cfg.prediction)
            if upsampled is None:
                return self._threshold(x0)
            image = self._threshold(from_residual(x0, upsampled, cfg.residual_scale))
            return to_residual(image, upsampled, cfg.residual_scale)

        return predict_x0

    def _threshold(self, x0: torch.Tensor) -> torch.Tensor:
        percentile = self.config.threshold_percentile
        return static_threshold(x0) if percentile is None else dynamic_threshold(x0, percentile)

    @torch.no_grad()
    def sample(
        self,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        lowres: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        sampler: SamplerConfig | None = None,
        aug_level: float | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] for a batch of text conditions (and low-resolution images for SR stages).

        The images are fp32 whatever the weights' dtype: the sampler's state stays fp32 and only the network
        calls run in the weights' dtype (a bf16 stage samples with bf16 matmuls and fp32 updates).
        """
        cfg = self.config
        batch = text_embeds.shape[0]
        lowres_noised = lowres_logsnr = upsampled = None
        if cfg.is_super_resolution:
            if lowres is None:
                raise ValueError(f"stage {cfg.name!r} is super-resolution: give `lowres` images of size {cfg.lowres_size}")
            lowres = lowres.float()
            if lowres.shape[-1] != cfg.lowres_size:
                lowres = resize_lowres(lowres, cfg.lowres_size)
            level = cfg.sample_aug_level if aug_level is None else aug_level
            levels = torch.full((batch,), level, device=lowres.device)
            lowres_noised, lowres_logsnr = noise_augment(lowres, levels, cfg.schedule, generator=generator)
            if cfg.residual_scale is not None:
                upsampled = upsample_lowres(lowres, cfg.image_size)
        x0_fn = self.x0_fn(
            text_embeds,
            text_mask,
            cfg.guidance_scale if guidance_scale is None else guidance_scale,
            lowres_noised,
            lowres_logsnr,
            upsampled,
        )
        shape = (batch, cfg.unet.out_channels, cfg.image_size, cfg.image_size)
        device = text_embeds.device
        x0 = sample(
            x0_fn, shape, cfg.schedule, sampler or cfg.sampler, generator, x_T=x_T, progress=progress, device=device
        )
        return x0 if upsampled is None else from_residual(x0, upsampled, cfg.residual_scale)
