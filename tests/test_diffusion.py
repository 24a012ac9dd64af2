"""d2c.diffusion against closed forms and independent (numpy/scipy) references.

The sampler tests use Gaussian data x0 ~ N(μ_c, s_c²) per channel c, for which the optimal
ε-predictor, variance and velocity are known exactly, so each sampler's output distribution can
be checked against μ and s (or, where the sampler's own discretisation error is larger than
sampling noise, against the exact finite-step moments computed by a scalar recursion).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from d2c.diffusion import (
    ClassifierFreeGuidance,
    DDPMSchedule,
    ddim_sample,
    ddpm_sample,
    eps_from_velocity,
    eps_mse_per_sample,
    interpolate,
    normal_kl,
    ode_heun_sample,
    sample_t,
    score_from_velocity,
    sde_euler_maruyama_sample,
    space_timesteps,
    v_loss,
    velocity_target,
    x0_from_velocity,
)

T = 1000
BETA_START, BETA_END = 1e-4, 0.02
# numpy reference schedule, built independently of d2c
NP_BETAS = np.linspace(BETA_START, BETA_END, T)
NP_ALPHA_BAR = np.cumprod(1.0 - NP_BETAS)

# Gaussian data per channel
MU = np.array([0.5, -1.0])
SD = np.array([0.5, 0.8])
N_SAMPLES, DATA_SHAPE = 4000, (2, 2, 2)          # 16,000 scalars per channel
SAMPLING_SE = 1.0 / math.sqrt(N_SAMPLES * 4)      # relative standard error scale


def _chan(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64).view(1, -1, 1, 1)


def _moments(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(dim=(0, 2, 3)).numpy(), x.std(dim=(0, 2, 3)).numpy()


def _x_init(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_SAMPLES, *DATA_SHAPE, generator=g, dtype=torch.float64)


Y0 = torch.zeros(N_SAMPLES, dtype=torch.long)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are small: on a shared, oversubscribed 2-core CPU, intra-op threading makes
    each tiny op ~100x slower, so this module runs single-threaded (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- exact Gaussian denoisers --------------------------------------------------------------------

def gaussian_eps(x, t, y):
    """E[ε | x_t] for x_t = √ā x0 + √(1−ā) ε, x0 ~ N(μ, s²): √(1−ā)/(ā s² + 1 − ā) (x_t − √ā μ)."""
    a = torch.from_numpy(NP_ALPHA_BAR[t.long().numpy()]).view(-1, 1, 1, 1)
    mu, s = _chan(MU), _chan(SD)
    return (1 - a).sqrt() / (a * s ** 2 + 1 - a) * (x - a.sqrt() * mu)


def gaussian_eps_learned_sigma(kept: list[int]):
    """[ε̂, v]: ε̂ exact; v encodes the exact reverse variance of the respaced chain over `kept`:
    Var(x_{t'} | x_t) = β̃ + c1² Var(x0 | x_t), as ADM's frac between log β̃ and log β."""
    prev_of = {k: (kept[i - 1] if i > 0 else None) for i, k in enumerate(kept)}

    def fn(x, t, y):
        eps = gaussian_eps(x, t, y)
        tt = int(t[0])
        assert bool((t == tt).all())
        if prev_of[tt] is None:  # last step: no noise is added, the variance is unused
            return torch.cat([eps, torch.zeros_like(eps)], dim=1)
        a, ap = NP_ALPHA_BAR[tt], NP_ALPHA_BAR[prev_of[tt]]
        beta = 1 - a / ap
        post_var = beta * (1 - ap) / (1 - a)
        c1 = beta * math.sqrt(ap) / (1 - a)
        var_x0 = SD ** 2 * (1 - a) / (a * SD ** 2 + 1 - a)
        true_var = post_var + c1 ** 2 * var_x0
        frac = (np.log(true_var) - math.log(post_var)) / (math.log(beta) - math.log(post_var))
        v = _chan(2 * frac - 1).expand_as(eps)
        return torch.cat([eps, v], dim=1)

    return fn


def gaussian_velocity(x, t, y):
    """E[ε − x0 | x_t] for x_t = (1−t) x0 + t ε:  (t − (1−t)s²)/V (x_t − (1−t)μ) − μ,
    V = (1−t)² s² + t²."""
    tb = t.double().view(-1, 1, 1, 1)
    mu, s = _chan(MU), _chan(SD)
    var = (1 - tb) ** 2 * s ** 2 + tb ** 2
    return (tb - (1 - tb) * s ** 2) / var * (x - (1 - tb) * mu) - mu


def exact_chain_moments(kept: list[int], eta: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact output mean/std of DDPM (eta=None, fixed small variance) or DDIM(eta) over `kept`
    steps with the exact ε-predictor: every step is x' = A x + B + σ z, so the moments follow a
    scalar recursion from N(0, 1)."""
    m, v = np.zeros(2), np.ones(2)
    for j in range(len(kept) - 1, -1, -1):
        a = NP_ALPHA_BAR[kept[j]]
        ap = NP_ALPHA_BAR[kept[j - 1]] if j > 0 else 1.0
        k = math.sqrt(1 - a) / (a * SD ** 2 + 1 - a)          # ε̂ = k (x − √a μ)
        x0_a, x0_b = (1 - math.sqrt(1 - a) * k) / math.sqrt(a), math.sqrt(1 - a) * k * MU
        beta = 1 - a / ap
        if eta is None:
            c1, c2 = beta * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - beta) / (1 - a)
            lin, off = c1 * x0_a + c2, c1 * x0_b
            var = beta * (1 - ap) / (1 - a) if j > 0 else 0.0
        else:
            var = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
            r = math.sqrt(1 - ap - var)
            lin = math.sqrt(ap) * x0_a + r * k
            off = math.sqrt(ap) * x0_b - r * k * math.sqrt(a) * MU
        m, v = lin * m + off, lin ** 2 * v + var
    return m, np.sqrt(v)


# -- schedule ------------------------------------------------------------------------------------

def test_alphas_cumprod_against_numpy_product():
    sch = DDPMSchedule(T, BETA_START, BETA_END)
    assert sch.betas.dtype == torch.float64
    assert float(sch.alphas_cumprod[0]) == pytest.approx(1 - BETA_START, rel=1e-14)
    assert float(sch.alphas_cumprod[T - 1]) == pytest.approx(np.prod(1 - NP_BETAS), rel=1e-12)
    # posterior variance β̃_t = β_t (1 − ā_{t−1}) / (1 − ā_t); its log clipped at t = 0 to β̃_1
    t = 500
    expect = NP_BETAS[t] * (1 - NP_ALPHA_BAR[t - 1]) / (1 - NP_ALPHA_BAR[t])
    assert float(sch.posterior_variance[t]) == pytest.approx(expect, rel=1e-12)
    assert float(sch.posterior_variance[0]) == 0.0
    assert float(sch.posterior_log_variance_clipped[0]) == pytest.approx(
        math.log(NP_BETAS[1] * (1 - NP_ALPHA_BAR[0]) / (1 - NP_ALPHA_BAR[1])), rel=1e-12)


def test_q_sample_is_the_closed_form_and_has_its_moments():
    sch = DDPMSchedule()
    n, t_idx, x0_val = 20000, 300, 0.7
    g = torch.Generator().manual_seed(3)
    x0 = torch.full((n, 1, 1, 1), x0_val, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.full((n,), t_idx, dtype=torch.long)
    xt = sch.q_sample(x0, t, noise)
    a = NP_ALPHA_BAR[t_idx]
    torch.testing.assert_close(xt, math.sqrt(a) * x0 + math.sqrt(1 - a) * noise)
    se = math.sqrt((1 - a) / n)
    assert abs(float(xt.mean()) - math.sqrt(a) * x0_val) < 4 * se
    assert float(xt.var()) == pytest.approx(1 - a, rel=4 * math.sqrt(2 / n))


def test_space_timesteps_and_respace_keep_alpha_bar():
    kept = space_timesteps(T, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == T - 1
    assert kept == sorted({round(i * (T - 1) / 249) for i in range(250)})
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert space_timesteps(20, [2, 3]) == [0, 9, 10, 14, 19]
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim7")
    base = DDPMSchedule()
    resp = base.respace(100)
    kept = space_timesteps(T, 100)
    torch.testing.assert_close(resp.alphas_cumprod, torch.from_numpy(NP_ALPHA_BAR[kept]))
    assert resp.timestep_map.tolist() == kept
    # the model receives the ORIGINAL timestep index, as a float
    seen = []

    def record(x, t, y):
        seen.append(t.clone())
        return torch.zeros_like(x)

    ddpm_sample(record, resp, torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))
    assert [int(s[0]) for s in seen] == kept[::-1]
    assert all(s.dtype == torch.float32 and s.shape == (3,) for s in seen)


def test_learned_sigma_interpolates_between_posterior_and_beta():
    sch = DDPMSchedule()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 700])
    for v, expect in ((-1.0, np.log(NP_BETAS[[1, 700]] * (1 - NP_ALPHA_BAR[[0, 699]])
                                    / (1 - NP_ALPHA_BAR[[1, 700]]))),
                      (1.0, np.log(NP_BETAS[[1, 700]]))):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        _, log_var, _ = sch.p_mean_variance(out, x, t, learn_sigma=True)
        torch.testing.assert_close(log_var[:, :, 0, 0],
                                   torch.from_numpy(expect).view(2, 1).expand(2, 3))
    with pytest.raises(ValueError):
        sch.p_mean_variance(torch.zeros_like(x), x, t, learn_sigma=True)


