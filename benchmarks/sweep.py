"""Sweep: time every CPU provider of harness.py against K and against D, forward and
forward+backward, project the GPU time of the Triton kernels and of the PyTorch reference on an
H100 (benchmarks/roofline.py, counted in the Triton interpreter), and write CSV rows plus PNG plots.

    python benchmarks/sweep.py [--quick] [--out results]

CSV columns: op, provider, mode, T, K, D, r, dtype, metric, value, device, torch, triton, timestamp.
metric "ms" is a median wall time measured here; "projected_us" a roofline PROJECTION for an H100
(not a measurement), counted by ``benchmarks.roofline --op`` in a subprocess (the interpreter must
not be set in the timing process).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from radargate_kernels.progress import Progress  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIELDS = ["op", "provider", "mode", "T", "K", "D", "r", "dtype", "metric", "value", "lo", "hi",
          "reps", "device", "torch", "triton", "timestamp"]


def sweep_shapes(quick):
    T, r = (512, 8) if quick else (2048, 8)
    ks = (1, 2, 4, 8, 16) if quick else (1, 2, 4, 8, 16, 32)
    ds = (256, 512, 1024) if quick else (256, 512, 1024, 2048, 4096)
    by_k = [("K", T, K, 1024, r) for K in ks]
    by_d = [("D", T, 8, D, r) for D in ds]
    return by_k + by_d


def projected(T, K, D, r):
    """Projected H100 microseconds of the Triton kernels and the PyTorch reference, per mode."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "p.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, "-m", "benchmarks.roofline", "--op", str(T), str(K),
                        str(D), str(r), "--out", out], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        with open(out) as f:
            res = json.load(f)
    return {(prov, mode): v["fwd_us"] if mode == "forward" else v["fwd_us"] + v["bwd_us"]
            for prov, v in res.items() for mode in ("forward", "forward_backward")}


PROVIDER_NOTES = {  # legend text: what each provider is
    "radargate": "radargate: this package on this device (on CPU: its PyTorch path)",
    "cpu_eager": "cpu_eager: this package's eager CPU path",
    "weighted_sum": "weighted_sum: plain weighted sum, no rotation (the floor)",
    "naive": "naive: the PyTorch reference, eager",
    "naive_compile": "naive_compile: the PyTorch reference under torch.compile",
    "triton_kernels": "triton_kernels: the Triton kernels (projected H100)",
    "pytorch_reference": "pytorch_reference: the reference, eager (projected H100)",
}


