"""d2c's checkpoint format (docs/design.md, ``TRAIN/checkpoints/``): a public contract.

One directory per checkpoint, ``<ckpt_dir>/step-0000020/``, holding:

=====================  ===================================================================
file                   content
=====================  ===================================================================
model.json             {"format": "d2c-checkpoint-v1", "arch", "dit_kwargs", "diffusion",
                       "step", "config"}: enough to rebuild the network and its diffusion
model.safetensors      the trained weights
ema.safetensors        the EMA weights (float32) — what sampling and scoring use
trainer.pt             optimizer, GradScaler, step, data position, RNG states; plain
                       tensors/dicts/lists/numbers/strings only, so it loads with
                       ``torch.load(..., weights_only=True)``
=====================  ===================================================================

A checkpoint is written into a hidden temporary directory beside its final place, every file
fsync'ed, then renamed into place: a crash mid-write leaves no ``step-*`` directory, only a
``.tmp-*`` one that :func:`latest_checkpoint` ignores (and :func:`prune_checkpoints` removes).
One process (rank 0) writes to a given checkpoint directory.

The ``*_at`` functions do the same on any :class:`d2c.storage.Location` — a local path or an
object-store URI such as ``s3://bucket/train/checkpoints``. An object store has no rename, so
there a checkpoint is written locally first and uploaded with ``model.json`` last; a
``step-*`` prefix counts as a checkpoint only once all four files are present.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from d2c.models.build import build_model
from d2c.models.dit import DiT
from d2c.storage import Location, location

CHECKPOINT_FORMAT = "d2c-checkpoint-v1"
META_FILE = "model.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
TRAINER_FILE = "trainer.pt"
CHECKPOINT_FILES = (META_FILE, MODEL_FILE, EMA_FILE, TRAINER_FILE)
#: Digits of the zero-padded step in a checkpoint's directory name.
STEP_DIGITS = 7
STEP_DIR_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


class CheckpointError(ValueError):
    """A path that is not a (complete) d2c checkpoint."""


def checkpoint_name(step: int) -> str:
    """``step-0000020`` for step 20."""
    return f"step-{step:0{STEP_DIGITS}d}"


def checkpoint_meta(
    arch: str, dit_kwargs: Mapping[str, Any], diffusion: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """The step-independent part of ``model.json``.

    Args:
        arch: ``"dit"`` or ``"sit"``.
        dit_kwargs: :class:`DiT` kwargs (:func:`d2c.models.build.dit_kwargs`).
        diffusion: the objective's settings (:meth:`D2CObjective.describe`).
        config: the full config dict (``cfg.to_dict()``), recorded for provenance.
    """
    return dict(arch=arch, dit_kwargs=dict(dit_kwargs), diffusion=dict(diffusion), config=dict(config or {}))


# ----------------------------------------------------------------------------------------------
# RNG state as weights_only-loadable values
# ----------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states: torch CPU (and CUDA, if initialised), numpy, python ``random``."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = dict(
        torch=torch.get_rng_state(),
        numpy=dict(
            name=np_name,
            keys=torch.from_numpy(np_keys.astype(np.int64)),
            pos=int(np_pos),
            has_gauss=int(np_has_gauss),
            cached_gaussian=float(np_gauss),
        ),
        python=dict(version=int(py_version), internal=list(py_internal), gauss=py_gauss),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states for the devices present)."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        for device, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s.cpu(), device)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as contiguous CPU tensors (what safetensors stores)."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    ema_model: nn.Module,
    trainer_state: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> Path:
    """Write ``<ckpt_dir>/step-<step>/`` atomically and return its path.

    Args:
        ckpt_dir: the checkpoints directory (created if missing).
        step: the training step the state belongs to.
        model: the trained network (bare module).
        ema_model: its EMA copy.
        trainer_state: optimizer, scaler, step, data position, RNG states
            (:meth:`d2c.train.trainer.Trainer.state_dict` plus ``data``).
        meta: :func:`checkpoint_meta` (arch, dit_kwargs, diffusion, config).

    An existing checkpoint of the same step is replaced (the new one is complete before the
    old one is moved aside).
    """
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        info = {**dict(meta), "format": CHECKPOINT_FORMAT, "step": int(step)}
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        save_file(_tensors(model.state_dict()), str(tmp / MODEL_FILE))
        save_file(_tensors(ema_model.state_dict()), str(tmp / EMA_FILE))
        torch.save(dict(trainer_state), tmp / TRAINER_FILE)
        for f in CHECKPOINT_FILES:
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        if final.exists():
            old = root / f"{OLD_PREFIX}{name}-{uuid.uuid4().hex}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------------------------
# Finding and reading
# ----------------------------------------------------------------------------------------------


#: A checkpoint's place: a local Path or a storage Location.
_P = TypeVar("_P")


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in CHECKPOINT_FILES)


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, path), oldest first (temp dirs ignored)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR_RE.match(child.name)
        if m and child.is_dir() and _is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint in ``ckpt_dir``, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def _resolve(where: Any, has: Callable[[str], bool], newest: Callable[[], Optional[_P]]) -> Optional[_P]:
    """The rule of :func:`resolve_checkpoint` / :func:`resolve_checkpoint_at`.

    ``where`` holds ``has(name)`` files: None when it is a (complete) checkpoint itself, else
    ``newest()``, the newest checkpoint inside it. Raises CheckpointError when it is an
    incomplete checkpoint or holds none.
    """
    if has(META_FILE):
        missing = [f for f in CHECKPOINT_FILES if not has(f)]
        if missing:
            raise CheckpointError(f"checkpoint {str(where)!r} is incomplete: missing {missing}")
        return None
    latest = newest()
    if latest is None:
        raise CheckpointError(
            f"{str(where)!r} is neither a d2c checkpoint (no {META_FILE}) nor a directory holding step-* checkpoints"
        )
    return latest


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest one inside a checkpoints directory."""
    p = Path(path)
    return _resolve(p, lambda name: (p / name).is_file(), lambda: latest_checkpoint(p)) or p


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of a checkpoint, its format checked."""
    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / META_FILE).read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(ckpt)!r} has format {meta.get('format')!r}; this d2c reads {CHECKPOINT_FORMAT!r}"
        )
    return meta


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (a ``step-*`` directory, or the newest one in a checkpoints directory).

    Returns:
        ``{"path": Path, "meta": model.json dict, "model": state dict, "ema": state dict,
        "trainer": trainer state (loaded with weights_only=True)}``.
    """
    ckpt = resolve_checkpoint(path)
    device = str(map_location)
    return dict(
        path=ckpt,
        meta=read_meta(ckpt),
        model=load_file(str(ckpt / MODEL_FILE), device=device),
        ema=load_file(str(ckpt / EMA_FILE), device=device),
        trainer=torch.load(ckpt / TRAINER_FILE, map_location=map_location, weights_only=True),
    )


