"""DDPM Gaussian diffusion as ADM and DiT use it.

Forward process ``q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I)`` with a linear β schedule;
ε-prediction training loss, optionally ADM's *hybrid* loss (ε-MSE + variational bound term for a
learned variance, what DiT trains with); the reverse-step mean and variance used by the samplers;
and ADM's timestep respacing (``space_timesteps`` + :meth:`DDPMSchedule.respace`).

Conventions
-----------
* Timestep indices ``t`` are ``LongTensor [N]`` in ``[0, num_timesteps)``; index 0 is the least
  noisy step. The denoiser receives :meth:`DDPMSchedule.model_timesteps` of them: the ORIGINAL
  (un-respaced) integer timestep as a float (DiT convention).
* Schedule arrays are float64 (as in ADM) and cast to the dtype of the tensor they multiply.
* A model output has ``C`` channels (ε) or ``2C`` (ε, then the variance interpolation values
  ``v ∈ [−1, 1]`` of a learned σ):
  ``log σ² = frac·log β_t + (1 − frac)·log β̃_t`` with ``frac = (v + 1) / 2``.
* Every loss here returns one value per sample, ``[N]``: a mean over ``C, H, W`` (or any
  trailing dims).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

DEFAULT_NUM_TIMESTEPS = 1000
DEFAULT_BETA_START = 1e-4
DEFAULT_BETA_END = 0.02
#: Half the spacing of 8-bit data rescaled to [-1, 1] (256 levels → bins of width 2/255).
DECODER_BIN_HALF_WIDTH = 1.0 / 255.0
#: Data beyond ±this is in an outermost bin, whose far edge extends to ±infinity.
DECODER_EDGE = 0.999
#: Floor applied to probabilities before their log, as in ADM.
LOG_PROB_FLOOR = 1e-12
#: ADM's DDIM schedule specification prefix: ``"ddim50"`` = 50 evenly strided steps.
DDIM_SPEC_PREFIX = "ddim"
#: dtype of the timesteps handed to a denoiser.
MODEL_TIME_DTYPE = torch.float32


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dim but the first: ``[N, ...] -> [N]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _gather(arr: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """Take ``arr[t]`` (float64 ``[T]``, indices ``[N]``) as ``like``'s dtype/device, shaped
    ``[N, 1, 1, ...]`` to broadcast against ``like`` ``[N, ...]``."""
    out = arr.to(t.device)[t].to(like.dtype)
    return out.reshape(out.shape[0], *([1] * (like.dim() - 1)))


def linear_betas(num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
                 beta_start: float = DEFAULT_BETA_START,
                 beta_end: float = DEFAULT_BETA_END) -> Tensor:
    """DDPM's linear schedule: float64 ``[num_timesteps]`` from ``beta_start`` to ``beta_end``.

    (ADM additionally rescales both ends by ``1000 / num_timesteps``; DiT always uses 1000 steps,
    where that factor is 1. Pass the ends you want explicitly.)
    """
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor,
                                        bin_half_width: float = DECODER_BIN_HALF_WIDTH,
                                        edge: float = DECODER_EDGE) -> Tensor:
    """Elementwise log-probability (nats) of data ``x`` (in [-1, 1]) under a Gaussian
    ``N(mean, exp(log_scale)^2)`` discretised into bins ``[x − h, x + h]``, the outermost bins
    extending to ±∞ (ADM's decoder at t = 0). Uses the exact normal CDF (ADM uses a tanh
    approximation of it; the values differ by < 1e-3 relative).

    Shapes: ``x``, ``mean``, ``log_scale`` broadcast together; the result has their shape.
    """
    inv_std = torch.exp(-log_scale)
    centered = x - mean
    upper = inv_std * (centered + bin_half_width)
    lower = inv_std * (centered - bin_half_width)
    log_cdf_upper = torch.special.log_ndtr(upper)                  # log P(z < upper)
    log_sf_lower = torch.special.log_ndtr(-lower)                  # log P(z > lower)
    bin_mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=LOG_PROB_FLOOR)
    return torch.where(x < -edge, log_cdf_upper,
                       torch.where(x > edge, log_sf_lower, torch.log(bin_mass)))


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """ADM's timestep respacing: which of the original steps to keep.

    Args:
        num_timesteps: steps of the original process (e.g. 1000).
        section_counts: ``int`` n (n steps spread evenly, both ends kept, e.g. 250 of 1000);
            a sequence (or comma string) of counts, one per equal section of the original steps;
            or ``"ddimN"``: the uniform stride ``s`` with ``len(range(0, T, s)) == N``.
    Returns:
        sorted list of kept original indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith(DDIM_SPEC_PREFIX):
            desired = int(section_counts[len(DDIM_SPEC_PREFIX):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} evenly strided steps "
                             f"of {num_timesteps}")
        section_counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    counts = list(section_counts)
    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"section of {size} steps cannot keep {count} of them")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # round() (banker's rounding) on purpose: it is what ADM does, so the kept steps match.
        kept += [start + round(k * stride) for k in range(count)]
        start += size
    return sorted(set(kept))


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------

