"""Build the diffusion transformer from the config.

:func:`dit_kwargs` turns ``cfg.model`` (plus what the data provides: class count, text and
visual feature sizes) into the keyword arguments of :class:`d2c.models.dit.DiT`. Those
kwargs are plain JSON values; a checkpoint stores them (``model.json``), and
:func:`build_model` rebuilds the same network from them, so a trained model can be loaded
without the config that made it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

from d2c.models.dit import DIT_CONFIGS, DiT

if TYPE_CHECKING:  # type-only: keeps this module importable without pydantic (GPU benchmarks)
    from d2c.config import D2CConfig

#: Prefixes a size name may carry ("DiT-XL/2", "SiT-L/2"); the size itself is the rest.
SIZE_NAME_PREFIXES = ("DiT-", "SiT-")


def size_fields(size: str) -> dict[str, int]:
    """``depth``, ``hidden_size``, ``num_heads``, ``patch_size`` of a named size ("XL/2", "SiT-L/2")."""
    key = size
    for prefix in SIZE_NAME_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if key not in DIT_CONFIGS:
        raise ValueError(
            f"model.size {size!r} is not a known size; use one of {sorted(DIT_CONFIGS)} or 'custom' "
            "(then model.hidden_size/depth/num_heads/patch_size)"
        )
    depth, hidden_size, num_heads, patch_size = DIT_CONFIGS[key]
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)


def dit_kwargs(
    cfg: D2CConfig,
    num_classes: int,
    text_dim: Optional[int] = None,
    text_len: Optional[int] = None,
    proj_dim: Optional[int] = None,
) -> dict[str, Any]:
    """The :class:`DiT` keyword arguments for this config and data.

    Args:
        cfg: the whole config; uses ``cfg.model``, ``cfg.latent_size`` (the input side H = W),
            ``cfg.latent_channels`` (C) and ``cfg.attach.text.max_length``.
        num_classes: number of classes of the data.
        text_dim: d of the stored class text embeddings ``[num_classes, L, d]``, or None when
            there are none. Dropped (no DC-embedding) when ``cfg.model.use_text`` is False.
        text_len: L, the text tokens per class; None = ``cfg.attach.text.max_length``.
        proj_dim: d of the stored visual tokens ``[T, d]``, or None when there are none.
            Dropped (no REPA projector) when ``cfg.model.use_visual`` is False.
    Returns:
        JSON-serialisable kwargs for ``DiT(**kwargs)``.
    """
    m = cfg.model
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if m.size == "custom":
        size = dict(depth=m.depth, hidden_size=m.hidden_size, num_heads=m.num_heads, patch_size=m.patch_size)
    else:
        size = size_fields(m.size)
    use_text = m.use_text and text_dim is not None
    use_visual = m.use_visual and proj_dim is not None
    if use_visual and not 1 <= m.encoder_depth <= size["depth"]:
        raise ValueError(
            f"model.encoder_depth ({m.encoder_depth}) must lie in [1, {size['depth']}] (the model's depth) "
            "for the REPA projector; set model.encoder_depth (8 for L/XL)"
        )
    if cfg.latent_size % size["patch_size"]:
        raise ValueError(
            f"latent size {cfg.latent_size} is not divisible by patch size {size['patch_size']}; "
            "change data.image_size or the model size"
        )
    return dict(
        input_size=cfg.latent_size,
        patch_size=size["patch_size"],
        in_channels=cfg.latent_channels,
        hidden_size=size["hidden_size"],
        depth=size["depth"],
        num_heads=size["num_heads"],
        mlp_ratio=float(m.mlp_ratio),
        class_dropout_prob=float(m.class_dropout_prob),
        num_classes=int(num_classes),
        learn_sigma=bool(m.learn_sigma),
        text_dim=int(text_dim) if use_text else None,
        text_len=int(text_len if text_len is not None else cfg.attach.text.max_length),
        proj_dim=int(proj_dim) if use_visual else None,
        proj_hidden_dim=int(m.proj_hidden_dim),
        encoder_depth=int(m.encoder_depth),
    )


def build_model(kwargs: Mapping[str, Any], seed: int | None = None) -> DiT:
    """``DiT(**kwargs)`` (freshly initialised), for kwargs from :func:`dit_kwargs` or a checkpoint.
    With ``seed`` (``train.seed``) the parts every variant shares start identical across variants."""
    return DiT(**dict(kwargs), init_seed=seed)
