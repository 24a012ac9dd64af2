"""Load official DiT checkpoints and convert diffusers ``DiTTransformer2DModel`` weights.

Our :class:`d2c.models.dit.DiT` uses the official DiT parameter names, so official
checkpoints load directly (:func:`load_official_dit_checkpoint`). diffusers stores the same
network under other names (:func:`convert_diffusers_dit` maps them):

=====================================================  ====================================
diffusers                                               ours / official
=====================================================  ====================================
``pos_embed.proj.{weight,bias}``                        ``x_embedder.proj.*``
(non-persistent buffer ``pos_embed.pos_embed``)         ``pos_embed`` [1, T, D]
``transformer_blocks.0.norm1.emb.timestep_embedder``    ``t_embedder.mlp.0`` / ``.mlp.2``
``.linear_1`` / ``.linear_2``
``transformer_blocks.0.norm1.emb.class_embedder``       ``y_embedder.embedding_table``
``.embedding_table``
``transformer_blocks.{i}.norm1.linear``                 ``blocks.{i}.adaLN_modulation.1``
``transformer_blocks.{i}.attn1.to_q/to_k/to_v``         ``blocks.{i}.attn.qkv`` (row concat)
``transformer_blocks.{i}.attn1.to_out.0``               ``blocks.{i}.attn.proj``
``transformer_blocks.{i}.ff.net.0.proj`` / ``ff.net.2`` ``blocks.{i}.mlp.fc1`` / ``mlp.fc2``
``proj_out_1`` / ``proj_out_2``                         ``final_layer.adaLN_modulation.1`` /
                                                        ``final_layer.linear``
=====================================================  ====================================

diffusers keeps a copy of the timestep/class embedder in every block's ``norm1.emb`` (and its
final layer reads block 0's); the official model has one shared embedder, so the copies must
be equal (checked). Two numerical conventions differ in diffusers and are NOT weights:

* timestep features: diffusers uses ``downscale_freq_shift=1`` where official DiT uses 0
  (same ``[cos, sin]`` order). Build our model with ``timestep_freq_shift=1`` to reproduce a
  diffusers model's outputs exactly; the default (0) reproduces the official DiT.
* the LayerNorm before each MLP uses the diffusers config's ``norm_eps`` (default 1e-5);
  ours, like the official model, uses 1e-6 (a warning is issued when a model is passed).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn

from d2c.models.dit import NORM_EPS, get_2d_sincos_pos_embed

# Keys holding the weights inside a training checkpoint written by the official train.py.
EMA_KEY = "ema"
MODEL_KEY = "model"
# Prefixes added by DistributedDataParallel and torch.compile; stripped on load.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_DIFFUSERS_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_DIFFUSERS_EMBEDDER_PREFIX = "norm1.emb."
# Per-block diffusers sub-keys -> our per-block sub-keys (q/k/v handled separately).
_BLOCK_RENAMES = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
# Shared embedder sub-keys (inside ``norm1.emb.``) -> our top-level keys.
_EMBEDDER_RENAMES = {
    "timestep_embedder.linear_1": "t_embedder.mlp.0",
    "timestep_embedder.linear_2": "t_embedder.mlp.2",
    "class_embedder.embedding_table": "y_embedder.embedding_table",
}
_TOP_RENAMES = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_QKV = ("to_q", "to_k", "to_v")
_PARAM_SUFFIXES = ("weight", "bias")


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a DDP/compile prefix shared by every key."""
    out = dict(state_dict)
    for prefix in WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def read_official_dit_state_dict(path: str | os.PathLike, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Read an official-format DiT checkpoint into a state dict (tensors only, CPU).

    Accepts a raw state dict (the released ``DiT-XL-2-256x256.pt`` is the EMA state dict) or a
    dict holding ``"ema"`` and/or ``"model"`` state dicts (official ``train.py`` checkpoints).
    Reads with ``weights_only=True``: checkpoints that also pickle arbitrary objects (the
    official train.py stores ``args`` as an ``argparse.Namespace``) are refused with an error
    explaining why; re-save their ``"ema"`` entry alone.

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist.
        KeyError: a training checkpoint lacks the requested entry.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"{path} holds objects other than tensors and containers, which weights_only=True "
            f"refuses to unpickle; save its state dict alone (e.g. torch.save(ckpt['ema'], ...)). "
            f"Original error: {err}"
        ) from err
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    if EMA_KEY in ckpt or MODEL_KEY in ckpt:
        key = EMA_KEY if use_ema else MODEL_KEY
        if key not in ckpt:
            raise KeyError(f"{path} has no {key!r} entry (use_ema={use_ema}); it has {sorted(ckpt)}")
        ckpt = ckpt[key]
    return _strip_wrapper_prefixes(ckpt)


def load_official_dit_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    use_ema: bool = True,
    strict: bool = True,
):
    """Load an official DiT checkpoint (see :func:`read_official_dit_state_dict`) into ``model``.

    Use ``strict=False`` for a model with D2C additions (``text_dim`` / ``proj_dim``): the
    official checkpoint then leaves exactly the ``y_embedder.text_*`` and ``projector.*`` keys
    missing. Shape mismatches (e.g. a different ``input_size``) always raise.

    Returns:
        ``torch.nn.modules.module._IncompatibleKeys`` (missing_keys, unexpected_keys).
    """
    state_dict = read_official_dit_state_dict(path, use_ema=use_ema)
    return model.load_state_dict(state_dict, strict=strict)


