"""benchmarks/gpu_suite.py: the --tiny suite on CPU, its FLOP counts, and that each fast path
computes what the real d2c code computes."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"

_spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
gs = importlib.util.module_from_spec(_spec)
sys.modules["gpu_suite"] = gs
_spec.loader.exec_module(gs)

from d2c.diffusion.ddpm import DDPMSchedule  # noqa: E402
from d2c.select.score import difficulty_scores, stratified_timesteps  # noqa: E402
from d2c.train.objective import ARCH_SIT, D2CObjective  # noqa: E402

#: Relative agreement required of the analytic DiT count and torch's FlopCounterMode (they
#: count the same matmuls, so they should agree exactly; this allows for rounding only).
FLOP_TOLERANCE = 1e-6
#: The analytic XL/2 and L/2 counts against docs/method.md's GMACs (which are rounded to 0.1 G).
METHOD_MD_TOLERANCE = 0.02
XL2_GMACS, L2_GMACS = 118.6, 80.7
#: DiT-XL/2 at 512 px (DiT's paper, Table 4).
XL2_512_GMACS = 524.6
#: Counted training FLOPs over 3 × forward: the backward skips the input gradients of the
#: patch embedding and the text conv (their inputs need none), so slightly below 3×.
TRAIN_RATIO_RANGE = (0.9, 1.0)
#: Packages the GPU machine lacks; the suite must run without them.
ABSENT_ON_GPU = ("pydantic", "ray")


def run_suite_subprocess(tmp_path: Path, args: list[str], absent: tuple[str, ...]) -> dict:
    """Run the suite in a fresh interpreter in which ``absent`` packages cannot be imported."""
    out = tmp_path / "suite.md"
    boot = (
        "import sys, runpy\n"
        f"for name in {list(absent)!r}: sys.modules[name] = None  # import fails, find_spec -> None\n"
        f"sys.argv = ['gpu_suite.py', *{args + ['--out', str(out)]!r}]\n"
        f"runpy.run_path({str(SUITE)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", boot], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out.read_text() in proc.stdout  # the table is printed and written
    return json.loads(out.with_suffix(".json").read_text())


def test_tiny_suite_runs_every_case_without_pydantic_or_ray(tmp_path):
    result = run_suite_subprocess(tmp_path, ["--tiny"], ABSENT_ON_GPU)
    rows, meta = result["rows"], result["meta"]
    assert meta["profile"] == "tiny" and meta["peak_tflops"] > 0
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad, bad
    for case in gs.CASES:
        assert any(r["case"] == case for r in rows), case
    args = meta["args"]
    for case, spec in [("scoring", args["score_variants"]), ("vae", args["vae_variants"]),
                       ("dino", args["dino_variants"]), ("train", args["train_variants"])]:
        names = {r["variant"] for r in rows if r["case"] == case}
        assert set(spec.split(",")) <= names, (case, names)
    train_points = {(r["raw"]["batch"], r["raw"]["precision"]) for r in rows if r["case"] == "train"}
    assert train_points == {(b, "fp32") for b in map(int, args["train_batches"].split(","))}
    for r in rows:
        if r["case"] == "projection":
            assert r["hours"] > 0 and math.isfinite(r["hours"])
            continue
        assert r["images_per_s"] > 0 and math.isfinite(r["images_per_s"]), r
        assert 0 < r["mfu"] <= 1, r
    configs = {(r["case"], r["config"]) for r in rows if r["case"] != "projection"}
    for case, config in configs:  # one fastest (★) variant per measured config
        assert sum(r["best"] for r in rows if (r["case"], r["config"]) == (case, config)) == 1
    assert any(r["variant"].startswith("8") and "projected" in r["variant"] for r in rows)
    assert any(r["config"].startswith("paper") and r["hours"] == pytest.approx(9.5) for r in rows)


def test_missing_optional_packages_give_rows_not_crashes(tmp_path):
    result = run_suite_subprocess(tmp_path, ["--tiny", "--only", "vae,dino,projection",
                                             "--vae-variants", "cast+cl,diffusers+cast+cl+bench"],
                                  ABSENT_ON_GPU + ("diffusers", "transformers"))
    rows = {(r["case"], r["variant"]): r for r in result["rows"]}
    assert rows[("vae", "diffusers+cast+cl+bench")]["status"] == "skipped"
    assert "diffusers not importable" in rows[("vae", "diffusers+cast+cl+bench")]["note"]
    assert rows[("vae", "cast+cl")]["status"] == "ok"
    assert all(r["status"] == "skipped" and "transformers" in r["note"] for (c, _), r in rows.items() if c == "dino")
    assert any(r["status"] == "skipped" and "no scoring" in r["note"] for r in result["rows"] if r["case"] == "projection")


def tiny_model_kwargs(**extra):
    return dict(gs.tiny_sizes().train_model, **extra)


@pytest.mark.parametrize("with_attach", [True, False])
def test_analytic_dit_flops_match_flop_counter(with_attach):
    kw = tiny_model_kwargs() if with_attach else dict(gs.tiny_sizes().scorer)
    torch.manual_seed(0)
    net = gs.DiT(**kw).eval()
    n = 3
    x = torch.randn(n, kw["in_channels"], kw["input_size"], kw["input_size"])
    t, y = torch.rand(n), torch.randint(0, kw["num_classes"], (n,))
    extra = dict(text_emb=torch.randn(n, kw["text_len"], kw["text_dim"])) if with_attach else {}
    with torch.no_grad():
        counted = gs.counted_flops(lambda: net(x, t, y, **extra))
    analytic = n * gs.dit_forward_flops(kw)
    assert counted == pytest.approx(analytic, rel=FLOP_TOLERANCE)


def test_training_flops_are_three_forwards():
    kw = tiny_model_kwargs()
    torch.manual_seed(0)
    net = gs.DiT(**kw).train()
    objective = D2CObjective(ARCH_SIT, None, proj_coeff=gs.PROJ_COEFF)
    n = 3
    tokens = (kw["input_size"] // kw["patch_size"]) ** 2
    batch = dict(latent=torch.randn(n, kw["in_channels"], kw["input_size"], kw["input_size"]),
                 label=torch.randint(0, kw["num_classes"], (n,)),
                 visual=torch.randn(n, tokens, kw["proj_dim"]), text_emb=torch.randn(n, kw["text_len"], kw["text_dim"]))

    def step():
        objective(net, batch)["loss"].backward()

    ratio = gs.counted_flops(step) / (gs.TRAIN_FLOPS_PER_FORWARD * n * gs.dit_forward_flops(kw))
    assert TRAIN_RATIO_RANGE[0] <= ratio <= TRAIN_RATIO_RANGE[1], ratio


def test_xl2_and_l2_counts_match_method_md():
    common = dict(input_size=32, in_channels=4, num_classes=1000)
    xl = gs.dit_forward_flops(gs.dit_kwargs("XL/2", learn_sigma=True, **common))
    large = gs.dit_forward_flops(gs.dit_kwargs("L/2", learn_sigma=True, **common))
    assert xl == pytest.approx(2 * XL2_GMACS * 1e9, rel=METHOD_MD_TOLERANCE)
    assert large == pytest.approx(2 * L2_GMACS * 1e9, rel=METHOD_MD_TOLERANCE)
    # The suite's real sizes are these models.
    sizes = gs.real_sizes()
    assert gs.dit_forward_flops(sizes.scorer) == xl
    assert sizes.train_model["proj_dim"] == 768 and sizes.train_model["text_dim"] == 2048


def test_512px_counts_beside_256px():
    """At 512 px (64 × 64 latents, 1,024 tokens) DiT-XL/2 is 524.6 GMACs a forward (DiT's paper);
    the projection's scoring FLOPs grow by that ratio."""
    xl512 = gs.dit_forward_flops(gs.real_sizes(512).scorer)
    assert xl512 == pytest.approx(2 * XL2_512_GMACS * 1e9, rel=METHOD_MD_TOLERANCE)
    assert gs.real_sizes(512).scorer["input_size"] == 64 and gs.real_sizes().scorer["input_size"] == 32
    table = gs.flops_projection("H100:989:0.3", num_timesteps=8, image_size=512)
    row = next(line for line in table.splitlines() if line.startswith("| H100 |"))
    score_hours = float(row.strip("|").split("|")[3])
    assert score_hours == pytest.approx(1_281_167 * 8 * xl512 / (989e12 * 0.3) / 3600, abs=0.05)
    assert "at 512 px" in table


def test_flops_projection_is_flops_over_peak_times_mfu():
    """The projected GPU-hours equal the counted FLOPs over peak × MFU, written out independently."""
    sizes = gs.real_sizes()
    score_flops = 1_281_167 * 8 * gs.dit_forward_flops(sizes.scorer)
    train_flops = 40_000 * 256 * 3 * gs.dit_forward_flops(sizes.train_model)
    rate = 989e12 * 0.3
    table = gs.flops_projection("H100:989:0.3", num_timesteps=8)
    row = next(line for line in table.splitlines() if line.startswith("| H100 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(score_flops / rate / 3600, abs=0.05)
    assert float(cells[4]) == pytest.approx(train_flops / rate / 3600, abs=0.05)
    assert float(cells[5]) == pytest.approx((score_flops + train_flops) / rate / 3600 / 8, abs=0.005)
    assert "Projected, not measured" in table and "paper (Table 6)" in table
    with pytest.raises(SystemExit, match="NAME:PEAK_TFLOPS:MFU"):
        gs.flops_projection("H100-989", num_timesteps=8)


def test_fused_adaln_forward_is_the_dit_forward():
    kw = tiny_model_kwargs()
    net = gs.build_dit(kw, torch.device("cpu")).train()
    fused = gs.FusedAdaLNDiT(net)
    n = 5
    x = torch.randn(n, kw["in_channels"], kw["input_size"], kw["input_size"])
    t, y = torch.rand(n), torch.randint(0, kw["num_classes"], (n,))
    text = torch.randn(n, kw["text_len"], kw["text_dim"])
    mask = torch.ones(n, kw["text_len"], dtype=torch.long)
    mask[0, 2:] = 0
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ref = net(x, t, y, text_emb=text, text_mask=mask, generator=g1)
    got = fused(x, t, y, text_emb=text, text_mask=mask, generator=g2)
    torch.testing.assert_close(got.out, ref.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.proj, ref.proj, rtol=1e-5, atol=1e-5)
    got.out.square().mean().backward()  # gradients reach the real modulation weights
    assert net.blocks[0].adaLN_modulation[1].weight.grad is not None
    scorer = gs.build_dit(gs.tiny_sizes().scorer, torch.device("cpu")).eval()
    with torch.no_grad():
        torch.testing.assert_close(gs.FusedAdaLNDiT(scorer)(x, t * 999, y), scorer(x, t * 999, y), rtol=1e-5, atol=1e-5)


def test_pipelined_scorer_is_difficulty_scores():
    kw = gs.tiny_sizes().scorer
    net = gs.build_dit(kw, torch.device("cpu")).eval()
    b, t_count = 3, 2
    z = torch.randn(b, kw["in_channels"], kw["input_size"], kw["input_size"])
    y = torch.randint(0, kw["num_classes"], (b,))
    ids = [f"img{i}" for i in range(b)]
    ab, ts = DDPMSchedule().alphas_cumprod, stratified_timesteps(t_count)
    ref = difficulty_scores(net, z, y, ids, ab, ts, seed=7, max_forward_batch=4, pad_rows=True)
    scorer = gs.PipelinedScorer(net, z, y, ids, ab, ts, 7, 4, torch.device("cpu"))
    try:
        got = scorer.step().clone()
    finally:
        scorer.close()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_vae_encoder_is_the_sd_vae_encoder():
    diffusers = pytest.importorskip("diffusers")
    # Real size: the same parameter names and shapes (built on the meta device: no memory).
    with torch.device("meta"):
        mine = gs.SDVAEEncode()
        theirs = diffusers.AutoencoderKL(**gs.diffusers_sd_vae_config(gs.real_sizes()))
    want = {k: v.shape for k, v in theirs.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    assert {k: v.shape for k, v in mine.state_dict().items()} == want
    # Tiny size: the same function.
    s = gs.tiny_sizes()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**gs.diffusers_sd_vae_config(s)).eval()
    enc = gs.SDVAEEncode(s.vae_channels, s.vae_layers, s.vae_groups).eval()
    enc.load_state_dict({k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))},
                        strict=True)
    x = torch.rand(2, 3, s.image_size, s.image_size) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        mean, logvar = enc.moments(x).chunk(2, dim=1)
    torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, dist.logvar, rtol=1e-5, atol=1e-5)


