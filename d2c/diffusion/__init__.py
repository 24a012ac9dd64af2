"""d2c/diffusion: DDPM schedule + ε-loss (ddpm), SiT linear interpolant + v-loss (interpolant),
samplers (DDPM ancestral, DDIM, ODE Heun, SDE Euler–Maruyama) and classifier-free guidance."""

from d2c.diffusion.ddpm import (
    DDPMSchedule,
    discretized_gaussian_log_likelihood,
    eps_mse_per_sample,
    linear_betas,
    mean_flat,
    normal_kl,
    space_timesteps,
    split_model_output,
)
from d2c.diffusion.guidance import ClassifierFreeGuidance
from d2c.diffusion.interpolant import (
    diffusion_coefficient,
    eps_from_velocity,
    interpolate,
    sample_t,
    score_from_velocity,
    v_loss,
    velocity_target,
    x0_from_velocity,
)
from d2c.diffusion.samplers import (
    ddim_sample,
    ddpm_sample,
    ode_heun_sample,
    sde_euler_maruyama_sample,
)

__all__ = [
    "ClassifierFreeGuidance",
    "DDPMSchedule",
    "ddim_sample",
    "ddpm_sample",
    "diffusion_coefficient",
    "discretized_gaussian_log_likelihood",
    "eps_from_velocity",
    "eps_mse_per_sample",
    "interpolate",
    "linear_betas",
    "mean_flat",
    "normal_kl",
    "ode_heun_sample",
    "sample_t",
    "score_from_velocity",
    "sde_euler_maruyama_sample",
    "space_timesteps",
    "split_model_output",
    "v_loss",
    "velocity_target",
    "x0_from_velocity",
]
