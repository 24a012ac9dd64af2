"""The D2C training objective (docs/method.md, Train; Eq. 11-12), in one place.

    L = L_diff + λ · L_proj,        L_proj = −1/h · Σ_i cos(φ(h_i), y_vis,i)

* DiT (``arch="dit"``): DDPM forward process, t uniform over the schedule's steps [0, T),
  ε-prediction, ``L_diff = mean ‖ε − ε̂‖²``. With a learned σ (``learn_sigma``) DiT's hybrid
  loss adds ``vlb_weight · L_vlb``, the variational bound computed with ε̂ detached (so it
  trains only the variance channels), exactly as DiT/ADM train.
* SiT (``arch="sit"``): the linear interpolant ``x_t = (1 − t)·x0 + t·ε``, t ~ U[t_eps, 1 − t_eps],
  velocity target ``ε − x0``, ``L_diff = mean ‖(ε − x0) − v̂‖²``. A learned-σ half of the
  output, if the network has one, is ignored (SiT discards it too).
* ``L_proj`` (REPA): the projector output φ(h) ``[N, T, d]`` of the hidden states after block
  ``encoder_depth`` against the stored visual tokens ``[N, T, d]``; cosine per token, mean
  over tokens and batch. Computed only when ``proj_coeff > 0`` AND the batch carries
  ``visual``; otherwise the term is absent (not multiplied by zero), so training is exactly
  plain diffusion training.

Every random draw (t, then ε, then the model's label dropout) comes from the
``torch.Generator`` passed in; horizontal flips are decided by the data iterator, which swaps
in the stored flipped latents/features before the batch gets here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2c.diffusion.ddpm import DDPMSchedule, linear_betas, mean_flat, split_model_output
from d2c.diffusion.interpolant import interpolate, sample_t, v_loss

if TYPE_CHECKING:  # type-only: keeps this module importable without pydantic (GPU benchmarks)
    from d2c.config import D2CConfig

ARCH_DIT = "dit"
ARCH_SIT = "sit"
ARCHS = (ARCH_DIT, ARCH_SIT)
#: DiT's weight of the variational-bound term of its hybrid loss.
DIT_VLB_WEIGHT = 1.0
#: SiT trains a velocity model on the full t ∈ [0, 1].
SIT_T_EPS = 0.0
#: Norm floor when normalising vectors for the cosine (F.normalize's default, as REPA).
COSINE_NORM_EPS = 1e-12
#: Relative tolerance for recognising a schedule as linear when describing it.
LINEAR_SCHEDULE_RTOL = 1e-9


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


def projection_loss(proj: Tensor, target: Tensor) -> Tensor:
    """REPA alignment ``−mean_{n, i} cos(proj[n, i], target[n, i])`` (a scalar, in float32).

    Args:
        proj: ``[N, T, d]`` projector outputs φ(h).
        target: ``[N, T, d]`` visual tokens y_vis (any float dtype).
    """
    if proj.shape != target.shape:
        raise ValueError(
            f"projector output {tuple(proj.shape)} and visual features {tuple(target.shape)} differ: "
            "the visual token count must equal the model's token count and their dim the projector's proj_dim"
        )
    z = F.normalize(proj.float(), dim=-1, eps=COSINE_NORM_EPS)
    y = F.normalize(target.float(), dim=-1, eps=COSINE_NORM_EPS)
    return -(z * y).sum(dim=-1).mean()


def _draw_device(generator: Optional[torch.Generator], like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


class D2CObjective:
    """``L = L_diff + λ·L_proj`` for a DiT (DDPM ε) or SiT (linear interpolant, velocity).

    Args:
        arch: ``"dit"`` or ``"sit"``.
        schedule: the DDPM schedule (required for DiT; must be None for SiT, whose path has
            no schedule).
        proj_coeff: λ; 0 turns the projection term off.
        learn_sigma: DiT only: the model outputs 2C channels and the hybrid loss is used.
        vlb_weight: weight of the VLB term of the hybrid loss (DiT: 1).
        t_eps: SiT only: t ~ U[t_eps, 1 − t_eps].
    """

    def __init__(
        self,
        arch: str,
        schedule: Optional[DDPMSchedule] = None,
        proj_coeff: float = 0.0,
        learn_sigma: bool = False,
        vlb_weight: float = DIT_VLB_WEIGHT,
        t_eps: float = SIT_T_EPS,
    ):
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
        if arch == ARCH_DIT and schedule is None:
            raise ValueError("a DiT objective needs a DDPMSchedule")
        if arch == ARCH_SIT and schedule is not None:
            raise ValueError("a SiT objective uses the linear interpolant; pass schedule=None")
        if proj_coeff < 0:
            raise ValueError(f"proj_coeff (λ) must be >= 0, got {proj_coeff}")
        self.arch = arch
        self.schedule = schedule
        self.proj_coeff = float(proj_coeff)
        self.learn_sigma = bool(learn_sigma)
        self.vlb_weight = float(vlb_weight)
        self.t_eps = float(t_eps)

    # -- construction / description -----------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: D2CConfig) -> "D2CObjective":
        """The objective of ``cfg.model.arch`` with ``cfg.diffusion``'s schedule and ``cfg.train.proj_coeff``."""
        schedule = None
        if cfg.model.arch == ARCH_DIT:
            d = cfg.diffusion
            schedule = DDPMSchedule(d.num_timesteps, d.beta_start, d.beta_end)
        return cls(cfg.model.arch, schedule, proj_coeff=cfg.train.proj_coeff, learn_sigma=cfg.model.learn_sigma)

    def describe(self) -> dict[str, Any]:
        """JSON settings that rebuild this objective with :meth:`from_description` (``model.json``'s
        ``diffusion``). A linear schedule is stored by its ends; any other by its betas."""
        out: dict[str, Any] = dict(
            arch=self.arch,
            prediction="eps" if self.arch == ARCH_DIT else "velocity",
            learn_sigma=self.learn_sigma,
            proj_coeff=self.proj_coeff,
        )
        if self.arch == ARCH_SIT:
            out.update(path="linear", t_eps=self.t_eps)
            return out
        betas = self.schedule.betas
        out.update(num_timesteps=self.schedule.num_timesteps, vlb_weight=self.vlb_weight)
        start, end = float(betas[0]), float(betas[-1])
        linear = linear_betas(len(betas), start, end)
        if torch.allclose(betas, linear, rtol=LINEAR_SCHEDULE_RTOL, atol=0.0) and bool(
            (self.schedule.timestep_map == torch.arange(len(betas))).all()
        ):
            out.update(schedule="linear", beta_start=start, beta_end=end)
        else:
            out.update(schedule="betas", betas=betas.tolist(), timestep_map=self.schedule.timestep_map.tolist())
        return out

    @classmethod
    def from_description(cls, desc: Mapping[str, Any]) -> "D2CObjective":
        """Inverse of :meth:`describe`."""
        return cls(
            desc["arch"],
            schedule_from_description(desc),
            proj_coeff=desc.get("proj_coeff", 0.0),
            learn_sigma=desc.get("learn_sigma", False),
            vlb_weight=desc.get("vlb_weight", DIT_VLB_WEIGHT),
            t_eps=desc.get("t_eps", SIT_T_EPS),
        )

    # -- the loss -------------------------------------------------------------------------------

    def sample_t_noise(self, x0: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Draw training times and noise for ``x0`` ``[N, C, H, W]`` from ``generator``.

        Returns:
            ``t`` ``[N]`` (DiT: long step indices in [0, T); SiT: float in [t_eps, 1 − t_eps]) and
            ``noise`` ``[N, C, H, W]`` on ``x0``'s device, drawn in that order.
        """
        n, device = x0.shape[0], _draw_device(generator, x0)
        if self.arch == ARCH_DIT:
            t = self.schedule.sample_timesteps(n, generator=generator, device=device)
        else:
            t = sample_t(n, t_eps=self.t_eps, generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        return t.to(x0.device), noise.to(x0.device)

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Tensor], generator: Optional[torch.Generator] = None
    ) -> dict[str, Tensor]:
        """Draw t and ε from ``generator`` and return :meth:`loss_at`'s terms."""
        x0 = batch["latent"].float()
        t, noise = self.sample_t_noise(x0, generator)
        return self.loss_at(model, batch, t, noise, generator)

    def loss_at(
        self,
        model: nn.Module,
        batch: Mapping[str, Tensor],
        t: Tensor,
        noise: Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, Tensor]:
        """The loss terms at given times and noise.

        Args:
            model: a :class:`~d2c.models.dit.DiT` (possibly DDP-wrapped), in train or eval mode.
            batch: ``latent`` ``[N, C, H, W]``, ``label`` ``[N]`` long; optional ``visual``
                ``[N, T, d]`` (any float dtype); ``text_emb`` ``[N, L, d_text]`` and ``text_mask``
                ``[N, L]`` (required iff the model has a DC-embedding).
            t: ``[N]`` as from :meth:`sample_t_noise`.
            noise: ``[N, C, H, W]``.
            generator: RNG of the model's training-time label dropout.
        Returns:
            scalar tensors ``loss``, ``loss_diff``, ``loss_proj`` (0 when the term is off) and,
            with a learned σ, ``loss_vlb``: ``loss = loss_diff + vlb_weight·loss_vlb + λ·loss_proj``.
        """
        net = unwrap(model)
        x0 = batch["latent"].float()
        y = batch["label"].long()
        visual = batch.get("visual")
        use_proj = self.proj_coeff > 0 and visual is not None
        if use_proj and getattr(net, "projector", None) is None:
            raise ValueError(
                f"proj_coeff (λ) is {self.proj_coeff} and the batch has visual features, but the model has no "
                "projector; build it with proj_dim (model.use_visual=true) or set train.proj_coeff=0"
            )
        text = {}
        if getattr(net, "text_dim", None) is not None:
            if batch.get("text_emb") is None:
                raise ValueError("the model has a DC text embedding (text_dim) but the batch has no text_emb")
            text = dict(text_emb=batch["text_emb"], text_mask=batch.get("text_mask"))

        if self.arch == ARCH_DIT:
            x_t = self.schedule.q_sample(x0, t, noise)
            model_t = self.schedule.model_timesteps(t)
        else:
            x_t = interpolate(x0, noise, t)
            model_t = t.float()

        result = model(x_t, model_t, y, generator=generator, **text)
        out, proj = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
        out = out.float()

        terms: dict[str, Tensor] = {}
        if self.arch == ARCH_DIT:
            eps, var_values = split_model_output(out, x0.shape[1], self.learn_sigma)
            loss_diff = mean_flat((noise - eps) ** 2).mean()
            loss = loss_diff
            if var_values is not None:
                frozen = torch.cat([eps.detach(), var_values], dim=1)
                loss_vlb = self.schedule.vlb_terms(frozen, x0, x_t, t).mean()
                terms["loss_vlb"] = loss_vlb
                loss = loss + self.vlb_weight * loss_vlb
        else:
            loss_diff = v_loss(out, x0, noise).mean()
            loss = loss_diff

        if use_proj:
            loss_proj = projection_loss(proj, visual)
            loss = loss + self.proj_coeff * loss_proj
        else:
            loss_proj = torch.zeros((), device=loss.device)
        terms.update(loss=loss, loss_diff=loss_diff, loss_proj=loss_proj)
        return terms


def schedule_from_description(desc: Mapping[str, Any]) -> Optional[DDPMSchedule]:
    """The DDPM schedule recorded by :meth:`D2CObjective.describe` (None for SiT)."""
    if desc["arch"] == ARCH_SIT:
        return None
    if desc.get("schedule", "linear") == "linear":
        return DDPMSchedule(desc["num_timesteps"], desc["beta_start"], desc["beta_end"])
    return DDPMSchedule.from_betas(
        torch.tensor(desc["betas"], dtype=torch.float64), torch.tensor(desc["timestep_map"], dtype=torch.long)
    )