# -- losses --------------------------------------------------------------------------------------

def _np_posterior(x0, xt, t):
    """q(x_{t−1} | x_t, x0) by Bayes: prior N(√ā_{t−1} x0, 1 − ā_{t−1}) × N(x_t; √α_t x, β_t)."""
    ap, beta = NP_ALPHA_BAR[t - 1], NP_BETAS[t]
    var = 1.0 / (1.0 / (1 - ap) + (1 - beta) / beta)
    mean = var * (math.sqrt(ap) * x0 / (1 - ap) + math.sqrt(1 - beta) * xt / beta)
    return mean, var


def test_vlb_kl_term_matches_closed_form_gaussian_kl():
    sch = DDPMSchedule()
    g = torch.Generator().manual_seed(5)
    n, shape = 3, (2, 3, 3)
    t_vals = [1, 250, 999]
    x0 = torch.rand(n, *shape, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor(t_vals)
    xt = sch.q_sample(x0, t, noise)
    eps_hat = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v_hat = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    vb = sch.vlb_terms(torch.cat([eps_hat, v_hat], dim=1), x0, xt, t)
    for i, ti in enumerate(t_vals):
        a = NP_ALPHA_BAR[ti]
        x0n, xtn = x0[i].numpy(), xt[i].numpy()
        m1, v1 = _np_posterior(x0n, xtn, ti)
        x0_hat = (xtn - math.sqrt(1 - a) * eps_hat[i].numpy()) / math.sqrt(a)
        m2, post_var = _np_posterior(x0_hat, xtn, ti)
        frac = (v_hat[i].numpy() + 1) / 2
        v2 = np.exp(frac * np.log(NP_BETAS[ti]) + (1 - frac) * np.log(post_var))
        kl = np.log(np.sqrt(v2 / v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
        assert float(vb[i]) == pytest.approx(kl.mean() / math.log(2), rel=1e-9)
    # normal_kl itself against scipy-free closed form on scalars
    assert float(normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0),
                           torch.tensor(math.log(4.0)))) == pytest.approx(
        math.log(2.0) + (1 + 1) / 8 - 0.5)


def test_vlb_decoder_nll_at_t0_matches_scipy():
    sch = DDPMSchedule()
    x0 = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0], dtype=torch.float64).view(1, 1, 1, 5)
    xt = sch.q_sample(x0, torch.tensor([0]), torch.full_like(x0, 0.1))
    out = torch.cat([torch.full_like(x0, 0.2), torch.full_like(x0, 0.5)], dim=1)
    vb = sch.vlb_terms(out, x0, xt, torch.tensor([0]))
    mean, log_var, _ = sch.p_mean_variance(out, xt, torch.tensor([0]), learn_sigma=True)
    m, xs = mean.flatten().numpy(), x0.flatten().numpy()
    sd = np.exp(0.5 * log_var.flatten().numpy())
    h = 1 / 255
    upper = np.where(xs > 0.999, np.inf, xs + h)
    lower = np.where(xs < -0.999, -np.inf, xs - h)
    p = stats.norm.cdf(upper, m, sd) - stats.norm.cdf(lower, m, sd)
    assert float(vb[0]) == pytest.approx(-np.log(p).mean() / math.log(2), rel=1e-9)


