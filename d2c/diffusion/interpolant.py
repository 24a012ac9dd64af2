"""SiT's linear interpolant (stochastic interpolant / rectified-flow path) and its v-loss.

Path (REPA's convention, the one docs/method.md states; t = 0 is data, t = 1 is noise)::

    x_t = (1 − t)·x0 + t·ε,        v = dx_t/dt = ε − x0,        t ~ U[0, 1]

The model receives ``t ∈ [0, 1]`` as a float ``[N]`` and predicts v. (The official SiT code uses
the reversed clock, t_SiT = 1 − t with v_SiT = −v; convert both when loading its checkpoints.)

From a velocity ``v = E[ε − x0 | x_t]`` the other parametrisations follow by linearity, since
``x_t = x0 + t·(ε − x0) = ε − (1 − t)·(ε − x0)``::

    x̂0 = x_t − t·v,      ε̂ = x_t + (1 − t)·v,      score ∇log p_t(x_t) = −ε̂ / t   (t > 0)

the score because ``x_t | x0 ~ N((1 − t)·x0, t²I)`` gives ``∇log p_t = −E[ε | x_t] / t``.

Shapes: data ``[N, C, H, W]`` (any trailing dims), times ``[N]`` broadcast over the trailing dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from d2c.diffusion.ddpm import MODEL_TIME_DTYPE, mean_flat

#: SiT's default SDE diffusion form: w(t) = norm · σ_t, σ_t = t the noise coefficient of the path.
DIFFUSION_FORM_SIGMA = "sigma"
#: Constant diffusion: w(t) = norm.
DIFFUSION_FORM_CONSTANT = "constant"
DIFFUSION_FORMS = (DIFFUSION_FORM_SIGMA, DIFFUSION_FORM_CONSTANT)


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """``t`` ``[N]`` → ``[N, 1, 1, ...]`` in ``like``'s dtype, to broadcast against ``like``."""
    return t.to(like.dtype).reshape(t.shape[0], *([1] * (like.dim() - 1)))


def sample_t(n: int, *, t_eps: float = 0.0, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
    """Training times ``[n]`` ~ U[t_eps, 1 − t_eps] (SiT: t_eps = 0 for a velocity model)."""
    if not 0.0 <= t_eps < 0.5:
        raise ValueError("t_eps must lie in [0, 0.5)")
    u = torch.rand(n, generator=generator, device=device, dtype=MODEL_TIME_DTYPE)
    return t_eps + (1.0 - 2.0 * t_eps) * u


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 − t)·x0 + t·noise``; ``x0``, ``noise`` ``[N, ...]``, ``t`` ``[N]``."""
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """``v = noise − x0`` ``[N, ...]``: the time derivative of :func:`interpolate`."""
    return noise - x0


def v_loss(model_out: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Per-sample velocity loss ``mean_{C,H,W} ‖(noise − x0) − v̂‖²`` ``[N]``.

    ``model_out`` ``[N, C_out ≥ C, ...]``: its first C channels are v̂ (a learned-σ half, which
    SiT discards, is ignored); ``x0``, ``noise`` ``[N, C, ...]``.
    """
    return mean_flat((velocity_target(x0, noise) - model_out[:, :x0.shape[1]]) ** 2)


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """``x̂0 = x_t − t·v``; ``x_t``, ``v`` ``[N, ...]``, ``t`` ``[N]``."""
    return x_t - _bcast(t, x_t) * v


def eps_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """``ε̂ = x_t + (1 − t)·v``; ``x_t``, ``v`` ``[N, ...]``, ``t`` ``[N]``."""
    return x_t + (1.0 - _bcast(t, x_t)) * v


def score_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """``∇log p_t(x_t) = −(x_t + (1 − t)·v) / t`` ``[N, ...]``; requires every ``t > 0``."""
    return -eps_from_velocity(x_t, v, t) / _bcast(t, x_t)


def diffusion_coefficient(t: Tensor, like: Tensor, *, form: str = DIFFUSION_FORM_SIGMA,
                          norm: float = 1.0) -> Tensor:
    """SiT's SDE diffusion ``w(t)`` (the SDE's noise is ``sqrt(2 w(t)) dW``), ``[N, 1, ...]``.

    ``"sigma"`` (SiT's default): ``w = norm · t`` — SiT's ``norm · σ_t`` with σ_t the path's noise
    coefficient (``1 − t_SiT`` in SiT's reversed clock, i.e. ``t`` here); ``"constant"``: ``norm``.
    """
    tb = _bcast(t, like)
    if form == DIFFUSION_FORM_SIGMA:
        return norm * tb
    if form == DIFFUSION_FORM_CONSTANT:
        return torch.full_like(tb, norm)
    raise ValueError(f"unknown diffusion form {form!r}; choose from {DIFFUSION_FORMS}")
