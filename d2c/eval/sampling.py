"""Class-balanced sampling from a trained DiT/SiT with its EMA weights (docs/method.md, Evaluate).

Which sample is which
---------------------
Sample ``i`` (``0 <= i < N``) has class ``i mod C`` (:func:`sample_labels`), so every class
gets ``N // C`` samples and, when C does not divide N, the first ``N mod C`` classes get one
more (:func:`class_counts`); every prefix of the samples is balanced the same way.

Its randomness comes from ONE CPU generator seeded by ``(seed, i)`` (:func:`sample_seed`):
first the starting noise ``[c, h, w]``, then one draw ``[c, h, w]`` per stochastic step
(DDPM ancestral steps, SDE Euler–Maruyama steps). So a sample does not depend on the batch
it is drawn in, on how the N samples are split across actors, or on their order.
Distributed callers cut the N samples into chunks of ``batch_size``
(:func:`num_chunks`, :func:`sample_indices`) and give each worker whole chunks.

Every model batch is padded to exactly ``batch_size`` rows (padding rows get zero noise and
are dropped), so every forward pass has the same shape: at equal ``batch_size`` the
samples are bitwise identical however they are split; across different batch sizes they
agree up to float rounding (matrix kernels may pick other blockings for other shapes).

Samplers
--------
* DiT (ε-prediction, DDPM schedule from the checkpoint's ``model.json``):
  ``"ddpm"`` ancestral sampling and ``"ddim"`` (η = 0), both over the schedule respaced to
  ``steps`` (ADM's ``timestep_respacing=str(steps)``: evenly spread, both ends kept).
  ``ddim`` runs :func:`d2c.diffusion.ddim_sample`; ``ddpm`` runs :func:`d2c.diffusion.ddpm_sample`
  with per-sample step noise (its ``noise_fn``).
* SiT (velocity, linear interpolant): ``"ode"`` runs :func:`d2c.diffusion.ode_heun_sample`
  (``steps`` Heun steps, the last one Euler); ``"sde"`` runs
  :func:`d2c.diffusion.sde_euler_maruyama_sample` (SiT's defaults: ``w(t) = t``, last
  noise-free step of 0.04) with per-sample step noise.

Classifier-free guidance goes through :class:`d2c.diffusion.ClassifierFreeGuidance`: the null
half uses the null label ``num_classes`` and an all-zero text embedding and mask. A guidance
interval is given as fractions of the trajectory (0 = data, 1 = noise) and converted to the
model's time units (DiT: the original timestep index, ``fraction × (T − 1)``; SiT: t itself).

The network's forward pass runs in ``precision`` (``"fp32"``, or bf16/fp16 autocast through
:func:`d2c.train.precision.autocast_model_fn`); its output and all sampler arithmetic are float32.

Latents are decoded by the autoencoder (``None`` = pixel space) into uint8 ``[N, H, W, C]``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from d2c.data.preprocess import to_uint8
from d2c.diffusion.ddpm import DDPMSchedule
from d2c.diffusion.guidance import ClassifierFreeGuidance
from d2c.diffusion.interpolant import DIFFUSION_FORM_SIGMA
from d2c.diffusion.samplers import SDE_LAST_STEP_SIZE, ddim_sample, ddpm_sample, ode_heun_sample, sde_euler_maruyama_sample
from d2c.models.dit import DiTOutput
from d2c.models.encoders.autoencoder import IMAGE_MAX, IMAGE_MIN, Autoencoder
from d2c.train.objective import ARCH_DIT, ARCH_SIT, schedule_from_description
from d2c.train.precision import PRECISIONS, autocast_model_fn

#: Samplers each architecture supports (config ``eval.sampler``).
SAMPLERS: dict[str, tuple[str, ...]] = {ARCH_DIT: ("ddpm", "ddim"), ARCH_SIT: ("ode", "sde")}
#: Fewest steps each sampler can run (a respaced DDPM schedule needs 2 betas; the SDE
#: needs one stochastic step before its last noise-free step).
MIN_STEPS = {"ddpm": 2, "ddim": 2, "ode": 1, "sde": 2}
#: DDIM's η: 0 is the deterministic DDIM sampler.
DDIM_ETA = 0.0
#: SiT's SDE diffusion: w(t) = norm · t.
SDE_DIFFUSION_FORM = DIFFUSION_FORM_SIGMA
SDE_DIFFUSION_NORM = 1.0
#: Bytes of the sha256 digest used for a sample's generator seed (63-bit seeds).
_SEED_BYTES = 8
_SEED_MASK = (1 << 63) - 1


class SamplingError(ValueError):
    """A sampling setting that does not fit the model (sampler for another arch, too few steps, …)."""


# ---------------------------------------------------------------------------------------------
# Which sample is which: labels, seeds, chunks
# ---------------------------------------------------------------------------------------------


def sample_labels(indices: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Class of each sample index: ``i mod C`` → int64 ``[len(indices)]``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return np.asarray(indices, dtype=np.int64) % num_classes


def class_counts(num_samples: int, num_classes: int) -> list[int]:
    """Samples per class for N samples: ``N // C`` each, plus one for the first ``N mod C`` classes."""
    base, extra = divmod(num_samples, num_classes)
    return [base + (1 if c < extra else 0) for c in range(num_classes)]


