"""Evaluate a stage on the metrics a config lists: held-out loss, CLIP score, FID, PSNR, the demo's colour task.

- eval_loss: the diffusion loss on held-out images at fixed timesteps with fixed noise, recomputed for every
  version (comparable across versions). Distinct from the training run's own `val_loss` (logged while training,
  recorded on the version as `train_val_loss`).
- clip_score: 100 * mean max(cos(image, prompt), 0) with the configured open_clip model (Hessel et al. 2021
  without their 2.5 weight, as torchmetrics' CLIPScore).
- fid: Frechet Inception Distance of samples against held-out images (fid.py); skipped, and said so, without
  Inception weights on disk.
- psnr (SR stages): PSNR of the upsampled held-out images against the originals, with `psnr_bicubic`, the
  bicubic baseline the stage must beat.
- colour_accuracy: share of samples showing the colours their prompts name (the demo corpus's task).
- position_accuracy: share of the shapes the prompts place that the samples show in their named 3x3 cell.
A super-resolution stage is sampled by upsampling the held-out images' downsampled copies, with their captions.
Results go to the version's run (metrics `eval/<name>`) and to the version itself (tags `metric.<name>`).
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Literal

import mlflow
import torch

from imagen_core.diffusion.residual import upsample_lowres
from imagen_core.diffusion.samplers import SamplerConfig
from imagen_core.stage import DiffusionStage, resize_lowres
from imagen_core.text_encoder import TextEncoder, build_text_encoder
from pipelines.clip_model import Clip, ClipConfig
from pipelines.demo.colour import colour_accuracy, position_accuracy, prompt_colours, prompt_shapes
from pipelines.registry.fid import FidConfig, InceptionUnavailable, fid
from pipelines import storage
from pipelines.registry.images import decode_png as decode_image_bytes
from pipelines.registry.images import read_image, to_pil
from pipelines.registry.loading import ModelRef, load_registered_stage, stage_model_name
from pipelines.registry.metrics import METRIC_TAG_PREFIX, RUN_METRIC_PREFIX
from pipelines.step import canonical_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MetricName = Literal["eval_loss", "clip_score", "fid", "psnr", "colour_accuracy", "position_accuracy"]


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Held-out images (N, 3, H, W) in [-1, 1] with their captions."""

    images: torch.Tensor
    captions: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.shape[0] != len(self.captions) or not self.captions:
            raise ValueError(
                f"HeldOut needs one caption per image, got {self.images.shape[0]} images, {len(self.captions)} captions"
            )


