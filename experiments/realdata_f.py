"""(f) The decisive real-data test: gates over a held-out pool of frozen task LoRAs, at 2 and
64 shots per class (issue #28).

Rules, fixed and committed before the first full run: ``experiments/results/RULES_F.md``.
Features, tasks and the 50 experts are those of (e) (``realdata.setup``). For a target topic
pair (a, b) the pool holds only the experts of tasks that never separate a from b (16 tasks,
32 experts), so no expert was trained to draw the target's decision boundary. All 10 topic
pairs are targets, 3 seeds each. A new head and a gate are trained for 40 Adam steps on 2 or
64 shots per class (64: steps of 32 random shots); the learning rate of each gate is picked
from {3e-3, 1e-2} by validation loss; test error is measured on every test article of the pair.
Gates: head only, uniform, softmax, a parameter-matched MLP router, signed (w = 1/E + linear(u):
leaves the cone without rotating), RadarGate, RadarGate with static angles only.
Statistics: paired differences of test error, 95% cluster bootstrap (targets, seeds nested).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from statistics import mean

from radargate_kernels.progress import Progress

from . import realdata as R
from .common import cluster_bootstrap

GATES = ("head_only", "uniform", "softmax", "mlp", "signed", "radargate", "radargate_static")
LRS = (3e-3, 1e-2)
MIN_REL, MIN_POINTS, MIN_HEADROOM = 0.10, 0.5, 3.0   # verdict rule (RULES_F.md)
PRIMARY = ("softmax", "mlp")
SECONDARY = (("radargate", "signed"), ("radargate", "uniform"),
             ("radargate", "radargate_static"), ("softmax", "head_only"), ("signed", "softmax"))
ALL_PAIRS = tuple((a, b) for a in range(5) for b in range(a + 1, 5))


@dataclass(frozen=True)
class FSettings:
    quick: bool
    real: R.RealSettings   # corpus subset and experts: (e)'s settings
    targets: tuple         # topic pairs (a, b)
    seeds: tuple
    shots: tuple           # articles per class, one regime each
    steps: int
    batch: int             # shots per step when there are more
    lrs: tuple
    scaling_pools: tuple   # extra pool sizes at the smallest shot count (() to skip)
    log_every: int


FULL = FSettings(False, R.FULL, ALL_PAIRS, (0, 1, 2), (2, 64), 40, 32, LRS, (4, 8), 10)
QUICK = FSettings(True, R.QUICK, ((0, 1),), (0,), (2, 8), 4, 8, LRS, (4,), 2)


def separates(task, a, b):
    """Whether the task labels one of topics a, b as 1 and the other as 0."""
    return (a in task.pos and b in task.neg) or (a in task.neg and b in task.pos)


def heldout_tasks(tasks, a, b):
    """The tasks whose experts may serve target (a, b): those that never separate a from b."""
    return [t for t in tasks if not separates(t, a, b)]


def error_label(err_a, err_b, d, lo, hi):
    """Gate A vs B by the rule of RULES_F.md: 'A better' / 'A worse' / 'no clear difference'."""
    if err_a <= (1 - MIN_REL) * err_b and d <= -MIN_POINTS and hi < 0:
        return "better"
    if err_b <= (1 - MIN_REL) * err_a and d >= MIN_POINTS and lo > 0:
        return "worse"
    return "no clear difference"


def compare(errs, a, b):
    """errs[(target, seed)][gate] = test error -> dict(d, lo, hi, err_a, err_b, label, n)."""
    by = {}
    for (t, _), e in sorted(errs.items()):
        by.setdefault(t, []).append(e[a] - e[b])
    d, lo, hi = cluster_bootstrap(by)
    ea, eb = mean(e[a] for e in errs.values()), mean(e[b] for e in errs.values())
    return dict(d=d, lo=lo, hi=hi, err_a=ea, err_b=eb, label=error_label(ea, eb, d, lo, hi),
                n=sum(len(v) for v in by.values()))


def verdict(errs):
    """The regime's verdict -> (verdict, head-only error, {other: comparison})."""
    h = mean(e["head_only"] for e in errs.values())
    comps = {o: compare(errs, "radargate", o) for o in PRIMARY}
    if h < MIN_HEADROOM:
        return f"no verdict (head-only error {h:.2f} < {MIN_HEADROOM:g} points)", h, comps
    labels = {c["label"] for c in comps.values()}
    v = ("supported" if labels == {"better"} else "contradicted" if labels == {"worse"}
         else "neither")
    return v, h, comps