def test_eps_loss_hybrid_and_stop_gradient():
    sch = DDPMSchedule()
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(4, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 400, 999])
    xt = sch.q_sample(x0, t, noise)
    out = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    mse = ((noise - out[:, :2]) ** 2).mean(dim=(1, 2, 3))
    plain = sch.eps_loss(out[:, :2], x0, xt, t, noise)
    torch.testing.assert_close(plain, mse)
    torch.testing.assert_close(eps_mse_per_sample(out, noise), mse)
    weight = 0.25
    hybrid = sch.eps_loss(out, x0, xt, t, noise, learn_sigma=True, vlb_weight=weight)
    assert hybrid.shape == (4,)
    torch.testing.assert_close(hybrid, mse + weight * sch.vlb_terms(out, x0, xt, t))
    (grad,) = torch.autograd.grad(hybrid.sum(), out)
    # ε channels get only the MSE gradient; the variance channels get the VLB gradient
    torch.testing.assert_close(grad[:, :2], -2 * (noise - out[:, :2]).detach() / 18)
    assert float(grad[:, 2:].abs().min()) > 0


# -- interpolant ---------------------------------------------------------------------------------

def test_interpolant_endpoints_velocity_and_conversions():
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(5)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(5)), eps)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    dt = 1e-6
    finite_diff = (interpolate(x0, eps, t + dt) - interpolate(x0, eps, t)) / dt
    torch.testing.assert_close(velocity_target(x0, eps), finite_diff, rtol=1e-6, atol=1e-6)
    xt, v = interpolate(x0, eps, t), velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(xt, v, t), x0)
    torch.testing.assert_close(eps_from_velocity(xt, v, t), eps)
    assert float(v_loss(torch.cat([v, v], 1), x0, eps).abs().max()) == 0.0
    torch.testing.assert_close(v_loss(v + 0.5, x0, eps),
                               torch.full((5,), 0.25, dtype=torch.float64))
    # score from the exact velocity = score of p_t = N((1−t)μ, (1−t)²s² + t²)
    x = torch.randn(5, 2, 1, 1, generator=g, dtype=torch.float64)
    tb = t.view(-1, 1, 1, 1)
    var = (1 - tb) ** 2 * _chan(SD) ** 2 + tb ** 2
    expect = -(x - (1 - tb) * _chan(MU)) / var
    torch.testing.assert_close(score_from_velocity(x, gaussian_velocity(x, t, None), t), expect)


