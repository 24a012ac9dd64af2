"""GPU suite (issue 9): D2C's GPU stages at real size, random weights, one table.

Runs on ``d2c/`` and torch alone (numpy and the standard library besides; transformers and
diffusers only where importable), so it runs on the GPU machine, which has no Ray, pydantic
or diffusers. Every case uses random weights at the paper's sizes:

* ``scoring``  — the difficulty score (docs/method.md Eq. 7) with a DiT-XL/2 scorer at 256 px
  (4×32×32 latents, learned σ), batch 256 images × ``num_timesteps`` (8) noisy copies = 2048
  rows, chunked into as few forward passes as memory allows (one by default; halved on OOM).
  images/s and MFU.
* ``vae``      — the SD-VAE encoder at 256 px: :class:`SDVAEEncode` here, a conv encoder with
  the SD-VAE encoder's exact layers and parameter names (its weights load from a diffusers
  ``AutoencoderKL`` with ``strict=True``), and diffusers' own ``AutoencoderKL.encode`` where
  diffusers is importable. images/s.
* ``dino``     — DINOv2-B/14 at 224 px, patch tokens (transformers' ``Dinov2Model``). images/s.
* ``train``    — a SiT-XL/2 + DC-embedding (text 16 × 2048, flan-T5-XL's shape) + REPA projector
  (to 768-d DINOv2-B targets after block 8) training step, the real
  :class:`~d2c.train.objective.D2CObjective` (L_diff + 0.5·L_proj), batch 32 and 64 per GPU,
  bf16 autocast and fp16 autocast with a GradScaler. images/s, MFU, peak memory.
* ``projection`` — hours to score 1.28M ImageNet images and to train 40k steps at batch 256 on
  1 GPU and on 8 (8 = linear scaling of the 1-GPU rate, labelled "projected"), beside the
  paper's 2.1 h + 7.4 h on 8 A800s (Table 6).

Variants. Each speed change is a ``+``-joined feature of a variant, and every variant of a
case is measured in the same run, so one GPU run gives each change's measured gain: the
``× prev`` column compares a variant with the latest earlier variant whose features are a
subset of its own, next to the gain predicted (``pred.``) before measuring (PREDICTED_GAINS,
with the arithmetic behind each). The fastest variant of a case is starred and is the one the
training grid and the projection use ("keep the ones that pay").

  scoring: ``real`` (d2c.select.score.difficulty_scores with app/condense.py's arguments, eager,
           the scorer wrapped as app/condense.py's ScoreActor wraps it for ``score.precision=bf16``:
           bf16 autocast over fp32 weights, d2c.train.precision.autocast_model_fn) · ``fp16``
           (the same with ``score.precision=fp16``, what configs/imagenet256.yaml scores with;
           opt-in ``fp32``: ``score.precision=fp32``; at most one of fp32, fp16, cast) ·
           ``pipe`` (the same math via scores_from_noise, the
           per-image noise drawn one batch ahead in a thread into pinned memory, copied on a
           side stream, losses left on the device: no host sync per batch) · ``cast`` (weights
           cast to bf16, no autocast) · ``fused`` (fused adaLN: SiLU(c) once, every block's
           modulation in one GEMM, modulate and gated residuals as single addcmul passes) ·
           ``compile`` (torch.compile of the transformer block, compiled once for all blocks).
  train:   ``trainer`` (the real d2c Trainer.train_step) · ``nosync`` (the same Trainer with
           ``train.sync_free``: fused AdamW reading the GradScaler's inf flag on the device, the
           grad norm and skip decision kept on the device, EMA by one foreach lerp: no host
           sync in the step) · ``prefetch`` (pinned-memory prefetch of the next batch) ·
           ``fused`` · ``compile``. All variants run at the ablation point (``--ablate-at``,
           64:bf16); the other (batch, precision) points run the baseline and the fastest.
  vae:     ``fp32`` (torch defaults: cuDNN TF32 on) · ``cast`` (bf16 weights) · ``cl``
           (channels-last) · ``bench`` (cudnn.benchmark) · ``compile`` · ``diffusers``
           (diffusers' AutoencoderKL instead of the same layers here).
  dino:    ``eager`` (transformers' eager attention, bf16) · ``sdpa`` · ``compile``.

FLOPs. The DiT forward is counted analytically (:func:`dit_forward_flops`: every matmul and
convolution, attention's QKᵀ and AV included; 2 FLOPs per multiply-add; norms, activations
and embedding lookups not counted), cross-checked against ``torch.utils.flop_counter`` in
tests/test_gpu_suite.py; DiT-XL/2 at 256 is 2 × 118.6 GFLOPs (docs/method.md). A training step
counts 3 × forward (backward = 2 × forward: a gradient for the activations and one for the
weights). The VAE and DINOv2 are counted by FlopCounterMode on one image (matmul, conv and
attention only). MFU = counted FLOPs/s over the dense matmul peak measured in the same run
(a square matmul loop in the compute dtype, CUDA-event timed, best of ``--peak-repeats``).

Timing. CUDA events around each timed loop (a synchronize before it), warm-up iterations
(where torch.compile compiles) excluded, peak memory from torch.cuda.max_memory_allocated,
reset per variant. A case that hits OOM or lacks an optional package gives a row saying so;
``--time-budget-s`` skips what would run past the budget, with a note.

On the GPU machine (one command, ≈7 minutes inside a 540 s limit; estimated, not yet
measured: startup and peak ≈ 15 s; scoring ≈ 90 s, of which two inference compiles of one
block ≈ 60 s; training ≈ 240 s, of which four forward+backward block compiles ≈ 180 s (the
ablation point's two, then the winner's at a new batch size and at fp16); VAE ≈ 50 s; DINOv2
≈ 30 s. A compiled variant starts only with ``--min-variant-s`` + ``--compile-estimate-s``
(75 s) of budget left, so a slow compile costs the last variants, not the time limit)::

    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --time-budget-s 420 --out $OUT/gpu_suite.md",
        timeout_s=540)

With diffusers' own AutoencoderKL as well (a pure-Python wheel; on Python 3.12 it needs no
other package that machine lacks), once here in the repository root::

    echo /.whl/ >> .git/info/exclude    # (.gitignore already lists /.whl/)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1

then ``carry=[".whl"]`` and a command that begins
``python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;``.

On this CPU: ``python benchmarks/gpu_suite.py --tiny`` shrinks every model and batch and
runs the whole suite in fp32 in well under a minute of CPU time (one thread, timed and
budgeted by process CPU time so a shared machine's load cannot distort it; torch.compile
with the ``aot_eager`` backend: Dynamo's capture and AOTAutograd's forward/backward graphs
are exercised, Inductor's code generation is not). Its numbers only show that the suite works.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import datetime as dt
import gc
import inspect
import json
import math
import platform
import queue
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2c.diffusion.ddpm import DDPMSchedule  # noqa: E402
from d2c.models.dit import DIT_CONFIGS, FREQUENCY_EMBEDDING_SIZE, NORM_EPS, DiT, DiTOutput  # noqa: E402
from d2c.models.encoders.autoencoder import SD_VAE_SCALING_FACTOR  # noqa: E402
from d2c.select.score import difficulty_scores, image_noise, scores_from_noise, stratified_timesteps  # noqa: E402
from d2c.train.objective import ARCH_SIT, D2CObjective  # noqa: E402
from d2c.train.compile import compile_options, compiled_blocks, configure_dynamo  # noqa: E402
from d2c.train.precision import autocast_model_fn  # noqa: E402
from d2c.train.loop import RowBatches, assemble_batch, batch_stream, row_shapes  # noqa: E402
from d2c.train.trainer import Trainer  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The paper's setting (docs/method.md, configs/imagenet256.yaml)
# ----------------------------------------------------------------------------------------------

#: ImageNet-1K train images (docs/method.md: 1.28M).
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_CLASSES = 1000
IMAGE_SIZE = 256
#: SD-VAE: 8× downsampling to 4 latent channels.
VAE_DOWNSAMPLE = 8
LATENT_CHANNELS = 4
#: DDPM schedule of the scorer (docs/method.md: linear β from 1e-4 to 0.02 over 1000 steps).
DDPM_STEPS, DDPM_BETA_START, DDPM_BETA_END = 1000, 1e-4, 0.02
#: The paper's scorer and trained model sizes.
SCORER_SIZE = "XL/2"
TRAIN_SIZE = "XL/2"
SCORE_BATCH = 256
NUM_TIMESTEPS = 8
#: flan-T5-XL encoder: 16 tokens × 2048.
TEXT_LEN, TEXT_DIM = 16, 2048
#: DINOv2-B/14: 768-d patch tokens; 224 px → 16×16 = 256 tokens = SiT-XL/2's token count.
VISION_DIM = 768
ENCODER_DEPTH = 8
PROJ_HIDDEN_DIM = 2048
CLASS_DROPOUT = 0.1
TRAIN_BATCHES = (32, 64)
# Training hyper-parameters of configs/imagenet256.yaml (AdamW, no weight decay).
LR, BETA1, BETA2, WEIGHT_DECAY = 1e-4, 0.9, 0.999, 0.0
CLIP_NORM, EMA_DECAY, PROJ_COEFF = 1.0, 0.9999, 0.5
#: A training step's FLOPs per forward FLOP (backward = activation grads + weight grads = 2×).
TRAIN_FLOPS_PER_FORWARD = 3
#: The projection: 40k steps at global batch 256, on 1 and 8 GPUs.
PROJECTED_STEPS, PROJECTED_GLOBAL_BATCH = 40_000, 256
PROJECTED_GPUS = (1, 8)
#: The paper's cost (Table 6): scoring + training hours on 8 A800 GPUs.
PAPER_SCORE_HOURS, PAPER_TRAIN_HOURS, PAPER_GPUS, PAPER_GPU = 2.1, 7.4, 8, "A800"
SECONDS_PER_HOUR = 3600.0

# SD-VAE encoder (diffusers AutoencoderKL config of stabilityai/sd-vae-ft-ema).
SD_VAE_BLOCK_CHANNELS = (128, 256, 512, 512)
SD_VAE_LAYERS_PER_BLOCK = 2
SD_VAE_NORM_GROUPS = 32
SD_VAE_NORM_EPS = 1e-6
#: diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
SD_VAE_LOGVAR_RANGE = (-30.0, 20.0)

# DINOv2-B/14 (facebook/dinov2-base config).
DINO_HIDDEN, DINO_LAYERS, DINO_HEADS, DINO_MLP_RATIO, DINO_PATCH = 768, 12, 12, 4, 14
DINO_IMAGE_SIZE = 224
#: The checkpoint's position-embedding grid is for 518 px; the model interpolates it at 224.
DINO_CHECKPOINT_IMAGE_SIZE = 518
DINO_LAYERSCALE = 1.0
DINO_PREFIX_TOKENS = 1  # CLS

# ----------------------------------------------------------------------------------------------
# Benchmark settings
# ----------------------------------------------------------------------------------------------

#: Std of the noise added to every weight, so that no matmul runs on zeros (adaLN-Zero
#: zeroes DiT's gates and output layer; docs/method.md: a bf16 matmul ran 13% faster on zeros).
RANDOM_WEIGHT_STD = 0.02
#: Synthetic condensed set: this many batches of the largest batch size (rows reused by epoch).
TRAIN_SET_BATCHES = 4
#: Shortest text of the synthetic class prompts (tokens; the rest of the 16 are padding).
MIN_TEXT_TOKENS = 4
#: Host batches queued ahead by the prefetch thread.
PREFETCH_DEPTH = 2
#: Poll interval of the prefetch thread's queue (s).
PREFETCH_POLL_S = 0.05
#: Scoring chunks are halved on OOM down to this many rows.
MIN_SCORE_CHUNK = 64
BYTES_PER_GIB = 2**30
#: Seed of every random draw of the suite.
SEED = 0

CASES = ("scoring", "train", "vae", "dino", "projection")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

SCORING_FEATURES = ("fp32", "fp16", "pipe", "cast", "fused", "compile")
#: Scoring features that set the scorer's numerics; a variant takes at most one.
SCORING_NUMERICS = frozenset({"fp32", "fp16", "cast"})
TRAIN_FEATURES = ("nosync", "prefetch", "fused", "compile")
VAE_FEATURES = ("cast", "cl", "bench", "compile", "diffusers")
DINO_FEATURES = ("sdpa", "compile")
#: Names of the empty feature set (the baseline) per case.
BASELINE_NAMES = {"scoring": "real", "train": "trainer", "vae": "fp32", "dino": "eager"}

#: Predicted speedup of adding one feature, written down before any GPU run (H200: ≈790
#: TFLOP/s bf16 matmul, ≈4.3 TB/s copy). A key "feature@compile" is used when the reference
#: variant is compiled. The reasoning:
PREDICTED_GAINS: dict[str, dict[str, float]] = {
    "scoring": {
        # Opt-in (not in the defaults: ≈30 s): the scorer in fp32 without autocast
        # (score.precision=fp32); plain fp32 matmuls run at ≈1/15 of the bf16 rate.
        "fp32": 0.1,
        # score.precision=fp16 (configs/imagenet256.yaml) instead of the suite's bf16: the same
        # tensor-core rate and bytes per element.
        "fp16": 1.0,
        # Host: 256·8·4096 normal draws (≈50 ms) + 34 MB pageable copy + a .cpu() sync per
        # batch, against ≈1.2 s of device work per batch (486 TFLOP at ≈50% MFU): ≈4%.
        "pipe": 1.04,
        # Autocast keeps the residual stream and LayerNorm in fp32 and re-casts 675M weights
        # per pass; the ≈1/3 of eager time that is elementwise moves half the bytes: ≈10%.
        "cast": 1.10,
        # 4 of ≈16 full-size elementwise passes per block become part of another (addcmul),
        # 29 modulation GEMMs become one: ≈1/3 elementwise share × 1/4 fewer bytes ≈ 5%;
        # nothing left to gain once Inductor has fused them.
        "fused": 1.05,
        "fused@compile": 1.00,
        # Inductor fuses LN+modulate, GELU, gating and residuals: elementwise bytes ≈ 3× fewer.
        "compile": 1.25,
    },
    "train": {
        # ≈8 host syncs (loss terms, grad norm, scale), a per-tensor EMA loop (≈2×450 kernels)
        # and a multi-kernel AdamW, ≈15 ms of a ≈170 ms step at batch 64: ≈8%.
        "nosync": 1.08,
        # 34 MB gathered on the host (≈10 ms) and copied from pageable memory (≈5 ms), in
        # series with the step, hidden behind it instead: ≈8%.
        "prefetch": 1.08,
        "fused": 1.04,
        "fused@compile": 1.00,
        # Forward and backward elementwise work fused; matmuls dominate more than in scoring.
        "compile": 1.20,
    },
    "vae": {
        # TF32 → bf16 tensor cores (2× rate) and half the bytes in the memory-bound norms.
        "cast": 1.8,
        # cuDNN's NHWC kernels skip the layout transposes around each convolution.
        "cl": 1.2,
        # cudnn.benchmark: each convolution shape picks its fastest algorithm once.
        "bench": 1.05,
        # GroupNorm + SiLU (memory-bound, ≈40% of the time at 256² × 128 channels) fused.
        "compile": 1.3,
        # The same layers: no difference expected.
        "diffusers": 1.0,
    },
    "dino": {
        # Eager attention writes and re-reads [B, 12, 257, 257] scores and softmax.
        "sdpa": 1.15,
        # LayerNorm, GELU, layer-scale and residuals fused.
        "compile": 1.15,
    },
}

#: Defaults that differ between the real suite and ``--tiny``.
PROFILES: dict[str, dict[str, Any]] = {
    "real": dict(
        score_variants="real,fp16,pipe,pipe+cast,pipe+cast+fused,pipe+cast+compile,pipe+cast+compile+fused",
        train_variants="trainer,nosync,nosync+prefetch,nosync+prefetch+fused,nosync+prefetch+compile,"
        "nosync+prefetch+compile+fused",
        vae_variants="fp32,cast,cast+cl,cast+cl+bench,cast+cl+bench+compile,diffusers+cast+cl+bench",
        dino_variants="eager,sdpa,sdpa+compile",
        score_batch=SCORE_BATCH, num_timesteps=NUM_TIMESTEPS, score_chunk=None,
        vae_batch=128, dino_batch=256, train_batches=",".join(map(str, TRAIN_BATCHES)),
        score_warmup=1, score_iters=2, enc_warmup=2, enc_iters=5, train_warmup=3, train_iters=8,
        peak_size=8192, peak_iters=20, peak_repeats=3,
        time_budget_s=420.0, min_variant_s=15.0, compile_estimate_s=60.0,
        compile_backend="inductor", cpu_timer="wall", cpu_threads=None,
    ),
    "tiny": dict(
        score_batch=4, num_timesteps=2, score_chunk=None, vae_batch=2, dino_batch=2, train_batches="2,4",
        score_warmup=1, score_iters=1, enc_warmup=1, enc_iters=1, train_warmup=1, train_iters=2,
        peak_size=512, peak_iters=4, peak_repeats=2,
        time_budget_s=300.0, min_variant_s=0.0, compile_estimate_s=0.0,
        compile_backend="aot_eager", cpu_timer="process", cpu_threads=1,
    ),
}
PROFILES["tiny"] = {**PROFILES["real"], **PROFILES["tiny"]}

# ----------------------------------------------------------------------------------------------
# FLOP counting
# ----------------------------------------------------------------------------------------------


def dit_kwargs(size: str, **overrides: Any) -> dict[str, Any]:
    """Full :class:`DiT` keyword arguments for a named size ("XL/2") plus ``overrides``."""
    depth, hidden, heads, patch = DIT_CONFIGS[size]
    return dict(dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch), **overrides)


def _dit_args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {
        k: p.default for k, p in inspect.signature(DiT.__init__).parameters.items() if p.default is not p.empty
    }
    return {**defaults, **kwargs}


def dit_forward_flops(kwargs: Mapping[str, Any]) -> int:
    """Analytic FLOPs of one DiT forward pass for ONE image (2 per multiply-add).

    Counts every matmul and convolution: patch embedding, timestep MLP, DC-embedding (text
    conv + MLP), per block the adaLN modulation, qkv, QKᵀ, AV, output projection and MLP,
    the final layer, and the REPA projector. Norms, activations, embedding lookups and
    elementwise work are not counted. ``kwargs`` are :class:`DiT` keyword arguments.
    """
    a = _dit_args(kwargs)
    d, depth, p, c = a["hidden_size"], a["depth"], a["patch_size"], a["in_channels"]
    tokens = (a["input_size"] // p) ** 2
    mlp = int(d * a["mlp_ratio"])
    c_out = 2 * c if a["learn_sigma"] else c

    macs = tokens * (c * p * p) * d  # patch embedding (a stride-p conv)
    macs += FREQUENCY_EMBEDDING_SIZE * d + d * d  # timestep MLP
    if a["text_dim"] is not None:
        macs += a["text_len"] * a["text_dim"] * d + 2 * d * d  # text conv + text MLP
    per_block = 6 * d * d  # adaLN modulation (per image)
    per_block += tokens * (3 * d * d + d * d + 2 * d * mlp)  # qkv, proj, fc1, fc2
    per_block += 2 * tokens * tokens * d  # QKᵀ and AV over all heads
    macs += depth * per_block
    macs += 2 * d * d + tokens * d * (p * p * c_out)  # final adaLN + linear
    if a["proj_dim"] is not None:
        h = a["proj_hidden_dim"]
        macs += tokens * (d * h + h * h + h * a["proj_dim"])
    return 2 * macs


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter.FlopCounterMode`` (matmul, conv, attention).

    Attention runs through SDPA's math backend while counting (its bmm ops are counted on
    every device; the fused CPU kernel is not registered with the counter).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# Timing and the matmul peak
# ----------------------------------------------------------------------------------------------


#: Clocks for CPU timing: "process" (CPU seconds of this process: a shared machine's load does
#: not distort it, and with one thread it is the work itself) or "wall".
CPU_CLOCKS: dict[str, Callable[[], float]] = {"process": time.process_time, "wall": time.perf_counter}
CPU_TIMER = {"name": "wall"}


def time_loop(step: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of ``step`` over ``iters`` timed calls after ``warmup`` untimed ones.

    On CUDA: one synchronize before the loop, CUDA events around it, one wait at its end.
    On CPU: the clock named by ``--cpu-timer``.
    """
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    clock = CPU_CLOCKS[CPU_TIMER["name"]]
    t0 = clock()
    for _ in range(iters):
        step()
    return (clock() - t0) / iters


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int, repeats: int) -> float:
    """Dense matmul FLOP/s: an ``n×n @ n×n`` product in ``dtype`` on random data, best of ``repeats``."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        sec = time_loop(lambda: torch.matmul(a, b, out=out), warmup=2, iters=iters, device=device)
        best = max(best, 2.0 * n**3 / sec)
    return best


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / BYTES_PER_GIB


# ----------------------------------------------------------------------------------------------
# Speed helpers: host prefetch (regional compile: d2c.train.compile)
# ----------------------------------------------------------------------------------------------


_FAILED = object()


class HostPrefetcher:
    """Host batches made in a background thread, pinned, and copied to the device one step ahead.

    ``produce()`` returns a dict of CPU tensors. The thread calls it continuously, pins the
    tensors (CUDA only) and queues up to ``depth`` batches. ``next()`` returns the batch whose
    copy was issued at the previous call (on a side stream) and issues the next one's, so the
    copy overlaps the step in between; the returned tensors are safe on the current stream.
    On CPU it returns the host tensors (the thread still overlaps their making).
    """

    def __init__(self, produce: Callable[[], dict[str, Tensor]], device: torch.device, depth: int = PREFETCH_DEPTH):
        self.produce = produce
        self.device = device
        self.cuda = device.type == "cuda"
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.staged: Optional[tuple] = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=PREFETCH_POLL_S)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        try:
            while not self.stop.is_set():
                batch = self.produce()
                if self.cuda:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                self._put(batch)
        except BaseException as err:  # re-raised in the consumer
            self.error = err
            self._put(_FAILED)

    def _stage(self) -> tuple:
        item = self.queue.get()
        if item is _FAILED:
            raise RuntimeError("the prefetch thread failed") from self.error
        if not self.cuda:
            return item, None, item
        with torch.cuda.stream(self.stream):
            dev = {k: v.to(self.device, non_blocking=True) for k, v in item.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return dev, event, item

    def __next__(self) -> dict[str, Tensor]:
        current = self.staged if self.staged is not None else self._stage()
        self.staged = self._stage()
        dev, event, _host = current
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for v in dev.values():
                v.record_stream(stream)
        return dev

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join()
        self.staged = None


# ----------------------------------------------------------------------------------------------
# Fused adaLN DiT forward
# ----------------------------------------------------------------------------------------------


def fused_block(
    x: Tensor,
    mod: Tensor,
    qkv_w: Tensor,
    qkv_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
    fc1_w: Tensor,
    fc1_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
    num_heads: int,
) -> Tensor:
    """One :class:`~d2c.models.dit.DiTBlock` as a pure function of tensors (compiles once for all blocks).

    The same function as the block: LayerNorm, adaLN modulation, attention (SDPA), gated
    residual, LayerNorm, modulation, GELU(tanh) MLP, gated residual; the modulation
    ``x·(1 + scale) + shift`` and each gated residual ``x + gate·y`` are single addcmul passes.

    Args:
        x: ``[N, T, D]`` tokens.
        mod: ``[N, 6D]`` this block's adaLN output (shift, scale, gate for attention, then MLP).
        qkv_w ... fc2_b: the block's Linear weights and biases.
        num_heads: attention heads.
    Returns:
        ``[N, T, D]``.
    """
    n, tokens, dim = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.unsqueeze(1).chunk(6, dim=2)  # each [N, 1, D]
    h = torch.addcmul(shift1, F.layer_norm(x, (dim,), eps=NORM_EPS), 1 + scale1)
    qkv = F.linear(h, qkv_w, qkv_b).reshape(n, tokens, 3, num_heads, dim // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, T, head_dim]
    attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, dim)
    x = torch.addcmul(x, gate1, F.linear(attn, proj_w, proj_b))
    h = torch.addcmul(shift2, F.layer_norm(x, (dim,), eps=NORM_EPS), 1 + scale2)
    y = F.linear(F.gelu(F.linear(h, fc1_w, fc1_b), approximate="tanh"), fc2_w, fc2_b)
    return torch.addcmul(x, gate2, y)


class FusedAdaLNDiT(nn.Module):
    """``module``'s network with a faster forward: the same function as :meth:`DiT.forward`.

    SiLU(c) is computed once and every adaLN modulation (all blocks and the final layer) comes
    from ONE GEMM against the concatenated modulation weights (they stay the module's own
    parameters, so gradients reach them); each block runs :func:`fused_block` (or a compiled
    version of it, ``block_fn``). ``unwrap(self)`` is the DiT, so :class:`D2CObjective` reads
    its projector and text settings as usual.
    """

    def __init__(self, module: DiT, block_fn: Callable[..., Tensor] = fused_block):
        super().__init__()
        self.module = module
        self.block_fn = block_fn

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        text_emb: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        force_drop_ids: Optional[Tensor] = None,
        return_hidden: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor | DiTOutput:
        """As :meth:`DiT.forward`: ``x`` ``[N, C, H, W]``, ``t`` ``[N]``, ``y`` ``[N]`` → ``[N, C_out, H, W]``
        or ``DiTOutput(out, proj [N, T, P])``."""
        net = self.module
        want_proj = net.projector is not None or return_hidden
        h, c = net.embed_inputs(x, t, y, text_emb, text_mask, force_drop_ids, generator)  # [N, T, D], [N, D]
        blocks = net.blocks
        ada = [b.adaLN_modulation[1] for b in blocks] + [net.final_layer.adaLN_modulation[1]]
        weight = torch.cat([m.weight for m in ada])  # [(6·depth + 2)·D, D]
        bias = torch.cat([m.bias for m in ada])
        mods = F.linear(F.silu(c), weight, bias)  # [N, (6·depth + 2)·D]
        per_block = blocks[0].adaLN_modulation[1].out_features
        hidden = None
        for i, b in enumerate(blocks):
            a, m = b.attn, b.mlp
            h = self.block_fn(
                h, mods[:, i * per_block : (i + 1) * per_block],
                a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, a.num_heads,
            )
            if want_proj and i + 1 == net.encoder_depth:
                hidden = h
        shift, scale = mods[:, len(blocks) * per_block :].unsqueeze(1).chunk(2, dim=2)
        normed = net.final_layer.norm_final(h)
        out = net.unpatchify(net.final_layer.linear(torch.addcmul(shift, normed, 1 + scale)))
        if not want_proj:
            return out
        return DiTOutput(out, net.projector(hidden) if net.projector is not None else hidden)


# ----------------------------------------------------------------------------------------------
# SD-VAE encoder (the SD-VAE encoder's exact layers; diffusers' parameter names)
# ----------------------------------------------------------------------------------------------


class VAEResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv3×3 twice plus a (1×1 conv when channels change) shortcut: ``[N, Ci, H, W] → [N, Co, H, W]``."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=SD_VAE_NORM_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=SD_VAE_NORM_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEDownsample(nn.Module):
    """Zero-pad right/bottom by 1, then a stride-2 3×3 conv: ``[N, C, H, W] → [N, C, H/2, W/2]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEDownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [VAEResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([VAEDownsample(c_out)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class VAEAttention(nn.Module):
    """Single-head self-attention over the H·W positions with a GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=SD_VAE_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W] → [N, C, H, W]``."""
        n, c, hgt, wid = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [N, HW, C]
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [N, 1, HW, C]
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](a).transpose(1, 2).reshape(n, c, hgt, wid)
        return out + x


class VAEMidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEEncoder(nn.Module):
    """The SD-VAE (diffusers ``Encoder``) layers: ``[N, 3, H, W] → [N, 2c, H/f, W/f]`` moments."""

    def __init__(self, channels: Sequence[int], layers: int, groups: int, latent_channels: int, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks, c_prev = [], channels[0]
        for i, c in enumerate(channels):
            blocks.append(VAEDownBlock(c_prev, c, layers, groups, downsample=i < len(channels) - 1))
            c_prev = c
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = VAEMidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=SD_VAE_NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class SDVAEEncode(nn.Module):
    """images ``[N, 3, H, W]`` in [-1, 1] → scaled posterior-sample latents ``[N, c, H/8, W/8]``.

    ``encoder`` and ``quant_conv`` carry diffusers ``AutoencoderKL``'s parameter names and
    shapes, so ``load_state_dict`` of that model's ``encoder.*`` and ``quant_conv.*`` entries
    works with ``strict=True``. The latent is ``scale · (mean + exp(logvar / 2) · ε)`` as in
    d2c's :class:`~d2c.models.encoders.autoencoder.SDVAE` with ``sample_posterior``.
    """

    def __init__(
        self,
        channels: Sequence[int] = SD_VAE_BLOCK_CHANNELS,
        layers: int = SD_VAE_LAYERS_PER_BLOCK,
        groups: int = SD_VAE_NORM_GROUPS,
        latent_channels: int = LATENT_CHANNELS,
        scaling_factor: float = SD_VAE_SCALING_FACTOR,
    ):
        super().__init__()
        self.encoder = VAEEncoder(channels, layers, groups, latent_channels)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.scaling_factor = scaling_factor

    def moments(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W] → [N, 2c, h, w]`` (mean, log-variance)."""
        return self.quant_conv(self.encoder(x))

    def forward(self, x: Tensor) -> Tensor:
        mean, logvar = self.moments(x).chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(*SD_VAE_LOGVAR_RANGE))
        return (mean + std * torch.randn_like(mean)) * self.scaling_factor


def diffusers_sd_vae_config(s: "Sizes") -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` kwargs of the SD-VAE (at ``s``'s sizes)."""
    blocks = len(s.vae_channels)
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(s.vae_channels), layers_per_block=s.vae_layers, latent_channels=LATENT_CHANNELS,
        norm_num_groups=s.vae_groups, sample_size=s.image_size,
    )


# ----------------------------------------------------------------------------------------------
# Sizes: real and --tiny
# ----------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """Every model size the suite builds (``real_sizes`` = the paper's, ``tiny_sizes`` = CPU test)."""

    scorer_name: str
    scorer: dict[str, Any]
    train_name: str
    train_model: dict[str, Any]
    num_classes: int
    image_size: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_groups: int
    dino: dict[str, int]


def real_sizes(image_size: int = IMAGE_SIZE) -> Sizes:
    """The paper's models at ``image_size`` (256, or 512: 64 × 64 latents, 1,024 tokens)."""
    latent = image_size // VAE_DOWNSAMPLE
    common = dict(input_size=latent, in_channels=LATENT_CHANNELS, num_classes=IMAGENET_CLASSES,
                  class_dropout_prob=CLASS_DROPOUT)
    return Sizes(
        scorer_name=f"DiT-{SCORER_SIZE}",
        scorer=dit_kwargs(SCORER_SIZE, learn_sigma=True, **common),
        train_name=f"SiT-{TRAIN_SIZE}+DC+REPA",
        train_model=dit_kwargs(
            TRAIN_SIZE, learn_sigma=False, text_dim=TEXT_DIM, text_len=TEXT_LEN, proj_dim=VISION_DIM,
            proj_hidden_dim=PROJ_HIDDEN_DIM, encoder_depth=ENCODER_DEPTH, **common,
        ),
        num_classes=IMAGENET_CLASSES,
        image_size=image_size,
        vae_channels=SD_VAE_BLOCK_CHANNELS,
        vae_layers=SD_VAE_LAYERS_PER_BLOCK,
        vae_groups=SD_VAE_NORM_GROUPS,
        dino=dict(hidden=DINO_HIDDEN, layers=DINO_LAYERS, heads=DINO_HEADS, mlp_ratio=DINO_MLP_RATIO,
                  patch=DINO_PATCH, image_size=DINO_IMAGE_SIZE, checkpoint_image_size=DINO_CHECKPOINT_IMAGE_SIZE),
    )


# --tiny: small enough for a 2-core CPU, every code path kept (text, projector, learned σ,
# several blocks, a VAE downsample, DINOv2 position interpolation).
TINY_CLASSES = 10
TINY_IMAGE, TINY_DOWNSAMPLE = 16, 2
TINY_DIT = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2)
TINY_TEXT_LEN, TINY_TEXT_DIM, TINY_VISION_DIM, TINY_PROJ_HIDDEN, TINY_ENCODER_DEPTH = 4, 16, 24, 32, 1
TINY_VAE_CHANNELS, TINY_VAE_GROUPS = (8, 16), 4
TINY_DINO = dict(hidden=32, layers=2, heads=2, mlp_ratio=4, patch=14, image_size=28, checkpoint_image_size=42)


def tiny_sizes() -> Sizes:
    common = dict(input_size=TINY_IMAGE // TINY_DOWNSAMPLE, in_channels=LATENT_CHANNELS, num_classes=TINY_CLASSES,
                  class_dropout_prob=CLASS_DROPOUT, **TINY_DIT)
    return Sizes(
        scorer_name="DiT-tiny",
        scorer=dict(learn_sigma=True, **common),
        train_name="SiT-tiny+DC+REPA",
        train_model=dict(learn_sigma=False, text_dim=TINY_TEXT_DIM, text_len=TINY_TEXT_LEN, proj_dim=TINY_VISION_DIM,
                         proj_hidden_dim=TINY_PROJ_HIDDEN, encoder_depth=TINY_ENCODER_DEPTH, **common),
        num_classes=TINY_CLASSES,
        image_size=TINY_IMAGE,
        vae_channels=TINY_VAE_CHANNELS,
        vae_layers=1,
        vae_groups=TINY_VAE_GROUPS,
        dino=dict(TINY_DINO),
    )


# ----------------------------------------------------------------------------------------------
# Rows and the run context
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table (and of the JSON)."""

    case: str
    config: str
    variant: str
    status: str = "ok"  # ok | skipped | oom | error
    images_per_s: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_gib: Optional[float] = None
    speedup: Optional[float] = None  # over the config's baseline variant
    gain: Optional[float] = None  # over the reference variant (see Variant.reference)
    predicted: Optional[float] = None  # predicted gain over that reference
    hours: Optional[float] = None
    best: bool = False
    note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


class MissingPackage(RuntimeError):
    """An optional package is not importable: the row says so instead of failing the suite."""


class Ctx:
    """What every case needs: options, device, dtype, sizes, peak and the time budget."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.sizes = tiny_sizes() if args.tiny else real_sizes()
        # The budget runs on the timing clock: wall time, or on a CPU timed by process time
        # (--tiny), this process's CPU seconds, so a loaded shared machine cannot exhaust it.
        cpu_clock = self.device.type == "cpu" and args.cpu_timer == "process"
        self.budget_clock = time.process_time if cpu_clock else time.monotonic
        self.start = time.monotonic()
        self.budget_start = self.budget_clock()
        self.peak_flops = 0.0
        self.compile = compile_options(args.compile_backend, args.compile_mode)

    def left_s(self) -> float:
        return self.args.time_budget_s - (self.budget_clock() - self.budget_start)

    def budget_note(self, features: frozenset[str]) -> Optional[str]:
        """Why a variant with ``features`` must be skipped now, or None."""
        need = self.args.min_variant_s + (self.args.compile_estimate_s if "compile" in features else 0.0)
        left = self.left_s()
        if left < need:
            return f"skipped: time budget ({left:.0f} s left, this variant needs ≈{need:.0f} s)"
        return None

    def skipped_for_budget(self, row: "Row", features: frozenset[str]) -> bool:
        """Mark ``row`` skipped (with the reason) when the time budget cannot fit ``features``."""
        note = self.budget_note(features)
        if note:
            row.status, row.note = "skipped", note
        return bool(note)

    def mfu(self, flops_per_s: float) -> Optional[float]:
        return flops_per_s / self.peak_flops if self.peak_flops > 0 else None


@dataclass(frozen=True)
class Variant:
    """A ``+``-joined feature set; its reference is the latest earlier variant whose features it contains."""

    name: str
    features: frozenset[str]


#: The command-line flag that lists each case's variants.
VARIANT_FLAGS = {"scoring": "--score-variants", "train": "--train-variants", "vae": "--vae-variants",
                 "dino": "--dino-variants"}


def parse_variants(spec: str, case: str, allowed: Sequence[str]) -> list[Variant]:
    """``"real,pipe+cast"`` → variants; ``SystemExit`` naming the flag for an unknown or invalid one."""
    out = []
    flag = VARIANT_FLAGS[case]
    for name in [v.strip() for v in spec.split(",") if v.strip()]:
        feats = frozenset() if name == BASELINE_NAMES[case] else frozenset(name.split("+"))
        unknown = sorted(feats - set(allowed))
        if unknown:
            raise SystemExit(
                f"{flag}: unknown feature(s) {unknown} in {name!r}; use {BASELINE_NAMES[case]!r} "
                f"or '+'-joined {list(allowed)}"
            )
        if case == "scoring" and len(feats & SCORING_NUMERICS) > 1:
            raise SystemExit(f"{flag}: {name!r} combines {sorted(feats & SCORING_NUMERICS)}, which exclude each other")
        if case == "train" and feats and "nosync" not in feats:
            raise SystemExit(f"{flag}: {name!r}: prefetch, fused and compile build on 'nosync' (the sync-free step)")
        out.append(Variant(name, feats))
    if not out:
        raise SystemExit(f"{flag}: no variants given")
    return out


def reference_of(variant: Variant, earlier: Sequence[Variant]) -> Optional[Variant]:
    for cand in reversed(earlier):
        if cand.features < variant.features:
            return cand
    return None


def predicted_gain(case: str, added: frozenset[str], ref: Variant) -> Optional[float]:
    table = PREDICTED_GAINS.get(case, {})
    gain = 1.0
    for feat in sorted(added):
        key = f"{feat}@compile" if "compile" in ref.features and f"{feat}@compile" in table else feat
        if key not in table:
            return None
        gain *= table[key]
    return gain


def fill_gains(rows: list[Row], variants: Sequence[Variant], case: str) -> None:
    """``speedup`` over the baseline (first) row, ``gain``/``predicted`` over each reference, ★ on the fastest."""
    by_name = {r.variant: r for r in rows}
    ok = [r for r in rows if r.status == "ok" and r.images_per_s]
    if not ok:
        return
    base = rows[0] if rows[0].status == "ok" else None
    for i, v in enumerate(variants):
        row = by_name.get(v.name)
        if row is None or row.status != "ok":
            continue
        if base is not None:
            row.speedup = row.images_per_s / base.images_per_s
        ref = reference_of(v, variants[:i])
        if ref is not None:
            row.predicted = predicted_gain(case, v.features - ref.features, ref)
            ref_row = by_name.get(ref.name)
            if ref_row is not None and ref_row.status == "ok":
                row.gain = row.images_per_s / ref_row.images_per_s
            row.raw["reference"] = ref.name
    max(ok, key=lambda r: r.images_per_s).best = True


def guarded(row: Row, ctx: Ctx, fn: Callable[[Row], None]) -> Row:
    """Run one measurement into ``row``; OOM, a missing package or an error becomes the row's status."""
    try:
        fn(row)
    except MissingPackage as err:
        row.status, row.note = "skipped", f"skipped: {err}"
    except torch.cuda.OutOfMemoryError as err:
        row.status, row.note = "oom", f"OOM: {str(err).splitlines()[0][:160]}"
    except Exception as err:  # a broken variant must not stop the suite
        traceback.print_exc(file=sys.stderr)
        row.status, row.note = "error", f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    finally:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def perturb_(module: nn.Module, std: float = RANDOM_WEIGHT_STD) -> nn.Module:
    """Add N(0, std²) noise to every parameter (so nothing is exactly zero); returns the module."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(SEED)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, device=p.device, dtype=p.dtype, generator=gen), alpha=std)
    return module


def build_dit(kwargs: Mapping[str, Any], device: torch.device) -> DiT:
    """A randomly initialised (and perturbed) :class:`DiT`, built directly on ``device``."""
    torch.manual_seed(SEED)
    with torch.device(device):
        net = DiT(**kwargs)
    return perturb_(net)


# ----------------------------------------------------------------------------------------------
# Case: scoring
# ----------------------------------------------------------------------------------------------


class PipelinedScorer:
    """The difficulty score of ``difficulty_scores`` with the host work off the critical path.

    The same math (:func:`~d2c.select.score.scores_from_noise`) on the same noise
    (:func:`~d2c.select.score.image_noise`, seeded per image), but the noise of the next batch
    is drawn in a thread into pinned memory and copied on a side stream (:class:`HostPrefetcher`),
    and each batch's scores are copied back into a pinned host buffer without waiting.
    """

    def __init__(self, model_fn, latents: Tensor, labels: Tensor, image_ids: Sequence[str],
                 alphas_cumprod: Tensor, timesteps: Tensor, seed: int, chunk: int, device: torch.device):
        self.model_fn, self.chunk, self.device = model_fn, chunk, device
        # On the device once: a copy from pageable host memory would wait for the stream.
        self.alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float64)
        self.timesteps = timesteps.to(device)
        shape, t_count = latents.shape[1:], len(timesteps)

        def produce() -> dict[str, Tensor]:
            return dict(latent=latents, label=labels, noise=image_noise(seed, image_ids, t_count, shape))

        self.prefetch = HostPrefetcher(produce, device)
        pin = device.type == "cuda"
        self.out = torch.empty((len(image_ids), t_count), dtype=torch.float32, pin_memory=pin)

    def step(self) -> Tensor:
        """Score the next batch; returns the pinned host buffer (valid after a device sync)."""
        b = next(self.prefetch)
        scores = scores_from_noise(self.model_fn, b["latent"], b["label"], b["noise"], self.alphas_cumprod,
                                   self.timesteps, self.chunk, pad_rows=True)
        self.out.copy_(scores, non_blocking=True)
        return self.out

    def close(self) -> None:
        self.prefetch.close()


def scorer_fn(model: nn.Module, ctx: Ctx, precision: Optional[str], in_dtype: torch.dtype):
    """ε_θ(x, t, y) for ``scores_from_noise``: inputs cast to the weights' dtype; ``precision`` (a
    ``score.precision`` value) wraps the model as the ScoreActor does; None = no autocast (cast weights)."""
    net = autocast_model_fn(model, precision, ctx.device.type) if precision else model

    def fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return net(x.to(in_dtype), t, y)

    return fn


def case_scoring(ctx: Ctx) -> list[Row]:
    a, s = ctx.args, ctx.sizes
    kw = s.scorer
    batch, t_count = a.score_batch, a.num_timesteps
    flops_per_row = dit_forward_flops(kw)
    config = (f"{s.scorer_name} {s.image_size}px ({kw['in_channels']}×{kw['input_size']}²), "
              f"B={batch} × T={t_count}, {a.dtype}")
    variants = parse_variants(a.score_variants, "scoring", SCORING_FEATURES)
    net = build_dit(kw, ctx.device).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(SEED)
    latents = torch.randn((batch, kw["in_channels"], kw["input_size"], kw["input_size"]), generator=gen)
    labels = torch.randint(0, s.num_classes, (batch,), generator=gen)
    ids = [f"bench-{i:06d}" for i in range(batch)]
    alphas_cumprod = DDPMSchedule(DDPM_STEPS, DDPM_BETA_START, DDPM_BETA_END).alphas_cumprod
    timesteps = stratified_timesteps(t_count, DDPM_STEPS)
    lowp: dict[str, DiT] = {}
    rows = []
    for v in variants:
        row = Row("scoring", config, v.name, raw=dict(flops_per_image=flops_per_row * t_count))
        if ctx.skipped_for_budget(row, v.features):
            rows.append(row)
            continue

        def measure(row: Row, v: Variant = v) -> None:
            if "fp32" in v.features:  # score.precision=fp32: no autocast
                model, precision, in_dtype = net, "fp32", torch.float32
            elif "fp16" in v.features:  # score.precision=fp16, as configs/imagenet256.yaml scores
                model, precision, in_dtype = net, "fp16", torch.float32
            elif "cast" in v.features:
                if "net" not in lowp:
                    lowp["net"] = copy.deepcopy(net).to(ctx.dtype)
                model, precision, in_dtype = lowp["net"], None, ctx.dtype
            else:  # score.precision = the suite's dtype (bf16 on CUDA), as the ScoreActor runs it
                model, precision, in_dtype = net, a.dtype, torch.float32
            compiled = "compile" in v.features
            stack = contextlib.ExitStack()
            if "fused" in v.features:
                block_fn = torch.compile(fused_block, fullgraph=True, **ctx.compile) if compiled else fused_block
                runner: nn.Module = FusedAdaLNDiT(model, block_fn)
            else:
                runner = model
                if compiled:
                    stack.enter_context(compiled_blocks(model.blocks, a.compile_backend, True, a.compile_mode))
            fn = scorer_fn(runner, ctx, precision, in_dtype)
            chunk = min(a.score_chunk or batch * t_count, batch * t_count)
            notes = []
            with stack:
                while True:
                    reset_peak_memory(ctx.device)
                    try:
                        sec = time_scoring(ctx, v, fn, latents, labels, ids, alphas_cumprod, timesteps, chunk)
                        break
                    except torch.cuda.OutOfMemoryError:
                        if chunk // 2 < MIN_SCORE_CHUNK:
                            raise
                        chunk //= 2
                        notes.append(f"OOM: chunk halved to {chunk}")
            row.images_per_s = batch / sec
            row.mfu = ctx.mfu(row.images_per_s * t_count * flops_per_row)
            row.peak_mem_gib = peak_memory_gib(ctx.device)
            passes = math.ceil(batch * t_count / chunk)
            row.note = "; ".join(notes + [f"{passes} pass(es) of {chunk} rows"])
            row.raw.update(seconds_per_batch=sec, chunk=chunk, passes=passes)

        rows.append(guarded(row, ctx, measure))
    fill_gains(rows, variants, "scoring")
    return rows


def time_scoring(ctx: Ctx, v: Variant, fn, latents, labels, ids, alphas_cumprod, timesteps, chunk) -> float:
    a = ctx.args
    if "pipe" not in v.features:
        z = latents.to(ctx.device)

        def step() -> Tensor:
            return difficulty_scores(fn, z, labels, ids, alphas_cumprod, timesteps, SEED,
                                     max_forward_batch=chunk, pad_rows=True)

        return time_loop(step, a.score_warmup, a.score_iters, ctx.device)
    scorer = PipelinedScorer(fn, latents, labels, ids, alphas_cumprod, timesteps, SEED, chunk, ctx.device)
    try:
        return time_loop(scorer.step, a.score_warmup, a.score_iters, ctx.device)
    finally:
        scorer.close()


# ----------------------------------------------------------------------------------------------
# Case: training
# ----------------------------------------------------------------------------------------------


def train_settings(precision: str, sync_free: bool = False) -> SimpleNamespace:
    """The fields of ``cfg.train`` that :class:`Trainer` reads (d2c.config needs pydantic, which
    the GPU machine lacks; the values are configs/imagenet256.yaml's)."""
    return SimpleNamespace(lr=LR, beta1=BETA1, beta2=BETA2, weight_decay=WEIGHT_DECAY, precision=precision,
                           clip_norm=CLIP_NORM, ema_decay=EMA_DECAY, seed=SEED, sync_free=sync_free)


def synthetic_condensed(ctx: Ctx, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A condensed set of the trained model's shapes (random contents) in host memory.

    Returns ``(columns, text_emb [C, L, d] float32, text_mask [C, L] int64)``; ``visual`` and
    ``visual_flip`` are float16 ``[rows, T, d_vis]`` as the attach stage stores them, latents
    float32 ``[rows, C, h, w]`` with their flipped copies (training uses flips, as configured).
    """
    kw = ctx.sizes.train_model
    rng = np.random.default_rng(SEED)
    shape = (kw["in_channels"], kw["input_size"], kw["input_size"])
    tokens = (kw["input_size"] // kw["patch_size"]) ** 2
    cols = dict(
        label=rng.integers(0, ctx.sizes.num_classes, rows),
        latent=rng.standard_normal((rows, *shape), dtype=np.float32),
        latent_flip=rng.standard_normal((rows, *shape), dtype=np.float32),
        visual=rng.standard_normal((rows, tokens, kw["proj_dim"]), dtype=np.float32).astype(np.float16),
        visual_flip=rng.standard_normal((rows, tokens, kw["proj_dim"]), dtype=np.float32).astype(np.float16),
    )
    length, dim = kw["text_len"], kw["text_dim"]
    text = rng.standard_normal((ctx.sizes.num_classes, length, dim), dtype=np.float32)
    lengths = rng.integers(min(MIN_TEXT_TOKENS, length), length + 1, ctx.sizes.num_classes)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return cols, text, mask


def case_train(ctx: Ctx) -> list[Row]:
    a, s = ctx.args, ctx.sizes
    kw = s.train_model
    flops_fwd = dit_forward_flops(kw)
    flops_step = TRAIN_FLOPS_PER_FORWARD * flops_fwd
    variants = parse_variants(a.train_variants, "train", TRAIN_FEATURES)
    batches = [int(b) for b in a.train_batches.split(",")]
    precisions = [p.strip() for p in a.precisions.split(",")]
    ablate_b, ablate_p = (a.ablate_at.split(":") if a.ablate_at else (str(max(batches)), precisions[0]))
    ablate = (int(ablate_b), ablate_p)
    points = [ablate] + [(b, p) for p in precisions for b in batches if (b, p) != ablate]
    net = build_dit(kw, ctx.device).train()
    data, text, mask = synthetic_condensed(ctx, max(batches) * TRAIN_SET_BATCHES)
    objective = D2CObjective(ARCH_SIT, None, proj_coeff=PROJ_COEFF, learn_sigma=False)
    rows: list[Row] = []
    best: Optional[Variant] = None
    for batch, precision in points:
        if (batch, precision) == ablate or a.full_grid:
            todo = variants
        else:
            todo = [variants[0]] + ([best] if best is not None and best != variants[0] else [])
        config = f"{s.train_name} {s.image_size}px, batch {batch}, {precision}"
        point_rows = []
        for v in todo:
            row = Row("train", config, v.name, raw=dict(flops_per_image=flops_step, batch=batch, precision=precision))
            if not ctx.skipped_for_budget(row, v.features):
                guarded(row, ctx, lambda r, v=v: measure_train(ctx, r, v, net, objective, data, text, mask,
                                                               batch, precision, flops_step))
            point_rows.append(row)
        fill_gains(point_rows, todo, "train")
        if (batch, precision) == ablate:
            fastest = [r for r in point_rows if r.best]
            best = next((v for v in variants if fastest and v.name == fastest[0].variant), None)
        rows.extend(point_rows)
    return rows


def measure_train(ctx: Ctx, row: Row, v: Variant, net: DiT, objective: D2CObjective, data, text, mask,
                  batch: int, precision: str, flops_step: int) -> None:
    a = ctx.args
    reset_peak_memory(ctx.device)
    rows = RowBatches(data, batch, SEED)
    text_rows = (torch.as_tensor(text, dtype=torch.float32), torch.as_tensor(mask))

    def loader(generator: torch.Generator) -> Iterator[dict[str, Tensor]]:
        """The product's batches; flips drawn on ``generator``'s device (a CPU one: host batches)."""
        return batch_stream(rows, functools.partial(assemble_batch, shapes=row_shapes(rows.rows), text=text_rows,
                                                    use_visual=True, hflip=True, generator=generator))

    compiled = "compile" in v.features
    stack = contextlib.ExitStack()
    with stack:
        if not v.features:  # the real Trainer, as the Ray Train workers run it
            trainer = Trainer(net, objective, train_settings(precision), device=ctx.device)

            batches = loader(trainer.generator)

            def step() -> Any:
                return trainer.train_step(next(batches))

            skipped = lambda: trainer.skipped_steps  # noqa: E731
        else:
            if "fused" in v.features:
                block_fn = torch.compile(fused_block, fullgraph=True, **ctx.compile) if compiled else fused_block
                model: nn.Module = FusedAdaLNDiT(net, block_fn)
            else:
                model = net
            # Built before the blocks are compiled: the EMA's deep copy must be plain modules.
            trainer = Trainer(model, objective, train_settings(precision, sync_free=True), device=ctx.device)
            if compiled and "fused" not in v.features:
                stack.enter_context(compiled_blocks(net.blocks, a.compile_backend, True, a.compile_mode))
            host = loader(torch.Generator().manual_seed(SEED))
            if "prefetch" in v.features:
                prefetch = HostPrefetcher(lambda: next(host), ctx.device)
                stack.callback(prefetch.close)
                get = lambda: next(prefetch)  # noqa: E731
            else:
                get = lambda: {k: t.to(ctx.device, non_blocking=True) for k, t in next(host).items()}  # noqa: E731

            def step() -> Any:
                return trainer.train_step(get())

            skipped = lambda: trainer.skipped_steps  # noqa: E731 (read after the timed loop)
        sec = time_loop(step, a.train_warmup, a.train_iters, ctx.device)
        last = step()
        loss = float(last["loss"].detach()) if isinstance(last["loss"], Tensor) else float(last["loss"])
        n_skipped = skipped()
    row.images_per_s = batch / sec
    row.mfu = ctx.mfu(row.images_per_s * flops_step)
    row.peak_mem_gib = peak_memory_gib(ctx.device)
    steps = a.train_warmup + a.train_iters + 1
    row.note = f"loss {loss:.3g}; {n_skipped}/{steps} steps skipped" + ("" if math.isfinite(loss) else " (non-finite!)")
    row.raw.update(seconds_per_step=sec, loss=loss, skipped_steps=n_skipped, steps=steps)


# ----------------------------------------------------------------------------------------------
# Cases: SD-VAE encoder, DINOv2
# ----------------------------------------------------------------------------------------------


def case_vae(ctx: Ctx) -> list[Row]:
    a, s = ctx.args, ctx.sizes
    variants = parse_variants(a.vae_variants, "vae", VAE_FEATURES)
    latent = s.image_size // 2 ** (len(s.vae_channels) - 1)
    config = f"SD-VAE encoder {s.image_size}px → {LATENT_CHANNELS}×{latent}², batch {a.vae_batch}"
    gen = torch.Generator().manual_seed(SEED)
    images = torch.rand((a.vae_batch, 3, s.image_size, s.image_size), generator=gen) * 2 - 1  # in [-1, 1]
    rows = []
    for v in variants:
        impl = "diffusers AutoencoderKL.encode" if "diffusers" in v.features else "SDVAEEncode (same layers)"
        row = Row("vae", config, v.name, note=impl)
        if ctx.skipped_for_budget(row, v.features):
            rows.append(row)
            continue

        def measure(row: Row, v: Variant = v) -> None:
            dtype = ctx.dtype if "cast" in v.features else torch.float32
            fmt = torch.channels_last if "cl" in v.features else torch.contiguous_format
            if "diffusers" in v.features:
                try:
                    from diffusers import AutoencoderKL
                except ImportError:
                    raise MissingPackage("diffusers not importable; carry its wheel (module docstring)") from None
                torch.manual_seed(SEED)
                vae = AutoencoderKL(**diffusers_sd_vae_config(s))

                def encode(x: Tensor) -> Tensor:
                    return vae.encode(x).latent_dist.sample() * SD_VAE_SCALING_FACTOR

                module: nn.Module = vae
            else:
                torch.manual_seed(SEED)
                module = SDVAEEncode(s.vae_channels, s.vae_layers, s.vae_groups, LATENT_CHANNELS)
                encode = module
            module = module.to(device=ctx.device, dtype=dtype, memory_format=fmt).eval().requires_grad_(False)
            x = images.to(device=ctx.device, dtype=dtype).contiguous(memory_format=fmt)
            with torch.no_grad(), cudnn_benchmark("bench" in v.features):
                flops = counted_flops(lambda: encode(x[:1]))
                fn = torch.compile(encode, **ctx.compile) if "compile" in v.features else encode
                reset_peak_memory(ctx.device)
                sec = time_loop(lambda: fn(x), a.enc_warmup, a.enc_iters, ctx.device)
            row.images_per_s = a.vae_batch / sec
            row.mfu = ctx.mfu(row.images_per_s * flops)
            row.peak_mem_gib = peak_memory_gib(ctx.device)
            row.note = (f"{impl}; {dtype_name(dtype)}, {'channels-last' if 'cl' in v.features else 'NCHW'}"
                        + (", cudnn.benchmark" if "bench" in v.features else ""))
            row.raw.update(flops_per_image=flops, seconds_per_batch=sec)

        rows.append(guarded(row, ctx, measure))
    fill_gains(rows, variants, "vae")
    return rows


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set for the block, restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, d in DTYPES.items() if d == dtype)


def build_dino(ctx: Ctx, attn_implementation: str) -> nn.Module:
    """A random-weight transformers ``Dinov2Model`` of the configured size, eval, in the compute dtype."""
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError:
        raise MissingPackage("transformers not importable") from None
    d = ctx.sizes.dino
    cfg = Dinov2Config(
        hidden_size=d["hidden"], num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
        mlp_ratio=d["mlp_ratio"], patch_size=d["patch"], image_size=d["checkpoint_image_size"],
        layerscale_value=DINO_LAYERSCALE, attn_implementation=attn_implementation,
    )
    torch.manual_seed(SEED)
    model = Dinov2Model(cfg)
    return model.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)


def dino_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a transformers ``Dinov2Model`` (``encoder.layer``)."""
    encoder = model.encoder
    for name in ("layer", "layers"):
        if isinstance(getattr(encoder, name, None), nn.ModuleList):
            return getattr(encoder, name)
    raise AttributeError("Dinov2Model.encoder has no layer list ('layer' or 'layers')")


def case_dino(ctx: Ctx) -> list[Row]:
    a, s = ctx.args, ctx.sizes
    d = s.dino
    variants = parse_variants(a.dino_variants, "dino", DINO_FEATURES)
    grid = d["image_size"] // d["patch"]
    config = f"DINOv2-B/14-shaped ({d['layers']}×{d['hidden']}) {d['image_size']}px → {grid * grid} patch tokens, " \
             f"batch {a.dino_batch}, {a.dtype}"
    if not ctx.args.tiny:
        config = f"DINOv2-B/14 {d['image_size']}px → {grid * grid} patch tokens, batch {a.dino_batch}, {a.dtype}"
    gen = torch.Generator().manual_seed(SEED)
    pixels = torch.randn((a.dino_batch, 3, d["image_size"], d["image_size"]), generator=gen)
    rows = []
    for v in variants:
        row = Row("dino", config, v.name)
        if ctx.skipped_for_budget(row, v.features):
            rows.append(row)
            continue

        def measure(row: Row, v: Variant = v) -> None:
            impl = "sdpa" if "sdpa" in v.features else "eager"
            model = build_dino(ctx, impl)
            x = pixels.to(device=ctx.device, dtype=ctx.dtype)

            def tokens(inp: Tensor) -> Tensor:
                return model(pixel_values=inp).last_hidden_state[:, DINO_PREFIX_TOKENS:]

            stack = contextlib.ExitStack()
            with torch.no_grad(), stack:
                flops = counted_flops(lambda: tokens(x[:1]))
                if "compile" in v.features:
                    stack.enter_context(compiled_blocks(dino_layers(model), a.compile_backend, False, a.compile_mode))
                reset_peak_memory(ctx.device)
                sec = time_loop(lambda: tokens(x), a.enc_warmup, a.enc_iters, ctx.device)
            row.images_per_s = a.dino_batch / sec
            row.mfu = ctx.mfu(row.images_per_s * flops)
            row.peak_mem_gib = peak_memory_gib(ctx.device)
            row.note = f"transformers Dinov2Model, attention {impl}"
            row.raw.update(flops_per_image=flops, seconds_per_batch=sec)

        rows.append(guarded(row, ctx, measure))
    fill_gains(rows, variants, "dino")
    return rows


# ----------------------------------------------------------------------------------------------
# Case: projection
# ----------------------------------------------------------------------------------------------


def _best(rows: Sequence[Row], case: str, batch: Optional[int] = None) -> Optional[Row]:
    cands = [r for r in rows if r.case == case and r.status == "ok" and r.images_per_s
             and (batch is None or r.raw.get("batch") == batch)]
    return max(cands, key=lambda r: r.images_per_s) if cands else None


def case_projection(ctx: Ctx, rows: Sequence[Row]) -> list[Row]:
    """Hours for 1.28M images scored and 40k × 256 images trained, from the fastest measured rows."""
    out = []
    score, vae = _best(rows, "scoring"), _best(rows, "vae")
    total_train = PROJECTED_STEPS * PROJECTED_GLOBAL_BATCH
    for gpus in PROJECTED_GPUS:
        label = f"{gpus} GPU" + ("s (projected: linear scaling)" if gpus > 1 else "")
        cfg = f"score {IMAGENET_TRAIN_IMAGES / 1e6:.2f}M images"
        if score is None:
            out.append(Row("projection", cfg, label, status="skipped", note="skipped: no scoring measurement"))
        else:
            rate = score.images_per_s * gpus
            row = Row("projection", cfg, label, images_per_s=rate,
                      hours=IMAGENET_TRAIN_IMAGES / rate / SECONDS_PER_HOUR,
                      note=f"scoring `{score.variant}`")
            if vae is not None:
                both = 1.0 / (1.0 / score.images_per_s + 1.0 / vae.images_per_s) * gpus
                row.note += f"; with VAE encode (`{vae.variant}`) {IMAGENET_TRAIN_IMAGES / both / SECONDS_PER_HOUR:.2f} h"
                row.raw["hours_with_vae"] = IMAGENET_TRAIN_IMAGES / both / SECONDS_PER_HOUR
            out.append(row)
        # 1 GPU: 256 = the largest measured per-GPU batch × accumulation; 8 GPUs: 256 / 8 per GPU.
        per_gpu = PROJECTED_GLOBAL_BATCH // gpus
        measured = [r.raw.get("batch") for r in rows if r.case == "train" and r.status == "ok"]
        fits = [b for b in measured if b is not None and b <= per_gpu and per_gpu % b == 0]
        cfg = f"train {PROJECTED_STEPS // 1000}k steps × batch {PROJECTED_GLOBAL_BATCH}"
        train = _best(rows, "train", max(fits)) if fits else None
        if train is None:
            out.append(Row("projection", cfg, label, status="skipped",
                           note=f"skipped: no training measurement at a per-GPU batch dividing {per_gpu}"))
            continue
        rate = train.images_per_s * gpus
        accum = per_gpu // train.raw["batch"]
        out.append(Row("projection", cfg, label, images_per_s=rate, hours=total_train / rate / SECONDS_PER_HOUR,
                       note=f"`{train.variant}` at batch {train.raw['batch']}/GPU, {train.raw['precision']}"
                       + (f", ×{accum} accumulation (its cost not counted)" if accum > 1 else "")
                       + ("; all-reduce not counted" if gpus > 1 else "")))
    out.append(Row("projection", "paper (Table 6)", f"{PAPER_GPUS}× {PAPER_GPU}",
                   hours=PAPER_SCORE_HOURS + PAPER_TRAIN_HOURS,
                   note=f"scoring {PAPER_SCORE_HOURS} h + training {PAPER_TRAIN_HOURS} h"))
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("case", "config", "variant", "images/s", "MFU", "peak GiB", "× base", "× prev (pred.)", "hours", "note")


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_table(meta: Mapping[str, Any], rows: Sequence[Row]) -> str:
    lines = [
        f"## D2C GPU suite — {meta['device_name']} · torch {meta['torch']} · {meta['date']}",
        "",
        f"{meta['profile']} sizes, compute dtype {meta['dtype']}; dense {meta['dtype']} matmul peak "
        f"({meta['peak_size']}³, measured in this run): {format_rate(meta['peak_tflops'] * 1e12)}; "
        f"compile backend {meta['compile_backend']}; wall {meta['wall_s']:.0f} s; budget {meta['budget_used_s']:.0f} "
        f"of {meta['time_budget_s']:.0f} s used" + (f"; CPU timing and budget by the {meta['cpu_timer']} clock."
                                                     if meta["device"] == "cpu" else "."),
        "FLOPs: DiT analytic (matmuls incl. attention; training = 3 × forward), VAE/DINOv2 by FlopCounterMode. "
        "★ = fastest variant of its config; × prev = gain over the latest earlier variant it extends (pred. = predicted).",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    for r in rows:
        ips = _fmt(r.images_per_s, ".4g") if r.images_per_s else ""
        prev = ""
        if r.gain is not None or r.predicted is not None:
            prev = (_fmt(r.gain, ".2f") or "—") + (f" ({r.predicted:.2f})" if r.predicted is not None else "")
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else ""
        cells = [r.case, r.config, ("★ " if r.best else "") + r.variant, ips, mfu, _fmt(r.peak_mem_gib, ".1f"),
                 _fmt(r.speedup, ".2f"), prev, _fmt(r.hours, ".2f"), r.note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_rate(flops_per_s: float) -> str:
    """``790.1 TFLOP/s`` or, below one TFLOP/s, ``42.3 GFLOP/s``."""
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:.1f} TFLOP/s"
    return f"{flops_per_s / 1e9:.1f} GFLOP/s"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models and batches, fp32: the whole suite on a CPU in seconds")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--only", default=",".join(CASES), help=f"comma list of cases out of {','.join(CASES)}")
    p.add_argument("--out", default=None, help="write the table to this markdown file and the raw numbers beside it (.json)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="skip (with a note) what would start past this (seconds of the timing clock)")
    p.add_argument("--min-variant-s", type=float, default=None, help="budget a variant needs to be started")
    p.add_argument("--compile-estimate-s", type=float, default=None, help="extra budget a compiled variant needs")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny: aot_eager)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for inductor (default: its default)")
    p.add_argument("--score-variants", default=None)
    p.add_argument("--score-batch", type=int, default=None)
    p.add_argument("--num-timesteps", type=int, default=None)
    p.add_argument("--score-chunk", type=int, default=None, help="rows per scorer pass (default: batch × T)")
    p.add_argument("--score-warmup", type=int, default=None)
    p.add_argument("--score-iters", type=int, default=None)
    p.add_argument("--vae-variants", default=None)
    p.add_argument("--vae-batch", type=int, default=None)
    p.add_argument("--dino-variants", default=None)
    p.add_argument("--dino-batch", type=int, default=None)
    p.add_argument("--enc-warmup", type=int, default=None)
    p.add_argument("--enc-iters", type=int, default=None)
    p.add_argument("--train-variants", default=None)
    p.add_argument("--train-batches", default=None, help="per-GPU batch sizes, comma list")
    p.add_argument("--precisions", default=None, help="training precisions (default: bf16,fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--ablate-at", default=None, help="BATCH:PRECISION where every train variant runs (default: largest batch, first precision)")
    p.add_argument("--full-grid", action="store_true", help="run every train variant at every (batch, precision)")
    p.add_argument("--train-warmup", type=int, default=None)
    p.add_argument("--train-iters", type=int, default=None)
    p.add_argument("--peak-size", type=int, default=None)
    p.add_argument("--peak-iters", type=int, default=None)
    p.add_argument("--peak-repeats", type=int, default=None)
    p.add_argument("--cpu-timer", choices=sorted(CPU_CLOCKS), default=None,
                   help="CPU timing clock (default wall; --tiny: process CPU time, robust to a shared machine)")
    p.add_argument("--cpu-threads", type=int, default=None, help="torch intra-op threads on CPU (--tiny: 1)")
    p.add_argument("--flops-projection", default=None, metavar="NAME:PEAK_TFLOPS:MFU,...",
                   help="print GPU-hours projected from analytic FLOPs at these peaks and MFUs, measure nothing")
    p.add_argument("--projection-image-size", type=int, choices=(256, 512), default=IMAGE_SIZE,
                   help="image side of --flops-projection (512: 64x64 latents, 1,024 tokens)")
    return p


def resolve_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for key, value in PROFILES["tiny" if args.tiny else "real"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = torch.device(args.device).type == "cpu"
    if args.dtype is None:
        args.dtype = "fp32" if cpu else "bf16"
    if args.precisions is None:
        args.precisions = "fp32" if cpu else "bf16,fp16"
    unknown = sorted(set(args.only.split(",")) - set(CASES))
    if unknown:
        raise SystemExit(f"--only: unknown case(s) {unknown}; choose from {list(CASES)}")
    bad = sorted(set(args.precisions.split(",")) - set(DTYPES))
    if bad:
        raise SystemExit(f"--precisions: unknown {bad}; choose from {sorted(DTYPES)}")
    for case, spec, allowed in [("scoring", args.score_variants, SCORING_FEATURES),
                                ("train", args.train_variants, TRAIN_FEATURES),
                                ("vae", args.vae_variants, VAE_FEATURES), ("dino", args.dino_variants, DINO_FEATURES)]:
        parse_variants(spec, case, allowed)  # refuse a bad variant before anything runs
    if args.ablate_at:
        batch, _, precision = args.ablate_at.partition(":")
        if not batch.isdigit() or int(batch) not in map(int, args.train_batches.split(",")) \
                or precision not in args.precisions.split(","):
            raise SystemExit(f"--ablate-at {args.ablate_at!r}: give BATCH:PRECISION out of --train-batches "
                             f"{args.train_batches} and --precisions {args.precisions}")
    return args


def suite_meta(ctx: Ctx) -> dict[str, Any]:
    """The header facts of the table and the JSON (card, versions, date, peak, settings)."""
    args = ctx.args
    return dict(
        device_name=device_name(ctx.device), device=str(ctx.device), torch=torch.__version__,
        cuda=torch.version.cuda, python=platform.python_version(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        profile="tiny" if args.tiny else "real", dtype=args.dtype, peak_size=args.peak_size,
        peak_tflops=ctx.peak_flops / 1e12, compile_backend=args.compile_backend, compile_mode=args.compile_mode,
        time_budget_s=args.time_budget_s, wall_s=time.monotonic() - ctx.start, cpu_timer=args.cpu_timer,
        budget_used_s=args.time_budget_s - ctx.left_s(),
        args=dict(vars(args)), predicted_gains=PREDICTED_GAINS, train_flops_per_forward=TRAIN_FLOPS_PER_FORWARD,
    )


def write_outputs(path: Optional[str], meta: Mapping[str, Any], rows: Sequence[Row]) -> str:
    """The markdown table; also written to ``path`` (and the raw numbers to its ``.json``) when given."""
    table = format_table(meta, rows)
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=2))
    return table


def log_rows(rows: Sequence[Row]) -> None:
    for r in rows:
        ips = f"{r.images_per_s:.4g} img/s" if r.images_per_s else ""
        mfu = f" MFU {100 * r.mfu:.1f}%" if r.mfu else ""
        print(f"[gpu_suite]   {r.case} | {r.config} | {r.variant}: {r.status} {ips}{mfu} {r.note}",
              file=sys.stderr, flush=True)


def run_suite(args: argparse.Namespace) -> tuple[dict[str, Any], list[Row]]:
    """Every selected case in order; the outputs are rewritten after each case (a run cut short keeps its rows)."""
    ctx = Ctx(args)
    CPU_TIMER["name"] = args.cpu_timer
    if ctx.device.type == "cpu" and args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    configure_dynamo()
    torch.manual_seed(SEED)
    only = [c for c in CASES if c in args.only.split(",")]
    ctx.peak_flops = matmul_peak(ctx.device, ctx.dtype, args.peak_size, args.peak_iters, args.peak_repeats)
    rows: list[Row] = []
    runners = dict(scoring=case_scoring, train=case_train, vae=case_vae, dino=case_dino)
    print(f"[gpu_suite] {device_name(ctx.device)}, torch {torch.__version__}: {args.dtype} matmul peak "
          f"{format_rate(ctx.peak_flops)}", file=sys.stderr, flush=True)
    for case in only:
        before = len(rows)
        if case == "projection":
            rows.extend(case_projection(ctx, rows))
        else:
            torch._dynamo.reset()  # each case compiles afresh (and caches within itself)
            try:
                rows.extend(runners[case](ctx))
            except torch.cuda.OutOfMemoryError as err:  # building the case's model failed
                rows.append(Row(case, "", "", status="oom", note=f"OOM: {str(err).splitlines()[0][:160]}"))
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                rows.append(Row(case, "", "", status="error", note=f"error: {type(err).__name__}: {err}"[:240]))
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        log_rows(rows[before:])
        print(f"[gpu_suite] {case} done at {time.monotonic() - ctx.start:.0f} s "
              f"({time.process_time():.0f} CPU s)", file=sys.stderr, flush=True)
        write_outputs(args.out, suite_meta(ctx), rows)
    return suite_meta(ctx), rows


def flops_projection(specs: str, num_timesteps: int, image_size: int = IMAGE_SIZE) -> str:
    """A markdown table of GPU-hours projected from analytic FLOPs, no measurement.

    ``specs``: comma list of ``NAME:PEAK_TFLOPS:MFU`` (e.g. ``H100:989:0.3``). Scoring is
    ``1.28M × num_timesteps`` forwards of the real-size scorer; training ``40k × 256`` images
    at :data:`TRAIN_FLOPS_PER_FORWARD` forwards each of the real-size training model
    (:func:`dit_forward_flops`). GPU-hours = FLOPs / (peak × MFU); wall hours on 8 GPUs assume
    linear scaling. ``image_size`` 512 projects the same models at 1,024 tokens.
    """
    sizes = real_sizes(image_size)
    score = IMAGENET_TRAIN_IMAGES * num_timesteps * dit_forward_flops(sizes.scorer)
    train = PROJECTED_STEPS * PROJECTED_GLOBAL_BATCH * TRAIN_FLOPS_PER_FORWARD * dit_forward_flops(sizes.train_model)
    lines = [f"Projected, not measured, at {image_size} px: {sizes.scorer_name} scoring {IMAGENET_TRAIN_IMAGES:,} images × T={num_timesteps} "
             f"({score / 1e15:,.0f} PFLOP), {sizes.train_name} training {PROJECTED_STEPS:,} steps × batch "
             f"{PROJECTED_GLOBAL_BATCH} ({train / 1e15:,.0f} PFLOP); GPU-hours = FLOPs / (peak × MFU).", "",
             "| GPU | peak TFLOPS | MFU | scoring GPU-h | training GPU-h | wall h on 8 GPUs |", "|---|---|---|---|---|---|"]
    for spec in specs.split(","):
        try:
            name, peak, mfu = spec.split(":")
            rate = float(peak) * 1e12 * float(mfu)
        except ValueError:
            raise SystemExit(f"--flops-projection {spec!r}: give NAME:PEAK_TFLOPS:MFU, e.g. H100:989:0.3") from None
        hours = [f / rate / SECONDS_PER_HOUR for f in (score, train)]
        lines.append(f"| {name} | {float(peak):g} | {float(mfu):g} | {hours[0]:.1f} | {hours[1]:.1f} | {sum(hours) / 8:.2f} |")
    lines.append(f"| paper (Table 6), {PAPER_GPUS}× {PAPER_GPU} | | | {PAPER_SCORE_HOURS * PAPER_GPUS:.1f} | "
                 f"{PAPER_TRAIN_HOURS * PAPER_GPUS:.1f} | {PAPER_SCORE_HOURS + PAPER_TRAIN_HOURS:.1f} (measured) |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = resolve_args(argv)
    if args.flops_projection:
        print(flops_projection(args.flops_projection, args.num_timesteps, args.projection_image_size), flush=True)
        return 0
    meta, rows = run_suite(args)
    print(write_outputs(args.out, meta, rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