def load_heldout(directory: str | pathlib.Path, size: int, limit: int) -> HeldOut:
    """Up to `limit` image files with same-named .txt captions (img2dataset's "files" layout), sorted by path.
    `directory` may be an object-store URL (s3://bucket/heldout): one listing, then each pair is read."""
    if "://" in str(directory):
        return _load_heldout_from_store(storage.path(directory), size, limit)
    directory = pathlib.Path(directory)
    pairs = [(p, p.with_suffix(".txt")) for p in sorted(directory.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    pairs = [(image, caption) for image, caption in pairs if caption.is_file()][:limit]
    if not pairs:
        raise ValueError(f"no held-out pairs in {directory}: expected <key>.png|jpg with a <key>.txt caption beside it")
    images = torch.cat([read_image(image, size=size) for image, _ in pairs])
    return HeldOut(images=images, captions=tuple(caption.read_text().strip() for _, caption in pairs))


def _load_heldout_from_store(directory: storage.StoragePath, size: int, limit: int) -> HeldOut:
    files = directory.files(recursive=True)
    names = {f.relative_to(directory) for f in files}
    pairs = []
    for image in files:  # sorted by URI, as the local branch sorts by path
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        relative = image.relative_to(directory)
        caption = relative[: len(relative) - len(image.suffix)] + ".txt"
        if caption in names:
            pairs.append((image, directory / caption))
    pairs = pairs[:limit]
    if not pairs:
        raise ValueError(f"no held-out pairs in {directory}: expected <key>.png|jpg with a <key>.txt caption beside it")
    images = torch.cat([decode_image_bytes(image.read_bytes(), size) for image, _ in pairs])
    return HeldOut(images=images, captions=tuple(caption.read_text().strip() for _, caption in pairs))


@dataclasses.dataclass(kw_only=True, frozen=True)
class EvalConfig:
    """What to measure and on what."""

    heldout_dir: str | None = None
    """Held-out images + captions (img2dataset "files" layout), a local folder or an object-store URL; needed for
    recomputed val_loss, FID, SR samples."""
    max_heldout: int = 64
    """At most this many held-out pairs are read."""
    prompts: tuple[str, ...] = ()
    """Prompts to sample a base stage with; empty: the held-out captions."""
    num_samples: int = 16
    """Samples drawn for CLIP score, colour accuracy and FID."""
    sampler: SamplerConfig = SamplerConfig(kind="ddim", steps=25)
    """Sampler for the evaluation samples."""
    guidance: float | None = None
    """Guidance for the samples (None: the stage's configured scale)."""
    val_loss_timesteps: int = 8
    """Fixed times t_k = (k + 0.5) / K at which the held-out loss is averaged."""
    seed: int = 0
    """Seed for the loss's noise and the samples: equal seeds make versions comparable."""
    batch_size: int = 8
    """Images per forward pass."""
    metrics: tuple[MetricName, ...] = ("eval_loss", "clip_score", "fid", "psnr")
    """What to measure; a metric that cannot be computed (no CLIP given, no Inception weights, a base stage's
    PSNR) is skipped and the reason kept in the version's `eval.notes` tag."""
    clip: ClipConfig | None = None
    """open_clip model for the CLIP score."""
    fid: FidConfig = FidConfig()
    """FID options."""
    colour_min_fraction: float = 0.01
    """Share of pixels a named shape colour must cover."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1 or self.val_loss_timesteps < 1 or self.max_heldout < 1:
            raise ValueError("EvalConfig: num_samples, batch_size, val_loss_timesteps and max_heldout must be >= 1")


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]
    notes: list[str]
    """What was skipped and why, in plain words."""
    samples: torch.Tensor | None = None


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def heldout_loss(stage: DiffusionStage, encoder: TextEncoder, heldout: HeldOut, config: EvalConfig) -> float:
    """Mean diffusion loss (the training objective, Imagen Sec 2.1) over held-out images at fixed timesteps and noise.

    No condition dropping; SR stages see their input augmented at the stage's sampling level.
    """
    cfg = stage.config
    device = next(stage.parameters()).device
    images = heldout.images
    if images.shape[-1] != cfg.image_size:
        images = resize_lowres(images, cfg.image_size)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    total, count = 0.0, 0
    for part in _batches(images.shape[0], config.batch_size):
        x0 = images[part].to(device)
        embeds, mask = encoder.encode(list(heldout.captions[part]))
        embeds, mask = embeds.to(device), mask.to(device)
        lowres = aug_level = aug_eps = None
        if cfg.is_super_resolution:
            lowres = resize_lowres(x0, cfg.lowres_size)
            aug_level = torch.full((x0.shape[0],), cfg.sample_aug_level, device=device)
            aug_eps = torch.randn(lowres.shape, generator=generator, device=device)
        for k in range(config.val_loss_timesteps):
            t = torch.full((x0.shape[0],), (k + 0.5) / config.val_loss_timesteps, device=device)
            eps = torch.randn(x0.shape, generator=generator, device=device)
            total += float(stage.loss_at(x0, embeds, mask, t, eps, lowres, aug_level, aug_eps).sum())
            count += x0.shape[0]
    return total / count


@torch.no_grad()
def draw_samples(
    stage: DiffusionStage, encoder: TextEncoder, prompts: Sequence[str], lowres: torch.Tensor | None, config: EvalConfig
) -> torch.Tensor:
    """Samples for the metrics, in batches, from one seeded generator."""
    device = next(stage.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    out = []
    for part in _batches(len(prompts), config.batch_size):
        embeds, mask = encoder.encode(list(prompts[part]))
        out.append(stage.sample(
            embeds.to(device), mask.to(device), lowres=None if lowres is None else lowres[part].to(device),
            guidance_scale=config.guidance, sampler=config.sampler, generator=generator,
        ).cpu())
    return torch.cat(out)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] against the reference (peak-to-peak range 2)."""
    mse = (images.clamp(-1, 1) - reference).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((10.0 * torch.log10(4.0 / mse)).mean())


def clip_score(clip: Clip, images: torch.Tensor, prompts: Sequence[str]) -> float:
    """100 * mean over samples of max(cos(image, prompt), 0)."""
    cosine = (clip.encode_images(to_pil(images)) * clip.encode_texts(list(prompts))).sum(-1)
    return float(100.0 * cosine.clamp_min(0.0).mean())


def _sample_inputs(
    stage: DiffusionStage, heldout: HeldOut | None, config: EvalConfig
) -> tuple[list[str], torch.Tensor | None] | str:
    """Prompts (and low-res inputs for SR) for the samples, or why there are none."""
    if stage.config.is_super_resolution:
        if heldout is None:
            return "sample metrics skipped: a super-resolution stage needs held-out images to upsample (heldout_dir)"
        n = min(config.num_samples, len(heldout.captions))
        return list(heldout.captions[:n]), resize_lowres(heldout.images[:n], stage.config.lowres_size)
    prompts = list(config.prompts) or (list(heldout.captions) if heldout else [])
    if not prompts:
        return "sample metrics skipped: give prompts or heldout_dir"
    return [prompts[i % len(prompts)] for i in range(config.num_samples)], None


def compute_metrics(stage: DiffusionStage, config: EvalConfig) -> EvalResult:
    """The configured metrics of one stage (no logging)."""
    encoder = build_text_encoder(stage.config.text_encoder, config.device)
    heldout = None
    if config.heldout_dir:
        heldout = load_heldout(config.heldout_dir, stage.config.image_size, config.max_heldout)
    wanted = set(config.metrics)
    metrics: dict[str, float] = {}
    notes: list[str] = []
    if "eval_loss" in wanted:
        if heldout is None:
            notes.append("eval_loss skipped: no held-out data (heldout_dir)")
        else:
            metrics["eval_loss"] = heldout_loss(stage, encoder, heldout, config)
    if not wanted - {"eval_loss"}:
        return EvalResult(metrics, notes)
    inputs = _sample_inputs(stage, heldout, config)
    if isinstance(inputs, str):
        notes.append(inputs)
        return EvalResult(metrics, notes)
    prompts, lowres = inputs
    samples = draw_samples(stage, encoder, prompts, lowres, config)
    if "psnr" in wanted:
        if lowres is None or heldout is None:
            notes.append("psnr skipped: it measures super-resolution stages against held-out images")
        else:
            truth = resize_lowres(heldout.images[: samples.shape[0]], stage.config.image_size)
            metrics["psnr"] = psnr(samples, truth)
            metrics["psnr_bicubic"] = psnr(upsample_lowres(lowres, stage.config.image_size), truth)
    if "clip_score" in wanted:
        if config.clip is None:
            notes.append("clip_score skipped: no CLIP given (evaluate.clip)")
        else:
            metrics["clip_score"] = clip_score(Clip(config.clip), samples, prompts)
    if "colour_accuracy" in wanted:
        if any(prompt_colours(p).background or prompt_colours(p).others for p in prompts):
            metrics["colour_accuracy"], _ = colour_accuracy(samples, prompts, config.colour_min_fraction)
        else:
            notes.append("colour_accuracy skipped: no prompt names a palette colour")
    if "position_accuracy" in wanted:
        if any(prompt_shapes(p) for p in prompts):
            metrics["position_accuracy"], _ = position_accuracy(samples, prompts, config.colour_min_fraction)
        else:
            notes.append("position_accuracy skipped: no prompt places a shape in a named cell")
    if "fid" in wanted:
        if heldout is None:
            notes.append("FID skipped: no held-out images (heldout_dir)")
        else:
            try:
                metrics["fid"] = fid(heldout.images, samples, config.fid, config.device)
            except InceptionUnavailable as error:
                notes.append(str(error))
    return EvalResult(metrics, notes, samples)


def evaluate_stage(
    name: str, stage: str, *, version: str = "challenger", config: EvalConfig = EvalConfig()
) -> EvalResult:
    """Evaluate `<name>-<stage>` at an alias or version number; log to its run and tag the version."""
    client = mlflow.MlflowClient()
    model = stage_model_name(name, stage)
    ref = ModelRef(model, version=version) if version.isdigit() else ModelRef(model, alias=version)
    diffusion_stage, model_version = load_registered_stage(ref, device=config.device, client=client)
    result = compute_metrics(diffusion_stage, config)
    for key, value in result.metrics.items():
        if model_version.run_id:
            client.log_metric(model_version.run_id, RUN_METRIC_PREFIX + key, value)
        client.set_model_version_tag(model, model_version.version, METRIC_TAG_PREFIX + key, repr(value))
    client.set_model_version_tag(model, model_version.version, "eval.notes", "; ".join(result.notes) or "none")
    client.set_model_version_tag(model, model_version.version, "eval.config", canonical_json(config)[:5000])
    return result
