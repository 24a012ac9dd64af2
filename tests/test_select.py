"""Difficulty score, interval sampling and baselines (d2c/select), against references."""

import numpy as np
import pandas as pd
import pytest
import torch

from d2c.select.baselines import herding, kcenter_greedy, make_chooser
from d2c.select.interval import SelectionError, interval_ranks, per_class_budget, select_table
from d2c.select.score import difficulty_scores, image_noise, image_seed, stratified_timesteps


def _table(sizes, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for label, m in enumerate(sizes):
        for i in range(m):
            rows.append({"image_id": f"c{label}-{i:04d}", "label": label, "score": float(rng.random())})
    return pd.DataFrame(rows)


# -- interval sampling ---------------------------------------------------------------


def test_interval_ranks_paper_formula():
    ranks, rep = interval_ranks(1300, 10, 96, "clamp", 0)
    assert ranks.tolist() == [i * 96 for i in range(10)]
    assert rep.k_used == 96 and rep.note == ""


def test_interval_clamp_and_error():
    ranks, rep = interval_ranks(732, 10, 96, "clamp", 3)  # ImageNet's smallest class
    assert rep.k_used == (732 - 1) // 9 == 81
    assert ranks.tolist() == [i * 81 for i in range(10)] and ranks[-1] <= 731
    assert "clamped" in rep.note
    with pytest.raises(SelectionError, match="class 3 has 732 images"):
        interval_ranks(732, 10, 96, "error", 3)


def test_interval_short_and_empty_class():
    ranks, rep = interval_ranks(3, 5, 2, "clamp", 1)
    assert ranks.tolist() == [0, 1, 2] and rep.selected == 3
    ranks, rep = interval_ranks(0, 5, 2, "clamp", 2)
    assert len(ranks) == 0 and rep.note == "empty class"
    with pytest.raises(SelectionError, match="class 2 is empty"):
        interval_ranks(0, 5, 2, "error", 2)


def test_select_table_matches_bruteforce_reference():
    table = _table([40, 35, 50], seed=1)
    # plant ties so the image_id tiebreak matters
    table.loc[table.index[:6], "score"] = 0.5
    sel, reports = select_table(table, budget=15, method="d2c", k=3)
    for label, group in table.groupby("label"):
        ordered = sorted(zip(group.score, group.image_id))  # (score, id) order, independently
        expect = [ordered[r][1] for r in range(0, 5 * 3, 3)]
        got = sel[sel.label == label].sort_values("rank").image_id.tolist()
        assert got == expect
    assert sel["rank"].tolist() == [0, 3, 6, 9, 12] * 3
    assert all(r.k_used == 3 for r in reports)


def test_select_table_reports_empty_class_and_is_order_invariant():
    table = _table([20, 0, 20], seed=2)
    sel, reports = select_table(table, budget=6, method="d2c", k=2, num_classes=3)
    assert reports[1].note == "empty class" and len(sel) == 4
    shuffled = table.sample(frac=1.0, random_state=0)
    sel2, _ = select_table(shuffled, budget=6, method="d2c", k=2, num_classes=3)
    pd.testing.assert_frame_equal(sel, sel2)


def test_per_class_budget_errors_name_the_key():
    assert per_class_budget(480, 10) == 48
    with pytest.raises(SelectionError, match="select.budget=485"):
        per_class_budget(485, 10)


# -- baselines -----------------------------------------------------------------------


def test_random_min_max_baselines():
    table = _table([30, 30], seed=3)
    sel_min, _ = select_table(table, 10, "min", k=1, chooser=make_chooser("min"))
    sel_max, _ = select_table(table, 10, "max", k=1, chooser=make_chooser("max"))
    for label, g in table.groupby("label"):
        s = np.sort(g.score.to_numpy())
        np.testing.assert_allclose(np.sort(sel_min[sel_min.label == label].score), s[:5])
        np.testing.assert_allclose(np.sort(sel_max[sel_max.label == label].score), s[-5:])
    a, _ = select_table(table, 10, "random", 1, chooser=make_chooser("random", seed=7))
    b, _ = select_table(table, 10, "random", 1, chooser=make_chooser("random", seed=7))
    c, _ = select_table(table, 10, "random", 1, chooser=make_chooser("random", seed=8))
    pd.testing.assert_frame_equal(a, b)
    assert set(a.image_id) != set(c.image_id)


def test_kcenter_matches_bruteforce():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    got = kcenter_greedy(x, 8)
    # independent reference: explicit min-over-chosen distances each round
    chosen = [int(np.argmin(np.linalg.norm(x - x.mean(0), axis=1)))]
    for _ in range(7):
        d = np.array([min(np.linalg.norm(x[i] - x[j]) for j in chosen) for i in range(len(x))])
        chosen.append(int(np.argmax(d)))
    assert got.tolist() == chosen


def test_herding_tracks_the_mean_better_than_random():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)) + 3.0
    idx = herding(x, 10)
    assert len(set(idx.tolist())) == 10
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    gap_herd = np.linalg.norm(xn[idx].mean(0) - xn.mean(0))
    gaps_rand = [np.linalg.norm(xn[rng.choice(200, 10, replace=False)].mean(0) - xn.mean(0)) for _ in range(50)]
    assert gap_herd < np.percentile(gaps_rand, 5)


