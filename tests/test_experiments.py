"""The experiment suite (issue #6): its measuring pieces on cases with known answers, its verdict
rules on constructed rows, and a --quick smoke run end to end."""
import math
import os
import subprocess
import sys

import pytest
import torch

from experiments import cone, verdicts
from experiments.contrastive import pair_statistics, pearson, spearman

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_cone_problem_without_rotation_is_a_weighted_sum_the_router_can_match():
    prob = cone.Problem(strength=0.0, seed=3)
    x, V, y = prob.sample(64, torch.Generator().manual_seed(0))
    gate = cone.WeightedSum()
    with torch.no_grad():
        gate.router.weight.copy_(prob.U.t())
    torch.testing.assert_close(gate(x, V), y, rtol=1e-5, atol=1e-6)
    assert cone.span_bound(V, y) < 1e-12


def test_cone_problem_with_rotation_leaves_the_span_of_the_experts():
    prob = cone.Problem(strength=1.0, seed=3)
    x, V, y = prob.sample(256, torch.Generator().manual_seed(0))
    assert cone.span_bound(V, y) > 0.1
    # rotations keep each expert's norm: per token |y| <= sum_i g_i |v_i| (triangle inequality)
    bound = (prob.teacher_weights(x) * V.norm(dim=-1)).sum(-1)
    assert (y.norm(dim=-1) <= bound * (1 + 1e-5)).all()


def test_mlp_gate_is_sized_to_radargate():
    h = cone.matched_mlp_hidden()
    sizes = [sum(p.numel() for p in cone.make_gate(n).parameters())
             for n in ("mlp_gate", "radargate")]
    assert sizes[0] >= sizes[1] > sum(p.numel() for p in cone.MLPGate(h - 1).parameters())


def test_pair_statistics_identity_and_a_known_rotation():
    torch.manual_seed(0)
    V = torch.randn(5, 4, 6, dtype=torch.float64)
    sim, delta = pair_statistics(V, torch.zeros(5, 4, 3, dtype=torch.float64), 1e-6)
    assert torch.equal(delta, torch.zeros_like(delta))
    cos = torch.nn.functional.cosine_similarity(V[:, 0], V[:, 1], dim=-1).mean()
    torch.testing.assert_close(sim[0], cos)
    # D = 2: v1 = e1, v2 = e2 (90 degrees apart); turning v1 by +0.3 towards e2 closes the gap
    # by 0.3
    V2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    _, d = pair_statistics(V2, torch.tensor([[[0.3], [0.0]]], dtype=torch.float64), 1e-6)
    torch.testing.assert_close(d, torch.tensor([-0.3], dtype=torch.float64))


def test_correlations_match_numpy():
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(30, generator=gen, dtype=torch.float64)
    b = a + torch.randn(30, generator=gen, dtype=torch.float64)
    assert math.isclose(pearson(a, b), np.corrcoef(a.numpy(), b.numpy())[0, 1], rel_tol=1e-12)
    ra, rb = np.argsort(np.argsort(a.numpy())), np.argsort(np.argsort(b.numpy()))
    assert math.isclose(spearman(a, b), np.corrcoef(ra, rb)[0, 1], rel_tol=1e-12)


def _cone_rows(radar, baseline, strengths=(0.0, 1.0), seeds=(0, 1)):
    return [dict(experiment="cone", gate=g, strength=s, seed=k,
                 final_loss=radar if g == "radargate" else baseline)
            for s in strengths for k in seeds for g in cone.GATES]


@pytest.mark.parametrize("radar, baseline, expected", [
    (0.1, 0.5, verdicts.SUPPORTED), (0.4, 0.5, verdicts.PARTLY), (0.5, 0.5, verdicts.NOT),
    (0.9, 0.5, verdicts.NOT)])
def test_cone_verdict_rule(radar, baseline, expected):
    assert verdicts.cone(_cone_rows(radar, baseline))[0] == expected


def _scaling_rows(errors):
    return [dict(experiment="scaling", gate=g, experts=E, seed=0, heldout_error=e)
            for g, by_e in errors.items() for E, e in by_e.items()]


