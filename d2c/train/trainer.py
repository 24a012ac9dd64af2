"""Training on a condensed set: the step and the shape checks (the loop: :mod:`d2c.train.loop`).

* :class:`Trainer` holds what one worker needs: the model, the objective, AdamW, the EMA,
  the precision helper, a ``torch.Generator`` (seeded by ``train.seed`` and the worker rank)
  from which every random draw of a step comes, and the step counter. ``state_dict`` /
  ``load_state_dict`` carry everything a resume needs except the weights, which the
  checkpoint stores as safetensors. With ``train.sync_free`` its step never waits for the
  device (see :meth:`Trainer.train_step`).
* :func:`check_shapes` refuses, before any training, a condensed set that does not fit the model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from d2c.train.checkpoint import capture_rng_state, restore_rng_state
from d2c.train.compile import compile_blocks
from d2c.train.ema import EMA
from d2c.train.objective import D2CObjective, unwrap
from d2c.train.precision import Precision

if TYPE_CHECKING:  # type-only: keeps this module importable without pydantic (GPU benchmarks)
    from d2c.config import TrainConfig


def worker_seed(seed: int, rank: int) -> int:
    """A 64-bit generator seed for (train.seed, worker rank), distinct per rank."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0])


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """One worker's training state and step.

    Args:
        model: the network (a :class:`~d2c.models.dit.DiT`, or a DDP wrapper around one); it is
            moved to ``device``.
        objective: the loss (:class:`D2CObjective`).
        train: ``cfg.train``: lr, beta1, beta2, weight_decay (AdamW), precision, clip_norm,
            ema_decay, seed; optional (defaults when absent): ``compile`` ("off"; else the
            model's blocks are compiled in place after the EMA copy is made) and ``sync_free``
            (False; True: fused AdamW and a step with no host synchronisation).
        device: where the step runs.
        rank: the worker's rank (decorrelates the generators of data-parallel workers).
        scaler_kwargs: extra GradScaler arguments for fp16 (see :class:`Precision`).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: D2CObjective,
        train: TrainConfig,
        device: str | torch.device = "cpu",
        rank: int = 0,
        **scaler_kwargs: Any,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.module = unwrap(self.model)
        self.objective = objective
        self.clip_norm = float(train.clip_norm)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.sync_free = bool(getattr(train, "sync_free", False))
        # fused AdamW takes the skip decision as a device tensor (found_inf): no host sync.
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train.lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay,
            fused=True if self.sync_free else None,
        )
        self.ema = EMA(self.module, train.ema_decay)  # before compiling: the copy stays eager
        self.compiled_blocks = compile_blocks(self.module.blocks, getattr(train, "compile", "off"))
        self.precision = Precision(train.precision, self.device.type, **scaler_kwargs)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(worker_seed(train.seed, rank))
        self.step = 0
        self._skipped = torch.zeros((), device=self.device)  # skipped steps (a device count: read on demand)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far (reading it waits for the device)."""
        return int(self._skipped.item())

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped.fill_(int(value))

    def _to_device(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if v is not None}

    def train_step(self, batch: Mapping[str, Tensor]) -> dict[str, float | Tensor]:
        """One optimizer step on ``batch`` (see :meth:`D2CObjective.loss_at` for its keys).

        Returns:
            the loss terms, ``grad_norm``, ``skipped`` (0/1), ``lr``, ``loss_scale`` and ``step``
            (the count after this step; skipped steps count, and leave weights and EMA alone):
            floats, or with ``sync_free`` 0-d device tensors for the device values (convert them
            with ``float()`` when logging: that is where the host waits).
        """
        self.model.train()
        batch = self._to_device(batch)
        if self.sync_free:
            return self._sync_free_step(batch)
        with self.precision.autocast():
            terms = self.objective(self.model, batch, self.generator)
        result = self.precision.step(terms["loss"], self.optimizer, self.params, self.clip_norm)
        if result.skipped:
            self._skipped += 1
        else:
            self.ema.update(self.module)
        self.step += 1
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        metrics.update(
            grad_norm=result.grad_norm,
            skipped=float(result.skipped),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            loss_scale=result.scale,
            step=float(self.step),
        )
        return metrics

    def _sync_free_step(self, batch: Mapping[str, Tensor]) -> dict[str, float | Tensor]:
        """:meth:`Precision.step` and :meth:`EMA.update` decided on the device.

        The grad norm stays a tensor; a non-finite norm skips the update through fused AdamW's
        ``found_inf`` (fp32/bf16) or the GradScaler's own flag (fp16, which it hands the fused
        optimizer as a tensor), exactly when :meth:`Precision.step` skips; the EMA moves by
        :meth:`EMA.update_unless`. Nothing is read back to the host.
        """
        scaler = self.precision.scaler
        with self.precision.autocast():
            terms = self.objective(self.model, batch, self.generator)
        scaled = scaler.scale(terms["loss"])  # (creates the scale tensor at the first step)
        scale = scaler._get_scale_async().clone() if scaler.is_enabled() else 1.0  # this step's, before update()
        scaled.backward()
        scaler.unscale_(self.optimizer)
        max_norm = self.clip_norm if self.clip_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        skipped = (~torch.isfinite(norm)).to(torch.float32)  # [] 1.0 where the step is skipped
        if scaler.is_enabled():
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.found_inf = skipped  # fused AdamW leaves the weights (and its step) alone where 1
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update_unless(self.module, skipped)
        self._skipped += skipped
        self.step += 1
        metrics: dict[str, float | Tensor] = {k: v.detach() for k, v in terms.items()}
        metrics.update(grad_norm=norm.detach(), skipped=skipped, lr=float(self.optimizer.param_groups[0]["lr"]),
                       loss_scale=scale, step=float(self.step))
        return metrics

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scaler, step counters (the EMA's update count among them), the generator and the global RNG states
        (weights_only-loadable); the weights are saved separately."""
        return dict(
            step=self.step,
            skipped_steps=self.skipped_steps,
            ema_updates=self.ema.num_updates,
            optimizer=self.optimizer.state_dict(),
            scaler=self.precision.state_dict(),
            generator=self.generator.get_state(),
            rng=capture_rng_state(),
        )

    def load_state_dict(self, state: Mapping[str, Any], restore_global_rng: bool = True) -> None:
        """Inverse of :meth:`state_dict` (extra keys such as ``data`` are ignored)."""
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        # checkpoints from before the EMA warm-up: every applied step was one update
        self.ema.num_updates = int(state.get("ema_updates", self.step - self.skipped_steps))
        self.optimizer.load_state_dict(self._as_this_optimizer(state["optimizer"]))
        self.precision.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"].cpu())
        if restore_global_rng:
            restore_rng_state(state["rng"])

    def _as_this_optimizer(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """``saved`` with this optimizer's implementation flags (``fused``, ``foreach``): a checkpoint
        written with another ``train.sync_free`` resumes (the moments and step counts are the same
        quantities either way; torch places the step counts by the flags it loads)."""
        groups = [dict(g, **{k: cur.get(k) for k in ("fused", "foreach")})
                  for g, cur in zip(saved["param_groups"], self.optimizer.param_groups)]
        return dict(saved, param_groups=groups)

    def restore(self, ckpt: Mapping[str, Any]) -> dict[str, int]:
        """Load a :func:`~d2c.train.checkpoint.load_checkpoint` result: weights, EMA, trainer state.

        Returns:
            the saved data position (``{"epoch", "index"}``), empty if none was saved.
        """
        self.module.load_state_dict(ckpt["model"], strict=True)
        self.ema.load_state_dict(ckpt["ema"])
        self.load_state_dict(ckpt["trainer"])
        return dict(ckpt["trainer"].get("data", {}))


# ----------------------------------------------------------------------------------------------
# Shape checks (before training)
# ----------------------------------------------------------------------------------------------


class ShapeMismatchError(ValueError):
    """The condensed set (or its text embeddings) does not fit the model."""


def check_shapes(
    model_kwargs: Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]],
    text_shape: Optional[Sequence[int]] = None,
    mask_shape: Optional[Sequence[int]] = None,
    hflip: bool = False,
    max_label: Optional[int] = None,
) -> None:
    """Raise :class:`ShapeMismatchError` naming every way the data does not fit the model.

    Args:
        model_kwargs: :class:`DiT` kwargs (:func:`d2c.models.build.dit_kwargs` or ``model.json``).
        shapes: per-row tensor shapes of the condensed set (``condensed_shapes(path)`` or
            ``{k: a.shape[1:]}``): ``latent`` [C, h, w], optional ``latent_flip``, ``visual`` [T, d],
            ``visual_flip``.
        text_shape: the class text embeddings' shape [num_classes, L, d], or None.
        mask_shape: their mask's shape [num_classes, L], or None.
        hflip: flips will be used (then the ``*_flip`` columns are required).
        max_label: the largest label in the data, if known.
    """
    problems: list[str] = []
    c = model_kwargs["in_channels"]
    size = model_kwargs["input_size"]
    patch = model_kwargs["patch_size"]
    tokens = (size // patch) ** 2
    want_latent = [c, size, size]
    if "latent" not in shapes:
        problems.append("latent: the condensed set has no latent column")
    for name in ("latent", "latent_flip"):
        if name in shapes and list(shapes[name]) != want_latent:
            problems.append(
                f"{name} shape: the condensed set has {list(shapes[name])} but the model takes "
                f"{want_latent} (in_channels, input_size, input_size); the latent size follows "
                "data.image_size and autoencoder.kind"
            )
    proj_dim = model_kwargs.get("proj_dim")
    if proj_dim is not None:
        for name in ("visual", "visual_flip") if hflip else ("visual",):
            if name not in shapes:
                problems.append(
                    f"{name}: the model has a REPA projector but the condensed set has no {name} column "
                    + ("(re-run attach with attach.flip=true, or set train.hflip=false)" if name == "visual_flip"
                       else "(set model.use_visual=false, or attach visual features)")
                )
                continue
            t, d = list(shapes[name])
            if t != tokens:
                problems.append(
                    f"{name} token count: the condensed set has {t} tokens per image but the model has "
                    f"{tokens} tokens ((input_size {size} / patch_size {patch})^2)"
                )
            if d != proj_dim:
                problems.append(f"{name} dim: the condensed set has {d}-d visual tokens but the model's proj_dim is {proj_dim}")
    if hflip and "latent_flip" not in shapes:
        problems.append(
            "latent_flip: train.hflip is on but the condensed set has no latent_flip column "
            "(re-run attach with attach.flip=true, or set train.hflip=false)"
        )
    text_dim = model_kwargs.get("text_dim")
    num_classes = model_kwargs["num_classes"]
    if text_dim is not None:
        text_len = model_kwargs["text_len"]
        if text_shape is None:
            problems.append("text: the model has a DC text embedding (text_dim) but no text embeddings were given")
        else:
            n_text, length, dim = list(text_shape)
            if dim != text_dim:
                problems.append(f"text dim: the text embeddings are {dim}-d but the model's text_dim is {text_dim}")
            if length != text_len:
                problems.append(f"text length: the text embeddings have {length} tokens but the model's text_len is {text_len}")
            if n_text != num_classes:
                problems.append(
                    f"text classes: there are text embeddings for {n_text} classes but the model has {num_classes}"
                )
            if mask_shape is not None and list(mask_shape) != [n_text, length]:
                problems.append(f"text mask shape: {list(mask_shape)} does not match the embeddings' [{n_text}, {length}]")
    if max_label is not None and max_label >= num_classes:
        problems.append(f"labels: the data has label {max_label} but the model has {num_classes} classes")
    if problems:
        raise ShapeMismatchError("the condensed set does not fit the model:\n  " + "\n  ".join(problems))
