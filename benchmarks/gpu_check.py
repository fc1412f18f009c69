"""The GPU lane: kernel-vs-reference checks and timings on a CUDA device, one command.

    python -m benchmarks.gpu_check [--quick] [--out results/gpu_check.md]

1. Correctness: the test suite's kernel-vs-reference grids (tests/test_kernel_vs_reference.py
   CASES for radar_gate, tests/test_lora.py CASES for radar_gate_lora) in every dtype, forward
   and every gradient, with the kernels on the device and the float64 truth on the CPU, under
   the same per-dtype tolerance table (tests/tolerances.py).
2. Timing: ``triton.testing.do_bench`` (median ms) of radar_gate's kernels against the naive
   reference, the compiled reference and plain weighted-sum gating (K = 8 and K = 40), and the
   fused layer against weighted-sum gating and the materialized path at the roofline's shapes,
   printed next to benchmarks/roofline.py's projection for them (docs/benchmarks/roofline.json).
3. A markdown report (``--out``) with the device, the versions, every failure and the timings.

Without CUDA it prints why and exits 0 (nothing to check on this machine). ``--device cpu``
runs part 1 on the CPU with the kernels in the Triton interpreter (a check of the lane itself;
tests/test_reports.py runs it in CI). Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _on(device, fn, **fixed):
    """fn evaluated on ``device``; inputs and output cross devices inside autograd, so the
    test helpers (which build CPU tensors and compare on the CPU) work unchanged."""
    import torch

    def run(**kw):
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        return fn(**moved, **fixed).cpu()
    return run


def correctness(device, quick, log):
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_kernel_vs_reference as kvr
    import test_lora as tl
    from helpers import check_against_reference, make_problem
    from lora_helpers import check_lora_against_reference
    from radargate_kernels import radar_gate, radar_gate_lora

    dtypes = (torch.float32,) if quick else kvr.DTYPES
    op_cases = kvr.CASES[:4] if quick else kvr.CASES
    lora_cases = tl.CASES[:3] if quick else tl.CASES
    results = []
    for dtype in dtypes:
        for case in op_cases:
            T, K, D, r, bias, ids = case
            p = make_problem(T, K, D, r, dtype=dtype, bias=bias, ids=ids, seed=T + K + D)
            dy = torch.randn(T, D, generator=torch.Generator().manual_seed(D),
                             dtype=torch.float64).to(dtype)
            name = f"radar_gate {kvr._id(case)} {str(dtype).split('.')[-1]}"
            results.append(_run(name, lambda: check_against_reference(
                _on(device, radar_gate, backend="triton"), p, dy, T + D), log))
        for case in lora_cases:
            prob, dy = tl._problem(case, dtype)
            name = f"radar_gate_lora {tl._id(case)} {str(dtype).split('.')[-1]}"
            results.append(_run(name, lambda: check_lora_against_reference(
                prob, dy, fn=_on(device, radar_gate_lora, backend="triton")), log))
    return results


def determinism(device, log):
    """Bitwise-equal outputs and gradients over two runs (no atomics): a property only a GPU's
    parallel programs can break."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import make_problem, run_with_grads
    from lora_helpers import lora_run, make_lora_problem
    from radargate_kernels import radar_gate, radar_gate_lora
    results = []
    for ids in (False, True):
        p = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
             for k, v in make_problem(512, 8, 256, 8, bias=True, ids=ids, seed=1).items()}
        dy = torch.randn(512, 256, device=device)

        def op():
            a, b = (run_with_grads(radar_gate, p, dy, backend="triton") for _ in range(2))
            assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
        results.append(_run(f"radar_gate bitwise deterministic (ids={ids})", op, log))
        q = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
             for k, v in make_lora_problem(512, 3 if ids else 8, 64, 256, 8, 8, ids=ids,
                                           bias=True, seed=2).items()}

        def lora():
            a, b = (lora_run(radar_gate_lora, q, dy, backend="triton") for _ in range(2))
            assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
        results.append(_run(f"radar_gate_lora bitwise deterministic (ids={ids})", lora, log))
    return results


def _run(name, check, log):
    try:
        check()
        log(f"  ok    {name}")
        return name, None
    except Exception:  # a failed comparison or a launch error: both are findings
        err = traceback.format_exc(limit=2).strip().splitlines()[-1]
        log(f"  FAIL  {name}: {err}")
        return name, err