def test_scaling_verdict_rule_counts_conditions():
    flat = {5: 0.5, 40: 0.5}
    good = _scaling_rows({"radargate": {5: 0.5, 40: 0.2}, "softmax": flat, "top2": flat})
    assert verdicts.scaling(good)[0] == verdicts.SUPPORTED
    # radargate improves and gains more, but softmax is still better at E = 40: two of three
    two = _scaling_rows({"radargate": {5: 0.9, 40: 0.3}, "softmax": {5: 0.2, 40: 0.19},
                         "top2": flat})
    assert verdicts.scaling(two)[0] == verdicts.PARTLY
    worse = _scaling_rows({"radargate": {5: 0.5, 40: 0.6}, "softmax": {5: 0.5, 40: 0.2},
                           "top2": flat})
    assert verdicts.scaling(worse)[0] == verdicts.NOT


def _ablation_rows(multitask, cone_errors):
    rows = []
    for exp, errs in (("ablation_multitask", multitask), ("ablation_cone", cone_errors)):
        for seed, by_variant in enumerate(errs):
            for v, e in by_variant.items():
                key = "heldout_error" if exp.endswith("multitask") else "final_loss"
                rows.append({"experiment": exp, "variant": v, "seed": seed, key: e})
    return rows


def test_ablation_verdict_rule():
    win = dict(both=0.1, stretch_only=0.3, rotation_only=0.2, neither=0.5)
    lose = dict(both=0.4, stretch_only=0.3, rotation_only=0.2, neither=0.5)
    assert verdicts.ablation(_ablation_rows([win, win], [win, win]))[0] == verdicts.SUPPORTED
    assert verdicts.ablation(_ablation_rows([win, win], [lose, lose]))[0] == verdicts.PARTLY
    assert verdicts.ablation(_ablation_rows([lose, lose], [lose, lose]))[0] == verdicts.NOT


def test_contrastive_verdict_rule():
    def rows(pairs):
        return [dict(experiment="contrastive", pearson=r, p_value=p, control_mean=0.0)
                for r, p in pairs]
    assert verdicts.contrastive(rows([(-0.5, 0.01)] * 3 + [(0.1, 0.5)]))[0] == verdicts.SUPPORTED
    assert verdicts.contrastive(rows([(-0.5, 0.01)] + [(0.1, 0.5)] * 3))[0] == verdicts.PARTLY
    assert verdicts.contrastive(rows([(-0.5, 0.2)] * 4))[0] == verdicts.NOT


