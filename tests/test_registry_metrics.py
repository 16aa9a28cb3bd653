"""Evaluation maths against hand-computed cases: Frechet distance, the colour classifier, metric directions."""
from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines.demo.corpus import COLOURS, POSITIONS, random_scene, render
from pipelines.demo.colour import (
    PlacedShape,
    background_accuracy,
    colour_accuracy,
    dominant_colour,
    position_accuracy,
    prompt_colours,
    prompt_shapes,
    shapes_in_cells,
    shows_prompted_colours,
)
from pipelines.registry.fid import (
    FidConfig,
    InceptionUnavailable,
    fid,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    load_inception,
)
from pipelines.registry.images import from_pil
from pipelines.registry.metrics import MetricSpec, metric_spec


def test_frechet_distance_hand_computed():
    # |mu1 - mu2|^2 = 2; S1 S2 = diag(4, 4) so Tr sqrt = 4; Tr S1 + Tr S2 = 10: d^2 = 2 + 10 - 8 = 4.
    assert frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 1.0])) == pytest.approx(4.0)
    # 1-D: N(0, 1) vs N(3, 4): 9 + (1 - 2)^2 = 10.
    one_d = frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]]))
    assert one_d == pytest.approx(10.0)
    s = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert frechet_distance(np.ones(2), s, np.ones(2), s) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_on_a_general_case():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2, mu1, mu2 = a @ a.T + np.eye(4), b @ b.T + 0.1 * np.eye(4), rng.normal(size=4), rng.normal(size=4)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)


def test_feature_route_equals_covariance_route_with_few_samples():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(5, 8)), rng.normal(loc=0.5, size=(7, 8))  # N < D: rank-deficient covariances
    expected = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    # the covariance route takes square roots of round-off eigenvalues (sqrt(1e-16) = 1e-8): agree to 1e-6
    assert frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_fid_without_weights_says_where_it_looked(tmp_path):
    with pytest.raises(InceptionUnavailable, match=f"FID skipped: no Inception weights at {tmp_path / 'x.pth'}"):
        load_inception(FidConfig(inception_weights=str(tmp_path / "x.pth")))


@pytest.mark.slow
def test_fid_runs_inception_from_a_local_safetensors_file(tmp_path):
    """The real loading and feature path, with random-init Inception-v3 weights (no download possible here)."""
    import safetensors.torch
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    torch.set_num_threads(1)
    weights = tmp_path / "inception.safetensors"
    model = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    real, fake = torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1
    config = FidConfig(inception_weights=str(weights), batch_size=3)
    different, same = fid(real, fake, config), fid(real, real, config)
    assert different > 0 and abs(same) < 1e-9 * different


def _scene_images(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return torch.cat([from_pil(render(s, 32)) for s in scenes]), [s.caption() for s in scenes]


def test_prompt_colours_split_background_and_shapes():
    parsed = prompt_colours("a red circle at the top left and a grey star on the right on a blue background")
    assert parsed.background == "blue" and parsed.others == ("red", "gray")
    assert prompt_colours("a cat").background is None and prompt_colours("a cat").others == ()


def test_colour_classifier_on_demo_scenes():
    for name, rgb in COLOURS.items():
        solid = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 4, 4) / 127.5 - 1
        assert dominant_colour(solid[0]) == name
    images, captions = _scene_images(24, seed=3)
    accuracy, scored = colour_accuracy(images, captions)
    assert (accuracy, scored) == (1.0, 24)  # the corpus's own renders show what their captions say
    shifted = captions[1:] + captions[:1]
    wrong, _ = colour_accuracy(images, shifted)
    print(f"colour accuracy: true captions {accuracy:.2f}, shifted captions {wrong:.2f}")
    assert wrong < 0.2
    assert shows_prompted_colours(images[0], "a photo") is None
    with pytest.raises(ValueError, match="no prompt names a colour"):
        colour_accuracy(images[:2], ["a photo", "a drawing"])


def test_background_accuracy_on_demo_scenes():
    images, captions = _scene_images(24, seed=4)
    assert background_accuracy(images, captions) == (1.0, 24)
    shifted = captions[1:] + captions[:1]
    assert background_accuracy(images, shifted)[0] < 0.3
    with pytest.raises(ValueError, match="no prompt names a background"):
        background_accuracy(images[:2], ["a red circle", "a photo"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        background_accuracy(images[:2], captions[:1])


def test_prompt_shapes_read_colour_and_cell():
    placed = prompt_shapes("a red circle at the top left and a grey star on the right on a blue background")
    assert placed == (PlacedShape("red", "top left"), PlacedShape("gray", "right"))
    assert prompt_shapes("a cyan ring at the top on a black background") == (PlacedShape("cyan", "top"),)
    assert prompt_shapes("a red circle on a blue background") == ()  # no cell named


def test_position_accuracy_on_demo_scenes():
    images, captions = _scene_images(40, seed=5)
    accuracy, scored = position_accuracy(images, captions)
    assert accuracy == 1.0 and scored == sum(len(prompt_shapes(c)) for c in captions) > 40
    # The same scenes captioned with every shape in another cell: the colours still match, the positions do not.
    cells = list(POSITIONS)
    rng = random.Random(5)
    scenes = [random_scene(rng) for _ in range(40)]
    moved = [dataclasses.replace(s, shapes=tuple(dataclasses.replace(x, position=cells[(cells.index(x.position) + 4) % 9])
                                                 for x in s.shapes)).caption() for s in scenes]
    assert colour_accuracy(images, moved)[0] == 1.0
    wrong, _ = position_accuracy(images, moved)
    print(f"position accuracy: true captions {accuracy:.2f}, shapes moved {wrong:.2f}")
    assert wrong < 0.1
    flat = torch.tensor(COLOURS["blue"], dtype=torch.float32).view(3, 1, 1).expand(3, 30, 30) / 127.5 - 1
    assert shapes_in_cells(flat, "a red circle at the top left on a blue background") == [False]  # no red at all
    with pytest.raises(ValueError, match="no prompt places a shape"):
        position_accuracy(images[:1], ["a red circle on a blue background"])


def test_metric_directions_and_improvements():
    loss, clip = metric_spec("eval_loss"), metric_spec("clip_score")
    assert loss.improvement(challenger=0.8, champion=1.0) == pytest.approx((0.2, 0.2))
    assert clip.improvement(challenger=30.0, champion=25.0) == pytest.approx((5.0, 0.2))
    assert clip.improvement(challenger=20.0, champion=25.0)[0] == pytest.approx(-5.0)
    assert MetricSpec(name="x", direction="max").improvement(1.0, 0.0) == (1.0, math.inf)
    with pytest.raises(ValueError, match="unknown metric 'acc'"):
        metric_spec("acc")
    with pytest.raises(ValueError, match="direction"):
        MetricSpec(name="x", direction="up")


def test_psnr_against_hand_computed_values_and_bicubic_baseline():
    import math

    import torch

    from imagen_core.diffusion.residual import upsample_lowres
    from pipelines.registry.evaluate import psnr

    reference = torch.zeros(2, 3, 4, 4)
    noisy = reference + 0.1  # mse 0.01 on a peak-to-peak range of 2: 10 log10(4 / 0.01) = 26.02 dB
    assert math.isclose(psnr(noisy, reference), 10 * math.log10(400), rel_tol=1e-6)
    smooth = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    up = upsample_lowres(torch.nn.functional.avg_pool2d(smooth, 2), 16)
    assert up.shape == smooth.shape and psnr(up, smooth) > 30  # a linear ramp survives bicubic upsampling
