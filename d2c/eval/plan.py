"""What an evaluation will do, checked before any Ray work, and what it computes from features:
its checkpoint, class text, Inception, sampling plan and reference (each refused with the key
and the fix), the settings that define ``EVAL/``, the metrics and the FID bootstrap.
``app/evaluate.py`` runs the Ray part (sampling and Inception actors) around these.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from d2c.config import ConfigError, D2CConfig, DataConfig
from d2c.eval.artifacts import bootstrap_reference
from d2c.rundir import non_default
from d2c.storage import Location, StorageError, is_uri, location

#: torch-fidelity's Inception weights are a .pth file; anything else is a TorchScript.
FIDELITY_WEIGHTS_SUFFIX = ".pth"
#: Reference values of eval.reference that name a split of data.*.
SPLIT_REFERENCES = ("test", "train")
#: Sources with a test split.
SOURCES_WITH_TEST_SPLIT = ("fashion_mnist",)
#: The marker the sqrtm route of the FID raises for an imaginary square root.
SQRTM_IMAGINARY_MARKER = "imaginary component"

def eval_dir_of(cfg: D2CConfig) -> Location:
    """``eval_dir``, default ``run_dir/eval`` (a local path or a storage URI)."""
    return location(cfg.eval_dir) if cfg.eval_dir else location(cfg.run_dir) / "eval"




def resolve_eval_checkpoint(value: Optional[str]) -> tuple[Location, dict[str, Any]]:
    """The checkpoint ``checkpoint=`` names: a step dir, a checkpoints dir, or a train dir (path or URI).

    Returns:
        (the ``step-*`` directory, its model.json).
    Raises:
        ConfigError: naming the key ``checkpoint`` when it is unset, missing or not a checkpoint.
    """
    from d2c.train.checkpoint import CheckpointError, read_meta_at, resolve_checkpoint_at

    if not value:
        raise ConfigError(
            "checkpoint is required: pass checkpoint=TRAIN_DIR (or its checkpoints/ directory, or one step-* directory)"
        )
    try:
        p = location(value if is_uri(value) else str(Path(value).expanduser()))
        if not p.exists():
            raise ConfigError(f"checkpoint: {value!r} does not exist; point checkpoint= at a train dir or a step-* checkpoint")
    except StorageError as err:
        raise ConfigError(f"checkpoint: {err}") from None
    if (p / "checkpoints").is_dir() and not (p / "model.json").is_file():
        p = p / "checkpoints"
    try:
        ckpt = resolve_checkpoint_at(p)
        meta = read_meta_at(ckpt)
    except (CheckpointError, json.JSONDecodeError) as err:
        raise ConfigError(f"checkpoint: {value!r} is not a usable d2c checkpoint: {err}") from None
    for key in ("arch", "dit_kwargs", "diffusion"):
        if key not in meta:
            raise ConfigError(f"checkpoint: {str(ckpt)!r}'s model.json lacks {key!r}; it was not written by d2c train")
    return ckpt, meta


def text_embeddings_path(cfg: D2CConfig, meta: dict[str, Any]) -> Optional[Location]:
    """The class text embeddings a D2C model needs (None for a model without DC-embedding).

    ``eval.text_embeddings`` when set, else ``text_embeddings.safetensors`` beside the
    ``condensed`` set recorded in the checkpoint's config.
    """
    from d2c.attach.text import TEXT_FILE

    has_text = meta["dit_kwargs"].get("text_dim") is not None
    if not has_text:
        if cfg.eval.text_embeddings:
            raise ConfigError("eval.text_embeddings is set but the checkpoint's model has no DC text embedding; unset it")
        return None
    if cfg.eval.text_embeddings:
        path = location(cfg.eval.text_embeddings)
    else:
        condensed = (meta.get("config") or {}).get("condensed")
        if not condensed:
            raise ConfigError(
                "the checkpoint's model uses class text embeddings but its config records no condensed set; "
                "set eval.text_embeddings=RUN/text_embeddings.safetensors"
            )
        path = location(condensed).parent / TEXT_FILE
    if not path.is_file():
        raise ConfigError(f"eval.text_embeddings: {str(path)!r} does not exist; set eval.text_embeddings to the run's {TEXT_FILE}")
    return path


def inception_source(cfg: D2CConfig) -> tuple[str, Optional[str]]:
    """(source, weights path) of :class:`d2c.eval.inception.InceptionFeatures` from ``eval.inception_path``."""
    path = cfg.eval.inception_path
    if path is None:
        return "torchscript", None
    if not os.path.isfile(path):
        raise ConfigError(f"eval.inception_path: {path!r} does not exist; unset it to use the shipped TorchScript Inception")
    return ("torch-fidelity" if path.endswith(FIDELITY_WEIGHTS_SUFFIX) else "torchscript"), path


def sampling_plan(cfg: D2CConfig, meta: dict[str, Any]):
    """The :class:`d2c.eval.sampling.SamplingPlan` of ``eval.*`` for this checkpoint (no weights loaded).

    Raises:
        ConfigError: a sampling setting, the autoencoder or the data shape does not fit the checkpoint.
    """
    from d2c.eval.sampling import SamplingError, SamplingPlan

    e, kwargs = cfg.eval, meta["dit_kwargs"]
    trained = ((meta.get("config") or {}).get("autoencoder") or {}).get("kind")
    if trained is not None and trained != cfg.autoencoder.kind:
        raise ConfigError(f"autoencoder.kind={cfg.autoencoder.kind!r} but the checkpoint was trained with {trained!r}; "
                          f"set autoencoder.kind={trained}")
    want = (int(kwargs["in_channels"]), int(kwargs["input_size"]))
    have = (cfg.latent_channels, cfg.latent_size)
    if want != have:
        raise ConfigError(
            f"the checkpoint's model takes {want[0]}x{want[1]}x{want[1]} latents but data.*/autoencoder.* give "
            f"{have[0]}x{have[1]}x{have[1]}; evaluate with the data and autoencoder settings it was trained with"
        )
    try:
        return SamplingPlan(meta, sampler=e.sampler, steps=e.steps, cfg_scale=e.cfg_scale, guidance_interval=e.guidance_interval,
                            seed=e.seed, batch_size=e.batch_size, clip_denoised=e.clip_denoised,
                            pixel_space=cfg.autoencoder.kind == "identity", precision=e.precision)
    except SamplingError as err:
        raise ConfigError(str(err)) from None


def check_reference(cfg: D2CConfig) -> None:
    """Refuse an ``eval.reference`` that is not a split name or a readable ADM .npz (naming the key)."""
    ref = cfg.eval.reference
    if ref in SPLIT_REFERENCES:
        if ref == "test" and cfg.data.source not in SOURCES_WITH_TEST_SPLIT:
            raise ConfigError(
                f"eval.reference='test' needs a data source with a test split ({', '.join(SOURCES_WITH_TEST_SPLIT)}); "
                f"for data.source={cfg.data.source} set eval.reference to an ADM reference .npz or to 'train'"
            )
        return
    if not ref.endswith(".npz"):
        raise ConfigError(f"eval.reference must be 'test', 'train' or an ADM reference .npz file; got {ref!r}")
    if not os.path.isfile(ref):
        raise ConfigError(f"eval.reference: {ref!r} does not exist")
    try:
        with np.load(ref, allow_pickle=False) as z:
            files = list(z.files)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConfigError(f"eval.reference: {ref!r} cannot be read as an .npz ({err})") from None
    from d2c.eval.fid import NPZ_IMAGES, NPZ_MU, NPZ_SIGMA

    if not ({NPZ_MU, NPZ_SIGMA} <= set(files) or NPZ_IMAGES in files):
        raise ConfigError(f"eval.reference: {ref!r} holds neither ADM statistics ({NPZ_MU}, {NPZ_SIGMA}) nor images "
                          f"({NPZ_IMAGES}); found {files}")


def balanced_reference_rows(cfg: D2CConfig, num_classes: int) -> tuple[list[dict[str, Any]], DataConfig, list[int]]:
    """``eval.reference_size`` class-balanced images of the reference split: the first ones of each class.

    Class c gets ``reference_size // C`` images (+1 for the first ``reference_size mod C``
    classes), the first ones in source order; a class with fewer is refused.

    Returns:
        (listing rows in listing order, the DataConfig they were listed with, per-class counts).
    """
    from d2c.data.source import list_source
    from d2c.eval.sampling import class_counts

    quota = class_counts(cfg.eval.reference_size, num_classes)
    data_cfg = cfg.data.model_copy(update={"split": cfg.eval.reference, "max_per_class": max(quota)})
    listing = list_source(data_cfg)
    if listing.num_classes != num_classes:
        raise ConfigError(
            f"eval.reference={cfg.eval.reference!r}: data.* lists {listing.num_classes} classes but the model has {num_classes}"
        )
    taken = [0] * num_classes
    rows = []
    for row in listing.rows:
        if taken[row["label"]] < quota[row["label"]]:
            taken[row["label"]] += 1
            rows.append(row)
    short = [c for c in range(num_classes) if taken[c] < quota[c]]
    if short:
        raise ConfigError(
            f"eval.reference_size={cfg.eval.reference_size}: classes {short[:5]} of the {cfg.eval.reference} split have fewer "
            f"than their {max(quota)} reference images; lower eval.reference_size"
        )
    return rows, data_cfg, taken


def fid_bootstrap(cfg: D2CConfig, samples: dict[str, np.ndarray], info: dict[str, Any]) -> tuple[Optional[dict], Optional[str]]:
    """``(metrics.json's fid_bootstrap, None)``, or ``(None, why it was not computed)`` (``eval.bootstrap_rounds``)."""
    from d2c.config import DEFAULT_BOOTSTRAP_ROUNDS
    from d2c.eval.bootstrap import cheap_route, fid_interval

    rounds = cfg.eval.bootstrap_rounds
    if rounds == 0:
        return None, "eval.bootstrap_rounds=0"
    ref = bootstrap_reference(info)
    n, dim = samples["pool"].shape
    m = None if ref.features is None else len(ref.features)
    if rounds is None:
        if not cheap_route(n, m, dim):
            return None, (f"skipped by default at N={n} samples vs {m or 'fixed statistics of the'} reference: each round "
                          f"would need {dim} x {dim} eigendecompositions (about 2 s each on 2 cores); set "
                          "eval.bootstrap_rounds=R to compute it anyway")
        rounds = DEFAULT_BOOTSTRAP_ROUNDS
    iv = fid_interval(samples["pool"], ref, samples["label"], rounds=rounds, level=cfg.eval.bootstrap_level, seed=cfg.eval.seed)
    return iv.to_dict(), None


def compute_all_metrics(cfg: D2CConfig, samples: dict[str, np.ndarray], ref: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """The d2c.eval.fid metrics of the samples against the reference, and the settings used.

    The FID's square root follows ``eval.fid_method``; when ADM's sqrtm route fails on a
    near-singular covariance (few samples), the eigh route (the same quantity) is used and
    recorded.
    """
    from d2c.eval import fid

    kwargs = dict(stats_ref=ref["stats"], spatial_gen=samples["spatial"], spatial_ref=ref["spatial"],
                  spatial_ref_features=ref.get("spatial_feats"), logits_gen=samples.get("logits"))
    method, note = cfg.eval.fid_method, None
    try:
        values = fid.compute_metrics(samples["pool"], ref["feats"], fid_method=method, **kwargs)
    except ValueError as err:
        if method != "sqrtm" or SQRTM_IMAGINARY_MARKER not in str(err):
            raise
        note = f"sqrtm failed ({err}); used the eigh route, which computes the same trace"
        method = "eigh"
        values = fid.compute_metrics(samples["pool"], ref["feats"], fid_method=method, **kwargs)
    settings = dict(fid_method=cfg.eval.fid_method, fid_method_used=method, fid_method_note=note,
                    kid_subsets=fid.KID_SUBSETS, prc_k=fid.PRC_NEIGHBORHOOD, metric_seed=fid.DEFAULT_SEED)
    return values, settings


def eval_settings(cfg: D2CConfig, ckpt: Location, meta: dict[str, Any], text_path: Optional[Location], reference_id: str,
                  extractor_id: str) -> dict[str, Any]:
    """Everything the EVAL outputs depend on (a rerun with the same is skipped)."""
    e = cfg.eval
    return {
        "checkpoint": str(ckpt.absolute()),
        "step": meta.get("step"),
        "weights": "ema",
        "text_embeddings": str(text_path.absolute()) if text_path else None,
        "autoencoder": cfg.autoencoder.settings(),
        "sampling": {k: getattr(e, k) for k in ("num_samples", "sampler", "steps", "cfg_scale", "seed", "clip_denoised")}
        | {"guidance_interval": list(e.guidance_interval) if e.guidance_interval else None},
        "reference": reference_id,
        "extractor_id": extractor_id,
        "fid_method": e.fid_method,
        "grid_per_class": e.grid_per_class,
        **non_default(e, "precision", "compile"),
    }


def reference_id(cfg: D2CConfig) -> str:
    """What names the reference in the settings: the split + size + data settings, or the file's digest."""
    from d2c.eval.inception import file_digest

    ref = cfg.eval.reference
    if ref in SPLIT_REFERENCES:
        d = cfg.data
        return f"{d.source}:{d.path}:{ref}:{cfg.eval.reference_size}:{d.image_size}:{d.channels}:{d.preprocess}"
    return f"npz:{file_digest(ref)}"


def class_names(meta: dict[str, Any], text_path: Optional[Location]) -> Optional[list[str]]:
    """Class names for the grids: from the text embeddings' metadata, else the condense manifest, else None."""
    if text_path is not None:
        from d2c.attach.text import load_text_embeddings

        with text_path.local_copy() as local_text:
            return load_text_embeddings(local_text)[2] or None
    from d2c.condense import manifest_class_names

    condensed = (meta.get("config") or {}).get("condensed")
    return manifest_class_names(condensed) if condensed else None
