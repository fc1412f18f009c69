"""Run the whole experiment suite and write RESULTS.md, runs.csv and PNG plots.

    python -m experiments.run            # full: (a)-(d) 5 seeds, (e) 5 seeds, (f) 3 seeds;
                                         # about two hours on 2 CPU cores uncached
    python -m experiments.run --quick    # smoke test: 1 seed, a few dozen steps, under a minute
    python -m experiments.run --out DIR  # where to write (default: experiments/results, or
                                         # results/experiments-quick with --quick)
Resumable: every training run's result is cached under OUT/cache (synthetic runs with their
trained weights, (e) and (f) per run in realdata_runs.jsonl and
realdata_f_runs.jsonl); a stopped suite picks up where it stopped.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import (ablation, cone, contrastive, realdata, realdata_f, realdata_f_report,
               realdata_report, report, scaling)
from .common import FULL, QUICK, cpu_pytorch_path, set_run_cache

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test (not evidence)")
    ap.add_argument("--out", default=None, help="output directory")
    args = ap.parse_args(argv)
    cpu_pytorch_path()
    settings = QUICK if args.quick else FULL
    out = args.out or (os.path.join(HERE, "..", "results", "experiments-quick") if args.quick
                       else os.path.join(HERE, "results"))
    torch.use_deterministic_algorithms(True)
    set_run_cache(os.path.join(out, "cache", "synthetic-quick" if args.quick else "synthetic"))
    timings, rows, t_all = {}, [], time.time()

    def timed(name, fn, *a):
        t0 = time.time()
        print(f"[{name}]", file=sys.stderr)
        result = fn(*a)
        timings[name] = time.time() - t0
        return result

    cone_rows = timed("a_cone", cone.run, settings)
    control_rows = timed("a_controls", cone.run_controls, settings, cone_rows)
    scaling_rows, models, problems = timed("b_scaling", scaling.run, settings)
    ablation_rows = timed("c_ablation", ablation.run, settings, scaling_rows, cone_rows, problems)
    ablation_rows += timed("c_controls", ablation.run_controls, settings, scaling_rows, problems)
    contrastive_rows = timed("d_contrastive", contrastive.run, settings, models, problems)
    real = realdata.QUICK if args.quick else realdata.FULL
    real_rows, real_md, real_found = timed("e_realdata", realdata.run, real, out,
                                           os.path.join(out, "cache"))
    f_settings = realdata_f.QUICK if args.quick else realdata_f.FULL
    f_out = timed("f_realdata", realdata_f.run, f_settings, out, os.path.join(out, "cache"))
    rows = cone_rows + control_rows + scaling_rows + ablation_rows + contrastive_rows
    timings["total"] = time.time() - t_all
    command = "python -m experiments.run" + (" --quick" if args.quick else "")
    found = report.write_all(rows, settings, timings, out, command, real_md)
    realdata_report.write(real_rows, real_md, out)
    f_found = realdata_f_report.write(f_settings, *f_out, out, timings["f_realdata"])
    print(f"wrote {os.path.relpath(os.path.join(out, 'RESULTS.md'))} ({timings['total']:.0f} s)")
    for claim, (verdict, _) in found.items():
        print(f"  {claim:12s} {verdict}" + ("  (quick run: not evidence)" if args.quick else ""))
    for claim, (verdict, _, _) in real_found.items():
        print(f"  (e) {claim}: {verdict}"
              + ("  (quick run: not evidence)" if args.quick else ""))
    for claim, verdict in f_found.items():
        print(f"  {claim}: {verdict}" + ("  (quick run: not evidence)" if args.quick else ""))
    return found


if __name__ == "__main__":
    main()
