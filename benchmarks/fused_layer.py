"""One RadarGate-LoRA layer on CPU: what it saves for backward and how long a training step takes,
fused (radar_gate_lora) vs materialized (expert outputs, then radar_gate) vs plain LoRA.

    python benchmarks/fused_layer.py [--T 2048 --d 1024 --rank 8] [--repeats 5] [--json out.json]

Shape as in the issue: T tokens, in = out = d, LoRA rank 8, gate rank 8, fp32, non-zero lora_B and
rot_up, an input that requires grad (a layer inside a network). Saved for backward: unique storages
packed by ``saved_tensors_hooks`` during one forward (radargate_kernels.memory.saved_bytes),
parameters included, as in the issue's table. Time: median of ``--repeats`` forward+backward
passes after one warm-up, ``time.perf_counter`` (the materialized layer's op runs radar_gate's
CPU path: with autograd, the cache-blocked eager path).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from radargate_kernels.memory import saved_bytes  # noqa: E402
from radargate_kernels.nn import RadarGateLoRALinear  # noqa: E402

SETTINGS = [(8, None), (8, 2), (40, None)]  # (E, top_k)


def _time(step, repeats):
    ts = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:]) * 1e3


def measure(T=2048, d=1024, rank=8, repeats=5):
    torch.manual_seed(0)
    x = torch.randn(T, d, requires_grad=True)
    base = nn.Linear(d, d)
    for p in base.parameters():
        p.requires_grad_(False)
    lora_a, lora_b = nn.Linear(d, rank, bias=False), nn.Linear(rank, d, bias=False)
    nn.init.normal_(lora_b.weight)

    def plain():
        return base(x) + 2.0 * lora_b(lora_a(x))
    ps = list(base.parameters()) + list(lora_a.parameters()) + list(lora_b.parameters())
    rows = [dict(layer="plain LoRA (PEFT-style)", E=1, top_k=None, rotation=False, fused=None,
                 saved=saved_bytes(plain, ps),
                 ms=_time(lambda: plain().square().mean().backward(), repeats))]
    for E, top_k in SETTINGS:
        for rotation in (True, False):
            for fused in (True, False):
                layer = RadarGateLoRALinear(base, num_experts=E, rank=rank, top_k=top_k,
                                            gate_rank=8, rotation=rotation, fused=fused)
                with torch.no_grad():
                    layer.lora_B.normal_()
                    if rotation:
                        layer.gate.rot_up.normal_()
                rows.append(dict(layer="RadarGate" if rotation else "weighted sum", E=E,
                                 top_k=top_k, rotation=rotation, fused=fused,
                                 saved=saved_bytes(lambda: layer(x), list(layer.parameters())),
                                 ms=_time(lambda: layer(x).square().mean().backward(), repeats)))
    return dict(T=T, d=d, rank=rank, rows=rows)


def report(res):
    plain = res["rows"][0]
    mib = 2 ** 20
    out = [f"T = {res['T']}, in = out = {res['d']}, rank {res['rank']}, fp32, CPU "
           f"({torch.get_num_threads()} threads, torch {torch.__version__})", "",
           "| layer | experts | path | saved for backward (MiB) | x plain LoRA | "
           "fwd+bwd (ms) | x plain LoRA |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        ex = "-" if r["fused"] is None else (f"E={r['E']} " + (f"top-{r['top_k']}"
                                                                 if r["top_k"] else "dense"))
        path = "-" if r["fused"] is None else ("fused" if r["fused"] else "materialized")
        out.append(f"| {r['layer']} | {ex} | {path} | {r['saved']['total'] / mib:.1f} | "
                   f"{r['saved']['total'] / plain['saved']['total']:.2f}x | {r['ms']:.0f} | "
                   f"{r['ms'] / plain['ms']:.1f}x |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this times the real CPU paths")
    res = measure(a.T, a.d, a.rank, a.repeats)
    print(report(res))
    if a.json:  # (as cost_report.emit does)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