def run(settings: FSettings, out_dir: str, cache_dir: str, shard=(0, 1)):
    """-> (rows, {shots: errs}, scaling {(target, seed, pool): {gate: error}}, timing info).
    shard (i, n): only every n-th target from the i-th (parallel processes on one run cache)."""
    os.makedirs(out_dir, exist_ok=True)
    feats, split, tasks, experts, _ = R.setup(settings.real, cache_dir, label="f_realdata")
    by_pair = {(t.pos[0], t.neg[0]): t for t in tasks if len(t.pos) == 1 and len(t.neg) == 1}
    targets = [(p, by_pair[p]) for p in settings.targets if p in by_pair][shard[0]::shard[1]]
    cache = R.RunCache(os.path.join(out_dir, "realdata_f_runs.jsonl"))
    tag = "quick" if settings.quick else "full"
    pools = {p: [experts[(t.name, s)] for t in heldout_tasks(tasks, *p) for s in R.EXPERT_SEEDS]
             for p, _ in targets}

    def one(target, pool, kind, seed, k, lr):
        t0 = time.time()
        r = R.run_gate(feats, split, target, pool, kind, seed, lr, settings.steps, k_shot=k,
                       batch=settings.batch, log_every=settings.log_every)
        return dict(r, seconds=time.time() - t0)

    def best(key, target, pool, kind, seed, k):
        return R.select_lr(cache, key, settings.lrs,
                           lambda lr: one(target, pool, kind, seed, k, lr), by="val_loss")

    rows, errs = [], {}
    for k in settings.shots:
        units = [(p, t, s) for p, t in targets for s in settings.seeds]
        prog = Progress(len(units) * len(GATES), f"f_realdata {k} shots")
        errs[k] = {}
        for n, (p, target, seed) in enumerate(units):
            pool = pools[p]
            for j, kind in enumerate(GATES):
                key = (f"{tag}|f|k={k}|{target.name}|{seed}|{kind}|{settings.steps}|"
                       f"{len(pool)}")
                r = best(key, target, pool, kind, seed, k)
                errs[k].setdefault((target.name, seed), {})[kind] = 100.0 - r["test"]
                rows.append(dict(
                    experiment="realdata_f_gate", shots=k, target=target.name, seed=seed,
                    gate=kind, pool=len(pool), lr=r["lr"], val_acc=r["val"],
                    val_loss=r["val_loss"], test_error=100.0 - r["test"],
                    gate_params=r["gate_params"], steps=settings.steps,
                    train_loss=";".join(f"{x:.3g}" for x in r["loss_curve"])))
                prog.update(n * len(GATES) + j + 1, f"{target.name} {seed} {kind}")

    scal = {}
    k = min(settings.shots)
    units = [(p, t, s) for p, t in targets for s in settings.seeds]
    prog = Progress(max(1, len(units) * len(settings.scaling_pools) * 2), "f_realdata scaling")
    n = 0
    for p, target, seed in units:
        full = pools[p]
        rng = random.Random(seed)
        for P in settings.scaling_pools:
            pool = [full[i] for i in sorted(rng.sample(range(len(full)), P))]
            for kind in ("softmax", "radargate"):
                key = f"{tag}|fscale|k={k}|{target.name}|{seed}|{kind}|{settings.steps}|{P}"
                r = best(key, target, pool, kind, seed, k)
                scal.setdefault((target.name, seed, P), {})[kind] = 100.0 - r["test"]
                rows.append(dict(experiment="realdata_f_scaling", shots=k, target=target.name,
                                 seed=seed, gate=kind, pool=P, lr=r["lr"], val_acc=r["val"],
                                 val_loss=r["val_loss"], test_error=100.0 - r["test"],
                                 steps=settings.steps))
                n += 1
                prog.update(n, f"{target.name} P={P} {kind}")
        if settings.scaling_pools:
            for kind in ("softmax", "radargate"):
                scal.setdefault((target.name, seed, len(full)), {})[kind] = \
                    errs[k][(target.name, seed)][kind]
    seconds = sum(r.get("seconds", 0.0) for key, r in cache.done.items()
                  if key.startswith(f"{tag}|f"))
    return rows, errs, scal, dict(targets=[t.name for _, t in targets], run_seconds=seconds,
                                  pool=len(next(iter(pools.values()))))


def main(argv=None):
    import argparse

    import torch

    from .common import cpu_pytorch_path
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (not evidence)")
    ap.add_argument("--out", default=None, help="output directory (default experiments/results)")
    ap.add_argument("--cache", default=None, help="feature and expert cache (default OUT/cache)")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th target from the i-th "
                    "and write no report (n processes fill one run cache; then run without)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args(argv)
    cpu_pytorch_path()
    if args.threads:
        torch.set_num_threads(args.threads)
    shard = tuple(int(x) for x in args.shard.split("/"))
    torch.use_deterministic_algorithms(True)
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or (os.path.join(here, "..", "results", "experiments-quick") if args.quick
                       else os.path.join(here, "results"))
    settings = QUICK if args.quick else FULL
    t0 = time.time()
    rows, errs, scal, info = run(settings, out, args.cache or os.path.join(out, "cache"), shard)
    if shard != (0, 1):
        print(f"shard {args.shard} done ({time.time() - t0:.0f} s)")
        return {}
    from .realdata_f_report import write
    found = write(settings, rows, errs, scal, info, out, time.time() - t0)
    print(f"wrote {os.path.relpath(os.path.join(out, 'REALDATA_F.md'))} "
          f"({time.time() - t0:.0f} s)")
    for claim, v in found.items():
        print(f"  {claim}: {v}")
    return found


if __name__ == "__main__":
    main()