def plot(rows, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for axis in ("K", "D"):
        for metric, ylabel in (("ms", "time [ms], measured on this CPU (median, band: min-max)"),
                               ("projected_us", "projected H100 time [us] (roofline, not "
                                                "measured)")):
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
            sel_all = [r for r in rows if r["sweep"] == axis and r["metric"] == metric]
            for ax, mode in zip(axes, ("forward", "forward_backward")):
                sel = [r for r in sel_all if r["mode"] == mode]
                for prov in sorted({r["provider"] for r in sel}):
                    pts = sorted((int(r[axis]), float(r["value"]), float(r.get("lo") or r["value"]),
                                  float(r.get("hi") or r["value"]))
                                 for r in sel if r["provider"] == prov)
                    xs = [p[0] for p in pts]
                    ax.plot(xs, [p[1] for p in pts], marker="o",
                            label=PROVIDER_NOTES.get(prov, prov))
                    if metric == "ms":
                        ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel(ylabel, fontsize=8)
                ax.set_title(f"{mode.replace('_', ' + ')} vs {axis}")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
            fixed = sel_all[0] if sel_all else {}
            fixed_txt = (f"T={fixed.get('T')}, " + (f"D={fixed.get('D')}" if axis == "K" else
                                                  f"K={fixed.get('K')}")
                         + f", r={fixed.get('r')}, {fixed.get('dtype')}") if fixed else ""
            where = (f"measured on {fixed.get('device')}" if metric == "ms"
                     else "PROJECTION for an H100 SXM from work counted in the Triton interpreter")
            fig.suptitle(f"radar_gate vs {axis} ({fixed_txt}): {where}", fontsize=9)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{metric}_vs_{axis}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller shapes (about 2 min)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    ap.add_argument("--no-projection", action="store_true", help="skip the GPU projection")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import triton
    meta = dict(device=harness.device_name(), torch=torch.__version__, triton=triton.__version__)
    shapes = sweep_shapes(args.quick)
    jobs = [(s, p, m) for s in shapes for m in harness.MODES for p in harness.PROVIDERS]
    n = len(jobs) + (0 if args.no_projection else len(shapes))
    rows, i, bar = [], 0, Progress(n, "sweep")
    reps = 5 if args.quick else 7
    print(f"sweep on {meta['device']}: {len(shapes)} shapes x {len(harness.PROVIDERS)} providers x "
          f"{len(harness.MODES)} modes, {reps} timed repetitions each after a warm-up "
          f"(torch.compile compiles once with dynamic shapes)")

    def row(**kw):
        return dict(op="radar_gate", dtype="float32", sweep=axis,
                    timestamp=datetime.datetime.now().isoformat(timespec="seconds"), **meta, **kw)
    measured, proj = {}, {}  # a shape in both sweeps is measured once and plotted in both
    for (axis, T, K, D, r) in shapes:
        for mode in harness.MODES:
            xs = harness.make(T, K, D, r, grad=(mode == "forward_backward"))
            # repetitions interleaved over the providers (round robin), so that a slow phase
            # of the machine hits all of them alike
            runs = {p: harness.step(p, mode, xs) for p in harness.PROVIDERS
                    if (p, mode, T, K, D) not in measured}
            for p, run in runs.items():
                bar.update(i, f"warm-up {p} {mode} T={T} K={K} D={D}")
                harness.times_ms(run, reps=1)
            for rep in range(reps if runs else 0):
                for p, run in runs.items():
                    measured.setdefault((p, mode, T, K, D), []).extend(
                        harness.times_ms(run, reps=1, warmup=0))
            for prov in harness.PROVIDERS:
                times = sorted(measured[(prov, mode, T, K, D)])
                rows.append(row(provider=prov, mode=mode, T=T, K=K, D=D, r=r, metric="ms",
                                value=f"{times[len(times) // 2]:.4f}", lo=f"{times[0]:.4f}",
                                hi=f"{times[-1]:.4f}", reps=len(times)))
                i += 1
        if not args.no_projection:
            bar.update(i, f"projecting K={K} D={D}")
            if (T, K, D) not in proj:
                proj[(T, K, D)] = projected(T, K, D, r)
            for (prov, mode), v in proj[(T, K, D)].items():
                rows.append(row(provider=prov, mode=mode, T=T, K=K, D=D, r=r,
                                metric="projected_us", value=f"{v:.1f}"))
            i += 1
    bar.update(n, "done")
    csv_path = os.path.join(args.out, "sweep.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS + ["sweep"])
        w.writeheader()
        w.writerows(rows)
    pngs = plot(rows, args.out)
    print(f"wrote {csv_path} and {', '.join(os.path.basename(p) for p in pngs)} in {args.out}")
    # short table
    print(f"\nmedian ms on this CPU\n{'shape':26s} {'mode':17s} "
          + " ".join(f"{p:>14s}" for p in harness.PROVIDERS))
    for (axis, T, K, D, r) in shapes:
        for mode in harness.MODES:
            vals = {row["provider"]: row["value"] for row in rows if row["metric"] == "ms"
                    and row["mode"] == mode and (row["T"], row["K"], row["D"]) == (T, K, D)
                    and row["sweep"] == axis}
            print(f"{f'T={T} K={K} D={D}':26s} {mode:17s} " +
                  " ".join(f"{float(vals[p]):12.1f}ms" for p in harness.PROVIDERS))


if __name__ == "__main__":
    main()