@pytest.mark.research  # about 2 minutes: its own CI step (pytest tests -m research)
def test_quick_run_writes_results_plots_and_verdicts(tmp_path):
    # the CI smoke test of issue #6
    env = dict(os.environ)  # TRITON_INTERPRET=1 from conftest stays set: run.py must drop it
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Quick smoke run" in text
    for claim in ("(a)", "(a')", "(b)", "(c)", "(c')", "(d)"):
        line = next(l for l in text.splitlines() if l.startswith(f"| {claim}"))
        assert any(f"**{v}**" in line for v in (verdicts.SUPPORTED, verdicts.PARTLY, verdicts.NOT))
    for name in ("cone", "scaling", "ablation", "contrastive"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = (tmp_path / "runs.csv").read_text().splitlines()
    kinds = {line.split(",")[0] for line in csv[1:]}
    assert kinds == {"cone", "cone_controls", "scaling", "ablation_multitask", "ablation_cone",
                     "ablation_controls", "contrastive"}
    # (e) real data: its section in RESULTS.md, its own report and rows
    assert "## (e) Real data" in text and (tmp_path / "REALDATA.md").exists()
    real = (tmp_path / "realdata.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in real[1:]} == {"realdata_expert", "realdata_gate",
                                                         "realdata_contrastive",
                                                         "realdata_scaling"}
    # (f) held-out pools: the same code path with a tiny config (1 target, 1 seed, 4 steps)
    from experiments import realdata_f
    assert "## (f) Real data, held out" in text and (tmp_path / "REALDATA_F.md").exists()
    f_rows = (tmp_path / "realdata_f.csv").read_text().splitlines()
    head = f_rows[0].split(",")
    got = {(r[head.index("experiment")], r[head.index("shots")], r[head.index("gate")])
           for r in (line.split(",") for line in f_rows[1:])}
    lo, hi = (str(k) for k in realdata_f.QUICK.shots)
    want = {("realdata_f_gate", k, g) for k in (lo, hi) for g in realdata_f.GATES}
    want |= {("realdata_f_scaling", lo, g) for g in ("softmax", "radargate")}
    assert got == want
    f_text = (tmp_path / "REALDATA_F.md").read_text()
    for k in realdata_f.QUICK.shots:
        line = next(l for l in f_text.splitlines() if l.startswith(f"| {k} | "))
        assert any(f"**{v}" in line for v in ("supported", "contradicted", "neither",
                                                "no verdict"))


def test_sensitivity_check_runs_and_counts_wins(tmp_path, monkeypatch):
    from experiments import sensitivity
    # the suite's models run on the CPU PyTorch path (as `python -m experiments.sensitivity`
    # does); under the tests' TRITON_INTERPRET=1 they would go through the interpreter (minutes)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = sensitivity.run(seeds=(0,), steps=2)
    assert {(r["experts"], r["gate"]) for r in rows} == {
        (E, g) for E in sensitivity.EXPERTS for g in sensitivity.GATES}
    path = tmp_path / "SENSITIVITY.md"
    sensitivity.write(rows, path, 0.0)
    text = path.read_text()
    for E in sensitivity.EXPERTS:
        by = {r["gate"]: r["heldout_error"] for r in rows if r["experts"] == E}
        wins = int(by["radargate"] < by["softmax"])
        assert f"- E = {E}: RadarGate below softmax on {wins} of 1 seeds." in text


# ---- (e) real data -------------------------------------------------------------------------------

def test_realdata_tasks_overlap_and_targets():
    from experiments import realdata, realdata_data as D
    topics = ["business", "entertainment", "politics", "sport", "tech"]
    tasks = D.make_tasks(topics)
    assert len(tasks) == 25 and len({t.name for t in tasks}) == 25
    by = {t.name: t for t in tasks}
    assert D.task_overlap(by["busi-vs-ente"], by["busi-vs-ente"]) == pytest.approx(1.0)
    assert D.task_overlap(by["busi-vs-ente"], by["poli-vs-spor"]) == 0.0  # no shared topic
    a, b = by["busi-vs-rest"], by["busi+ente-vs-rest"]
    assert D.task_overlap(a, b) == pytest.approx(D.task_overlap(b, a))
    assert 0 < D.task_overlap(a, b) < 1
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    inside, y = by["ente-vs-spor"].select(labels)
    assert inside.tolist() == [False, True, False, True, False, True]
    assert y[inside].tolist() == [1, 0, 1]
    # every target is a topic-vs-topic task, each topic in two of the five
    pairs = realdata.TARGET_PAIRS[:realdata.FULL.targets]
    assert sorted(sum(pairs, ())) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_realdata_split_is_stratified_and_disjoint():
    from experiments import realdata_data as D
    labels = torch.arange(5).repeat_interleave(torch.tensor([10, 11, 12, 13, 14]))
    sp = D.split_ids(labels)
    allidx = torch.cat([sp["train"], sp["val"], sp["test"]])
    assert sorted(allidx.tolist()) == list(range(len(labels)))  # a partition
    for c in range(5):
        assert (labels[sp["train"]] == c).sum() == int(0.6 * (labels == c).sum())
    assert torch.equal(sp["test"], D.split_ids(labels)["test"])  # fixed split


def _pool(E=6, fin=12, fout=8, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, fin, r, generator=g) * 0.3, torch.randn(E, r, fout, generator=g)


def test_realdata_gates_compute_what_they_say():
    from experiments import realdata as R
    A, B = _pool()
    u = torch.randn(20, A.shape[1])
    V = torch.einsum("ti,eir,ero->teo", u, A, B) * (R.ALPHA / R.RANK)  # every expert's output
    g = torch.Generator().manual_seed(1)
    uni = R.Gate("uniform", A, B, g)
    torch.testing.assert_close(uni(u), V.mean(1), rtol=1e-5, atol=1e-5)
    # at initialisation the router is uniform and every angle is 0: RadarGate = the average
    for kind in ("softmax", "radargate", "radargate_static", "radargate_nostatic", "mlp"):
        torch.testing.assert_close(R.Gate(kind, A, B, g)(u), V.mean(1), rtol=1e-5, atol=1e-5)
    top2 = R.Gate("top2", A, B, g)
    with torch.no_grad():
        top2.router.weight.normal_()
    w = torch.softmax(u @ top2.router.weight.t(), -1)
    wk, ik = w.topk(2, -1)
    want = (wk.unsqueeze(-1) / wk.sum(-1, keepdim=True).unsqueeze(-1)
            * V.gather(1, ik.unsqueeze(-1).expand(-1, -1, V.shape[2]))).sum(1)
    torch.testing.assert_close(top2(u), want, rtol=1e-5, atol=1e-5)
    static = R.Gate("radargate_static", A, B, g)
    assert not static.rot_up.requires_grad and static.angle_bias.requires_grad
    assert R.Gate("radargate_nostatic", A, B, g).angle_bias is None


def test_realdata_mlp_gate_is_parameter_matched():
    from experiments import realdata as R
    for E, fin, fout in ((48, 1536, 384), (5, 1536, 384), (6, 12, 8)):
        A, B = _pool(E, fin, fout)
        g = torch.Generator().manual_seed(0)
        n = {k: sum(p.numel() for p in R.trainable(R.Gate(k, A, B, g)))
             for k in ("mlp", "radargate")}
        h = R.matched_mlp_hidden(E, fin, fout)
        assert n["radargate"] == R.radargate_params(E, fin, fout)
        assert n["mlp"] >= n["radargate"] > (fin + 1) * (h - 1) + (h - 1) * E + E


def test_realdata_bootstrap_and_verdict_rules():
    from experiments import realdata as R
    m, lo, hi = R.paired_bootstrap([2.0, 3.0, 1.5, 2.5, 2.0, 3.0])
    assert lo <= m <= hi and lo > 0
    assert R.verdict(m, lo, hi, units=6) == "supported"
    m, lo, hi = R.paired_bootstrap([-2.0, -3.0, -1.5, -2.5, -2.0, -3.0])
    assert R.verdict(m, lo, hi, units=6) == "contradicted"
    m, lo, hi = R.paired_bootstrap([0.1, -0.1, 0.2, -0.2, 0.0, 0.1])
    assert R.verdict(m, lo, hi, units=6).startswith("no effect")
    m, lo, hi = R.paired_bootstrap([5.0, -4.0, 6.0, -5.0, 0.0, 1.0])
    assert R.verdict(m, lo, hi, units=6) == "inconclusive"
    assert R.verdict(3.0, 2.0, 4.0, units=4) == "too few units"
    # a mean below the minimum effect is not "supported" even with the interval above 0
    assert R.verdict(0.5, 0.2, 0.8, units=6).startswith("no effect")
    # paired: a constant offset between arms has a zero-width interval
    assert R.paired_bootstrap([1.0] * 8)[1:] == (1.0, 1.0)


def test_realdata_run_cache_resumes(tmp_path):
    from experiments import realdata as R
    calls = []
    c = R.RunCache(str(tmp_path / "runs.jsonl"))
    assert c.get("k", lambda: calls.append(1) or dict(val=1.0))["val"] == 1.0
    c2 = R.RunCache(str(tmp_path / "runs.jsonl"))  # a new process: read back, not recomputed
    assert c2.get("k", lambda: calls.append(2) or dict(val=2.0))["val"] == 1.0
    assert calls == [1]


def test_realdata_report_states_the_constants_it_uses():
    from experiments import realdata as R
    doc = " ".join(R.__doc__.split())
    assert f"trained on {R.K_SHOT} articles per class" in doc
    assert f"{R.VAL_PER_CLASS} validation articles per class" in doc
    assert f"({R.BOOTSTRAP:,} resamples)" in doc
    assert f"minimum effect {R.MIN_EFFECT:g} accuracy point" in doc
    assert "pools of " + ", ".join(str(p) for p in R.POOL_SIZES[:-1]) + f" and {R.POOL_SIZES[-1]}" in doc
    assert f"(rank {R.RANK}, alpha {R.ALPHA:g}" in doc


def test_cone_teacher_in_random_planes():
    g = cone.Problem(1.0, 3, "givens")
    r = cone.Problem(1.0, 3, "random")
    x, V, y = g.sample(64, torch.Generator().manual_seed(0))
    x2, V2, y2 = r.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(V, V2)  # same experts and inputs, other planes
    assert not torch.allclose(y, y2)
    # still rotations: |u_i| = |v_i| for each expert, so the same triangle bound holds
    bound = (r.teacher_weights(x) * V.norm(dim=-1)).sum(-1)
    assert (y2.norm(dim=-1) <= bound * (1 + 1e-5)).all()
    # at s = 0 both teachers are the same weighted sum
    y0 = cone.Problem(0.0, 3, "givens").sample(64, torch.Generator().manual_seed(0))[2]
    y0r = cone.Problem(0.0, 3, "random").sample(64, torch.Generator().manual_seed(0))[2]
    torch.testing.assert_close(y0, y0r, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="planes"):
        cone.Problem(1.0, 3, "diagonal")


def test_static_only_control_trains_only_router_and_angle_bias():
    gate = cone.make_gate("radargate_static")
    names = {n for n, p in gate.named_parameters() if p.requires_grad}
    assert names == {"router.weight", "gate.angle_bias"}
    assert float(gate.gate.rot_up.abs().sum()) == 0.0  # the relation part is 0: static angles


def test_cone_controls_verdict_rule():
    def rows(ratios_by_planes):
        out = []
        for planes, ratios in ratios_by_planes.items():
            for seed, ratio in enumerate(ratios):
                out += [dict(experiment="cone_controls", planes=planes, seed=seed, gate="radargate",
                             final_loss=0.1, span_bound=0.2),
                        dict(experiment="cone_controls", planes=planes, seed=seed,
                             gate="radargate_static", final_loss=0.1 * ratio, span_bound=0.2)]
        return out
    assert verdicts.cone_controls(rows({"givens": [1.5] * 3, "random": [1.2] * 3}))[0] \
        == verdicts.SUPPORTED
    assert verdicts.cone_controls(rows({"givens": [1.5] * 3, "random": [1.0] * 3}))[0] \
        == verdicts.PARTLY
    assert verdicts.cone_controls(rows({"givens": [1.05, 1.3, 1.3], "random": [1.05, 1.3, 1.3]}))[0] \
        == verdicts.PARTLY  # both on the means only
    assert verdicts.cone_controls(rows({"givens": [1.0] * 3, "random": [1.0] * 3}))[0] \
        == verdicts.NOT


def test_ablation_controls_verdict_rule():
    def rows(ratios_by_budget):
        out = []
        for budget, ratios in ratios_by_budget.items():
            for seed, ratio in enumerate(ratios):
                for v, err in (("both", 0.1), ("stretch_only", 0.12),
                               ("stretch_only_matched", 0.1 * ratio)):
                    out.append(dict(experiment="ablation_controls", budget=budget, seed=seed,
                                    variant=v, heldout_error=err))
        return out
    assert verdicts.ablation_controls(rows({1: [1.2] * 3, 2: [1.05] * 3}))[0] == verdicts.SUPPORTED
    assert verdicts.ablation_controls(rows({1: [1.2] * 3, 2: [0.9] * 3}))[0] == verdicts.PARTLY
    assert verdicts.ablation_controls(rows({1: [1.0, 1.1, 1.1], 2: [1.0, 1.1, 1.1]}))[0] \
        == verdicts.PARTLY  # on the means only
    assert verdicts.ablation_controls(rows({1: [0.95] * 3, 2: [0.95] * 3}))[0] == verdicts.NOT


def test_parameter_matched_rank_reaches_radargate_size():
    from experiments import ablation, scaling
    from experiments.common import count_params
    prob = scaling.Problem(0)
    r = ablation.matched_rank(prob, 5, 0)
    n_rg = count_params(prob.model(5, 0))
    assert count_params(prob.model(5, 0, rank=r, rotation=False)) >= n_rg
    assert count_params(prob.model(5, 0, rank=r - 1, rotation=False)) < n_rg


def test_synthetic_runs_are_cached_so_the_suite_resumes(tmp_path, monkeypatch):
    from experiments import common, scaling
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU PyTorch path, as run.py
    common.set_run_cache(str(tmp_path))
    try:
        r1 = cone.fit("weighted_sum", 1.0, 0, 3)
        prob = scaling.Problem(0)
        row1, m1 = scaling.fit(prob, "softmax", 2, 0, 2)

        def boom(*a, **k):
            raise AssertionError("a cached run was trained again")
        monkeypatch.setattr(cone, "train", boom)
        monkeypatch.setattr(scaling, "train", boom)
        assert cone.fit("weighted_sum", 1.0, 0, 3) == r1
        row2, m2 = scaling.fit(prob, "softmax", 2, 0, 2)
        assert row2 == row1
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
        with pytest.raises(AssertionError, match="trained again"):  # another key is not cached
            cone.fit("weighted_sum", 1.0, 1, 3)
    finally:
        common.set_run_cache(None)