def timings(log):
    import torch
    import triton.testing
    from radargate_kernels import radar_gate, radar_gate_lora, radar_gate_reference
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    rows = []
    # the paper's 40 experts (the WIDE launch plan, K > 32), then the benchmark shape, whose T,
    # D, rot_down, rot_up and dy the layer timings below reuse
    for T, K, D, r in ((1024, 40, 4096, 8), (4096, 8, 4096, 8)):
        V = torch.randn(T, K, D, generator=gen).to(dev, dt).requires_grad_(True)
        g = torch.softmax(torch.randn(T, K, generator=gen), -1).to(dev, dt).requires_grad_(True)
        A = (torch.randn(D, r, generator=gen) / D ** 0.5).to(dev, dt).requires_grad_(True)
        B = (torch.randn(r, D // 2, generator=gen) / r ** 0.5).to(dev, dt).requires_grad_(True)
        compiled = torch.compile(radar_gate_reference, dynamic=False)
        providers = {
            "radargate (Triton)": lambda: radar_gate(V, g, A, B, backend="triton"),
            "naive (reference, eager)": lambda: radar_gate_reference(V, g, A, B),
            "naive_compile": lambda: compiled(V, g, A, B),
            "weighted_sum (floor)": lambda: torch.einsum("tk,tkd->td", g, V),
        }
        dy = torch.randn(T, D, device=dev, dtype=dt)
        for name, f in providers.items():
            fwd = triton.testing.do_bench(f)
            fb = triton.testing.do_bench(lambda: torch.autograd.grad(f(), (V, g), dy))
            rows.append((f"radar_gate T={T} K={K} D={D} r={r} bf16", name, fwd, fb))
            log(f"  {name:28s} forward {fwd:8.3f} ms   forward+backward {fb:8.3f} ms")
    rows += layer_timings(log, gen)
    return rows


def layer_timings(log, gen):
    """The fused layer, weighted-sum gating and the materialized path at benchmarks/roofline.py's
    shapes, measured, next to the roofline's projection for them (docs/benchmarks/roofline.json):
    the first GPU run checks the model."""
    import json
    import torch
    import triton.testing
    from benchmarks import roofline
    from radargate_kernels import radar_gate, radar_gate_lora
    path = os.path.join(ROOT, "docs", "benchmarks", "roofline.json")
    projected = json.load(open(path)) if os.path.exists(path) else {}
    rows, dev, dt = [], "cuda", torch.bfloat16
    for name, shape in roofline.SHAPES.items():
        T, d_in, d_out, E, K, r, rg, topk = shape
        p = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v)
             for k, v in roofline.problem(T, d_in, d_out, E, K, r, rg, dt, topk).items()}
        x, LA, LB = (p[k].requires_grad_(True) for k in ("x", "lora_A", "lora_B"))
        w = torch.zeros(T, E, device=dev, dtype=dt).scatter(1, p["ids"], p["g"]) \
            if topk else p["g"]

        def fused():
            return radar_gate_lora(x, LA, LB, p["g"], p["rot_down"], p["rot_up"], p["beta"],
                                   p["ids"], backend="triton")

        def weighted():
            s = torch.einsum("ti,eir->ter", x, LA) * w.unsqueeze(-1)
            return s.reshape(T, E * r) @ LB.reshape(E * r, d_out)

        def materialized():
            V = torch.einsum("ter,ero->teo", torch.einsum("ti,eir->ter", x, LA), LB)
            if topk:
                V = torch.gather(V, 1, p["ids"].unsqueeze(-1).expand(-1, -1, d_out))
            return radar_gate(V, p["g"], p["rot_down"], p["rot_up"], p["beta"], p["ids"],
                              backend="triton")
        for label, f in (("fused", fused), ("weighted_sum", weighted),
                         ("materialized", materialized)):
            fwd = triton.testing.do_bench(f)
            fb = triton.testing.do_bench(lambda: torch.autograd.grad(f(), (x, LA, LB), p["dy"]))
            proj = projected.get(name, {}).get(label, {})
            pr = (f" (projected {proj['fwd_us'] / 1e3:.3f} / "
                  f"{(proj['fwd_us'] + proj['bwd_us']) / 1e3:.3f} ms)" if proj else "")
            rows.append((f"{name} ({label}) bf16", label + pr, fwd, fb))
            log(f"  {name} {label:14s} forward {fwd:8.3f} ms   forward+backward {fb:8.3f} ms{pr}")
    return rows


def report(path, meta, results, rows, seconds):
    failed = [(n, e) for n, e in results if e]
    lines = [f"# gpu_check report ({meta['device']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{seconds:.0f} s", "",
             f"## Kernels vs reference: {len(results) - len(failed)} / {len(results)} passed", ""]
    lines += [f"- FAIL {n}: `{e}`" for n, e in failed] or ["All passed."]
    if rows:
        lines += ["", "## Timings (triton.testing.do_bench, median ms, measured on this device)",
                  "", "| shape | provider | forward | forward + backward |", "| --- | --- | --- | --- |"]
        lines += [f"| {s} | {p} | {f:.3f} | {b:.3f} |" for s, p, f, b in rows]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="a few shapes, fp32 only")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_check.md"))
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    import torch
    import triton
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped -- no CUDA device here (torch.cuda.is_available() is False, "
              f"torch {torch.__version__}). Run it on a machine with an NVIDIA GPU; "
              "`--device cpu` checks the lane itself in the Triton interpreter.")
        return 0
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check --device cpu needs TRITON_INTERPRET=1 (or unset)")
        return 2
    meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else
                "cpu (Triton interpreter)", torch=torch.__version__, triton=triton.__version__)
    t0 = time.time()
    print(f"gpu_check on {meta['device']}: kernels vs reference")
    results = correctness(args.device, args.quick, print)
    rows = []
    if args.device == "cuda":
        results += determinism(args.device, print)
        print("timings (triton.testing.do_bench)")
        rows = timings(print)
    report(args.out, meta, results, rows, time.time() - t0)
    n_fail = sum(1 for _, e in results if e)
    print(f"{len(results) - n_fail}/{len(results)} checks passed; report: {args.out}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