class DDPMSchedule:
    """A discrete Gaussian diffusion (ADM ``GaussianDiffusion`` with ε-prediction).

    All arrays are float64 ``[T]`` where ``T = num_timesteps`` (of this schedule, which may be a
    respaced subset; ``timestep_map[i]`` is then the original index of step i).

    Args:
        num_timesteps, beta_start, beta_end: the linear β schedule (DiT: 1000, 1e-4, 0.02).
    """

    def __init__(self, num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
                 beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END):
        self._setup(linear_betas(num_timesteps, beta_start, beta_end),
                    torch.arange(num_timesteps, dtype=torch.long))

    @classmethod
    def from_betas(cls, betas: Tensor, timestep_map: Tensor | None = None) -> "DDPMSchedule":
        """A schedule from explicit betas ``[T]`` (and the original index of each step ``[T]``)."""
        obj = cls.__new__(cls)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if timestep_map is None:
            timestep_map = torch.arange(len(betas), dtype=torch.long)
        obj._setup(betas, torch.as_tensor(timestep_map, dtype=torch.long))
        return obj

    def _setup(self, betas: Tensor, timestep_map: Tensor) -> None:
        if betas.dim() != 1 or len(betas) < 2:
            raise ValueError("need a 1-D schedule of at least 2 betas")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if timestep_map.shape != betas.shape:
            raise ValueError("timestep_map must have one entry per beta")
        self.betas = betas
        self.timestep_map = timestep_map
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64),
                                              self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, β̃_t)
        self.posterior_variance = (betas * (1.0 - self.alphas_cumprod_prev)
                                   / (1.0 - self.alphas_cumprod))
        # β̃_0 = 0: its log is clipped to β̃_1, as in ADM.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = (betas * self.alphas_cumprod_prev.sqrt()
                                     / (1.0 - self.alphas_cumprod))
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * alphas.sqrt()
                                     / (1.0 - self.alphas_cumprod))
        self.log_betas = torch.log(betas)

    # -- respacing ------------------------------------------------------------------------------

    def respace(self, section_counts: int | str | Sequence[int]) -> "DDPMSchedule":
        """A schedule over a subset of this one's steps (ADM ``SpacedDiffusion``).

        The kept steps are :func:`space_timesteps` of ``section_counts``; new betas are
        ``1 − ᾱ_k / ᾱ_prev_kept`` so that ᾱ at every kept step is unchanged; ``timestep_map``
        keeps each step's original index, which is what the model receives.
        """
        use = space_timesteps(self.num_timesteps, section_counts)
        kept_ac = self.alphas_cumprod[use]
        prev_ac = torch.cat([torch.ones(1, dtype=torch.float64), kept_ac[:-1]])
        return DDPMSchedule.from_betas(1.0 - kept_ac / prev_ac, self.timestep_map[use])

    # -- forward process ------------------------------------------------------------------------

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the denoiser receives for step indices ``t`` ``[N]``: the original timestep as a
        float ``[N]`` (DiT convention)."""
        return self.timestep_map.to(t.device)[t].to(MODEL_TIME_DTYPE)

    def sample_timesteps(self, n: int, *, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
        """Uniform step indices ``[n]`` (long) in ``[0, T)``, as DiT draws them for training."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise``; x0, noise ``[N, ...]``, t ``[N]``."""
        return (_gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q(x_{t−1} | x_t, x_0)``: ``(mean [N, ...], variance, clipped log-variance)``, the
        last two ``[N, 1, ...]``."""
        mean = (_gather(self.posterior_mean_coef1, t, x_t) * x0
                + _gather(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, _gather(self.posterior_variance, t, x_t),
                _gather(self.posterior_log_variance_clipped, t, x_t))

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)``; all ``[N, ...]``, ``t`` ``[N]``."""
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Inverse of :meth:`predict_x0_from_eps`."""
        return ((_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
                / _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # -- reverse step ---------------------------------------------------------------------------

    def p_mean_variance(self, model_out: Tensor, x_t: Tensor, t: Tensor, *,
                        learn_sigma: bool = False, clip_x0: float | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """Reverse-step Gaussian ``p(x_{t−1} | x_t)`` from a model output.

        Args:
            model_out: ``[N, C, ...]`` (ε) or ``[N, 2C, ...]`` with ``learn_sigma`` (ε, v).
            x_t: ``[N, C, ...]``; t: step indices ``[N]``.
            learn_sigma: interpolate ``log σ²`` between ``log β̃_t`` (v = −1) and ``log β_t``
                (v = +1); otherwise the fixed small variance ``β̃_t`` (clipped log).
            clip_x0: if given, clamp the predicted x0 to ``[−clip_x0, clip_x0]`` (DiT: none).
        Returns:
            ``(mean [N, C, ...], log_variance [N, C or 1, ...], pred_x0 [N, C, ...])``.
        """
        eps, var_values = split_model_output(model_out, x_t.shape[1], learn_sigma)
        if var_values is None:
            log_var = _gather(self.posterior_log_variance_clipped, t, x_t)
        else:
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = _gather(self.log_betas, t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_x0 is not None:
            pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return mean, log_var, pred_x0

    # -- losses ---------------------------------------------------------------------------------

    def vlb_terms(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The variational-bound term of a learned-σ model, in bits per dim, ``[N]``.

        For t > 0: ``KL(q(x_{t−1}|x_t,x0) || p(x_{t−1}|x_t))`` averaged over dims; for t = 0 the
        discretised-Gaussian decoder NLL of ``x0``. ``model_out`` is ``[N, 2C, ...]``; gradients
        flow through every part of it that is not detached by the caller.
        """
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var, _ = self.p_mean_variance(model_out, x_t, t, learn_sigma=True)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def eps_loss(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor, *,
                 learn_sigma: bool = False, vlb_weight: float = 1.0) -> Tensor:
        """Per-sample training loss ``[N]``.

        ``mean_{C,H,W} ‖ε − ε̂‖²``; with ``learn_sigma`` ADM/DiT's hybrid loss adds
        ``vlb_weight · vlb_terms`` computed with the ε-half DETACHED, so the bound trains only the
        variance (DiT: weight 1; ADM's "rescaled MSE" uses ``num_timesteps / 1000``).

        Args:
            model_out: ``[N, C or 2C, ...]``; x0, x_t, noise: ``[N, C, ...]``; t: indices ``[N]``.
        """
        eps, var_values = split_model_output(model_out, x0.shape[1], learn_sigma)
        loss = mean_flat((noise - eps) ** 2)
        if var_values is not None:
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            loss = loss + vlb_weight * self.vlb_terms(frozen, x0, x_t, t)
        return loss


def split_model_output(model_out: Tensor, channels: int, learn_sigma: bool
                       ) -> tuple[Tensor, Tensor | None]:
    """``[N, C, ...]`` → ``(pred, None)``; with ``learn_sigma`` ``[N, 2C, ...]`` →
    ``(pred [N, C, ...], var_values [N, C, ...])``."""
    expected = 2 * channels if learn_sigma else channels
    if model_out.shape[1] != expected:
        raise ValueError(f"model output has {model_out.shape[1]} channels, expected {expected} "
                         f"(data channels {channels}, learn_sigma={learn_sigma})")
    if learn_sigma:
        return model_out[:, :channels], model_out[:, channels:]
    return model_out, None


def eps_mse_per_sample(model_out: Tensor, noise: Tensor) -> Tensor:
    """Difficulty-score helper: ``mean_{C,H,W} ‖noise − model_out[:, :C]‖²`` ``[N]``.

    ``model_out`` ``[N, C_out ≥ C, ...]`` (a learned-σ output's extra channels are ignored);
    ``noise`` ``[N, C, ...]``.
    """
    return mean_flat((noise - model_out[:, :noise.shape[1]]) ** 2)
