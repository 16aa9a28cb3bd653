"""Diffusion maths against hand-computed values: schedules, eps/v objectives, guidance, thresholding, augmentation."""
import math

import pytest
import torch

from imagen_core.diffusion import (
    ScheduleConfig,
    alpha_sigma,
    apply_guidance,
    diffusion_loss,
    drop_condition_mask,
    dynamic_threshold,
    eps_from_x0,
    logsnr_schedule,
    min_snr_weight,
    noise_augment,
    sample_aug_levels,
    sample_times,
    static_threshold,
    training_target,
    x0_from_output,
)
from imagen_core.diffusion.thresholding import per_sample_quantile

COSINE = ScheduleConfig(kind="cosine")
LINEAR = ScheduleConfig(kind="linear")


def _hand_cosine(t: float, s: float = 0.008) -> float:
    """Nichol & Dhariwal 2021 eq. 17 written as in imagen-pytorch: -log(cos((t+s)/(1+s) pi/2)^-2 - 1)."""
    return -math.log(math.cos((t + s) / (1 + s) * math.pi / 2) ** -2 - 1)


def _hand_linear(t: float) -> float:
    return -math.log(math.expm1(1e-4 + 10 * t**2))


# --- schedules -------------------------------------------------------------------------------------------------


def test_cosine_and_linear_match_hand_values_inside_the_clip():
    t = torch.tensor([0.0, 0.25, 0.5, 0.9])
    assert _hand_cosine(0.5) == pytest.approx(-0.024934, abs=1e-6)
    assert _hand_linear(0.5) == pytest.approx(-2.414458, abs=1e-6)
    expected_cos = torch.tensor([_hand_cosine(v) for v in t.tolist()])
    expected_lin = torch.tensor([_hand_linear(v) for v in t.tolist()])
    torch.testing.assert_close(logsnr_schedule(t, COSINE), expected_cos, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logsnr_schedule(t, LINEAR), expected_lin, atol=2e-5, rtol=1e-5)


def test_schedule_endpoints_are_clipped():
    ends = torch.tensor([0.0, 1.0])
    # Cosine: t=0 is 8.7693 (inside the default clip), t=1 is -inf, clipped to logsnr_min.
    torch.testing.assert_close(logsnr_schedule(ends, COSINE), torch.tensor([_hand_cosine(0.0), -20.0]))
    assert _hand_cosine(0.0) == pytest.approx(8.7693, abs=1e-4)
    # Linear reaches neither default clip: 9.2103 .. -10.0001.
    torch.testing.assert_close(logsnr_schedule(ends, LINEAR), torch.tensor([_hand_linear(0.0), _hand_linear(1.0)]))
    narrow = ScheduleConfig(kind="linear", logsnr_min=-5.0, logsnr_max=5.0)
    torch.testing.assert_close(logsnr_schedule(ends, narrow), torch.tensor([5.0, -5.0]))


@pytest.mark.parametrize("config", [COSINE, LINEAR], ids=["cosine", "linear"])
def test_schedule_is_finite_and_decreasing(config):
    logsnr = logsnr_schedule(torch.linspace(0, 1, 1001), config)
    assert torch.isfinite(logsnr).all()
    assert (logsnr[1:] <= logsnr[:-1]).all()


def test_alpha_sigma_variance_preserving_and_snr():
    logsnr = torch.linspace(-20, 20, 81)
    alpha, sigma = alpha_sigma(logsnr)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(logsnr), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.log(alpha**2 / sigma**2), logsnr, atol=1e-4, rtol=1e-5)
    # Hand value at logsnr 0: alpha = sigma = sqrt(1/2).
    a0, s0 = alpha_sigma(torch.tensor([0.0]))
    assert a0.item() == pytest.approx(math.sqrt(0.5)) and s0.item() == pytest.approx(math.sqrt(0.5))


