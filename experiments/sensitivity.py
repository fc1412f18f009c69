"""Post-hoc budget check for (b) (exploratory; written after the full suite's verdicts, and not
part of them): is dense RadarGate vs dense softmax gating a matter of the training budget?

    python -m experiments.sensitivity [--out DIR]     # about 5 minutes on 2 CPU cores

Reruns the scaling problem's ``radargate`` and ``softmax`` gates at E in {10, 40} with 2x the
steps of the full run (everything else as in scaling.py, seeds 0, 1, 2) and writes
SENSITIVITY.md next to RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import time
from statistics import mean

from . import scaling
from .common import FULL, cpu_pytorch_path
from .run import HERE

EXPERTS, GATES, FACTOR = (10, 40), ("radargate", "softmax"), 2


def run(seeds=FULL.seeds, steps=FACTOR * FULL.scaling_steps):
    rows = []
    for seed in seeds:
        problem = scaling.Problem(seed)
        for E in EXPERTS:
            for gate in GATES:
                rows.append(scaling.fit(problem, gate, E, seed, steps)[0])
    return rows


def write(rows, path, seconds):
    steps = rows[0]["steps"]
    L = ["# Budget sensitivity of (b): dense RadarGate vs dense softmax gating\n",
         "Exploratory and post hoc: run after the full suite's verdicts were written, to see "
         "whether the gap in (b) depends on the training budget. It does not change any verdict.\n",
         f"Command: `python -m experiments.sensitivity`. {steps} steps ({FACTOR}x the full "
         f"run's), everything else as in `experiments/scaling.py`; seeds "
         f"{sorted({r['seed'] for r in rows})}; wall time {seconds:.0f} s.\n",
         "| E | gate | held-out error (per seed) | mean | training error (mean) |",
         "|---|---|---|---|---|"]
    for E in EXPERTS:
        for gate in GATES:
            rs = [r for r in rows if r["experts"] == E and r["gate"] == gate]
            per_seed = ", ".join(f"{r['heldout_error']:.4f}" for r in rs)
            L.append(f"| {E} | {gate} | {per_seed} | "
                     f"{mean(r['heldout_error'] for r in rs):.4f} | "
                     f"{mean(r['train_error'] for r in rs):.4f} |")
    L.append("")
    for E in EXPERTS:
        by = {(r["gate"], r["seed"]): r["heldout_error"] for r in rows if r["experts"] == E}
        seeds = sorted({k for _, k in by})
        wins = sum(by[("radargate", k)] < by[("softmax", k)] for k in seeds)
        L.append(f"- E = {E}: RadarGate below softmax on {wins} of {len(seeds)} seeds.")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    cpu_pytorch_path()
    t0 = time.time()
    rows = run()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "SENSITIVITY.md")
    write(rows, path, time.time() - t0)
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
