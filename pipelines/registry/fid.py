"""Frechet Inception Distance (Heusel et al. 2017): the Frechet distance between Gaussians fitted to Inception
pool features of real and generated images.

Features come from torchvision's Inception-v3 (IMAGENET1K_V1, the Google weights ported to torchvision). The
reference FID code (pytorch-fid, TF's "pt_inception-2015-12-05") uses an older export of those weights, so the
numbers here are comparable with each other, not with published FIDs. Weights are never downloaded here: without
the file, `fid_features` raises `InceptionUnavailable` and evaluation says "FID skipped: ...".
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

TORCHVISION_INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
"""The file name torchvision's Inception_V3_Weights.IMAGENET1K_V1 downloads to (torch hub cache)."""
INCEPTION_SIZE = 299


class InceptionUnavailable(RuntimeError):
    """No Inception weights at the configured path."""


def default_inception_path() -> pathlib.Path:
    """Where torchvision caches the Inception-v3 weights: $TORCH_HOME/hub/checkpoints/..."""
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_INCEPTION_FILE


@dataclasses.dataclass(kw_only=True, frozen=True)
class FidConfig:
    """How to compute FID."""

    inception_weights: str | None = None
    """torchvision Inception-v3 state dict (.pth loaded with weights_only, or .safetensors); None: torch hub cache."""
    batch_size: int = 32
    """Images per Inception forward pass."""
    min_images: int = 2
    """Fewer images per side cannot give a covariance; FID from a few hundred images is biased high (Chong and
    Forsyth 2020): compare values computed from equal numbers of images."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"FidConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.min_images < 2:
            raise ValueError(f"FidConfig.min_images must be >= 2 (a covariance needs two), got {self.min_images}")

    @property
    def weights_path(self) -> pathlib.Path:
        return pathlib.Path(self.inception_weights) if self.inception_weights else default_inception_path()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Dowson and Landau 1982; FID, Heusel et al. 2017 eq. 6).

    Tr((S1 S2)^(1/2)) is computed as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the two matrices are similar, and the second
    is symmetric PSD, so an eigen-decomposition gives it without the complex parts scipy's sqrtm can return.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    root1 = _sqrt_psd(sigma1)
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance of the Gaussians fitted to two (N, D) feature sets.

    With fewer samples than dimensions (the usual case for small evaluations: D = 2048) the covariances are rank
    deficient and the covariance route loses precision. Writing S_i = A_i A_i^T with A_i = centred features^T /
    sqrt(N_i - 1), Tr((S1^(1/2) S2 S1^(1/2))^(1/2)) is the nuclear norm of A1^T A2 (N1 x N2), and Tr(S_i) = |A_i|_F^2:
    exact, and cheap while N1 * N2 is small.
    """
    f1, f2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of equal D, got {f1.shape} and {f2.shape}")
    if min(len(f1), len(f2)) > f1.shape[1]:
        return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    a1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    a2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    diff = f1.mean(0) - f2.mean(0)
    nuclear = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum())
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2.0 * nuclear)


def load_inception(config: FidConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """torchvision's Inception-v3 with the classifier removed: forward gives (B, 2048) pool features."""
    path = config.weights_path
    if not path.is_file():
        raise InceptionUnavailable(
            f"FID skipped: no Inception weights at {path}. On a machine with internet, "
            "`torchvision.models.inception_v3(weights='IMAGENET1K_V1')` caches them there; copy the file here "
            "or set FidConfig.inception_weights."
        )
    if path.suffix == ".safetensors":
        import safetensors.torch

        state = safetensors.torch.load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # restricted unpickler: tensors only
    from torchvision.models import inception_v3

    # transform_input=False: the Google weights expect inputs in [-1, 1], which is our image convention already
    # (torchvision's transform_input=True maps ImageNet-normalised inputs to that range).
    model = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
    model.load_state_dict(state)
    model.fc = torch.nn.Identity()
    return model.eval().to(device)


@torch.no_grad()
def fid_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """(N, 2048) pool features of images in [-1, 1], bilinearly resized to 299x299."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device, torch.float32)
        batch = F.interpolate(batch, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        out.append(model(batch).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def fid(real: torch.Tensor, fake: torch.Tensor, config: FidConfig, device: torch.device | str = "cpu") -> float:
    """FID between two image sets in [-1, 1]; InceptionUnavailable when the weights are not on disk."""
    for label, images in (("real", real), ("generated", fake)):
        if images.shape[0] < config.min_images:
            raise ValueError(f"FID needs at least {config.min_images} {label} images, got {images.shape[0]}")
    model = load_inception(config, device)
    return frechet_distance_from_features(
        fid_features(model, real, config.batch_size), fid_features(model, fake, config.batch_size)
    )

