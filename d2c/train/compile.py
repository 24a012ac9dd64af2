"""Regional ``torch.compile``: every transformer block compiled in place, one graph for all.

``train.compile`` and ``score.compile`` name a backend: ``"off"`` (eager), ``"inductor"``
(torch's compiler: fused kernels, the setting that pays on a GPU; benchmarks/gpu_suite.py
measures it) or ``"aot_eager"`` (Dynamo's capture and AOTAutograd's forward/backward graphs run
eagerly: checks that a model compiles, no speed-up; what the CPU tests use).

Why blocks and not the whole model: :meth:`torch.nn.Module.compile` on each block keeps the
module tree and its parameter names (checkpoints and the EMA read the same ``state_dict``
keys as eager, no ``_orig_mod.`` prefix), and Dynamo treats a block's parameters as inputs,
so N identical blocks cost one compile per input shape and dtype, not N. Compile after the
EMA copy is made (:class:`~d2c.train.trainer.Trainer` does): a deep copy of a compiled module
would carry the compiled call along.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

#: Values of ``train.compile`` / ``score.compile``: "off" or a torch.compile backend.
COMPILE_BACKENDS = ("off", "inductor", "aot_eager")
#: Dynamo's per-function recompile cap, raised so a shape change never falls back to eager.
DYNAMO_RECOMPILE_LIMIT = 64


def configure_dynamo() -> None:
    """Raise Dynamo's recompile cap and make hitting it an error, not a silent eager fallback."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), DYNAMO_RECOMPILE_LIMIT))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def compile_options(backend: str, mode: Optional[str] = None) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for ``backend`` (a ``mode`` only applies to inductor)."""
    opts: dict[str, Any] = dict(backend=backend)
    if backend == "inductor" and mode:
        opts["mode"] = mode
    return opts


def compile_blocks(blocks: Sequence[nn.Module], backend: str, fullgraph: bool = True, mode: Optional[str] = None) -> int:
    """Compile each module of ``blocks`` in place with ``backend`` ("off" = leave them eager).

    Args:
        blocks: the repeated layers (``DiT.blocks``, a vision encoder's layers).
        backend: "off", or a torch.compile backend (the config allows :data:`COMPILE_BACKENDS`;
            benchmarks may name any other that ``torch._dynamo.list_backends()`` knows).
        fullgraph: refuse graph breaks (a DiT block has none).
        mode: inductor's mode (``"max-autotune"`` ...); None = its default.
    Returns:
        the number of modules compiled (0 for "off").
    """
    if backend == "off":
        return 0
    configure_dynamo()
    for module in blocks:
        module.compile(fullgraph=fullgraph, **compile_options(backend, mode))
    return len(blocks)


def uncompile_blocks(blocks: Sequence[nn.Module]) -> None:
    """Back to eager calls (the compiled graphs stay in Dynamo's cache for a later compile)."""
    for module in blocks:
        module._compiled_call_impl = None  # nn.Module.compile's slot


@contextlib.contextmanager
def compiled_blocks(blocks: Sequence[nn.Module], backend: str, fullgraph: bool = True,
                    mode: Optional[str] = None) -> Iterator[None]:
    """:func:`compile_blocks` for the duration of a ``with`` block (benchmarks compare variants)."""
    compile_blocks(blocks, backend, fullgraph, mode)
    try:
        yield
    finally:
        uncompile_blocks(blocks)
