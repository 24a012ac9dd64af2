"""Classifier-free guidance as a model_fn wrapper.

``ClassifierFreeGuidance(model_fn, scale, null_label, ...)`` is itself a model_fn
``(x [N, C, H, W], t [N], y [N]) -> [N, C_out, H, W]`` that evaluates the conditional batch and the
null-label batch in ONE forward of a doubled batch ``[2N, ...]`` and returns::

    out[:, :K] = uncond[:, :K] + s · (cond[:, :K] − uncond[:, :K])       (K guided channels)
    out[:, K:] = cond[:, K:]                                            (e.g. learned-σ channels)

with ``s = scale`` for samples whose time lies in the guidance interval and ``s = 1`` (exactly the
conditional output) elsewhere. The interval is in the units the model receives: the original
DDPM timestep index (0–999) for DiT, ``t ∈ [0, 1]`` (1 = noise) for SiT.

Extra conditioning
------------------
The wrapped ``model_fn`` is called as ``model_fn(x2, t2, y2, **kwargs)``. Batched conditioning
(e.g. the DC text embedding ``[N, L, d]``) goes in ``cond_kwargs`` (what the conditional half gets)
and ``uncond_kwargs`` (what the null half gets, e.g. zeros): both dicts must have the same keys
and tensors of the same shape ``[N, ...]``; they are concatenated along dim 0 (cond first).
Un-batched keyword arguments go in ``shared_kwargs`` and are passed once, unchanged. Because the
batched kwargs belong to one batch of samples, build one wrapper per sampled batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor


class ClassifierFreeGuidance:
    """Guided model_fn (see the module docstring).

    Args:
        model_fn: ``(x, t, y, **kwargs) -> [N, C_out, ...]``.
        scale: guidance scale s (1 = no guidance: only the conditional half is evaluated).
        null_label: the class index of the dropped label (DiT: ``num_classes``).
        interval: ``(t_lo, t_hi)``, closed, in model time units; None = guide at every t.
        num_guided_channels: K, the prediction channels guided; None = all ``x.shape[1]`` (the
            standard choice). DiT's released sampler guides only 3 of 4 latent channels; pass 3
            to reproduce its FID numbers.
        cond_kwargs / uncond_kwargs: batched conditioning ``{name: [N, ...]}``, same keys/shapes.
        shared_kwargs: un-batched keyword arguments passed as they are.
        skip_uncond_outside_interval: when no sample of a call lies in the interval, evaluate
            only the conditional batch (the result is identical; the null half would be unused).
    """

    def __init__(self, model_fn: Callable[..., Tensor], scale: float, null_label: int, *,
                 interval: tuple[float, float] | None = None,
                 num_guided_channels: int | None = None,
                 cond_kwargs: Mapping[str, Tensor] | None = None,
                 uncond_kwargs: Mapping[str, Tensor] | None = None,
                 shared_kwargs: Mapping[str, Any] | None = None,
                 skip_uncond_outside_interval: bool = True):
        cond_kwargs = dict(cond_kwargs or {})
        uncond_kwargs = dict(uncond_kwargs or {})
        if cond_kwargs.keys() != uncond_kwargs.keys():
            raise ValueError("cond_kwargs and uncond_kwargs must have the same keys, got "
                             f"{sorted(cond_kwargs)} and {sorted(uncond_kwargs)}")
        for name in cond_kwargs:
            c, u = cond_kwargs[name], uncond_kwargs[name]
            if not (isinstance(c, Tensor) and isinstance(u, Tensor)) or c.shape != u.shape:
                raise ValueError(f"conditioning {name!r} must be two tensors of one shape")
        if interval is not None and interval[0] > interval[1]:
            raise ValueError(f"guidance interval {interval} is empty")
        if num_guided_channels is not None and num_guided_channels < 1:
            raise ValueError("num_guided_channels must be >= 1")
        self.model_fn = model_fn
        self.scale = float(scale)
        self.null_label = int(null_label)
        self.interval = interval
        self.num_guided_channels = num_guided_channels
        self.cond_kwargs = cond_kwargs
        self.uncond_kwargs = uncond_kwargs
        self.shared_kwargs = dict(shared_kwargs or {})
        self.skip_uncond_outside_interval = skip_uncond_outside_interval

    def guided_mask(self, t: Tensor) -> Tensor:
        """Bool ``[N]``: which samples get scale s (the rest get 1)."""
        if self.scale == 1.0:
            return torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        lo, hi = self.interval
        return (t >= lo) & (t <= hi)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """``x`` ``[N, C, ...]``, ``t`` ``[N]``, ``y`` ``[N]`` → guided ``[N, C_out, ...]``."""
        n = x.shape[0]
        for name, value in self.cond_kwargs.items():
            if value.shape[0] != n:
                raise ValueError(f"conditioning {name!r} has batch {value.shape[0]}, x has {n}")
        guided = self.guided_mask(t)
        if self.skip_uncond_outside_interval and not bool(guided.any()):
            return self.model_fn(x, t, y, **self.cond_kwargs, **self.shared_kwargs)
        batched = {name: torch.cat([self.cond_kwargs[name], self.uncond_kwargs[name]], dim=0)
                   for name in self.cond_kwargs}
        out = self.model_fn(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0),
                            torch.cat([y, torch.full_like(y, self.null_label)], dim=0),
                            **batched, **self.shared_kwargs)
        cond, uncond = out[:n], out[n:]
        k = x.shape[1] if self.num_guided_channels is None else self.num_guided_channels
        mix = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        mask = guided.reshape(n, *([1] * (x.dim() - 1)))
        return torch.cat([torch.where(mask, mix, cond[:, :k]), cond[:, k:]], dim=1)
