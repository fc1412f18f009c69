"""Sweep: time every provider of harness.py against K and against D, forward and forward+backward,
count bytes per token (fused kernels in the Triton interpreter, naive eager by aten dispatch), and
write CSV rows plus PNG plots.

    python benchmarks/sweep.py [--quick] [--out results]

CSV columns: op, provider, mode, T, K, D, r, dtype, metric, value, device, torch, triton, timestamp.
metric "ms" is a median wall time measured here; "bytes_per_token" is counted (device-independent)
at a small T by ``benchmarks.cost_report`` in a subprocess (the interpreter must not be set
in the timing process).
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
FIELDS = ["op", "provider", "mode", "T", "K", "D", "r", "dtype", "metric", "value", "device",
          "torch", "triton", "timestamp"]


def sweep_shapes(quick):
    T, r = (512, 8) if quick else (2048, 8)
    ks = (1, 2, 4, 8, 16) if quick else (1, 2, 4, 8, 16, 32)
    ds = (256, 512, 1024) if quick else (256, 512, 1024, 2048, 4096)
    by_k = [("K", T, K, 1024, r) for K in ks]
    by_d = [("D", T, 8, D, r) for D in ds]
    return by_k + by_d


def count_bytes(K, D, r, T_count):
    """Bytes per token for fused and naive via cost_report in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "c.json")
        subprocess.run([sys.executable, "-m", "benchmarks.cost_report", "--T", str(T_count),
                        "--K", str(K), "--D", str(D), "--r", str(r), "--dtype", "float32",
                        "--no-ids", "--json", out], cwd=ROOT, check=True, capture_output=True)
        with open(out) as f:
            res = json.load(f)
    per = {}
    for mode in ("forward", "backward"):
        per[("radargate", mode)] = res["fused"][mode]["dram_model_bytes"] / T_count
        per[("naive", mode)] = res["naive"][mode]["bytes"] / T_count
        per[("minimum", mode)] = res["minimum"][mode] / T_count
    return per


def plot(rows, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for axis in ("K", "D"):
        for metric, ylabel in (("ms", "median time [ms] (measured)"),
                               ("bytes_per_token", "bytes per token (counted)")):
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, mode in zip(axes, ("forward", "forward_backward" if metric == "ms"
                                       else "backward")):
                sel = [r for r in rows if r["sweep"] == axis and r["metric"] == metric
                       and r["mode"] == mode]
                for prov in sorted({r["provider"] for r in sel}):
                    pts = sorted((int(r[axis]), float(r["value"])) for r in sel
                                 if r["provider"] == prov)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{mode} vs {axis}")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
            dev = rows[0]["device"] if rows else ""
            fig.suptitle(f"RadarGate {metric} vs {axis} -- {dev}", fontsize=9)
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
    ap.add_argument("--no-bytes", action="store_true", help="skip the byte counting")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import triton
    meta = dict(device=harness.device_name(), torch=torch.__version__, triton=triton.__version__)
    shapes = sweep_shapes(args.quick)
    jobs = [(s, p, m) for s in shapes for m in harness.MODES for p in harness.PROVIDERS]
    n = len(jobs) + (0 if args.no_bytes else len(shapes))
    rows, i, bar = [], 0, Progress(n, "sweep")
    print(f"sweep on {meta['device']}: {len(shapes)} shapes x {len(harness.PROVIDERS)} providers x "
          f"{len(harness.MODES)} modes (torch.compile compiles once with dynamic shapes)")
    for (axis, T, K, D, r) in shapes:
        for mode in harness.MODES:
            xs = harness.make(T, K, D, r, grad=(mode == "forward_backward"))
            for prov in harness.PROVIDERS:
                bar.update(i, f"{prov} {mode} T={T} K={K} D={D}")
                ms = harness.time_ms(harness.step(prov, mode, xs), reps=3 if args.quick else 5)
                rows.append(dict(op="radar_gate", provider=prov, mode=mode, T=T, K=K, D=D, r=r,
                                 dtype="float32", metric="ms", value=f"{ms:.4f}", sweep=axis,
                                 timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                                 **meta))
                i += 1
        if not args.no_bytes:
            bar.update(i, f"counting bytes K={K} D={D}")
            per = count_bytes(K, D, r, T_count=16)
            for (prov, mode), v in per.items():
                rows.append(dict(op="radar_gate", provider=prov, mode=mode, T=16, K=K, D=D, r=r,
                                 dtype="float32", metric="bytes_per_token", value=f"{v:.1f}",
                                 sweep=axis, timestamp=datetime.datetime.now().isoformat(
                                     timespec="seconds"), **meta))
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
    print(f"\n{'shape':24s} {'mode':17s} " + " ".join(f"{p:>13s}" for p in harness.PROVIDERS))
    for (axis, T, K, D, r) in shapes:
        for mode in harness.MODES:
            vals = {row["provider"]: row["value"] for row in rows if row["metric"] == "ms"
                    and row["mode"] == mode and (row["T"], row["K"], row["D"]) == (T, K, D)
                    and row["sweep"] == axis}
            print(f"T={T} K={K} D={D:<6} {mode:17s} " +
                  " ".join(f"{float(vals[p]):11.1f}ms" for p in harness.PROVIDERS))


if __name__ == "__main__":
    main()