def sample_seed(seed: int, index: int) -> int:
    """The 63-bit generator seed of sample ``index`` under ``seed`` (stable across processes)."""
    digest = hashlib.sha256(f"d2c-sample\x1f{seed}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:_SEED_BYTES], "little") & _SEED_MASK


def num_chunks(num_samples: int, chunk_size: int) -> int:
    """How many chunks of ``chunk_size`` cover N samples (the last may be short)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return -(-num_samples // chunk_size)


def sample_indices(num_samples: int, chunk_size: Optional[int] = None, chunk: int = 0) -> np.ndarray:
    """Sample indices int64 of chunk ``chunk`` when N samples are cut into chunks of ``chunk_size``.

    ``chunk_size=None`` gives all N indices. Chunks are contiguous: ``[chunk·size, min((chunk+1)·size, N))``.
    """
    if chunk_size is None:
        return np.arange(num_samples, dtype=np.int64)
    if not 0 <= chunk < num_chunks(num_samples, chunk_size):
        raise ValueError(f"chunk {chunk} is outside [0, {num_chunks(num_samples, chunk_size)}) for N={num_samples}")
    start = chunk * chunk_size
    return np.arange(start, min(start + chunk_size, num_samples), dtype=np.int64)


class SampleNoise:
    """Per-sample noise streams for a batch padded to ``rows`` rows.

    Row j < len(indices) draws from the generator of sample ``indices[j]``; rows beyond are
    padding and get zeros. Every :meth:`draw` returns float32 ``[rows, *shape]`` on ``device``.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], rows: int, device: str | torch.device):
        if rows < len(indices):
            raise ValueError(f"rows ({rows}) must be >= the number of samples ({len(indices)})")
        self.shape = tuple(int(s) for s in shape)
        self.rows = rows
        self.device = torch.device(device)
        self.generators = []
        for i in indices:
            g = torch.Generator(device="cpu")
            g.manual_seed(sample_seed(seed, int(i)))
            self.generators.append(g)

    def draw(self) -> Tensor:
        out = torch.zeros((self.rows, *self.shape), dtype=torch.float32)
        for j, g in enumerate(self.generators):
            out[j] = torch.randn(self.shape, generator=g, dtype=torch.float32)
        return out.to(self.device)


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------