def load_model(
    path: str | os.PathLike, use_ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[DiT, dict[str, Any]]:
    """Rebuild the network of a checkpoint from ``model.json`` and load its (EMA) weights.

    Returns:
        ``(model in eval mode on device, model.json dict)``; ``meta["diffusion"]`` rebuilds the
        objective/schedule (:meth:`d2c.train.objective.D2CObjective.from_description`).
    """
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    model = build_model(meta["dit_kwargs"])
    state = load_file(str(ckpt / (EMA_FILE if use_ema else MODEL_FILE)))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints, and leftover temp dirs of crashed writes.

    Returns:
        the deleted paths.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(ckpt_dir)
    found = list_checkpoints(root)
    doomed = [p for _, p in found[:-keep]]
    if root.is_dir():
        doomed += [c for c in root.iterdir() if c.is_dir() and c.name.startswith((TMP_PREFIX, OLD_PREFIX))]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


# ----------------------------------------------------------------------------------------------
# The same on any storage location (local path or object-store URI)
# ----------------------------------------------------------------------------------------------


def list_checkpoints_at(ckpt_dir: Location | str | os.PathLike) -> list[tuple[int, Location]]:
    """Complete checkpoints under ``ckpt_dir`` as (step, location), oldest first (see :func:`list_checkpoints`)."""
    root = location(ckpt_dir)
    if root.is_local:
        return [(step, root / p.name) for step, p in list_checkpoints(root.local_path)]
    found = []
    for child in root.iterdir():
        m = STEP_DIR_RE.match(child.name)
        if m and {f.name for f in child.files()} >= set(CHECKPOINT_FILES):
            found.append((int(m.group(1)), child))
    return sorted(found, key=lambda item: item[0])


def latest_checkpoint_at(ckpt_dir: Location | str | os.PathLike) -> Optional[Location]:
    """The newest complete checkpoint under ``ckpt_dir``, or None."""
    found = list_checkpoints_at(ckpt_dir)
    return found[-1][1] if found else None


def resolve_checkpoint_at(path: Location | str | os.PathLike) -> Location:
    """A checkpoint itself, or the newest one inside a checkpoints directory (see :func:`resolve_checkpoint`)."""
    loc = location(path)
    if loc.is_local:
        resolved = resolve_checkpoint(loc.local_path)
        return loc if resolved == loc.local_path else loc / resolved.name
    present = {f.name for f in loc.files()}
    return _resolve(loc, present.__contains__, lambda: latest_checkpoint_at(loc)) or loc


def read_meta_at(path: Location | str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of a checkpoint at any location, its format checked."""
    ckpt = resolve_checkpoint_at(path)
    meta = json.loads((ckpt / META_FILE).read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(ckpt)!r} has format {meta.get('format')!r}; this d2c reads {CHECKPOINT_FORMAT!r}")
    return meta


def save_checkpoint_at(
    ckpt_dir: Location | str | os.PathLike,
    step: int,
    model: nn.Module,
    ema_model: nn.Module,
    trainer_state: Mapping[str, Any],
    meta: Mapping[str, Any],
    staging: Optional[str | os.PathLike] = None,
) -> tuple[Location, Path]:
    """:func:`save_checkpoint` to any location.

    Args:
        staging: a local directory for the object-store case: the checkpoint is written there
            (``staging/step-*``) and uploaded, ``model.json`` last. Unused for a local ``ckpt_dir``.
    Returns:
        (the checkpoint's location, a local directory holding the same files — the checkpoint
        itself when local, else its staged copy, which the caller may delete).
    """
    root = location(ckpt_dir)
    if root.is_local:
        path = save_checkpoint(root.local_path, step, model, ema_model, trainer_state, meta)
        return root / path.name, path
    if staging is None:
        raise ValueError(f"save_checkpoint_at({str(root)!r}): an object-store checkpoint needs a local staging directory")
    local = save_checkpoint(staging, step, model, ema_model, trainer_state, meta)
    target = root / local.name
    if target.exists():
        target.rmtree()  # an older write of the same step: never mix its files with these
    for name in [f for f in CHECKPOINT_FILES if f != META_FILE] + [META_FILE]:
        (target / name).upload_from(local / name)
    return target, local


def prune_checkpoints_at(ckpt_dir: Location | str | os.PathLike, keep: int) -> list[Location]:
    """:func:`prune_checkpoints` at any location; on an object store also the incomplete ``step-*``
    prefixes older than the newest complete checkpoint (left by an interrupted upload)."""
    root = location(ckpt_dir)
    if root.is_local:
        return [root / p.name for p in prune_checkpoints(root.local_path, keep)]
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    found = list_checkpoints_at(root)
    doomed = [loc for _, loc in found[:-keep]]
    if found:
        newest = found[-1][0]
        complete = {loc.name for _, loc in found}
        for child in root.iterdir():
            m = STEP_DIR_RE.match(child.name)
            if m and child.name not in complete and int(m.group(1)) < newest:
                doomed.append(child)
    for loc in doomed:
        loc.rmtree()
    return doomed
