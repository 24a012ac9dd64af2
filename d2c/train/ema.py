"""Exponential moving average of a model's weights (DiT's ``update_ema``).

The EMA model is a deep copy of the network kept in float32 and in eval mode, with gradients
off. After each applied optimizer step::

    ema ← decay · ema + (1 − decay) · θ          (every parameter, trainable or frozen)

and buffers are copied as they are. Sampling and evaluation use the EMA weights.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn


class EMA:
    """An EMA copy of ``model``.

    Args:
        model: the network being trained (a bare module, not a DDP wrapper).
        decay: the EMA decay in [0, 1] (METHOD.md: 0.9999); 0 makes the EMA a copy.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).float().eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every EMA parameter toward ``model``'s by ``1 − decay``; copy buffers."""
        params = dict(model.named_parameters())
        for name, ema_p in self.model.named_parameters():
            ema_p.mul_(self.decay).add_(params[name].detach().float(), alpha=1.0 - self.decay)
        self._copy_buffers(model)

    @torch.no_grad()
    def update_unless(self, model: nn.Module, skipped: torch.Tensor) -> None:
        """:meth:`update` decided on the device: ``skipped`` (0-d float, 1 = a skipped step) scales
        the move to zero without being read on the host. One ``lerp`` over all parameters
        (``ema + w·(θ − ema)``, the same update up to rounding); buffers are copied.
        """
        params = dict(model.named_parameters())
        ema_params = [p for _, p in self.model.named_parameters()]
        live = [params[name].detach().float() for name, _ in self.model.named_parameters()]
        weight = (1.0 - self.decay) * (1.0 - skipped.to(torch.float32))
        torch._foreach_lerp_(ema_params, live, [weight] * len(ema_params))
        self._copy_buffers(model)

    def _copy_buffers(self, model: nn.Module) -> None:
        buffers = dict(model.named_buffers())
        for name, ema_b in self.model.named_buffers():
            ema_b.copy_(buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA model's state dict (float32 tensors)."""
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load EMA weights (strict: every key must match)."""
        self.model.load_state_dict(state, strict=True)
