"""A stage end to end in one process: the tiny U-Net learns, samples follow the prompt, the cascade chains."""
import pytest
import torch

from imagen_core.cascade import Cascade
from imagen_core.diffusion.samplers import SamplerConfig
from imagen_core.recipes import stage_tiny_base, stage_tiny_sr
from imagen_core.stage import DiffusionStage, drop_condition, null_condition
from imagen_core.text_encoder import build_text_encoder

OVERFIT_STEPS = 400
PROMPTS = ["a red square", "a blue circle", "a green triangle", "a yellow star"]


def _pattern_images(size: int) -> torch.Tensor:
    """Four distinct images: solid colours with a bright quadrant in different places."""
    colours = torch.tensor([[1.0, -1, -1], [-1, -1, 1.0], [-1, 1.0, -1], [1.0, 1.0, -1]])
    images = colours[:, :, None, None].expand(4, 3, size, size).clone()
    half = size // 2
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        images[i, :, r * half : (r + 1) * half, c * half : (c + 1) * half] *= -0.5
    return images


def _fixed_eval_loss(stage: DiffusionStage, images, embeds, mask) -> float:
    """Loss at fixed times and noise (no condition dropping): comparable between calls."""
    gen = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for t in torch.linspace(0.05, 0.95, 10):
            eps = torch.randn(images.shape, generator=gen)
            losses.append(stage.loss_at(images, embeds, mask, torch.full((images.shape[0],), float(t)), eps).mean().item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_tiny_stage_overfits_and_follows_prompts(assets_dir):
    torch.manual_seed(0)
    config = stage_tiny_base()
    encoder = build_text_encoder(config.text_encoder, "cpu")
    embeds, mask = encoder.encode(PROMPTS)
    images = _pattern_images(config.image_size)
    stage = DiffusionStage(config)
    opt = torch.optim.Adam(stage.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, OVERFIT_STEPS)
    before = _fixed_eval_loss(stage, images, embeds, mask)
    for _ in range(OVERFIT_STEPS):
        loss = stage(images.repeat(4, 1, 1, 1), embeds.repeat(4, 1, 1), mask.repeat(4, 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    after = _fixed_eval_loss(stage, images, embeds, mask)
    print(f"overfit: fixed-timestep loss {before:.4f} -> {after:.4f} ({before / after:.1f}x) in {OVERFIT_STEPS} steps")
    assert after < before / 10

    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 16, 16, generator=gen)
    samples = stage.sample(
        embeds[:2], mask[:2], guidance_scale=3.0, sampler=SamplerConfig(kind="ddim", steps=25), x_T=x_T, generator=gen
    )
    # Same starting noise, two prompts: the outputs must differ and each must be close to its training image.
    assert (samples[0] - samples[1]).abs().mean() > 0.3
    err_own = (samples - images[:2]).abs().mean(dim=(1, 2, 3))
    err_swapped = (samples - images[[1, 0]]).abs().mean(dim=(1, 2, 3))
    print(f"sample error vs own prompt's image {err_own.tolist()}, vs the other's {err_swapped.tolist()}")
    assert (err_own < err_swapped).all()


def test_null_condition_and_dropping():
    embeds = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    null_embeds, null_mask = null_condition(embeds, mask)
    assert null_embeds.abs().sum() == 0 and null_mask.sum(1).tolist() == [1, 1, 1]
    dropped, dropped_mask = drop_condition(embeds, mask, torch.tensor([False, True, False]))
    assert torch.equal(dropped[0], embeds[0]) and torch.equal(dropped[2], embeds[2])
    assert dropped[1].abs().sum() == 0 and dropped_mask[1].tolist() == [True, False, False, False, False]


def test_sr_stage_trains_and_samples_at_its_size():
    torch.manual_seed(0)
    config = stage_tiny_sr()
    stage = DiffusionStage(config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    embeds, mask = torch.randn(2, 4, 64), torch.ones(2, 4, dtype=torch.bool)
    loss = stage(images, embeds, mask)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    out = stage.sample(embeds, mask, lowres=images[:, :, ::2, ::2], sampler=SamplerConfig(steps=3),
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32)


def test_residual_sr_stage_diffuses_the_difference_from_bicubic():
    """residual_scale: the loss is the image objective on (x - bicubic(lowres)) * scale; the x0 an untrained
    net gives at high noise is the bicubic upsample; samples come back as images in [-1, 1]."""
    import dataclasses

    from imagen_core.diffusion.residual import from_residual, to_residual, upsample_lowres
    from imagen_core.diffusion.schedule import logsnr_schedule
    from imagen_core.stage import resize_lowres

    torch.manual_seed(0)
    plain = stage_tiny_sr()
    config = dataclasses.replace(plain, residual_scale=10.0)
    stage = DiffusionStage(config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    lowres = resize_lowres(images, 16)
    upsampled = upsample_lowres(lowres, 32)
    torch.testing.assert_close(from_residual(to_residual(images, upsampled, 10.0), upsampled, 10.0), images)
    embeds, mask = torch.randn(2, 4, 64), torch.ones(2, 4, dtype=torch.bool)
    t, eps, aug_level, aug_eps = torch.full((2,), 0.5), torch.randn(2, 3, 32, 32), torch.zeros(2), torch.randn(2, 3, 16, 16)
    as_image_stage = DiffusionStage(plain)
    as_image_stage.load_state_dict(stage.state_dict())
    torch.testing.assert_close(
        stage.loss_at(images, embeds, mask, t, eps, lowres, aug_level, aug_eps),
        as_image_stage.loss_at(to_residual(images, upsampled, 10.0), embeds, mask, t, eps, lowres, aug_level, aug_eps),
    )
    with pytest.raises(ValueError, match="give lowres, aug_level and aug_eps"):
        stage.loss_at(images, embeds, mask, t, eps)

    logsnr = logsnr_schedule(torch.full((2,), 1.0), config.schedule)
    x0_fn = stage.x0_fn(embeds, mask, 1.0, lowres, torch.zeros(2), upsampled)
    x0 = from_residual(x0_fn(torch.randn(2, 3, 32, 32), logsnr), upsampled, 10.0)
    assert (x0 - upsampled).abs().max().item() < 0.01  # zero-init output: v = 0, so x0 = alpha * x_t / scale
    with pytest.raises(ValueError, match="upsampled"):
        stage.x0_fn(embeds, mask, 1.0, lowres, torch.zeros(2))
    out = stage.sample(embeds, mask, lowres=lowres, sampler=SamplerConfig(steps=3), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32) and out.abs().max().item() <= 1.0

    with pytest.raises(ValueError, match="residual_scale"):
        dataclasses.replace(stage_tiny_base(), residual_scale=10.0)
    with pytest.raises(ValueError, match="residual_scale"):
        dataclasses.replace(plain, residual_scale=0.0)


def test_threshold_percentile_none_clips_instead_of_rescaling():
    """Dynamic thresholding divides a whole sample by its percentile when that exceeds 1; None only clips."""
    import dataclasses

    from imagen_core.diffusion.schedule import alpha_sigma, logsnr_schedule

    torch.manual_seed(0)
    embeds, mask = torch.randn(1, 4, 64), torch.ones(1, 4, dtype=torch.bool)
    logsnr = logsnr_schedule(torch.zeros(1), stage_tiny_base().schedule)
    alpha, _ = alpha_sigma(logsnr)
    x_t = torch.full((1, 3, 32, 32), 0.5)
    x_t[..., :4, :] = 1.5  # 12.5% of pixels out of range: the 99.5th percentile is 1.5 * alpha
    for percentile, inside in ((0.995, 0.5 / 1.5), (None, 0.5 * alpha.item())):
        stage = DiffusionStage(dataclasses.replace(stage_tiny_base(), threshold_percentile=percentile))
        x0 = stage.x0_fn(embeds, mask, 1.0)(x_t, logsnr)  # zero-init output (v = 0): x0 = alpha * x_t
        assert x0[..., 8:, :].sub(inside).abs().max().item() < 1e-5
        assert x0.max().item() == pytest.approx(1.0)


def test_cascade_chains_stages_deterministically(assets_dir):
    torch.manual_seed(0)
    cascade = Cascade.from_stages([DiffusionStage(stage_tiny_base()), DiffusionStage(stage_tiny_sr())])
    run = lambda seed: cascade.sample(["a red circle"], sampler=SamplerConfig(steps=3), seed=seed)  # noqa: E731
    first, again, other = run(0), run(0), run(1)
    assert [o.shape[-1] for o in first] == [16, 32]
    assert torch.equal(first[-1], again[-1])
    assert not torch.equal(first[-1], other[-1])


def _psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (images.clamp(-1, 1) - reference).square().flatten(1).mean(1)
    return float((10 * torch.log10(4 / mse)).mean())


SR_STEPS = 400


@pytest.mark.slow
def test_sr_stage_learns_to_use_its_lowres_input():
    """The Efficient U-Net's full-resolution block lets an SR net denoise single pixels at low noise, and its
    low-res input gives the image at high noise (the demo SR net, with one channel per GroupNorm group and no such
    block, still ignored its low-res input after 400 steps: x0 at t=0.99 no better than the mean image)."""
    import random

    import numpy as np

    from imagen_core.diffusion.augmentation import noise_augment
    from imagen_core.diffusion.schedule import alpha_sigma, logsnr_schedule
    from imagen_core.stage import resize_lowres
    from pipelines.demo.corpus import random_scene, render

    torch.manual_seed(0)
    config = stage_tiny_sr()
    rng = random.Random(0)
    images = torch.stack([
        torch.from_numpy(np.array(render(random_scene(rng), 32))).permute(2, 0, 1).float()
        for _ in range(64)
    ]) / 127.5 - 1
    embeds, mask = torch.zeros(64, 1, 64), torch.ones(64, 1, dtype=torch.bool)
    stage = DiffusionStage(config)
    optimizer = torch.optim.Adam(stage.parameters(), lr=1e-3)
    for _ in range(SR_STEPS):
        idx = torch.randint(0, 64, (16,))
        loss = stage(images[idx], embeds[idx], mask[idx]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    gen = torch.Generator().manual_seed(1)
    test = images[:16]
    lowres, lowres_logsnr = noise_augment(resize_lowres(test, 16), torch.zeros(16), config.schedule, generator=gen)
    mean_image = images.mean(0, keepdim=True).expand_as(test)
    results = {}
    with torch.no_grad():
        for t in (0.05, 0.99):
            logsnr = logsnr_schedule(torch.full((16,), t), config.schedule)
            alpha, sigma = alpha_sigma(logsnr)
            x_t = alpha.view(-1, 1, 1, 1) * test + sigma.view(-1, 1, 1, 1) * torch.randn(test.shape, generator=gen)
            x0 = stage.x0_fn(embeds[:16], mask[:16], 1.0, lowres, lowres_logsnr)(x_t, logsnr)
            results[t] = (_psnr(x0, test), _psnr(x_t / alpha.view(-1, 1, 1, 1), test))
    print(f"x0 PSNR (dB) at t=0.05: {results[0.05][0]:.1f} vs x_t {results[0.05][1]:.1f}; at t=0.99: "
          f"{results[0.99][0]:.1f} vs the mean image {_psnr(mean_image, test):.1f}")
    # Seen at 400 steps: +2.8 dB over x_t at t=0.05, +4.5 dB over the mean image at t=0.99; without the
    # full-resolution block the first was -1.2 dB (x0 worse than x_t: the net could not denoise single pixels).
    assert results[0.05][0] > results[0.05][1] + 1.5, "denoises at low noise"
    assert results[0.99][0] > _psnr(mean_image, test) + 3.0, "reconstructs from the low-res input at high noise"


def test_min_snr_weighting_scales_each_training_sample_and_not_validation():
    import dataclasses

    from imagen_core.diffusion import logsnr_schedule, min_snr_weight

    plain = stage_tiny_base()
    weighted = dataclasses.replace(plain, min_snr_gamma=5.0)
    torch.manual_seed(0)
    a = DiffusionStage(plain)
    b = DiffusionStage(weighted)
    b.load_state_dict(a.state_dict())
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    embeds, mask = torch.randn(4, 5, 64), torch.ones(4, 5, dtype=torch.bool)
    unweighted = a(images, embeds, mask, generator=torch.Generator().manual_seed(3))
    loss = b(images, embeds, mask, generator=torch.Generator().manual_seed(3))
    t = torch.rand(4, generator=torch.Generator().manual_seed(3))  # forward's first draw
    expected = unweighted * min_snr_weight(logsnr_schedule(t, plain.schedule), 5.0, plain.prediction)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, unweighted)
    t_fixed, eps = torch.full((4,), 0.5), torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(b.loss_at(images, embeds, mask, t_fixed, eps), a.loss_at(images, embeds, mask, t_fixed, eps))
    with pytest.raises(ValueError, match="min_snr_gamma must be positive"):
        dataclasses.replace(plain, min_snr_gamma=0.0)
