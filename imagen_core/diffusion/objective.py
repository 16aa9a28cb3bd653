"""What the network predicts and what it is trained against: eps- or v-prediction.

eps-prediction: Ho et al. 2020 (Imagen trains every stage this way). v-prediction: Salimans & Ho 2022 ("Progressive
Distillation", Sec 4 / Appendix D), v = alpha * eps - sigma * x0, which stays well scaled at both ends of the schedule.
All functions take alpha and sigma as (B,) tensors, already broadcast (B, 1, ..., 1) ones, or Python floats.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

Prediction = Literal["eps", "v"]


def expand_like(values: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """Reshape per-sample values (B,) to (B, 1, ..., 1) so they broadcast against x of shape (B, ...).

    A Python float (one level for the whole batch, as in the samplers) already broadcasts and is returned as is.
    """
    if isinstance(values, float):
        return values
    if values.numel() not in (1, x.shape[0]):
        raise ValueError(f"expected one value per sample ({x.shape[0]}), got a tensor of shape {tuple(values.shape)}")
    return values.reshape(-1, *([1] * (x.ndim - 1)))


def _check_prediction(prediction: str) -> None:
    if prediction not in get_args(Prediction):
        raise ValueError(f"prediction must be one of {get_args(Prediction)}, got {prediction!r}")


def x0_from_output(
    output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
    prediction: Prediction,
) -> torch.Tensor:
    """The network's estimate of the clean image.

    eps: x0 = (x_t - sigma * eps) / alpha (inverting x_t = alpha x0 + sigma eps).
    v:   x0 = alpha * x_t - sigma * v (Salimans & Ho 2022 eq. in Appendix D; uses alpha^2 + sigma^2 = 1).
    """
    _check_prediction(prediction)
    alpha, sigma = expand_like(alpha, x_t), expand_like(sigma, x_t)
    if prediction == "eps":
        return (x_t - sigma * output) / alpha
    return alpha * x_t - sigma * output


def eps_from_x0(
    x0: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float
) -> torch.Tensor:
    """The noise implied by an x0 estimate: eps = (x_t - alpha * x0) / sigma (used by DDIM, Song et al. 2021 eq. 12)."""
    return (x_t - expand_like(alpha, x_t) * x0) / expand_like(sigma, x_t)


def training_target(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
    prediction: Prediction,
) -> torch.Tensor:
    """Regression target for the network output: eps itself, or v = alpha * eps - sigma * x0 (Salimans & Ho 2022)."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    return expand_like(alpha, x0) * eps - expand_like(sigma, x0) * x0


def min_snr_weight(logsnr: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Per-sample loss weight of Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", Sec 3.4), shape (B,): the x0-space weight min(SNR, gamma), written for the predicted
    quantity. The eps-MSE is SNR times the x0-MSE and the v-MSE (SNR + 1) times it, so the weight is
    min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v. It stops the nearly clean, high-SNR
    steps (fine detail) from dominating the gradient, which the paper finds conflicts with the noisier steps
    that decide layout and colour; gamma 5 is its default.
    """
    _check_prediction(prediction)
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
    snr = torch.exp(logsnr.float().clamp(max=60.0))  # exp(60) is still finite in fp32; a larger SNR weighs ~0
    capped = snr.clamp(max=gamma)
    return capped / snr if prediction == "eps" else capped / (snr + 1.0)


def diffusion_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, shape (B,) (the "simple" loss of Ho et al. 2020 eq. 14, as in Imagen).

    Always fp32: a bf16/fp16 network output is upcast before the difference (bf16 keeps 8 bits of mantissa, so
    a bf16 squared error, and its mean over a large image, would lose the small differences training reduces).
    """
    if output.shape != target.shape:
        raise ValueError(f"output shape {tuple(output.shape)} differs from target shape {tuple(target.shape)}")
    output, target = _at_least_fp32(output), _at_least_fp32(target)
    return (output - target).square().reshape(output.shape[0], -1).mean(dim=1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
