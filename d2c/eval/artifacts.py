"""An evaluation's directory (``EVAL/``) and what reads it without Ray: file names, the
``features.npz`` arrays, the reference the FID was scored against, and how every number in
``metrics.json`` is produced (``HOW``, also the report's metric definitions).

``d2c evaluate`` (``app/evaluate.py``) writes the directory; ``d2c compare``
(:mod:`d2c.eval.compare`), its bootstrap and the report read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from d2c.config import ConfigError
from d2c.eval.reference import NPZ_POOL_FEATURES, NPZ_REF_LABELS, load_cached
from d2c.rundir import CACHE_ENV
from d2c.storage import Location

#: Format tag of metrics.json.
EVAL_FORMAT = "d2c-eval-v1"
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.npz"
#: The samples' Inception pool features and labels (``d2c compare`` and bootstrap reruns read them).
FEATURES_FILE = "features.npz"
NPZ_GEN_POOL = "pool"
NPZ_GEN_LABELS = "label"
GRIDS_DIR = "grids"
#: reference.statistics in metrics.json: the FID's reference statistics come from the cached
#: features (a split, or an ADM .npz's arr_0) or from the ADM file's own mu/sigma.
STATS_FROM_FEATURES = "features"
STATS_FROM_FILE = "file_mu_sigma"

#: How every number in metrics.json is produced (the key is the number's dotted path; a list's
#: entries share the list's entry).
HOW: dict[str, str] = {
    "fid": "Fréchet distance |mu_g - mu_r|^2 + tr(S_g + S_r - 2 sqrt(S_g S_r)) between Gaussian fits of Inception-v3 "
    "pool_3 features (2048-d, TF 2015-12-05 weights, TF1 bilinear resize to 299 px) of the N samples and of the "
    "reference; covariances np.cov (N - 1); square root by metric_settings.fid_method_used",
    "sfid": "the same distance on ADM's spatial features (mixed_6/conv, first 7 channels, 17x17x7 = 2023-d)",
    "kid_mean": "Kernel Inception Distance: unbiased MMD^2 with the kernel (x.y/2048 + 1)^3 on pool_3 features, mean over "
    "metric_settings.kid_subsets random subsets of kid_subset_size from each set (numpy RandomState(metric_seed))",
    "kid_std": "standard deviation of the per-subset MMD^2 values behind kid_mean",
    "kid_subset_size": "images per KID subset: min(1000, N samples, N reference)",
    "precision": "improved precision (Kynkäänniemi et al. 2019): share of samples inside the union of k-NN balls "
    "(k = metric_settings.prc_k) of the reference pool_3 features",
    "recall": "improved recall: share of reference images inside the union of k-NN balls of the samples' features",
    "is_mean": "Inception Score (torch-fidelity): exp(E KL(p(y|x) || p(y))) over the 1008 unbiased logits, mean over 10 splits",
    "is_std": "standard deviation of the Inception Score over its 10 splits",
    "n_gen": "samples the metrics were computed on",
    "fid_bootstrap.point": "the FID of all samples against the whole reference (equals fid to round-off)",
    "fid_bootstrap.std": "standard deviation of the FID over eval.bootstrap_rounds rounds, each resampling with replacement, "
    "within each class, the samples and (when the FID's statistics come from features) the reference; d2c.eval.bootstrap. "
    "Conservative for one FID: in benchmarks/bootstrap_calibration.py's simulation (N=300 vs 500, D=2048) it was 2.7x the "
    "spread over fresh draws; for a paired difference (d2c compare) 1.06x (BENCHMARKS.md)",
    "fid_bootstrap.low": "lower end of the eval.bootstrap_level interval: the rounds' percentiles, moved so their mean is the point",
    "fid_bootstrap.high": "upper end of that interval",
    "fid_bootstrap.shift": "the rounds' mean minus the point (resampling duplicates rows, which raises FID)",
    "fid_bootstrap.rounds": "eval.bootstrap_rounds (None: 200 where the fast route applies)",
    "fid_bootstrap.level": "eval.bootstrap_level",
    "fid_bootstrap.seed": "seed of the rounds' draws (eval.seed)",
    "fid_bootstrap.resampled": "what each round resampled",
    "n_ref": "reference images (or the count stored with the reference statistics) behind the reference statistics",
    "num_samples": "samples drawn (eval.num_samples); sample i has class i mod num_classes",
    "num_classes": "classes of the model (its label table without the null class)",
    "samples_per_class": "samples of each class: N // C, plus one for the first N mod C classes",
    "steps": "eval.steps: respaced DDPM/DDIM steps, Heun steps (ODE) or model evaluations (SDE)",
    "cfg_scale": "eval.cfg_scale: classifier-free guidance scale (1 = none); null label + zero text for the unconditional half",
    "guidance_interval": "eval.guidance_interval: [lo, hi] fractions of the trajectory (0 = data, 1 = noise) where CFG applies",
    "seed": "eval.seed: sample i draws its noise from a generator seeded by sha256(seed, i)",
    "sampling.steps": "as steps",
    "sampling.cfg_scale": "as cfg_scale",
    "sampling.seed": "as seed",
    "sampling.batch_size": "eval.batch_size: samples per model batch (the last padded to it)",
    "sampling.model_evaluations_per_sample": "network calls per sample (ODE Heun: 2 steps - 1; others: steps); "
    "CFG doubles the rows of calls inside the guidance interval",
    "sampling.guidance_interval_model_units": "the guidance interval in the model's time units "
    "(DiT: original timestep index = fraction x (T - 1); SiT: t)",
    "sampling.timesteps_used": "original DDPM timestep indices the respaced schedule visits (ADM respacing str(steps))",
    "sampling.ddim_eta": "DDIM eta (0 = deterministic DDIM)",
    "sampling.sde_last_step_size": "size of SiT's final noise-free Euler step (t = 0.04 -> 0)",
    "checkpoint.step": "training step of the evaluated checkpoint (its model.json)",
    "reference.size": "reference images used (eval.reference_size for a dataset split; arr_0's count for an ADM .npz)",
    "reference.per_class": "reference images of each class (the first ones in source order)",
    "reference.rejected": "reference images that failed to decode and were left out",
    "metric_settings.kid_subsets": "number of KID subsets (torch-fidelity's default)",
    "metric_settings.prc_k": "k of the k-NN balls of precision/recall",
    "metric_settings.metric_seed": "seed of the KID subset draws (torch-fidelity's default)",
    "timing.reference_s": "wall seconds to get the reference statistics (near 0 on a cache hit)",
    "timing.sampling_and_features_s": "wall seconds of the Ray pipeline: sampling actors -> Inception actors -> driver",
    "timing.samples_per_s": "num_samples / timing.sampling_and_features_s",
    "timing.metrics_s": "wall seconds to compute the metrics from the features",
    "timing.bootstrap_s": "wall seconds of the fid_bootstrap rounds",
    "timing.total_s": "wall seconds of the whole evaluate run",
}


def bootstrap_reference(info: dict[str, Any]):
    """The :class:`~d2c.eval.bootstrap.BootstrapReference` of an evaluation's ``metrics.json["reference"]``.

    Features (resampled per round, with their class labels as strata) when the FID's statistics
    came from them; the ADM file's fixed mu/sigma otherwise.

    Raises:
        ConfigError: the reference's cache file or ADM file is gone or no longer matches.
    """
    from d2c.eval.bootstrap import NO_LABEL, BootstrapReference
    from d2c.eval.fid import load_reference_npz

    statistics = info.get("statistics")
    if statistics == STATS_FROM_FILE:
        path = info.get("path")
        if not path or not Path(path).is_file():
            raise ConfigError(f"the reference file {path!r} this evaluation used is not there any more; restore it")
        return BootstrapReference(stats=load_reference_npz(path).pool)
    if statistics != STATS_FROM_FEATURES:
        raise ConfigError("this metrics.json predates reference.statistics (d2c before the bootstrap); "
                          "delete the EVAL directory and run d2c evaluate again")
    path, key = Path(info.get("cache_file") or ""), info.get("key")
    cached = load_cached(path, key) if key else None
    if cached is None:
        raise ConfigError(f"the reference features this evaluation used ({path}) are not in the cache (another "
                          f"machine, or {CACHE_ENV} points elsewhere); rerun d2c evaluate with the same config here "
                          "to rebuild them (its samples are reused only if you move the EVAL directory away)")
    labels = cached.get(NPZ_REF_LABELS)
    if labels is not None and (labels == NO_LABEL).all():
        labels = None
    return BootstrapReference.from_features(cached[NPZ_POOL_FEATURES], labels)


def save_features(path: Location, pool: np.ndarray, labels: np.ndarray) -> None:
    """Write ``EVAL/features.npz``: ``pool`` float32 ``[N, 2048]`` and ``label`` int64 ``[N]`` (atomically)."""
    from d2c.eval.fid import atomic_savez

    if pool.ndim != 2 or labels.shape != (len(pool),):
        raise ValueError(f"pool must be [N, D] and labels [N]; got {pool.shape} and {labels.shape}")
    with path.local_output() as staged:
        atomic_savez(str(staged), {NPZ_GEN_POOL: pool.astype(np.float32), NPZ_GEN_LABELS: labels.astype(np.int64)})


def load_features(eval_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(pool float32 [N, D], labels int64 [N])`` from ``EVAL/features.npz``.

    Raises:
        ConfigError: the file is missing (an evaluation made before it existed) or malformed.
    """
    path = Path(eval_dir) / FEATURES_FILE
    if not path.is_file():
        raise ConfigError(f"{eval_dir} has no {FEATURES_FILE} (evaluated by a d2c before it was written); delete "
                          f"{eval_dir} and run d2c evaluate again")
    with np.load(path, allow_pickle=False) as z:
        if NPZ_GEN_POOL not in z.files or NPZ_GEN_LABELS not in z.files:
            raise ConfigError(f"{path} lacks {NPZ_GEN_POOL!r}/{NPZ_GEN_LABELS!r} (found {z.files})")
        return z[NPZ_GEN_POOL], z[NPZ_GEN_LABELS]
