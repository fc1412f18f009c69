"""Experiment (f)'s pieces that decide its verdicts: the held-out pool rule, the cluster
bootstrap, the verdict rule and the signed gate."""
import itertools
import math

import pytest
import torch

from experiments import realdata as R, realdata_data as D, realdata_f as F
from experiments.common import cluster_bootstrap, paired_bootstrap

TOPICS = ["business", "entertainment", "politics", "sport", "tech"]


def test_heldout_pool_never_separates_the_target_pair():
    tasks = D.make_tasks(TOPICS)
    for a, b in itertools.combinations(range(5), 2):
        pool = F.heldout_tasks(tasks, a, b)
        assert len(pool) == 16
        # judged from the task's own labels: an article of topic a and one of topic b
        labels = torch.tensor([a, b])
        for t in tasks:
            inside, y = t.select(labels)
            splits = bool(inside.all()) and y[0] != y[1]
            assert (t in pool) == (not splits), (t.name, a, b)
        assert all(t.name != f"{TOPICS[a][:4]}-vs-{TOPICS[b][:4]}" for t in pool)


def test_cluster_bootstrap_spread_matches_the_two_stage_variance():
    gen = torch.Generator().manual_seed(3)
    clusters = {c: (torch.randn(3, generator=gen) + 2 * c).tolist() for c in range(10)}
    d = torch.tensor(list(clusters.values()), dtype=torch.float64)
    # one draw: a random cluster, then the mean of its 3 seeds drawn with replacement
    var_one = d.mean(1).var(unbiased=False) + d.var(1, unbiased=False).mean() / 3
    sd = math.sqrt(var_one / 10)
    m, lo, hi = cluster_bootstrap(clusters, n=20000)
    assert m == pytest.approx(d.mean().item())
    assert (hi - lo) / (2 * 1.96) == pytest.approx(sd, rel=0.06)


def test_cluster_bootstrap_resamples_seeds_and_keeps_clusters_together():
    # every cluster the same: only the nested seed draw can move the mean
    same = {c: [0.0, 1.0, 2.0] for c in range(5)}
    m, lo, hi = cluster_bootstrap(same)
    assert m == 1.0 and lo < 1.0 < hi
    # seeds identical within clusters: clusters are the units, wider than 15 independent ones
    tied = {c: [float(c)] * 3 for c in range(5)}
    _, lo_c, hi_c = cluster_bootstrap(tied)
    _, lo_u, hi_u = paired_bootstrap(sum(tied.values(), []))
    assert hi_c - lo_c > 1.4 * (hi_u - lo_u)
    assert cluster_bootstrap({0: [1.5] * 3, 1: [1.5] * 3})[1:] == (1.5, 1.5)
    with pytest.raises(ValueError):
        cluster_bootstrap({0: [1.0, 2.0], 1: [1.0]})


def _errs(radar, others, head=20.0, noise=0.2):
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in range(10):
        for s in range(3):
            e = {g: others for g in F.GATES}
            e["head_only"] = head
            e["radargate"] = radar + noise * torch.randn(1, generator=gen).item()
            out[(f"t{t}", s)] = e
    return out


def test_verdict_rule_per_regime():
    assert F.verdict(_errs(radar=8.0, others=10.0))[0] == "supported"
    assert F.verdict(_errs(radar=12.0, others=10.0))[0] == "contradicted"
    # 0.4 points and 4% lower: below both thresholds
    assert F.verdict(_errs(radar=9.6, others=10.0))[0] == "neither"
    # 1 point lower but only 5% relative
    assert F.verdict(_errs(radar=19.0, others=20.0, head=30.0))[0] == "neither"
    assert F.verdict(_errs(radar=0.5, others=2.0, head=2.9))[0].startswith("no verdict")
    # mirror image: 10.5 vs 10 is +0.5 points but under 10% relative
    assert F.error_label(10.5, 10.0, 0.5, 0.4, 0.6) == "no clear difference"
    assert F.error_label(11.2, 10.0, 1.2, 0.9, 1.5) == "worse"
    assert F.error_label(8.0, 10.0, -2.0, -2.5, 0.1) == "no clear difference"  # CI crosses 0


def test_signed_gate_is_one_over_e_plus_a_linear_map():
    g = torch.Generator().manual_seed(0)
    E, fin, fout = 5, 12, 8
    A, B = torch.randn(E, fin, 4, generator=g) * 0.3, torch.randn(E, 4, fout, generator=g)
    gate = R.Gate("signed", A, B, g)
    with torch.no_grad():
        gate.router.weight.normal_(generator=g)
    u = torch.randn(7, fin, generator=g)
    V = torch.einsum("ti,eir,ero->teo", u, A, B) * (R.ALPHA / R.RANK)
    w = 1.0 / E + u @ gate.router.weight.t()
    assert (w < 0).any()  # signed weights: outside the cone of the experts
    torch.testing.assert_close(gate(u), (w.unsqueeze(-1) * V).sum(1), rtol=1e-4, atol=1e-4)
    assert gate.rot_down is None and gate.angle_bias is None


def test_hand_written_bottom_line_is_kept_once(tmp_path):
    from experiments import report
    path = tmp_path / "RESULTS.md"
    path.write_text("# title\n\n## Bottom line\n\nplain words\n" + report.END_KEPT
                    + "\n\nCommand: generated\n\n## Verdicts\n")
    kept = report.kept_section(str(path), "## Bottom line")
    assert kept[:3] == ["## Bottom line", "", "plain words"]
    assert "Command: generated" not in kept and kept.count(report.END_KEPT) == 1
    # written back and read again: the same lines, not doubled
    path.write_text("\n".join(["# title", ""] + kept + ["Command: new", "## Verdicts"]))
    assert report.kept_section(str(path), "## Bottom line") == kept
    assert report.kept_section(str(tmp_path / "missing.md"), "## Bottom line") == []