def guidance_interval_in_model_units(
    interval: Optional[Sequence[float]], arch: str, num_train_timesteps: Optional[int] = None
) -> Optional[tuple[float, float]]:
    """``(lo, hi)`` fractions of the trajectory (0 = data, 1 = noise) → model time units.

    DiT: ``fraction × (T − 1)`` in original timestep indices; SiT: t itself. None stays None.
    """
    if interval is None:
        return None
    lo, hi = float(interval[0]), float(interval[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise SamplingError(f"guidance interval {list(interval)} must satisfy 0 <= lo <= hi <= 1")
    if arch == ARCH_SIT:
        return lo, hi
    if num_train_timesteps is None:
        raise ValueError("a DiT guidance interval needs the schedule's number of training timesteps")
    last = num_train_timesteps - 1
    return lo * last, hi * last


class SamplingPlan:
    """Validated sampling settings for a checkpoint, without its weights.

    Built from the checkpoint's ``model.json`` alone, so a driver can check settings (and
    describe them) before any actor loads a model.

    Args:
        meta: ``model.json`` (``arch``, ``dit_kwargs``, ``diffusion``).
        sampler: ``"ddpm"`` / ``"ddim"`` (DiT) or ``"ode"`` / ``"sde"`` (SiT).
        steps: respaced DDPM/DDIM steps, Heun steps, or SDE model evaluations.
        cfg_scale: classifier-free guidance scale (1 = none).
        guidance_interval: ``(lo, hi)`` fractions of the trajectory, or None (everywhere).
        seed: the sampling seed.
        batch_size: rows per model batch; the last batch of a call is padded to it.
        clip_denoised: clamp predicted x0 to [-1, 1] in DDPM/DDIM steps; None = ``pixel_space``.
        pixel_space: the model works on pixels (identity autoencoder).
        precision: the network's forward pass: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast).

    Raises:
        SamplingError: a setting that does not fit the checkpoint.
    """

    def __init__(
        self,
        meta: Mapping[str, Any],
        *,
        sampler: str,
        steps: int,
        cfg_scale: float = 1.0,
        guidance_interval: Optional[Sequence[float]] = None,
        seed: int = 0,
        batch_size: int = 64,
        clip_denoised: Optional[bool] = None,
        pixel_space: bool = True,
        precision: str = "fp32",
    ):
        arch = meta["arch"]
        kwargs = meta["dit_kwargs"]
        if arch not in SAMPLERS:
            raise SamplingError(f"unknown arch {arch!r} in model.json; expected one of {sorted(SAMPLERS)}")
        if sampler not in SAMPLERS[arch]:
            raise SamplingError(
                f"eval.sampler={sampler!r} does not fit a {arch.upper()} model; use one of {list(SAMPLERS[arch])}"
            )
        if steps < MIN_STEPS[sampler]:
            raise SamplingError(f"eval.steps={steps} is too few for the {sampler} sampler (minimum {MIN_STEPS[sampler]})")
        if cfg_scale < 1.0:
            raise SamplingError(f"eval.cfg_scale must be >= 1, got {cfg_scale}")
        if cfg_scale > 1.0 and not float(kwargs.get("class_dropout_prob", 0.0)) > 0.0:
            raise SamplingError(
                f"eval.cfg_scale={cfg_scale} needs a null class, but this model was trained without label "
                "dropout (class_dropout_prob = 0); use eval.cfg_scale=1"
            )
        if batch_size < 1:
            raise SamplingError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise SamplingError(f"eval.precision={precision!r} is not one of {list(PRECISIONS)}")
        self.precision = precision
        self.arch = arch
        self.sampler = sampler
        self.steps = int(steps)
        self.cfg_scale = float(cfg_scale)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_classes = int(kwargs["num_classes"])
        self.latent_shape = (int(kwargs["in_channels"]), int(kwargs["input_size"]), int(kwargs["input_size"]))
        self.learn_sigma = bool(kwargs.get("learn_sigma", False))
        self.text_conditioning = kwargs.get("text_dim") is not None
        self.clip_denoised = bool(pixel_space) if clip_denoised is None else bool(clip_denoised)
        self.schedule: Optional[DDPMSchedule] = None
        self.num_train_timesteps: Optional[int] = None
        if arch == ARCH_DIT:
            try:
                base = schedule_from_description(meta["diffusion"])
            except KeyError as err:
                raise SamplingError(f"model.json's 'diffusion' lacks {err}, needed to rebuild the DDPM schedule") from None
            if self.steps > base.num_timesteps:
                raise SamplingError(f"eval.steps={steps} exceeds the model's {base.num_timesteps} diffusion timesteps")
            self.num_train_timesteps = base.num_timesteps
            self.schedule = base.respace(self.steps)
        self.interval = guidance_interval_in_model_units(guidance_interval, arch, self.num_train_timesteps)

    def model_evaluations(self) -> int:
        """Network calls per sample (×2 rows inside the guidance interval when cfg_scale > 1)."""
        if self.sampler == "ode":
            return 2 * self.steps - 1
        return self.steps

    def describe(self) -> dict[str, Any]:
        """The sampling settings as JSON values (what metrics.json records)."""
        out: dict[str, Any] = dict(
            arch=self.arch,
            sampler=self.sampler,
            steps=self.steps,
            model_evaluations_per_sample=self.model_evaluations(),
            cfg_scale=self.cfg_scale,
            guidance_interval_model_units=list(self.interval) if self.interval is not None else None,
            seed=self.seed,
            batch_size=self.batch_size,
            clip_denoised=self.clip_denoised if self.sampler in ("ddpm", "ddim") else None,
            learn_sigma=self.learn_sigma,
            text_conditioning=self.text_conditioning,
            precision=self.precision,
            noise="per sample: generator seeded by sha256(seed, index); start noise, then one draw per stochastic step",
            labels="sample i has class i mod num_classes",
        )
        if self.schedule is not None:
            out["timestep_respacing"] = str(self.steps)
            out["timesteps_used"] = self.schedule.timestep_map.tolist()
            out["ddim_eta"] = DDIM_ETA if self.sampler == "ddim" else None
        if self.sampler == "sde":
            out.update(sde_diffusion=f"{SDE_DIFFUSION_FORM}: w(t) = {SDE_DIFFUSION_NORM} * t",
                       sde_last_step_size=SDE_LAST_STEP_SIZE)
        return out


class ClassBalancedSampler:
    """Draws samples by index from a DiT/SiT (see the module docstring for the rules).

    Args:
        model: the network (EMA weights, eval mode), on ``device``.
        meta: its checkpoint's ``model.json`` (``arch``, ``dit_kwargs``, ``diffusion``).
        sampler, steps, cfg_scale, guidance_interval, seed, batch_size, clip_denoised: see
            :class:`SamplingPlan`.
        text: ``(emb [C, L, d], mask [C, L])`` class text embeddings for a D2C model, else None.
        autoencoder: decoder of latents to images in [-1, 1]; None = pixel space (clamp only).
            ``clip_denoised=None`` clips only in pixel space (no autoencoder, or ``downsample == 1``).
        device: where the model runs.
    """

    def __init__(
        self,
        model: nn.Module,
        meta: Mapping[str, Any],
        *,
        sampler: str,
        steps: int,
        cfg_scale: float = 1.0,
        guidance_interval: Optional[Sequence[float]] = None,
        seed: int = 0,
        batch_size: int = 64,
        text: Optional[tuple[Tensor, Tensor]] = None,
        autoencoder: Optional[Autoencoder] = None,
        clip_denoised: Optional[bool] = None,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
    ):
        pixel_space = autoencoder is None or getattr(autoencoder, "downsample", None) == 1
        self.plan = SamplingPlan(
            meta, sampler=sampler, steps=steps, cfg_scale=cfg_scale, guidance_interval=guidance_interval, seed=seed,
            batch_size=batch_size, clip_denoised=clip_denoised, pixel_space=pixel_space, precision=precision,
        )
        if int(model.num_classes) != self.plan.num_classes:
            raise SamplingError(f"model has {model.num_classes} classes but model.json says {self.plan.num_classes}")
        self.model = model
        self.autoencoder = autoencoder
        self.device = torch.device(device)
        # The network's prediction [N, C_out, H, W] as float32, run in plan.precision.
        self._raw_model_fn = autocast_model_fn(self._network, self.plan.precision, self.device.type)
        self.text = None
        if getattr(model, "text_dim", None) is not None:
            if text is None:
                raise SamplingError("this model has a DC text embedding: pass the class text embeddings (eval.text_embeddings)")
            emb, mask = text
            want = (self.plan.num_classes, int(model.text_len), int(model.text_dim))
            if tuple(emb.shape) != want or tuple(mask.shape) != want[:2]:
                raise SamplingError(
                    f"text embeddings {tuple(emb.shape)} / mask {tuple(mask.shape)} do not fit the model: "
                    f"expected [{want[0]}, {want[1]}, {want[2]}] / [{want[0]}, {want[1]}]"
                )
            self.text = (emb.float().to(self.device), mask.float().to(self.device))
        elif text is not None:
            raise SamplingError("text embeddings were given but the model has no DC text embedding (text_dim is None)")

    def describe(self) -> dict[str, Any]:
        return self.plan.describe()

    # -- the model function ----------------------------------------------------------------------

    def _network(self, x: Tensor, t: Tensor, y: Tensor, **kwargs: Tensor) -> Tensor:
        out = self.model(x, t, y, **kwargs)
        return out.out if isinstance(out, DiTOutput) else out

    def _model_fn(self, y: Tensor) -> ClassifierFreeGuidance:
        """CFG-wrapped model_fn for a batch of labels ``y`` ``[B]`` (scale 1 = conditional only)."""
        cond, uncond = {}, {}
        if self.text is not None:
            emb, mask = self.text
            cond = dict(text_emb=emb[y], text_mask=mask[y])
            uncond = dict(text_emb=torch.zeros_like(cond["text_emb"]), text_mask=torch.zeros_like(cond["text_mask"]))
        return ClassifierFreeGuidance(
            self._raw_model_fn, self.plan.cfg_scale, self.plan.num_classes,
            interval=self.plan.interval, cond_kwargs=cond, uncond_kwargs=uncond,
        )

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples of the given indices, in batches of ``batch_size``.

        Returns:
            ``(images uint8 [B, H, W, C], labels int64 [B])`` in the order of ``indices``.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (indices < 0).any():
            raise ValueError("indices must be a 1-D array of non-negative sample indices")
        labels = sample_labels(indices, self.plan.num_classes)
        parts = [self._sample_batch(indices[s : s + self.plan.batch_size]) for s in range(0, len(indices), self.plan.batch_size)]
        if not parts:
            raise ValueError("no sample indices given")
        return np.concatenate(parts), labels

    def _sample_batch(self, indices: np.ndarray) -> np.ndarray:
        """One padded model batch: indices ``[b <= batch_size]`` → uint8 ``[b, H, W, C]``."""
        b, rows = len(indices), self.plan.batch_size
        y = torch.zeros(rows, dtype=torch.long)
        y[:b] = torch.as_tensor(sample_labels(indices, self.plan.num_classes))
        y = y.to(self.device)
        noise = SampleNoise(self.plan.seed, indices, self.plan.latent_shape, rows, self.device)
        x_init = noise.draw()
        model_fn = self._model_fn(y)
        if self.plan.sampler == "ddpm":
            z = self._ddpm(model_fn, x_init, y, noise)
        elif self.plan.sampler == "ddim":
            z = ddim_sample(model_fn, self.plan.schedule, x_init, y, eta=DDIM_ETA, clip_x0=self._clip())
        elif self.plan.sampler == "ode":
            z = ode_heun_sample(model_fn, x_init, y, num_steps=self.plan.steps)
        else:
            z = self._sde(model_fn, x_init, y, noise)
        z = z[:b]
        images = z.float().clamp(IMAGE_MIN, IMAGE_MAX) if self.autoencoder is None else self.autoencoder.decode(z)
        return to_uint8(images)

    def _clip(self) -> Optional[float]:
        return IMAGE_MAX if self.plan.clip_denoised else None

    def _ddpm(self, model_fn, x: Tensor, y: Tensor, noise: SampleNoise) -> Tensor:
        """Ancestral sampling (:func:`d2c.diffusion.ddpm_sample`) with per-sample step noise."""
        return ddpm_sample(model_fn, self.plan.schedule, x, y, learn_sigma=self.plan.learn_sigma, clip_x0=self._clip(),
                           noise_fn=lambda _x: noise.draw())

    def _sde(self, model_fn, x: Tensor, y: Tensor, noise: SampleNoise) -> Tensor:
        """Euler–Maruyama (:func:`d2c.diffusion.sde_euler_maruyama_sample`, SiT's defaults) with per-sample noise."""
        return sde_euler_maruyama_sample(
            model_fn, x, y, num_steps=self.plan.steps, diffusion_form=SDE_DIFFUSION_FORM, diffusion_norm=SDE_DIFFUSION_NORM,
            last_step_size=SDE_LAST_STEP_SIZE, noise_fn=lambda _x: noise.draw(),
        )


def sample_class_balanced(
    model: nn.Module,
    meta: Mapping[str, Any],
    num_samples: int,
    num_classes: int,
    sampler: str,
    steps: int,
    cfg_scale: float = 1.0,
    guidance_interval: Optional[Sequence[float]] = None,
    seed: int = 0,
    batch_size: int = 64,
    text: Optional[tuple[Tensor, Tensor]] = None,
    autoencoder: Optional[Autoencoder] = None,
    device: str | torch.device = "cpu",
    clip_denoised: Optional[bool] = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """N class-balanced samples (sample i has class ``i mod C``; see the module docstring).

    Returns:
        ``(images uint8 [N, H, W, C], labels int64 [N])``; H, W, C are the decoded image's.
    Raises:
        SamplingError: ``num_classes`` differs from the model's, or a setting does not fit it.
    """
    if num_classes != model.num_classes:
        raise SamplingError(f"num_classes={num_classes} but the model has {model.num_classes} classes")
    runner = ClassBalancedSampler(
        model, meta, sampler=sampler, steps=steps, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
        seed=seed, batch_size=batch_size, text=text, autoencoder=autoencoder, clip_denoised=clip_denoised,
        precision=precision, device=device,
    )
    return runner.sample(sample_indices(num_samples))
