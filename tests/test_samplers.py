"""Samplers against closed forms: Gaussian data has an analytic optimal denoiser and an analytic ODE flow.

Data x0 ~ N(MU, S^2) i.i.d. per scalar. Then x_t ~ N(alpha MU, alpha^2 S^2 + sigma^2) and the optimal denoiser is
E[x0 | x_t] = MU + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha MU). A correct sampler driven by it must
return samples with mean MU and std S, up to Monte-Carlo noise and its own discretisation error.
"""
import math

import pytest
import torch

from imagen_core.diffusion import SamplerConfig, ScheduleConfig, alpha_sigma, sample, time_grid

MU, S = 0.3, 0.5
N = 100_000
"""Scalars per run. Monte-Carlo standard errors: mean S / sqrt(N) = 0.0016, std S / sqrt(2N) = 0.0011."""

MOMENT_TOL = 0.01
"""Allowed |empirical - true| for mean and std (2% of S). About 6 SE of the mean / 9 SE of the std, so Monte-Carlo
noise alone essentially never fails, plus the discretisation bias of the step counts below (largest measured:
std -0.005, first-order DDIM at 250 steps on the linear schedule). A real mistake (a mis-scaled or missing noise
term, eps and x0 confused) moves the std by far more (std sqrt(c) -> c in the ancestral step: -0.45); coefficient
errors that vanish as the steps shrink are left to the convergence-order test."""

SCHEDULES = [ScheduleConfig(kind="cosine"), ScheduleConfig(kind="linear")]
# Steps per sampler: DDIM is first order (its std bias halves per doubling of steps: -0.027 at 50 linear steps),
# the ancestral sampler also loses Var[x0 | x_t] at every step; DPM-Solver++(2M) is second order.
MOMENT_RUNS = [
    SamplerConfig(kind="dpmpp_2m", steps=50),
    SamplerConfig(kind="ddim", steps=250),
    SamplerConfig(kind="ancestral", steps=1000),
]


def gaussian_x0_fn(mu: float, s: float):
    def x0_fn(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (v.to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1)) for v in alpha_sigma(logsnr.double()))
        return mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x_t - alpha * mu)

    return x0_fn


def mixture_x0_fn(modes: tuple[float, float], s: float):
    """E[x0 | x_t] for x0 ~ 0.5 N(m1, s^2) + 0.5 N(m2, s^2): the per-mode posterior means weighted by p(mode | x_t)."""

    def x0_fn(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (v.to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1)) for v in alpha_sigma(logsnr.double()))
        var = alpha**2 * s**2 + sigma**2
        log_w = torch.stack([-((x_t - alpha * m) ** 2) / (2 * var) for m in modes])
        means = torch.stack([m + alpha * s**2 / var * (x_t - alpha * m) for m in modes])
        return (torch.softmax(log_w, dim=0) * means).sum(0)

    return x0_fn


def _run(config: SamplerConfig, schedule: ScheduleConfig, x0_fn, seed: int = 0, shape=(100, 1, 1000)):
    return sample(x0_fn, shape, schedule, config, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda c: c.kind)
@pytest.mark.parametrize("config", MOMENT_RUNS, ids=lambda c: f"{c.kind}-{c.steps}")
def test_gaussian_moments(config, schedule):
    torch.set_num_threads(1)
    out = _run(config, schedule, gaussian_x0_fn(MU, S))
    assert out.numel() == N
    assert abs(out.mean().item() - MU) < MOMENT_TOL, f"mean {out.mean().item():.4f} vs {MU}"
    assert abs(out.std().item() - S) < MOMENT_TOL, f"std {out.std().item():.4f} vs {S}"


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda c: c.kind)
@pytest.mark.parametrize("config", MOMENT_RUNS, ids=lambda c: f"{c.kind}-{c.steps}")
def test_two_mode_mixture_moments(config, schedule):
    # Modes at +-0.6 with std 0.15: a non-linear denoiser. True mean 0, std sqrt(0.6^2 + 0.15^2) = 0.6185,
    # half the mass on each side of 0 (binomial SE 0.0016; same tolerance).
    torch.set_num_threads(1)
    out = _run(config, schedule, mixture_x0_fn((-0.6, 0.6), 0.15))
    assert abs(out.mean().item()) < MOMENT_TOL
    assert abs(out.std().item() - math.hypot(0.6, 0.15)) < MOMENT_TOL
    assert abs((out > 0).double().mean().item() - 0.5) < MOMENT_TOL