# -- difficulty score ----------------------------------------------------------------


def test_stratified_timesteps():
    assert stratified_timesteps(8).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert stratified_timesteps(1000).tolist() == list(range(1000))
    with pytest.raises(ValueError, match="score.num_timesteps"):
        stratified_timesteps(0)


def test_noise_depends_only_on_seed_and_id():
    a = image_noise(0, ["x", "y"], 3, (1, 4, 4))
    b = image_noise(0, ["y"], 3, (1, 4, 4))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(image_noise(1, ["y"], 3, (1, 4, 4)), b)
    assert image_seed(0, "x") == image_seed(0, "x") != image_seed(0, "x2")


def _ab(total=1000):
    betas = np.linspace(1e-4, 0.02, total, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1 - betas))


class _TinyEps(torch.nn.Module):
    """A small conv net standing in for ε_θ (the scorer's interface), random weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.emb = torch.nn.Embedding(4, 2)

    def forward(self, x, t, y):
        return self.conv(x) * (t.view(-1, 1, 1, 1) / 1000) + self.emb(y).view(-1, 2, 1, 1)


def test_difficulty_scores_match_a_direct_loop_and_ignore_batching():
    model = _TinyEps().eval()
    torch.manual_seed(1)
    z = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ids = [f"img{i}" for i in range(6)]
    ts = stratified_timesteps(4)
    ab = _ab()
    got = difficulty_scores(model, z, y, ids, ab, ts, seed=5)
    assert got.shape == (6, 4)
    # independent reference: one image, one timestep at a time
    for j in range(6):
        g = torch.Generator().manual_seed(image_seed(5, ids[j]))
        eps_all = torch.randn((4, 1, 8, 8), generator=g)
        for i, t in enumerate(ts.tolist()):
            a = ab[t]
            x_t = (a.sqrt() * z[j] + (1 - a).sqrt() * eps_all[i]).float().unsqueeze(0)
            with torch.no_grad():
                pred = model(x_t, torch.tensor([float(t)]), y[j : j + 1])[:, :1]
            ref = ((eps_all[i] - pred[0]) ** 2).mean()
            torch.testing.assert_close(got[j, i], ref, rtol=1e-5, atol=1e-6)
    # split batches and tiny forward chunks give the same scores
    part = torch.cat([difficulty_scores(model, z[:2], y[:2], ids[:2], ab, ts, 5),
                      difficulty_scores(model, z[2:], y[2:], ids[2:], ab, ts, 5, max_forward_batch=3)])
    torch.testing.assert_close(part, got, rtol=1e-5, atol=1e-7)
