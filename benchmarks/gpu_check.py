"""The GPU lane: kernel-vs-reference checks and timings on a CUDA device, one command.

    python -m benchmarks.gpu_check [--quick] [--out results/gpu_check.md]

1. Correctness: the test suite's kernel-vs-reference grids (tests/test_kernel_vs_reference.py
   CASES for radar_gate, tests/test_lora.py CASES for radar_gate_lora) in every dtype, forward
   and every gradient, with the kernels on the device and the float64 truth on the CPU, under
   the same per-dtype tolerance table (tests/tolerances.py).
2. Timing: ``triton.testing.do_bench`` (median ms) of radar_gate's kernels against the naive
   reference, the compiled reference and plain weighted-sum gating (K = 8 and K = 40), the
   single-pass forward's token groups against one token block per program (T = 32 and 4096),
   and the fused layer against the materialized one.
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
    rows += _group_timings(log, gen)
    # fused layer vs materialized: T tokens, in = out = D, E = 8 experts of rank 8, dense
    E, rk = 8, 8
    x = torch.randn(T, D, generator=gen).to(dev, dt).requires_grad_(True)
    LA = (torch.randn(E, D, rk, generator=gen) / D ** 0.5).to(dev, dt).requires_grad_(True)
    LB = (0.1 * torch.randn(E, rk, D, generator=gen)).to(dev, dt).requires_grad_(True)
    w = torch.softmax(torch.randn(T, E, generator=gen), -1).to(dev, dt)

    def fused():
        return radar_gate_lora(x, LA, LB, w, A, B, backend="triton")

    def materialized():
        Vm = torch.einsum("ter,ero->teo", torch.einsum("ti,eir->ter", x, LA), LB)
        return radar_gate(Vm, w, A, B, backend="triton")
    for name, f in (("fused layer", fused), ("materialized layer", materialized)):
        fwd = triton.testing.do_bench(f)
        fb = triton.testing.do_bench(lambda: torch.autograd.grad(f(), (x, LA, LB), dy))
        rows.append((f"LoRA layer T={T} in=out={D} E={E} r={rk} bf16", name, fwd, fb))
        log(f"  {name:28s} forward {fwd:8.3f} ms   forward+backward {fb:8.3f} ms")
    return rows


def _group_timings(log, gen):
    """The single-pass forward with its token groups (A, B, angle_bias loaded once per group of
    token blocks: issue #11's forward target) against one block per program, at a small and a
    large T: the groups trade parallelism at small T for fewer parameter reads."""
    import torch
    import triton.testing
    from radargate_kernels import radar_gate
    from radargate_kernels.kernels import launch as L
    dev, dt, K, D, r, E = "cuda", torch.bfloat16, 8, 512, 8, 16
    rows, rule = [], L.MAX_GROUP
    for T in (32, 4096):
        V = torch.randn(T, K, D, generator=gen).to(dev, dt).requires_grad_(True)
        g = torch.softmax(torch.randn(T, K, generator=gen), -1).to(dev, dt).requires_grad_(True)
        A = (torch.randn(D, r, generator=gen) / D ** 0.5).to(dev, dt)
        B = (torch.randn(r, D // 2, generator=gen) / r ** 0.5).to(dev, dt)
        beta = (0.1 * torch.randn(E, D // 2, generator=gen)).to(dev, dt)
        ids = torch.randint(0, E, (T, K), generator=gen).to(dev)
        dy = torch.randn(T, D, device=dev, dtype=dt)

        def f():
            return radar_gate(V, g, A, B, angle_bias=beta, expert_ids=ids, backend="triton")
        for name, cap in (("token groups (launch rule)", rule), ("one token block per program", 1)):
            L.MAX_GROUP = cap
            try:
                fwd = triton.testing.do_bench(f)
                fb = triton.testing.do_bench(lambda: torch.autograd.grad(f(), (V, g), dy))
            finally:
                L.MAX_GROUP = rule
            rows.append((f"single-pass forward T={T} K={K} D={D} r={r} E={E} bf16", name, fwd, fb))
            log(f"  {name:28s} forward {fwd:8.3f} ms   forward+backward {fb:8.3f} ms")
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
        print("timings (triton.testing.do_bench)")
        rows = timings(print)
    report(args.out, meta, results, rows, time.time() - t0)
    n_fail = sum(1 for _, e in results if e)
    print(f"{len(results) - n_fail}/{len(results)} checks passed; report: {args.out}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
