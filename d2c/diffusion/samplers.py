"""Samplers: DDPM ancestral and DDIM (ε-prediction, :class:`DDPMSchedule`), and SiT's ODE (Heun)
and SDE (Euler–Maruyama) for the linear interpolant (velocity prediction).

Every sampler is model-agnostic: it takes a ``model_fn(x [N, C, H, W], t [N] float, y [N] long)
-> out [N, C_out, H, W]`` whose first ``C`` channels are the prediction (ε or v) — wrap it with
:class:`d2c.diffusion.guidance.ClassifierFreeGuidance` for CFG — and the starting noise
``x_init`` ``[N, C, H, W]`` ~ N(0, I), drawn by the caller (so the caller owns its seed). Stochastic
samplers draw their step noise from ``generator`` (which must live on ``x_init``'s device).
All return the final sample ``[N, C, H, W]`` and run without autograd.

Fewer DDPM/DDIM steps: pass a respaced schedule, e.g. ``DDPMSchedule().respace(250)`` (ADM's
``"250"``) or ``.respace("ddim50")``; the model still receives the original timestep indices.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from d2c.diffusion.ddpm import MODEL_TIME_DTYPE, DDPMSchedule
from d2c.diffusion.interpolant import (
    DIFFUSION_FORM_SIGMA,
    diffusion_coefficient,
    score_from_velocity,
)

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]
#: Step noise: ``noise_fn(x [N, ...]) -> z`` standard normal shaped like ``x`` (callers that
#: own per-sample generators pass their own; the default draws from ``generator``).
NoiseFn = Callable[[Tensor], Tensor]

#: SiT's default Euler–Maruyama settings: 250 model evaluations, the last one a noise-free
#: ("Mean") step of this size from t = SDE_LAST_STEP_SIZE to t = 0.
SDE_DEFAULT_STEPS = 250
SDE_LAST_STEP_SIZE = 0.04
#: SiT's default ODE step count.
ODE_DEFAULT_STEPS = 50


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal ``[N, ...]`` shaped, typed and placed like ``x``."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _step_noise(noise_fn: NoiseFn | None, generator: torch.Generator | None) -> NoiseFn:
    """``noise_fn`` if given, else standard normal draws from ``generator``."""
    return noise_fn if noise_fn is not None else (lambda x: _noise_like(x, generator))


def _check_inputs(x_init: Tensor, y: Tensor) -> None:
    if x_init.dim() < 2 or y.shape != (x_init.shape[0],):
        raise ValueError(f"x_init must be [N, C, ...] and y [N]; got {tuple(x_init.shape)} and "
                         f"{tuple(y.shape)}")


# ---------------------------------------------------------------------------------------------
# DDPM family (ε-prediction)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def ddpm_sample(model_fn: ModelFn, schedule: DDPMSchedule, x_init: Tensor, y: Tensor, *,
                learn_sigma: bool = False, clip_x0: float | None = None,
                generator: torch.Generator | None = None, noise_fn: NoiseFn | None = None) -> Tensor:
    """Ancestral sampling over every step of ``schedule`` (DiT: ``respace(250)``).

    Each step draws ``x_{t−1} ~ N(μ_θ(x_t, t), σ_t²)`` with μ from the predicted x0 through the
    posterior mean, and σ² learned (``learn_sigma``: the model's second C channels interpolate
    ``log β_t`` and ``log β̃_t``) or fixed to the posterior variance ``β̃_t``. The last step
    (index 0) returns the mean without noise.

    Args:
        model_fn: ε-predictor; out ``[N, 2C, ...]`` when ``learn_sigma`` else ``[N, C, ...]``.
        schedule: a (possibly respaced) schedule.
        x_init: ``[N, C, ...]`` start noise; y: labels ``[N]``.
        clip_x0: clamp the predicted x0 to ``[−clip_x0, clip_x0]`` (pixel models); None = no clip.
        generator: draws the per-step noise.
        noise_fn: draws the per-step noise instead of ``generator`` (e.g. per-sample streams).
    """
    _check_inputs(x_init, y)
    noise = _step_noise(noise_fn, generator)
    x = x_init
    for i in reversed(range(schedule.num_timesteps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = model_fn(x, schedule.model_timesteps(t), y)
        mean, log_var, _ = schedule.p_mean_variance(out, x, t, learn_sigma=learn_sigma,
                                                    clip_x0=clip_x0)
        x = mean if i == 0 else mean + torch.exp(0.5 * log_var) * noise(x)
    return x


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, schedule: DDPMSchedule, x_init: Tensor, y: Tensor, *,
                eta: float = 0.0, clip_x0: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """DDIM over every step of ``schedule`` (use e.g. ``respace("ddim50")``).

    With ``ᾱ = ᾱ_t``, ``ᾱ' = ᾱ`` of the previous kept step, x̂0 and ε̂ from the model::

        σ = eta · sqrt((1 − ᾱ') / (1 − ᾱ)) · sqrt(1 − ᾱ / ᾱ')
        x' = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − σ²)·ε̂ + σ·z

    ``eta = 0`` is deterministic (no ``generator`` use); ``eta = 1`` is ancestral sampling with
    the posterior variance. Only the first C output channels (ε) are used.
    """
    _check_inputs(x_init, y)
    x = x_init
    channels = x.shape[1]
    for i in reversed(range(schedule.num_timesteps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps = model_fn(x, schedule.model_timesteps(t), y)[:, :channels]
        pred_x0 = schedule.predict_x0_from_eps(x, t, eps)
        if clip_x0 is not None:
            pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
            eps = schedule.predict_eps_from_x0(x, t, pred_x0)
        alpha_bar = float(schedule.alphas_cumprod[i])
        alpha_bar_prev = float(schedule.alphas_cumprod_prev[i])
        sigma = eta * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
                       * (1.0 - alpha_bar / alpha_bar_prev)) ** 0.5
        x = (alpha_bar_prev ** 0.5 * pred_x0
             + max(1.0 - alpha_bar_prev - sigma ** 2, 0.0) ** 0.5 * eps)
        if i > 0 and sigma > 0.0:
            x = x + sigma * _noise_like(x, generator)
    return x


# ---------------------------------------------------------------------------------------------
# SiT linear interpolant (velocity prediction); t runs from 1 (noise) to 0 (data)
# ---------------------------------------------------------------------------------------------

def _velocity(model_fn: ModelFn, x: Tensor, t: float, y: Tensor) -> Tensor:
    """``v̂(x, t)`` ``[N, C, ...]``: the model's first C channels at the scalar time ``t``."""
    t_vec = torch.full((x.shape[0],), t, dtype=MODEL_TIME_DTYPE, device=x.device)
    return model_fn(x, t_vec, y)[:, :x.shape[1]]


@torch.no_grad()
def ode_heun_sample(model_fn: ModelFn, x_init: Tensor, y: Tensor, *,
                    num_steps: int = ODE_DEFAULT_STEPS, last_step_euler: bool = True) -> Tensor:
    """Probability-flow ODE ``dx/dt = v(x, t)`` integrated from t = 1 to t = 0 with Heun's method
    on ``num_steps`` uniform steps.

    With ``last_step_euler`` the final step is plain Euler (as EDM and REPA's sampler do), so the
    model is evaluated ``2·num_steps − 1`` times; otherwise every step is Heun (``2·num_steps``).
    (SiT itself integrates with torchdiffeq; this fixed-step solver is the common Heun variant.)
    """
    _check_inputs(x_init, y)
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    x = x_init
    for i in range(num_steps):
        t_cur, t_next = times[i], times[i + 1]
        dt = t_next - t_cur
        v_cur = _velocity(model_fn, x, t_cur, y)
        x_next = x + dt * v_cur
        if i < num_steps - 1 or not last_step_euler:
            v_next = _velocity(model_fn, x_next, t_next, y)
            x_next = x + 0.5 * dt * (v_cur + v_next)
        x = x_next
    return x


def _reverse_sde_drift(model_fn: ModelFn, x: Tensor, t: float, y: Tensor, form: str,
                       norm: float) -> tuple[Tensor, Tensor]:
    """Drift of the reverse-time SDE per unit of DECREASING t, and ``w(t)`` ``[N, 1, ...]``.

    An Euler–Maruyama step from t to t − h is::

        x ← x + h·(−v(x, t) + w(t)·∇log p_t(x)) + sqrt(2·w(t)·h)·z

    which keeps the marginals p_t for any w ≥ 0 (the added score drift and the added diffusion
    cancel in the Fokker–Planck equation; w = 0 is the probability-flow ODE).
    """
    t_vec = torch.full((x.shape[0],), t, dtype=MODEL_TIME_DTYPE, device=x.device)
    v = model_fn(x, t_vec, y)[:, :x.shape[1]]
    w = diffusion_coefficient(t_vec, x, form=form, norm=norm)
    return -v + w * score_from_velocity(x, v, t_vec), w


@torch.no_grad()
def sde_euler_maruyama_sample(model_fn: ModelFn, x_init: Tensor, y: Tensor, *,
                              num_steps: int = SDE_DEFAULT_STEPS,
                              diffusion_form: str = DIFFUSION_FORM_SIGMA,
                              diffusion_norm: float = 1.0,
                              last_step_size: float = SDE_LAST_STEP_SIZE,
                              generator: torch.Generator | None = None,
                              noise_fn: NoiseFn | None = None) -> Tensor:
    """SiT's SDE sampler (Euler–Maruyama) for the linear path, velocity model.

    The score comes from the velocity (``−(x + (1 − t)·v) / t``); the diffusion is SiT's default
    ``w(t) = diffusion_norm · t`` (form ``"sigma"``). Times: ``num_steps`` points uniform from 1 to
    ``last_step_size``; ``num_steps − 1`` stochastic steps between them, then one noise-free
    ("Mean") step of size ``last_step_size`` to t = 0 — ``num_steps`` model evaluations in all,
    exactly SiT's ``--last-step Mean --last-step-size 0.04`` schedule. ``noise_fn`` replaces the
    draws from ``generator`` (e.g. per-sample streams).
    """
    _check_inputs(x_init, y)
    noise = _step_noise(noise_fn, generator)
    if num_steps < 2:
        raise ValueError("num_steps must be >= 2")
    if not 0.0 < last_step_size < 1.0:
        raise ValueError("last_step_size must lie in (0, 1)")
    times = torch.linspace(1.0, last_step_size, num_steps, dtype=torch.float64).tolist()
    x = x_init
    for i in range(num_steps - 1):
        h = times[i] - times[i + 1]
        drift, w = _reverse_sde_drift(model_fn, x, times[i], y, diffusion_form, diffusion_norm)
        x = x + h * drift + torch.sqrt(2.0 * w * h) * noise(x)
    drift, _ = _reverse_sde_drift(model_fn, x, last_step_size, y, diffusion_form, diffusion_norm)
    return x + last_step_size * drift
