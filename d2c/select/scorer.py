"""Loading the frozen scorer ε_θ named by ``score.scorer``.

Three kinds of source are accepted:

* a checkpoint of ours (a ``step-*`` directory with ``model.json``, or a training
  directory whose latest checkpoint is used) — e.g. a scorer trained from scratch by
  ``d2c train data.full=true``;
* an official DiT checkpoint file (``DiT-XL-2-256x256.pt``), its size read off the
  weights' shapes;
* a diffusers ``DiTTransformer2DModel`` directory or hub id (``facebook/DiT-XL-2-256``).

The scorer is always ε-prediction on the DDPM schedule (docs/method.md): a SiT checkpoint
is refused, since its output is a velocity.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from d2c.models.convert import convert_diffusers_dit, read_official_dit_state_dict
from d2c.models.dit import DIT_CONFIGS, DiT

if TYPE_CHECKING:
    from d2c.config import D2CConfig

#: Rows the official class table holds beyond the classes (the CFG null class).
NULL_CLASS_ROWS = 1


class ScorerError(ValueError):
    """``score.scorer`` names something that cannot serve as an ε-prediction scorer."""


@dataclass
class Scorer:
    """A frozen scorer and where it came from.

    Attributes:
        model: the DiT, eval mode, ``requires_grad`` off; ``model(x, t, y)`` → [N, C or 2C, H, W].
        source: what ``score.scorer`` named (or the cache path of an embedded scorer).
        kind: "d2c-checkpoint", "official-dit" or "diffusers".
        num_classes: classes the scorer was trained on.
    """

    model: DiT
    source: str
    kind: str
    num_classes: int

    def check_compatible(self, num_classes: int, channels: int, size: int) -> None:
        """Refuse a scorer whose classes or input shape differ from the data's."""
        m = self.model
        grid = int(m.x_embedder.num_patches ** 0.5) * m.patch_size
        problems = []
        if self.num_classes != num_classes:
            problems.append(f"it has {self.num_classes} classes, the data {num_classes}")
        if m.in_channels != channels or grid != size:
            problems.append(f"it takes {m.in_channels}x{grid}x{grid} inputs, the latents are {channels}x{size}x{size}")
        if problems:
            raise ScorerError(f"score.scorer {self.source!r} does not fit this data: " + "; ".join(problems))


def _freeze(model: DiT, device: torch.device | str) -> DiT:
    model.eval().requires_grad_(False)
    return model.to(device)


def official_kwargs(state_dict: dict[str, torch.Tensor]) -> dict:
    """DiT constructor kwargs read off an official-format state dict's shapes."""
    hidden, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    tokens = state_dict["pos_embed"].shape[1]
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    heads = {(d, h): nh for d, h, nh, _ in DIT_CONFIGS.values()}.get((depth, hidden))
    if heads is None:
        raise ScorerError(
            f"official checkpoint with depth {depth} and hidden size {hidden} matches no DiT size "
            f"({sorted(DIT_CONFIGS)}); its head count cannot be read off the weights"
        )
    mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    return dict(
        input_size=int(round(tokens**0.5)) * patch,
        patch_size=patch,
        in_channels=channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_hidden / hidden,
        class_dropout_prob=0.1 if rows > 1 else 0.0,
        num_classes=rows - NULL_CLASS_ROWS,
        learn_sigma=out_features == 2 * patch * patch * channels,
    )


def _load_ours(path: Path, device) -> Scorer:
    from d2c.train.checkpoint import latest_checkpoint, load_model

    ckpt = path if (path / "model.json").is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise ScorerError(f"score.scorer {str(path)!r} is a directory with no d2c checkpoint in it")
    meta = json.loads((Path(ckpt) / "model.json").read_text())
    if meta.get("arch") != "dit":
        raise ScorerError(
            f"score.scorer {str(ckpt)!r} is a {meta.get('arch')!r} model; the difficulty score needs an "
            "ε-prediction (DiT/DDPM) scorer — train one with model.arch=dit"
        )
    model, _ = load_model(ckpt, use_ema=True)
    return Scorer(_freeze(model, device), str(ckpt), "d2c-checkpoint", model.num_classes)


