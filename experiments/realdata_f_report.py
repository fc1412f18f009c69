"""The report of experiment (f): its section of RESULTS.md, REALDATA_F.md and realdata_f.csv.
The experiment itself: realdata_f.py; its rules: results/RULES_F.md."""
from __future__ import annotations

import os
from statistics import mean, median

from . import realdata_f as F
from .common import cluster_bootstrap

HEADING = "## (f) Real data, held out for real"


def _ci(c):
    return f"{c['d']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"


def _rel(c):
    return f"{100 * (c['err_a'] / c['err_b'] - 1):+.0f}%" if c["err_b"] > 0 else "-"


def section(settings, rows, errs, scal, info, wall):
    """-> (markdown, {claim: verdict})."""
    from .report import _machine
    L = [f"{HEADING}: held-out expert pools, 2 and 64 shots per class\n"]
    if settings.quick:
        L.append("> Quick smoke run: a corpus subset, 1 target, 1 seed, a few steps: **not "
                 "evidence**.\n")
    L.append(F.__doc__.strip().split("\n", 2)[2].strip() + "\n")
    L.append(f"Budget: {settings.steps} gate steps (batch {settings.batch} shots when there are "
             f"more), learning rates {list(settings.lrs)}, seeds {list(settings.seeds)}, "
             f"{len(info['targets'])} targets, pools of {info['pool']} experts. Machine of this "
             f"report: {_machine()}. Training time of all (f) runs, summed over runs from the "
             f"run cache: {info['run_seconds'] / 60:.1f} min (runs in parallel processes "
             f"(--shard) overlap, so the wall time is shorter; runs on shared cores take "
             f"longer); this invocation: {wall / 60:.1f} min.\n")
    L.append("### Verdicts (rule: RULES_F.md)\n")
    L.append("Test error in points; differences are RadarGate - other (negative: RadarGate "
             "better), 95% cluster-bootstrap interval; relative: RadarGate's mean error over the "
             "other's, minus 1.\n")
    L.append("| shots per class | head-only error | RadarGate error | vs softmax | vs MLP | "
             "verdict |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    found = {}
    for k, e in errs.items():
        v, h, comps = F.verdict(e)
        s, m = comps["softmax"], comps["mlp"]
        L.append(f"| {k} | {h:.2f} | {s['err_a']:.2f} | {_ci(s)} ({_rel(s)}; softmax "
                 f"{s['err_b']:.2f}) | {_ci(m)} ({_rel(m)}; MLP {m['err_b']:.2f}) | **{v}** |")
        found[f"(f) RadarGate beats softmax and MLP gating at {k} shots per class"] = v
    L.append("\n### Other comparisons (same three-part test, outside the verdict)\n")
    L.append("| shots | comparison | A error | B error | A - B [95% cluster CI] | relative | "
             "reading |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for k, e in errs.items():
        for a, b in F.SECONDARY:
            c = F.compare(e, a, b)
            L.append(f"| {k} | {a} vs {b} | {c['err_a']:.2f} | {c['err_b']:.2f} | {_ci(c)} | "
                     f"{_rel(c)} | {a} {c['label']} |")
    L.append("\n### Per gate (mean over units; lr picked by validation loss)\n")
    L.append("| shots | gate | test error | trainable gate parameters | lr picked (count) | "
             "training loss on all shots at steps " + ", ".join(
                 str(settings.log_every * (i + 1))
                 for i in range(settings.steps // settings.log_every)) + " (median) |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    g = [r for r in rows if r["experiment"] == "realdata_f_gate"]
    for k in errs:
        for kind in F.GATES:
            rs = [r for r in g if r["gate"] == kind and r["shots"] == k]
            lrs = {}
            for r in rs:
                lrs[r["lr"]] = lrs.get(r["lr"], 0) + 1
            curves = [[float(x) for x in r["train_loss"].split(";")] for r in rs]
            med = ", ".join(f"{median(c[i] for c in curves):.2g}" for i in range(len(curves[0])))
            L.append(f"| {k} | {kind} | {mean(r['test_error'] for r in rs):.2f} | "
                     f"{rs[0]['gate_params']} | "
                     + ", ".join(f"{x:g}: {c}" for x, c in sorted(lrs.items())) + f" | {med} |")
    if scal:
        k = min(errs)
        Ps = sorted({key[2] for key in scal})
        L.append(f"\n### Scaling with the pool size ({k} shots per class; test error, mean over "
                 f"units; the largest pool is the main run's)\n")
        L.append("| gate | " + " | ".join(f"{P} experts" for P in Ps) + " |")
        L.append("| --- |" + " --- |" * len(Ps))
        for kind in ("softmax", "radargate"):
            L.append(f"| {kind} | " + " | ".join(
                f"{mean(v[kind] for key, v in scal.items() if key[2] == P):.2f}" for P in Ps)
                + " |")
        cells = []
        for P in Ps:
            by = {}
            for (t, _, p), v in sorted(scal.items()):
                if p == P:
                    by.setdefault(t, []).append(v["radargate"] - v["softmax"])
            cells.append("{:+.2f} [{:+.2f}, {:+.2f}]".format(*cluster_bootstrap(by)))
        L.append("| radargate - softmax [95% cluster CI] | " + " | ".join(cells) + " |")
    L.append("\n### Limits of (f)\n")
    L += [
        "- One corpus (BBC News, five topics), one encoder, one adapted layer, rank-4 experts; "
        "the targets are topic pairs of the corpus the experts come from (held out for the "
        "decision boundary, not for the topics).",
        "- The 10 targets share topics (each topic is in 4 pairs): the cluster bootstrap treats "
        "targets as independent clusters, so the intervals may still be optimistic.",
        "- 40 steps and two learning rates for every gate, fixed in advance; the shots come "
        "from the experts' training split (the experts saw those articles under other labels).",
    ]
    L.append("")
    return "\n".join(L), found


def write(settings, rows, errs, scal, info, out_dir, wall):
    """REALDATA_F.md and realdata_f.csv in out_dir; the (f) section of RESULTS.md there (if it
    exists) replaced in place -> {claim: verdict}."""
    from .report import replace_section, write_csv
    md, found = section(settings, rows, errs, scal, info, wall)
    write_csv(rows, os.path.join(out_dir, "realdata_f.csv"))
    with open(os.path.join(out_dir, "REALDATA_F.md"), "w") as f:
        f.write(md + "\n")
    results = os.path.join(out_dir, "RESULTS.md")
    if os.path.exists(results):
        replace_section(results, HEADING, md)
    return found
