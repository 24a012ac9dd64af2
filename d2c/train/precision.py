"""Numerical precision: fp32, bf16 autocast, or fp16 autocast (with a GradScaler when training).

The weights and optimizer state stay float32 in every mode; autocast runs the forward pass
in the low-precision dtype. :meth:`Precision.step` is the whole update:

    backward (of the scaled loss) → unscale → clip the grad norm → optimizer step → scaler update

An update is SKIPPED, and reported as such, when the gradient norm is not finite: with fp16
the GradScaler skips it and halves its scale; in fp32/bf16 the optimizer step is simply not
taken. Either way the weights never receive an inf/NaN.

Inference stages (difficulty scoring, sampling) run their network through
:func:`autocast_model_fn`: the same autocast, with the output cast back to float32 so that
everything around the network (losses, sampler arithmetic) stays float32.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(mode: str) -> str:
    """``mode`` if it is one of :data:`PRECISIONS`, else a ValueError naming the choices."""
    if mode not in PRECISIONS:
        raise ValueError(f"unknown precision {mode!r}; choose from {PRECISIONS}")
    return mode


def autocast_context(mode: str, device_type: str) -> contextlib.AbstractContextManager:
    """Nothing for fp32, else ``torch.autocast(device_type, bf16/fp16)``."""
    if check_precision(mode) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[mode])


def autocast_model_fn(fn: Callable[..., torch.Tensor], mode: str, device_type: str) -> Callable[..., torch.Tensor]:
    """``fn`` run under :func:`autocast_context`, its tensor output returned as float32.

    Args:
        fn: a network call ``(x, t, y, **kwargs) -> Tensor`` (any signature; one tensor out).
        mode: ``"fp32"`` (``fn`` itself is returned), ``"bf16"`` or ``"fp16"``.
        device_type: ``"cuda"`` or ``"cpu"``.
    """
    if check_precision(mode) == "fp32":
        return fn

    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast_context(mode, device_type):
            out = fn(*args, **kwargs)
        return out.float()

    return run


class StepResult(NamedTuple):
    """What one update did.

    grad_norm: total L2 norm of the (unscaled) gradients before clipping (inf/NaN if skipped).
    skipped: True when the optimizer step was not applied.
    scale: the GradScaler's loss scale used for this step (1.0 without fp16).
    """

    grad_norm: float
    skipped: bool
    scale: float


class Precision:
    """Autocast context and the update step for one precision mode.

    Args:
        mode: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device_type: ``"cuda"`` or ``"cpu"`` (autocast and GradScaler are per device type).
        scaler_kwargs: extra :class:`torch.amp.GradScaler` arguments for fp16 (``init_scale``,
            ``growth_factor``, ``backoff_factor``, ``growth_interval``); torch's defaults otherwise.
    """

    def __init__(self, mode: str, device_type: str, **scaler_kwargs: Any):
        self.mode = check_precision(mode)
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=mode == "fp16", **scaler_kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass: nothing for fp32, else ``torch.autocast`` in bf16/fp16."""
        return autocast_context(self.mode, self.device_type)

    def step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.nn.Parameter],
        clip_norm: float,
    ) -> StepResult:
        """Backward, unscale, clip, step, update; gradients are cleared afterwards.

        Args:
            loss: scalar loss (float32) of the forward pass.
            optimizer: the optimizer of ``parameters``.
            parameters: the trained parameters (for the norm and clipping).
            clip_norm: max total grad norm; 0 = measure the norm but do not clip.
        """
        params = [p for p in parameters if p.requires_grad]
        scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        max_norm = clip_norm if clip_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        skipped = not math.isfinite(grad_norm)
        if self.scaler.is_enabled():
            # The scaler skips the step itself when unscaling found an inf/NaN, and then
            # lowers its scale: that decrease is the authoritative "skipped".
            self.scaler.step(optimizer)
            self.scaler.update()
            skipped = float(self.scaler.get_scale()) < scale
        elif not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm, skipped, scale)

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state (empty unless fp16)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(dict(state))