def test_variant_references_and_predictions():
    vs = gs.parse_variants("trainer,nosync,nosync+prefetch,nosync+prefetch+fused,nosync+prefetch+compile,"
                           "nosync+prefetch+compile+fused", "train", gs.TRAIN_FEATURES)
    refs = [gs.reference_of(v, vs[:i]) for i, v in enumerate(vs)]
    assert [r.name if r else None for r in refs] == [
        None, "trainer", "nosync", "nosync+prefetch", "nosync+prefetch", "nosync+prefetch+compile"]
    assert gs.predicted_gain("train", frozenset({"fused"}), refs[5]) == gs.PREDICTED_GAINS["train"]["fused@compile"]
    with pytest.raises(SystemExit):
        gs.parse_variants("nosync+warp", "train", gs.TRAIN_FEATURES)
    scoring = gs.parse_variants("real,fp16,pipe+cast", "scoring", gs.SCORING_FEATURES)
    assert gs.reference_of(scoring[1], scoring[:1]).name == "real"  # fp16 against the bf16 baseline
    for clash in ("fp16+cast", "fp32+fp16", "pipe+cast+fp32"):
        with pytest.raises(SystemExit, match="exclude each other"):
            gs.parse_variants(clash, "scoring", gs.SCORING_FEATURES)