def _check_diffusers_config(config: Mapping) -> None:
    """Refuse diffusers configs that our network cannot represent; warn on the eps mismatch."""
    requirements = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": False,
        "attention_bias": True,
    }
    for field, expected in requirements.items():
        if field in config and config[field] != expected:
            raise ValueError(f"diffusers config {field}={config[field]!r}; only {expected!r} is supported")
    eps = config.get("norm_eps")
    if eps is not None and eps != NORM_EPS:
        warnings.warn(
            f"diffusers norm_eps={eps} differs from this DiT's {NORM_EPS} (the official value) "
            "for the LayerNorm before each MLP; outputs will differ slightly",
            stacklevel=3,
        )


def convert_diffusers_dit(
    source: nn.Module | Mapping[str, torch.Tensor],
    grid_size: int | None = None,
    check_shared_embedder: bool = True,
) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``DiTTransformer2DModel`` (or its state dict) to our names.

    Args:
        source: the diffusers model (its config is checked and its ``pos_embed`` buffer used)
            or its ``state_dict()``.
        grid_size: tokens per side (``sample_size / patch_size``). diffusers does not save the
            position embedding, so for a bare state dict ``pos_embed`` is computed from this;
            when ``None`` (and ``source`` is a state dict) the key is omitted — load with
            :func:`load_diffusers_dit`, which takes it from the target model.
        check_shared_embedder: require every block's timestep/class embedder to equal block
            0's (the official model has one); when False, block 0's is taken silently.
    Returns:
        State dict in official DiT names (tensors shared with ``source`` where possible).

    Raises:
        ValueError: unsupported config, untied per-block embedders, or unexpected keys.
    """
    pos_embed = None
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if config is not None:
            _check_diffusers_config(config)
        buffer = getattr(getattr(source, "pos_embed", None), "pos_embed", None)
        if isinstance(buffer, torch.Tensor):
            pos_embed = buffer.detach()
        state_dict = source.state_dict()
    else:
        state_dict = dict(source)

    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    embedders: dict[int, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in state_dict.items():
        stem, _, suffix = key.rpartition(".")
        match = _DIFFUSERS_BLOCK.match(key)
        if match is not None:
            index, rest = int(match.group(1)), match.group(2)
            rest_stem, _, rest_suffix = rest.rpartition(".")
            if rest.startswith(_DIFFUSERS_EMBEDDER_PREFIX):
                embedders.setdefault(index, {})[rest[len(_DIFFUSERS_EMBEDDER_PREFIX) :]] = value
            elif rest_stem in _BLOCK_RENAMES:
                out[f"blocks.{index}.{_BLOCK_RENAMES[rest_stem]}.{rest_suffix}"] = value
            elif rest_stem.startswith("attn1.") and rest_stem[len("attn1.") :] in _QKV:
                qkv_parts.setdefault((index, rest_suffix), {})[rest_stem[len("attn1.") :]] = value
            else:
                unexpected.append(key)
        elif stem in _TOP_RENAMES and suffix in _PARAM_SUFFIXES:
            out[f"{_TOP_RENAMES[stem]}.{suffix}"] = value
        elif key == "pos_embed.pos_embed":  # persistent only for SD3-style cropping configs
            pos_embed = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"unexpected diffusers DiT keys: {unexpected}")

    for (index, suffix), parts in sorted(qkv_parts.items()):
        missing = [name for name in _QKV if name not in parts]
        if missing:
            raise ValueError(f"block {index} lacks attn1.{missing} {suffix}")
        out[f"blocks.{index}.attn.qkv.{suffix}"] = torch.cat([parts[name] for name in _QKV], dim=0)

    if 0 not in embedders:
        raise ValueError("transformer_blocks.0.norm1.emb.* (timestep/class embedder) not found")
    shared = embedders[0]
    if check_shared_embedder:
        for index, emb in sorted(embedders.items()):
            for name, value in shared.items():
                if name not in emb or not torch.equal(emb[name], value):
                    raise ValueError(
                        f"transformer_blocks.{index}.norm1.emb.{name} differs from block 0's; the "
                        "official DiT shares one embedder (pass check_shared_embedder=False to use block 0's)"
                    )
    for name, value in shared.items():
        stem, _, suffix = name.rpartition(".")
        if stem not in _EMBEDDER_RENAMES:
            raise ValueError(f"unexpected diffusers embedder key norm1.emb.{name}")
        out[f"{_EMBEDDER_RENAMES[stem]}.{suffix}"] = value

    if pos_embed is None and grid_size is not None:
        hidden_size = out["x_embedder.proj.weight"].shape[0]
        pos_embed = get_2d_sincos_pos_embed(hidden_size, grid_size).float()
    if pos_embed is not None:
        out["pos_embed"] = pos_embed.reshape(1, -1, pos_embed.shape[-1]).clone()
    return out


def load_diffusers_dit(model: nn.Module, source: nn.Module | Mapping[str, torch.Tensor], strict: bool = True):
    """Convert ``source`` (see :func:`convert_diffusers_dit`) and load it into our ``model``.

    A missing ``pos_embed`` is taken from ``model`` (the fixed sin-cos table its constructor
    computed). Returns ``load_state_dict``'s (missing_keys, unexpected_keys).
    """
    state_dict = convert_diffusers_dit(source)
    if "pos_embed" not in state_dict:
        state_dict["pos_embed"] = model.state_dict()["pos_embed"]
    return model.load_state_dict(state_dict, strict=strict)
