"""Diffusion maths for Imagen-style cascades: schedules, objectives, guidance, thresholding, augmentation, samplers.

Pure torch; nothing here imports a network.
"""
from imagen_core.diffusion.augmentation import SAMPLING_AUG_LEVEL, noise_augment, sample_aug_levels
from imagen_core.diffusion.guidance import apply_guidance, drop_condition_mask
from imagen_core.diffusion.objective import (
    Prediction,
    diffusion_loss,
    eps_from_x0,
    expand_like,
    min_snr_weight,
    training_target,
    x0_from_output,
)
from imagen_core.diffusion.samplers import SamplerConfig, SamplerKind, X0Fn, sample, time_grid
from imagen_core.diffusion.schedule import (
    ScheduleConfig,
    ScheduleKind,
    alpha_sigma,
    cosine_logsnr,
    linear_logsnr,
    logsnr_schedule,
    sample_times,
)
from imagen_core.diffusion.thresholding import dynamic_threshold, static_threshold

__all__ = [
    "SAMPLING_AUG_LEVEL",
    "Prediction",
    "SamplerConfig",
    "SamplerKind",
    "ScheduleConfig",
    "ScheduleKind",
    "X0Fn",
    "alpha_sigma",
    "apply_guidance",
    "cosine_logsnr",
    "diffusion_loss",
    "drop_condition_mask",
    "dynamic_threshold",
    "min_snr_weight",
    "eps_from_x0",
    "expand_like",
    "linear_logsnr",
    "logsnr_schedule",
    "noise_augment",
    "sample",
    "sample_aug_levels",
    "sample_times",
    "static_threshold",
    "time_grid",
    "training_target",
    "x0_from_output",
]