def _load_official(path: Path, device) -> Scorer:
    state = read_official_dit_state_dict(path, use_ema=True)
    model = DiT(**official_kwargs(state))
    model.load_state_dict(state, strict=True)
    return Scorer(_freeze(model, device), str(path), "official-dit", model.num_classes)


def _load_diffusers(spec: str, device) -> Scorer:
    from diffusers import DiTTransformer2DModel

    local = Path(spec)
    sub = "transformer" if (local / "transformer").is_dir() or not local.exists() else None
    try:
        dm = DiTTransformer2DModel.from_pretrained(spec, subfolder=sub)
    except (OSError, ValueError) as err:
        raise ScorerError(f"score.scorer {spec!r}: could not load a diffusers DiT ({err})") from None
    state = convert_diffusers_dit(dm)
    kwargs = official_kwargs(state)
    kwargs["timestep_freq_shift"] = 1.0  # diffusers' sinusoid convention (see d2c.models.dit)
    model = DiT(**kwargs)
    model.load_state_dict(state, strict=True)
    return Scorer(_freeze(model, device), spec, "diffusers", model.num_classes)


def load_scorer(spec: str, device: torch.device | str = "cpu") -> Scorer:
    """Load ``score.scorer`` (see the module docstring for what it may name)."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if (path / "model.json").is_file() or (path / "checkpoints").is_dir() or any(path.glob("step-*")):
            return _load_ours(path, device)
        if (path / "config.json").is_file() or (path / "transformer").is_dir():
            return _load_diffusers(str(path), device)
        raise ScorerError(
            f"score.scorer {spec!r} is a directory that holds neither a d2c checkpoint (model.json) "
            "nor a diffusers DiT (config.json)"
        )
    if path.is_file():
        return _load_official(path, device)
    return _load_diffusers(spec, device)

# ----------------------------------------------------------------------------------------------
# The embedded scorer: trained from scratch when score.scorer is unset, cached by its settings
# ----------------------------------------------------------------------------------------------

#: Subdirectory of the cache root (d2c.rundir.cache_root) holding embedded scorers.
SCORER_CACHE_SUBDIR = "scorers"


def embedded_scorer_dir(cfg: "D2CConfig") -> Path:
    """Where the embedded scorer of ``cfg`` is cached: keyed by :func:`scorer_settings`."""
    from d2c.rundir import cache_root

    key = hashlib.sha256(json.dumps(scorer_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / SCORER_CACHE_SUBDIR / key


def scorer_settings(cfg: "D2CConfig") -> dict[str, Any]:
    """What the embedded scorer depends on (its cache key)."""
    return {
        "data": {k: getattr(cfg.data, k) for k in ("source", "path", "split", "image_size", "channels", "preprocess", "max_per_class")},
        "autoencoder": cfg.autoencoder.settings(),
        "diffusion": cfg.diffusion.model_dump(),
        "model": {k: getattr(cfg.model, k) for k in ("size", "hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "class_dropout_prob")},
        "steps": cfg.score.scorer_train_steps,
        "holdout_rows": cfg.score.gate_rows,
        "ema_warmup": True,
        "train": {k: getattr(cfg.train, k) for k in ("batch_size", "lr", "beta1", "beta2", "weight_decay", "clip_norm", "ema_decay", "seed")},
    }


def scorer_config(cfg: "D2CConfig", out: Path) -> "D2CConfig":
    """The config that trains the embedded scorer: DiT, ε-prediction, full data, no attach."""
    raw = cfg.to_dict()
    raw["data"]["full"] = True
    raw["model"].update(arch="dit", learn_sigma=False, use_text=False, use_visual=False)
    raw["train"].update(steps=cfg.score.scorer_train_steps, num_workers=1, hflip=False, proj_coeff=0.0,
                        ckpt_every=max(1, cfg.score.scorer_train_steps // 4))
    raw["train_dir"] = str(out)
    from d2c.config import build_config

    return build_config(raw)
