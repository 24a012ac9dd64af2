"""Exponential moving average of a model's weights (DiT's ``update_ema``), with warm-up.

The EMA model is a deep copy of the network kept in float32 and in eval mode, with gradients
off. After the s-th applied optimizer step (s = 0, 1, …, counting applied updates only)::

    d_s = min(decay, (1 + s) / (10 + s))                       (warm-up)
    ema ← d_s · ema + (1 − d_s) · θ          (every parameter, trainable or frozen)

and buffers are copied as they are. Without the warm-up a short run at decay 0.9999 keeps
the EMA at the initial weights (after 1,000 steps 90 % of it still is): an adaLN-Zero model
then predicts about zero. Sampling, evaluation and scoring use the EMA weights.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn


def warmup_decay(decay: float, updates: int | torch.Tensor) -> float | torch.Tensor:
    """``min(decay, (1 + s) / (10 + s))`` for the ``s``-th update (a float, or a tensor on the device)."""
    if isinstance(updates, torch.Tensor):
        return torch.clamp((1.0 + updates) / (10.0 + updates), max=decay)
    return min(decay, (1.0 + updates) / (10.0 + updates))


class EMA:
    """An EMA copy of ``model``.

    Args:
        model: the network being trained (a bare module, not a DDP wrapper).
        decay: the EMA decay in [0, 1] after warm-up; 0 makes the EMA a copy.
        warmup: use the warm-up schedule (``False``: a constant ``decay``).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.model = copy.deepcopy(model).float().eval()
        self.model.requires_grad_(False)
        # applied updates so far, on the model's device (the sync-free step counts without the host)
        self.updates = torch.zeros((), dtype=torch.float64, device=next(self.model.parameters()).device)

    @property
    def num_updates(self) -> int:
        """Updates applied so far (reading it waits for the device)."""
        return int(self.updates.item())

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self.updates.fill_(int(value))

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        return warmup_decay(self.decay, self.num_updates) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every EMA parameter toward ``model``'s by ``1 − d_s``; copy buffers."""
        decay = self.current_decay()
        params = dict(model.named_parameters())
        for name, ema_p in self.model.named_parameters():
            ema_p.mul_(decay).add_(params[name].detach().float(), alpha=1.0 - decay)
        self._copy_buffers(model)
        self.updates += 1

    @torch.no_grad()
    def update_unless(self, model: nn.Module, skipped: torch.Tensor) -> None:
        """:meth:`update` decided on the device: ``skipped`` (0-d float, 1 = a skipped step) scales
        the move to zero without being read on the host. One ``lerp`` over all parameters
        (``ema + w·(θ − ema)``, the same update up to rounding); buffers are copied.
        """
        params = dict(model.named_parameters())
        ema_params = [p for _, p in self.model.named_parameters()]
        live = [params[name].detach().float() for name, _ in self.model.named_parameters()]
        applied = 1.0 - skipped.to(torch.float64)
        decay = warmup_decay(self.decay, self.updates) if self.warmup else torch.full_like(self.updates, self.decay)
        weight = ((1.0 - decay) * applied).to(torch.float32)
        torch._foreach_lerp_(ema_params, live, [weight] * len(ema_params))
        self._copy_buffers(model)
        self.updates += applied

    def _copy_buffers(self, model: nn.Module) -> None:
        buffers = dict(model.named_buffers())
        for name, ema_b in self.model.named_buffers():
            ema_b.copy_(buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA model's state dict (float32 tensors); the update count travels in the trainer state."""
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load EMA weights (strict: every key must match)."""
        self.model.load_state_dict(state, strict=True)
