"""Validation on the held-out split: a deterministic loss (the number promotion compares) and sample grids.

The training loss draws t, the noise and the condition drop at random, so two checkpoints' training losses
are not comparable. The validation loss fixes all of it: K times t_k = (k + 0.5) / K for every sample, noise
drawn from a generator seeded by (val_seed, key) (so it depends neither on the batch layout nor on the rank),
no condition dropping, and for SR stages the low-res input noised at the stage's sampling augmentation level.
It is the Imagen training objective (Sec 2.1, eps- or v-MSE) averaged over those fixed points.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import torch

from imagen_core.diffusion import SamplerConfig
from imagen_core.stage import DiffusionStage
from pipelines.train.data import Batch


def _key_seed(seed: int, key: str) -> int:
    digest = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return int(np.random.SeedSequence([seed, digest]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _per_sample_normal(keys: list[str], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One standard-normal draw of `shape` per key, reproducible from (seed, key) alone."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(_key_seed(seed, k))) for k in keys])


@torch.no_grad()
def validation_loss(module: DiffusionStage, batches: list[Batch], *, timesteps: int, seed: int) -> float:
    """Mean diffusion loss over the held-out batches at fixed times and noise (float; NaN if no batches)."""
    cfg = module.config
    device = next(module.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device, torch.float32)
        images = batch.images
        eps = _per_sample_normal(batch.keys, tuple(images.shape[1:]), seed).to(device)
        aug_level = aug_eps = None
        if cfg.is_super_resolution:
            # Augmentation noise from a second per-key stream; the level is the stage's sampling level.
            aug_eps = _per_sample_normal(batch.keys, tuple(batch.lowres.shape[1:]), seed + 1).to(device)
            aug_level = torch.full((len(batch),), cfg.sample_aug_level, device=device)
        for k in range(timesteps):
            t = torch.full((len(batch),), (k + 0.5) / timesteps, device=device)
            losses = module.loss_at(
                images, batch.text_embeds, batch.text_mask, t, eps, batch.lowres, aug_level, aug_eps
            )
            total += float(losses.sum())
            count += len(batch)
    return total / count if count else float("nan")


def first_rows(batches: list[Batch], n: int) -> Batch:
    """The first n held-out rows: the fixed prompts (and low-res inputs) of every sample grid of the run."""
    keys, captions, images, embeds, masks, lows = [], [], [], [], [], []
    for batch in batches:
        take = min(n - len(keys), len(batch))
        keys += batch.keys[:take]
        captions += batch.captions[:take]
        images.append(batch.images[:take])
        embeds.append(batch.text_embeds[:take])
        masks.append(batch.text_mask[:take])
        if batch.lowres is not None:
            lows.append(batch.lowres[:take])
        if len(keys) == n:
            break
    length = max(e.shape[1] for e in embeds)
    return Batch(keys=keys, captions=captions, images=torch.cat(images),
                 text_embeds=torch.cat([_pad_tokens(e, length) for e in embeds]),
                 text_mask=torch.cat([_pad_tokens(m, length) for m in masks]),
                 lowres=torch.cat(lows) if lows else None)


def _pad_tokens(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero/False-pad the token axis (dim 1) of embeddings (B, L, D) or a mask (B, L) to `length`."""
    shape = list(tensor.shape)
    shape[1] = length - tensor.shape[1]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=1)


@torch.no_grad()
def sample_grid(module: DiffusionStage, rows: Batch, *, steps: int, seed: int) -> bytes:
    """PNG: one column per prompt; rows = [low-res input (SR)], samples, the held-out image itself."""
    cfg = module.config
    device = next(module.parameters()).device
    rows = rows.to(device, torch.float32)
    generator = torch.Generator(device=device).manual_seed(seed)
    sampler = SamplerConfig(kind=cfg.sampler.kind, steps=steps, eta=cfg.sampler.eta)
    samples = module.sample(rows.text_embeds, rows.text_mask, lowres=rows.lowres, sampler=sampler, generator=generator)
    size = cfg.image_size
    grid_rows = []
    if rows.lowres is not None:
        grid_rows.append(torch.nn.functional.interpolate(rows.lowres, size=(size, size), mode="nearest"))
    grid_rows += [samples, rows.images]
    return _png(torch.stack(grid_rows))


def _png(grid: torch.Tensor) -> bytes:
    """(R, C, 3, S, S) in [-1, 1] -> PNG bytes of an R x C grid with 2-px gaps."""
    from PIL import Image

    r, c, _, s, _ = grid.shape
    gap = 2
    canvas = np.full((r * (s + gap) - gap, c * (s + gap) - gap, 3), 255, dtype=np.uint8)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
    for i in range(r):
        for j in range(c):
            canvas[i * (s + gap): i * (s + gap) + s, j * (s + gap): j * (s + gap) + s] = pixels[i, j]
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, format="PNG")
    return out.getvalue()