def test_sample_t_range():
    t = sample_t(1000, t_eps=0.1, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (1000,)
    assert float(t.min()) >= 0.1 and float(t.max()) <= 0.9
    with pytest.raises(ValueError):
        sample_t(3, t_eps=0.5)


# -- samplers recover a Gaussian -----------------------------------------------------------------

REL_TOL = 0.03       # ≈ 5 sampling standard errors at 16,000 scalars per channel


def _assert_recovers(x, mean_tol=REL_TOL, std_tol=REL_TOL):
    m, s = _moments(x)
    assert np.all(np.abs(m - MU) < mean_tol * SD), (m, MU)
    assert np.all(np.abs(s / SD - 1) < std_tol), (s, SD)


def test_ddpm_learned_sigma_100_steps_recovers_gaussian():
    # with the exact mean AND exact reverse variance, the respaced chain is exact for Gaussians
    resp = DDPMSchedule().respace(100)
    out = ddpm_sample(gaussian_eps_learned_sigma(resp.timestep_map.tolist()), resp, _x_init(), Y0,
                      learn_sigma=True, generator=torch.Generator().manual_seed(1))
    _assert_recovers(out)


def test_ddpm_fixed_sigma_100_steps_matches_exact_chain():
    resp = DDPMSchedule().respace(100)
    out = ddpm_sample(gaussian_eps, resp, _x_init(), Y0, generator=torch.Generator().manual_seed(1))
    m_exact, s_exact = exact_chain_moments(resp.timestep_map.tolist(), eta=None)
    m, s = _moments(out)
    assert np.all(np.abs(m - m_exact) < 5 * SAMPLING_SE * SD)
    assert np.all(np.abs(s / s_exact - 1) < 5 * SAMPLING_SE)
    # β̃ under-estimates the reverse variance at 100 steps: a few % low, never far off
    _assert_recovers(out, std_tol=0.1)


def test_ddim_eta0_50_steps():
    resp = DDPMSchedule().respace("ddim50")
    out = ddim_sample(gaussian_eps, resp, _x_init(), Y0)
    m_exact, s_exact = exact_chain_moments(resp.timestep_map.tolist(), eta=0.0)
    m, s = _moments(out)
    assert np.all(np.abs(m - m_exact) < 5 * SAMPLING_SE * SD)
    assert np.all(np.abs(s / s_exact - 1) < 5 * SAMPLING_SE)
    _assert_recovers(out, std_tol=0.1)   # first-order DDIM at 50 steps: std ≈ 5 % low


def test_ddim_eta1_equals_ddpm_with_posterior_variance():
    resp = DDPMSchedule().respace(20)
    x = _x_init()[:64]
    y = Y0[:64]
    a = ddim_sample(gaussian_eps, resp, x, y, eta=1.0, generator=torch.Generator().manual_seed(4))
    b = ddpm_sample(gaussian_eps, resp, x, y, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ode_heun_50_steps_recovers_gaussian():
    calls = []

    def counted(x, t, y):
        calls.append(float(t[0]))
        return gaussian_velocity(x, t, y)

    out = ode_heun_sample(counted, _x_init(), Y0, num_steps=50)
    assert len(calls) == 2 * 50 - 1 and calls[0] == 1.0 and calls[-1] == pytest.approx(0.02)
    _assert_recovers(out)


def test_sde_euler_maruyama_250_steps_recovers_gaussian():
    calls = []

    def counted(x, t, y):
        calls.append(float(t[0]))
        return gaussian_velocity(x, t, y)

    out = sde_euler_maruyama_sample(counted, _x_init(), Y0, num_steps=250,
                                    generator=torch.Generator().manual_seed(2))
    assert len(calls) == 250 and calls[0] == 1.0 and calls[-1] == pytest.approx(0.04)
    _assert_recovers(out)


def test_samplers_are_deterministic_given_a_seed():
    resp = DDPMSchedule().respace(10)
    x, y = _x_init()[:16], Y0[:16]

    def run(seed):
        return (ddpm_sample(gaussian_eps, resp, x, y,
                            generator=torch.Generator().manual_seed(seed)),
                sde_euler_maruyama_sample(gaussian_velocity, x, y, num_steps=10,
                                          generator=torch.Generator().manual_seed(seed)))

    a, b, c = run(0), run(0), run(1)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v)
        assert not torch.equal(u, w)
    assert torch.equal(ddim_sample(gaussian_eps, resp, x, y), ddim_sample(gaussian_eps, resp, x, y))


# -- classifier-free guidance --------------------------------------------------------------------

NULL = 10


class ToyModel:
    """Counts calls; output [N, 2C]: prediction depends on x, t, y and a `text` kwarg; the
    variance half on y only (so cond/uncond halves differ there too)."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x, t, y, text=None, offset=0.0):
        self.batches.append(x.shape[0])
        yb = y.to(x.dtype).view(-1, 1, 1, 1)
        pred = x * (1 + yb) + t.view(-1, 1, 1, 1) + offset
        if text is not None:
            pred = pred + text.sum(dim=1).view(-1, 1, 1, 1)
        return torch.cat([pred, yb.expand_as(x)], dim=1)


def _cfg_inputs():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    text = torch.randn(3, 5, generator=g, dtype=torch.float64)
    return x, y, text


def test_cfg_scale_one_is_conditional():
    x, y, text = _cfg_inputs()
    t = torch.full((3,), 0.5, dtype=torch.float64)
    model = ToyModel()
    guided = ClassifierFreeGuidance(model, 1.0, NULL, cond_kwargs={"text": text},
                                    uncond_kwargs={"text": torch.zeros_like(text)})
    torch.testing.assert_close(guided(x, t, y), ToyModel()(x, t, y, text=text))
    assert model.batches == [3]


def test_cfg_manual_combination_in_one_doubled_call():
    x, y, text = _cfg_inputs()
    t = torch.full((3,), 0.5, dtype=torch.float64)
    scale = 4.0
    model = ToyModel()
    guided = ClassifierFreeGuidance(model, scale, NULL, cond_kwargs={"text": text},
                                    uncond_kwargs={"text": torch.zeros_like(text)},
                                    shared_kwargs={"offset": 0.25})
    out = guided(x, t, y)
    assert model.batches == [6]
    ref = ToyModel()
    cond = ref(x, t, y, text=text, offset=0.25)
    uncond = ref(x, t, torch.full_like(y, NULL), text=torch.zeros_like(text), offset=0.25)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])          # variance from the cond half
    # DiT's released sampler guides only the first 3 channels
    out3 = ClassifierFreeGuidance(ToyModel(), scale, NULL, num_guided_channels=3)(x, t, y)
    cond, uncond = ref(x, t, y), ref(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(out3[:, :3], uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out3[:, 3:], cond[:, 3:])


def test_cfg_interval_respected():
    x, y, _ = _cfg_inputs()
    scale, lo, hi = 3.0, 0.2, 0.6
    ref = ToyModel()
    model = ToyModel()
    guided = ClassifierFreeGuidance(model, scale, NULL, interval=(lo, hi))
    t = torch.tensor([0.1, 0.4, 0.6], dtype=torch.float64)     # out, in, in (closed interval)
    out = guided(x, t, y)
    cond, uncond = ref(x, t, y), ref(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(out[0], cond[0])
    torch.testing.assert_close(out[1:, :4], (uncond + scale * (cond - uncond))[1:, :4])
    assert model.batches == [6]
    t_out = torch.full((3,), 0.9, dtype=torch.float64)
    torch.testing.assert_close(guided(x, t_out, y), ref(x, t_out, y))
    assert model.batches == [6, 3]      # nothing in the interval: conditional half only


def test_cfg_rejects_mismatched_kwargs():
    x, y, text = _cfg_inputs()
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(ToyModel(), 2.0, NULL, cond_kwargs={"text": text})
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(ToyModel(), 2.0, NULL, cond_kwargs={"text": text},
                               uncond_kwargs={"text": text[:, :2]})
