"""The validation loss is deterministic and independent of batching; sample grids are PNGs of the right size."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from imagen_core.recipes import unet_tiny, unet_tiny_sr
from imagen_core.stage import DiffusionStage, StageConfig
from imagen_core.text_encoder import TextEncoderConfig
from pipelines.train.data import Batch
from pipelines.train.validation import first_rows, sample_grid, validation_loss

ENCODER = TextEncoderConfig(name="imagen-asset:tiny-t5", max_length=16)


def _stage(sr: bool) -> DiffusionStage:
    torch.manual_seed(0)
    unet = dataclasses.replace(unet_tiny_sr() if sr else unet_tiny(), text_embed_dim=8)
    config = StageConfig(name="sr1" if sr else "base", unet=unet, text_encoder=ENCODER, lowres_size=8 if sr else None)
    stage = DiffusionStage(config).eval()
    for p in stage.parameters():  # leave the zero-initialised output layer: a fresh net predicts 0
        p.data.add_(0.05 * torch.randn_like(p))
    return stage


def _batch(keys: list[str], sr: bool) -> Batch:
    g = torch.Generator().manual_seed(sum(map(int, keys)))
    n = len(keys)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return Batch(keys=keys, captions=[f"caption {k}" for k in keys],
                 images=torch.rand(n, 3, 16, 16, generator=g) * 2 - 1,
                 text_embeds=torch.randn(n, 5, 8, generator=g) * mask[..., None], text_mask=mask,
                 lowres=torch.rand(n, 3, 8, 8, generator=g) * 2 - 1 if sr else None)


def _split(batch: Batch, sizes: list[int]) -> list[Batch]:
    out, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        out.append(dataclasses.replace(batch, keys=batch.keys[part], captions=batch.captions[part],
                                       images=batch.images[part], text_embeds=batch.text_embeds[part],
                                       text_mask=batch.text_mask[part],
                                       lowres=None if batch.lowres is None else batch.lowres[part]))
        start += size
    return out


@pytest.mark.parametrize("sr", [False, True])
def test_validation_loss_is_deterministic_and_batch_independent(sr: bool) -> None:
    stage = _stage(sr)
    whole = _batch(["1", "2", "3", "4", "5", "6"], sr)
    loss = validation_loss(stage, [whole], timesteps=4, seed=7)
    assert loss == validation_loss(stage, [whole], timesteps=4, seed=7)
    assert loss == pytest.approx(validation_loss(stage, _split(whole, [2, 1, 3]), timesteps=4, seed=7), rel=1e-6)
    assert loss != validation_loss(stage, [whole], timesteps=4, seed=8)
    assert loss != validation_loss(stage, [whole], timesteps=3, seed=7)
    assert 0.0 < loss < 10.0


def test_sample_grid_is_a_png_of_prompts_by_rows() -> None:
    from PIL import Image

    stage = _stage(sr=True)
    rows = first_rows(_split(_batch(["1", "2", "3"], True), [2, 1]), 3)
    assert rows.keys == ["1", "2", "3"] and rows.text_embeds.shape == (3, 5, 8)
    png = sample_grid(stage, rows, steps=2, seed=0)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (3 * 18 - 2, 3 * 18 - 2)  # low-res, samples, originals