def _ode_path_error(config: SamplerConfig, schedule: ScheduleConfig) -> float:
    """Max |sampler - exact probability-flow ODE| for Gaussian data, from the same x_T (float64).

    With y = x / alpha and r = sigma / alpha, the ODE dy/dr = (y - x0_hat) / r has the solution
    y - MU proportional to sqrt(S^2 + r^2); the sampler returns x0_hat at the last grid level r_last.
    """
    grid = time_grid(config.steps, schedule)
    first, last = grid[0], grid[config.steps - 1]
    r_T, r_last = first.sigma / first.alpha, last.sigma / last.alpha
    x_T = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z_T = x_T / first.alpha - MU
    exact = MU + S**2 * z_T / (math.sqrt(S**2 + r_last**2) * math.sqrt(S**2 + r_T**2))
    out = sample(gaussian_x0_fn(MU, S), x_T.shape, schedule, config, None, x_T=x_T)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda c: c.kind)
@pytest.mark.parametrize(("kind", "order"), [("ddim", 1), ("dpmpp_2m", 2)])
def test_deterministic_samplers_converge_at_their_order(kind, order, schedule):
    # Doubling the steps divides the global error by 2^order. Measured from 200 to 400 steps: DDIM 1.98 (cosine)
    # and 1.97 (linear), DPM-Solver++(2M) 3.80 and 3.80 (3.55 / 3.16 from 100 to 200, still pre-asymptotic).
    # A wrong second-order coefficient falls back to a ratio near 2, outside the +-15% window.
    coarse = _ode_path_error(SamplerConfig(kind=kind, steps=200), schedule)
    fine = _ode_path_error(SamplerConfig(kind=kind, steps=400), schedule)
    assert 0.85 * 2**order < coarse / fine < 1.15 * 2**order, f"error {coarse:.2e} -> {fine:.2e}"


def test_ddim_with_eta_one_is_the_ancestral_sampler():
    # Song et al. 2021 eq. 16: eta = 1 gives the DDPM posterior variance; both draw noise in the same order.
    schedule = ScheduleConfig()
    ddim = _run(SamplerConfig(kind="ddim", steps=20, eta=1.0), schedule, gaussian_x0_fn(MU, S), shape=(1000,))
    ancestral = _run(SamplerConfig(kind="ancestral", steps=20), schedule, gaussian_x0_fn(MU, S), shape=(1000,))
    torch.testing.assert_close(ddim, ancestral, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["ancestral", "ddim", "dpmpp_2m"])
def test_seeded_and_deterministic(kind):
    config, schedule, fn = SamplerConfig(kind=kind, steps=10), ScheduleConfig(), gaussian_x0_fn(MU, S)
    a = _run(config, schedule, fn, seed=1, shape=(2, 3, 4, 4))
    b = _run(config, schedule, fn, seed=1, shape=(2, 3, 4, 4))
    c = _run(config, schedule, fn, seed=2, shape=(2, 3, 4, 4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_one_model_call_per_step_and_final_prediction_returned():
    calls, ticks = [], []

    def x0_fn(x_t, logsnr):
        calls.append(logsnr.clone())
        return torch.full_like(x_t, 0.25)

    out = sample(x0_fn, (3, 2), ScheduleConfig(), SamplerConfig(steps=4), torch.Generator().manual_seed(0),
                 progress=lambda step, total: ticks.append((step, total)))
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [c.shape for c in calls] == [(3,)] * 4
    # Grid t = 1, 0.75, 0.5, 0.25: the first call is at the clipped logsnr_min, the last returns x0_hat itself.
    assert calls[0][0].item() == -20.0 and torch.equal(out, torch.full((3, 2), 0.25))
    assert all((later > earlier).all() for earlier, later in zip(calls[:-1], calls[1:]))


def test_sampler_config_and_input_validation():
    assert SamplerConfig() == SamplerConfig(kind="ddim", steps=50, eta=0.0)
    with pytest.raises(ValueError, match="kind"):
        SamplerConfig(kind="euler")
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="eta applies to kind='ddim'"):
        SamplerConfig(kind="ancestral", eta=0.5)
    with pytest.raises(ValueError, match="x_T has shape"):
        sample(gaussian_x0_fn(MU, S), (2, 3), ScheduleConfig(), SamplerConfig(), None, x_T=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="x0_fn returned shape"):
        sample(lambda x, l: x[:1], (2, 3), ScheduleConfig(), SamplerConfig(steps=2), None)
