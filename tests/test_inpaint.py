"""RePaint inpainting (Lugmayr et al. 2022): the jump schedule, exact known pixels, and `edit` on PNG files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagen_core.diffusion.schedule import ScheduleConfig
from imagen_core.inpaint import InpaintConfig, inpaint, repaint, repaint_schedule
from imagen_core.text_encoder import build_text_encoder
from pipelines.registry.checkpoints import load_stage
from pipelines.registry.sampling import EditConfig, SampleConfig, edit
from test_registry_common import make_stage, sr_config

pytest_plugins = ["test_registry_common"]  # its session fixtures (stages, registry) are shared

EDIT_TOLERANCE_LEVELS = 0
"""Kept pixels of `edit` must come back bit-exact in the PNG (0 of 255 levels) when the input is at base size."""


def test_schedule_matches_a_hand_worked_case():
    # steps 4, jump back 2 levels once (resample 2) from noise index 0: RePaint's get_schedule_jump.
    assert repaint_schedule(InpaintConfig(steps=4, jump_length=2, resample=2)) == [4, 3, 2, 1, 0, 1, 2, 1, 0]
    assert repaint_schedule(InpaintConfig(steps=5, jump_length=1, resample=1)) == [5, 4, 3, 2, 1, 0]


def test_schedule_moves_one_level_at_a_time_and_counts_calls():
    config = InpaintConfig(steps=10, jump_length=2, resample=3)
    path = repaint_schedule(config)
    assert path[0] == 10 and path[-1] == 0 and all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
    calls = sum(1 for a, b in zip(path, path[1:]) if b < a)
    # every level once, plus (r - 1) extra passes over each of the 4 jump segments (points 0, 2, 4, 6)
    assert calls == 10 + (3 - 1) * 2 * 4


def test_perfect_predictor_recovers_the_image_and_known_pixels_are_exact():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    keep = torch.ones(2, 1, 8, 8)
    keep[:, :, 2:6, 2:6] = 0
    config = InpaintConfig(steps=6, jump_length=2, resample=2)
    oracle = repaint(lambda x, logsnr: image, image, keep, ScheduleConfig(), config, torch.Generator().manual_seed(1))
    torch.testing.assert_close(oracle, image)  # with x0 known exactly, the hole is filled with the truth

    calls = []
    blind = repaint(lambda x, logsnr: torch.zeros_like(x), image, keep, ScheduleConfig(), InpaintConfig(steps=6),
                    torch.Generator().manual_seed(1), progress=lambda i, n: calls.append((i, n)))
    assert torch.equal(blind * keep, image * keep)  # known pixels pasted back exactly
    assert torch.equal(blind[:, :, 2:6, 2:6], torch.zeros(2, 3, 4, 4))  # the hole is the predictor's
    assert calls[-1] == (len(calls), len(calls))


def test_inpaint_with_a_stage_keeps_known_pixels_and_changes_the_hole(stage_dirs):
    torch.set_num_threads(1)
    stage = load_stage(stage_dirs["base_trained"])
    embeds, mask = build_text_encoder(stage.config.text_encoder).encode(["a red square on a blue background"])
    image = torch.full((1, 3, 8, 8), -1.0)
    keep = torch.ones(1, 1, 8, 8)
    keep[..., :4] = 0
    out = inpaint(stage, embeds, mask, image, keep, config=InpaintConfig(steps=6, jump_length=2, resample=2),
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., 4:], image[..., 4:])
    assert not torch.allclose(out[..., :4], image[..., :4])
    with pytest.raises(ValueError, match="super-resolution"):
        inpaint(make_stage(sr_config(), 0), embeds, mask, image, keep)
    with pytest.raises(ValueError, match="inpaints images of shape"):
        inpaint(stage, embeds, mask, torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16))


def _write(path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_edit_regenerates_the_white_mask_and_keeps_the_rest(stage_dirs, tmp_path):
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 1:5] = 255  # white = regenerate
    calls = []
    result = edit(
        stage_dirs["base_trained"], _write(tmp_path / "in.png", original), _write(tmp_path / "mask.png", mask),
        "a green circle on a white background", tmp_path / "out.png",
        config=EditConfig(sample=SampleConfig(seed=0), inpaint=InpaintConfig(steps=6, jump_length=2, resample=2)),
        progress=lambda stage, i, n: calls.append(stage),
    )
    edited = np.asarray(Image.open(result.path).convert("RGB")).astype(int)
    kept = mask == 0
    assert np.abs(edited[kept] - original[kept]).max() <= EDIT_TOLERANCE_LEVELS
    assert np.abs(edited[~kept] - original[~kept]).mean() > 10
    assert set(calls) == {"base"} and len(calls) == 10
    with pytest.raises(ValueError, match="no white pixels"):
        black = _write(tmp_path / "black.png", np.zeros((8, 8), np.uint8))
        edit(stage_dirs["base_trained"], tmp_path / "in.png", black, "x")