def test_schedule_config_and_input_validation():
    with pytest.raises(ValueError, match="kind"):
        ScheduleConfig(kind="sigmoid")
    with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
        ScheduleConfig(logsnr_min=5.0, logsnr_max=-5.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logsnr_schedule(torch.tensor([1.5]), COSINE)


def test_sample_times_seeded_uniform():
    t1 = sample_times(10_000, torch.Generator().manual_seed(3))
    t2 = sample_times(10_000, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.shape == (10_000,)
    assert 0.0 <= t1.min() and t1.max() < 1.0
    assert t1.mean().item() == pytest.approx(0.5, abs=0.015)  # SE 0.0029


# --- objective -------------------------------------------------------------------------------------------------


def _noised(batch: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(batch, 3, 8, 8, generator=g, dtype=dtype)
    alpha, sigma = alpha_sigma(torch.tensor([-6.0, -1.0, 2.0, 7.0], dtype=dtype))
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    return x0, eps, alpha, sigma, x_t


def test_eps_and_v_round_trips():
    x0, eps, alpha, sigma, x_t = _noised()
    for prediction in ("eps", "v"):
        target = training_target(x0, eps, alpha, sigma, prediction)
        # float64: the identities hold to rounding (v: alpha x_t - sigma v = (alpha^2 + sigma^2) x0).
        torch.testing.assert_close(x0_from_output(target, x_t, alpha, sigma, prediction), x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(eps_from_x0(x0, x_t, alpha, sigma), eps, atol=1e-12, rtol=0)
    v = training_target(x0, eps, alpha, sigma, "v")
    torch.testing.assert_close(v, alpha.view(-1, 1, 1, 1) * eps - sigma.view(-1, 1, 1, 1) * x0)
    # Already-broadcast alpha/sigma give the same answer.
    torch.testing.assert_close(
        x0_from_output(v, x_t, alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1), "v"), x0, atol=1e-12, rtol=0
    )


def test_diffusion_loss_is_per_sample_mse():
    output = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 0.0]]).view(2, 1, 2, 2)
    torch.testing.assert_close(diffusion_loss(output, target), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(output, target[:1])


def test_min_snr_weight_is_the_x0_weight_min_snr_gamma_in_each_parameterisation():
    logsnr = torch.log(torch.tensor([0.25, 1.0, 5.0, 20.0]))  # SNR 0.25, 1, 5, 20 with gamma 5
    torch.testing.assert_close(min_snr_weight(logsnr, 5.0, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weight(logsnr, 5.0, "v"), torch.tensor([0.2, 0.5, 5 / 6, 5 / 21]))
    # In x0 space both are min(SNR, gamma): the eps-MSE is SNR x the x0-MSE, the v-MSE (SNR + 1) x it.
    x0, eps, alpha, sigma, x_t = _noised()
    snr = (alpha / sigma) ** 2
    wrong_x0 = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=x0.dtype)
    for prediction in ("eps", "v"):  # the output a net would give for the estimate wrong_x0
        output = training_target(wrong_x0, eps_from_x0(wrong_x0, x_t, alpha, sigma), alpha, sigma, prediction)
        target = training_target(x0, eps, alpha, sigma, prediction)
        weighted = diffusion_loss(output, target) * min_snr_weight(torch.log(snr), 5.0, prediction)
        torch.testing.assert_close(weighted, diffusion_loss(wrong_x0, x0) * snr.clamp(max=5.0).float())
    assert torch.isfinite(min_snr_weight(torch.tensor([200.0, -200.0]), 5.0, "v")).all()
    with pytest.raises(ValueError, match="gamma must be positive"):
        min_snr_weight(logsnr, 0.0, "v")


def test_unknown_prediction_is_rejected():
    x0, eps, alpha, sigma, x_t = _noised()
    with pytest.raises(ValueError, match="prediction"):
        training_target(x0, eps, alpha, sigma, "x0")
    with pytest.raises(ValueError, match="one value per sample"):
        x0_from_output(eps, x_t, alpha[:3], sigma[:3], "eps")


# --- guidance --------------------------------------------------------------------------------------------------


def test_guidance_scales():
    cond = torch.tensor([1.0, 2.0, -0.3])
    uncond = torch.tensor([0.5, 0.0, 0.1])
    assert torch.equal(apply_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(apply_guidance(cond, uncond, 0.0), uncond)
    # 7.5: 0.5 + 7.5 * 0.5 = 4.25, 0 + 7.5 * 2 = 15, 0.1 + 7.5 * (-0.4) = -2.9.
    torch.testing.assert_close(apply_guidance(cond, uncond, 7.5), torch.tensor([4.25, 15.0, -2.9]))
    with pytest.raises(ValueError, match="guidance scale"):
        apply_guidance(cond, uncond, -1.0)


def test_drop_condition_mask_rate():
    n, p = 100_000, 0.1
    mask = drop_condition_mask(n, p, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (n,)
    # Binomial SE sqrt(p (1 - p) / n) = 0.00095; 5 SE.
    assert mask.float().mean().item() == pytest.approx(p, abs=0.005)
    assert not drop_condition_mask(100, 0.0).any()
    assert drop_condition_mask(100, 1.0).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_condition_mask(10, 1.5)


# --- thresholding ----------------------------------------------------------------------------------------------


def test_dynamic_threshold_hand_values():
    # Sample 0: |x| = 0, 0.01, ..., 2.00 (201 values) with alternating signs. The 99.5th percentile sits at
    # position 0.995 * 200 = 199 of the sorted values, i.e. s = 1.99 > 1: clip to [-1.99, 1.99] and divide by 1.99.
    magnitudes = torch.arange(201, dtype=torch.float64) / 100
    signs = torch.where(torch.arange(201) % 2 == 0, 1.0, -1.0).double()
    big = (magnitudes * signs).view(1, 1, 1, 201)
    # Sample 1: |x| <= 0.5, so s = max(quantile, 1) = 1 and the sample is left unchanged.
    small = big / 4
    out = dynamic_threshold(torch.cat([big, small]), percentile=0.995)
    expected_big = big.clamp(-1.99, 1.99) / 1.99
    torch.testing.assert_close(out[0:1], expected_big, atol=1e-9, rtol=0)
    assert out[0, 0, 0, 200].item() == pytest.approx(1.0)  # 2.00 -> clipped to 1.99 -> 1
    assert out[0, 0, 0, 100].item() == pytest.approx(1.0 / 1.99)  # 1.00 -> 1 / 1.99
    assert torch.equal(out[1:2], small)


def test_per_sample_quantile_matches_torch_quantile():
    x = torch.randn(3, 2, 7, 5, generator=torch.Generator().manual_seed(1))
    for q in (0.5, 0.9, 0.995, 1.0):
        expected = torch.quantile(x.reshape(3, -1), q, dim=1)
        torch.testing.assert_close(per_sample_quantile(x, q), expected)


def test_static_threshold_and_percentile_validation():
    assert torch.equal(static_threshold(torch.tensor([-3.0, 0.2, 1.5])), torch.tensor([-1.0, 0.2, 1.0]))
    with pytest.raises(ValueError, match="percentile"):
        dynamic_threshold(torch.zeros(1, 4), percentile=99.5)


# --- noise-conditioning augmentation ---------------------------------------------------------------------------


def test_aug_level_zero_is_the_schedule_start_not_exactly_clean():
    # Level 0 is t=0 of the schedule, not a special case: cosine logsnr(0) = 8.7693 (not the clip at 20),
    # so alpha = 0.99992 and sigma = 0.0125: the input comes back within a few sigma, not bit for bit.
    lowres = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noised, logsnr = noise_augment(lowres, torch.zeros(2), COSINE, torch.Generator().manual_seed(1))
    torch.testing.assert_close(logsnr, torch.full((2,), _hand_cosine(0.0)))
    alpha, sigma = alpha_sigma(logsnr)
    assert sigma[0].item() == pytest.approx(0.0125, abs=1e-4)
    eps = torch.randn(lowres.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(noised, alpha.view(-1, 1, 1, 1) * lowres + sigma.view(-1, 1, 1, 1) * eps)
    assert (noised - lowres).abs().max().item() < 6 * sigma[0].item()


def test_noise_augment_statistics_per_sample_level():
    levels = torch.tensor([0.3, 0.7])
    lowres = torch.full((2, 3, 64, 64), 0.5)
    noised, logsnr = noise_augment(lowres, levels, COSINE, torch.Generator().manual_seed(0))
    torch.testing.assert_close(logsnr, torch.tensor([_hand_cosine(0.3), _hand_cosine(0.7)]))
    alpha, sigma = alpha_sigma(logsnr)
    per_sample = noised.flatten(1)
    n = per_sample.shape[1]  # 12288 values: SE of the mean sigma / sqrt(n), of the std sigma / sqrt(2 n); 5 SE each
    assert ((per_sample.mean(1) - 0.5 * alpha).abs() < 5 * sigma / math.sqrt(n)).all()
    assert ((per_sample.std(1) - sigma).abs() < 5 * sigma / math.sqrt(2 * n)).all()
    assert sigma[1] > 1.5 * sigma[0]  # the two samples really got different corruption (0.89 vs 0.46)


def test_sample_aug_levels_are_per_sample():
    levels = sample_aug_levels(1000, torch.Generator().manual_seed(0), max_level=0.5)
    assert levels.shape == (1000,) and levels.unique().numel() == 1000
    assert 0.0 <= levels.min() and levels.max() < 0.5
    assert levels.mean().item() == pytest.approx(0.25, abs=0.02)  # SE 0.0046
    with pytest.raises(ValueError, match="max_level"):
        sample_aug_levels(4, max_level=0.0)
    with pytest.raises(ValueError, match="one level per image"):
        noise_augment(torch.zeros(2, 3, 4, 4), torch.zeros(3), COSINE)
