"""Ahead-of-time compile report: every kernel launch the launcher can plan, compiled for a GPU.

    python -m benchmarks.compile_report [--arch 80 90] [--quick] [--jobs 2]

No GPU needed: a stand-in driver makes ``kernel.warmup`` compile for the requested arch with the
ptxas shipped in the triton wheel, with the very arguments the launcher builds
(``launch.plan_forward`` / ``plan_backward`` / ``plan_stream_forward`` / ``plan_stream_backward``),
so the specialisation (integers equal to 1, divisibility by 16, constexprs) is the one a real
launch gets. Each distinct compilation is done once, from an empty Triton cache (a fresh
temporary TRITON_CACHE_DIR per run: the report is reproducible). Printed per compilation:
registers, spill bytes (the ``ptxas -v`` log of Triton's own compilation), shared memory against the per-block limit, and what
``tl.sin``/``tl.cos`` became in the PTX (``sin.approx`` on the special-function units, or
libdevice's ``__nv_sinf`` routine). Exit status 1 if anything fails to compile, spills, exceeds
the shared memory limit or cannot launch. Must not run with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

SMEM_LIMIT = {80: 166912, 90: 232448}  # per-block opt-in limits (CUDA programming guide)
REGISTER_FILE = 65536  # 32-bit registers per block, sm_80 and sm_90
DTYPES = ("bfloat16", "float16", "float32")  # fp64 runs the PyTorch path on CUDA (ops.py)
T_REPR = 64  # tokens of the representative launch (T is never specialised)

# radar_gate (K, D, r, E): E experts with angle_bias and ids, 0 ids without angle_bias (masked
# slots), None neither. K 1..64, D 2..4096, r 1..32, E up to 128
OP_FULL = [(K, D, r, E) for K in (1, 2, 3, 8, 13, 32, 40, 64) for D in (2, 130, 4096)
           for r in (1, 8, 17, 32) for E in (None, 0, 128)]  # r <= 32 (launch.MAX_OP_RANK)
OP_QUICK = [(8, 4096, 8, 8), (1, 2, 1, None), (64, 130, 32, 128), (32, 130, 32, 128),
            (13, 4096, 17, None), (8, 4096, 8, 0)]
# the fused layer (K, out, r, rg, E or None for no ids): r, rg <= 64, any K and E
LORA_FULL = [(K, out, r, rg, E) for K in (1, 8, 40) for out in (2, 4096) for r in (1, 16, 32, 64)
             for rg in (1, 16, 32, 64) for E in (None, 64)]
LORA_QUICK = [(8, 4096, 16, 16, None), (2, 4096, 16, 16, 8), (40, 4096, 16, 16, None),
              (3, 2, 64, 64, 128), (3, 2, 64, 16, 128), (3, 2, 32, 32, 128), (1, 130, 1, 1, None)]


def lora_shape_runs(shape, dtype_name):
    """Whether the fused layer plans Triton launches for this shape and dtype (lora.py's
    _resolve_backend: fp16/fp32 take r, rg <= 32 or one of them <= 16)."""
    r, rg = shape[2], shape[3]
    return dtype_name == "bfloat16" or max(r, rg) <= 32 or min(r, rg) <= 16


class StandInDriver:
    """Duck-typed CUDA driver for ahead-of-time compilation (triton 3.9 internal API)."""

    def __init__(self, arch):
        import torch
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)
        self._torch = torch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return self._torch.device("cpu")

    def is_active(self):
        return True


def ptxas_usage(log: str):
    """(registers, spill bytes) from the ptxas -v log of Triton's own compilation."""
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise RuntimeError(f"no ptxas log: {log[-300:]}")
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return int(regs.group(1)), spills


def compile_logged(launch):
    """launch.kernel.warmup (a real compilation, never from a cache) -> (compiled, ptxas log)."""
    import contextlib
    import io
    import triton
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    # JITFunction keeps compiled kernels per device in memory, not per target: a stand-in
    # driver for another arch would get the other arch's binary from it
    launch.kernel.device_caches.clear()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
    return compiled, buf.getvalue()


def trig_in_ptx(ptx: str) -> str:
    """What sin/cos became: 'sfu' (sin/cos.approx), 'libdevice' (__nv_sinf's FMA routine with its
    slow path), 'none'."""
    approx = "sin.approx" in ptx or "cos.approx" in ptx
    routine = "__nv_sinf" in ptx or "__nv_cosf" in ptx or "__internal_trig_reduction" in ptx
    return "libdevice" if routine else ("sfu" if approx else "none")


def planned_launches(family, shape, dtype_name):
    """The launches the launcher plans for one shape class (small CPU tensors, T = T_REPR)."""
    import torch
    from radargate_kernels.kernels import launch as L
    dt = getattr(torch, dtype_name)
    T = T_REPR
    if family == "op":
        K, D, r, E = shape
        V, g = torch.empty((T, K, D), dtype=dt), torch.empty((T, K), dtype=dt)
        A, B = torch.empty((D, r), dtype=dt), torch.empty((r, D // 2), dtype=dt)
        beta = torch.empty((E, D // 2), dtype=dt) if E else None
        ids = torch.zeros((T, K), dtype=torch.int64) if E is not None else None
        fwd, (y, n, C, rho, z, d) = L.plan_forward(V, g, A, B, beta, ids, 1.0, 1e-6)
        out = list(fwd)
        for need in ((True, True, True), (False, True, False), (True, False, False)):
            out += L.plan_backward(y, V, g, A, B, beta, ids, n, C, rho, z, d, 1.0, 1e-6,
                                   need)[0]
        return out
    K, D, r, rg, E = shape
    Ex = E or K
    s_all = torch.empty((T, Ex, r)), torch.empty((T, K, rg))
    g, lb = torch.empty((T, K), dtype=dt), torch.empty((Ex, r, D), dtype=dt)
    U, beta = torch.empty((rg, D // 2), dtype=dt), torch.empty((Ex, D // 2), dtype=dt)
    ids = torch.zeros((T, K), dtype=torch.int64) if E else None
    out = L.plan_stream_forward(s_all[0], g, s_all[1], ids, lb, U, beta, dt)[0]
    for need in ((True, True, True), (False, True, False), (True, False, False)):
        out += L.plan_stream_backward(torch.empty((T, D), dtype=dt), s_all[0], g, s_all[1], ids,
                                      lb, U, beta, need)[0]
    if L.relation_fits(K, Ex, r):
        P, Q = torch.empty((Ex, r, Ex, r)), torch.empty((Ex, r, rg))
        out += L.plan_lora_relation(s_all[0], ids, P, Q, 1.0, 1e-6, dt)[0]
        split = torch.empty((T, 2 * Ex * r), dtype=dt) if dt == torch.bfloat16 else None
        out += L.plan_lora_relation_backward(s_all[0], ids, P, Q, torch.empty((T, K, rg)),
                                             torch.empty((T, K, r)), 1.0, 1e-6, dt, 1.0,
                                             split)[0]
    return out


def specialisation(launch):
    """What decides a compilation: kernel, constexprs, pointer dtypes, integers equal to 1."""
    import torch
    args = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else (a == 1 if isinstance(a, int)
                                                                   else type(a).__name__)
                 for a in launch.args)
    return (launch.kernel.fn.__name__, tuple(sorted(launch.meta.items())), args)


def compile_job(job):
    """Compile one planned launch; returns the job with regs, spills, shared, trig, error."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_report must run without TRITON_INTERPRET=1")
    import triton
    triton.runtime.driver.set_active(StandInDriver(job["arch"]))
    t0 = time.time()
    out = dict(job)
    try:
        launch = planned_launches(job["family"], job["shape"], job["dtype"])[job["index"]]
        compiled, log = compile_logged(launch)
        ptx = compiled.asm["ptx"]
        regs, spills = ptxas_usage(log)
        out.update(regs=regs, spills=spills, shared=int(compiled.metadata.shared),
                   warps=launch.meta["num_warps"], trig=trig_in_ptx(ptx), error=None)
    except Exception as exc:  # reported, and makes the exit status non-zero
        out.update(regs=None, spills=None, shared=None, warps=None, trig="?",
                   error=f"{type(exc).__name__}: {str(exc)[:300]}")
    out["seconds"] = time.time() - t0
    return out


def plan_jobs(quick: bool, archs, dtypes=DTYPES, families=("op", "lora")):
    """One job per distinct compilation, with the first shape that plans it."""
    from radargate_kernels.kernels.launch import precision
    jobs, seen = [], set()
    for arch in archs:
        for dtype in dtypes:
            for family in families:
                shapes = (OP_QUICK if quick else OP_FULL) if family == "op" else \
                    (LORA_QUICK if quick else LORA_FULL)
                for shape in shapes:
                    if family == "lora" and not lora_shape_runs(shape, dtype):
                        continue
                    for i, launch in enumerate(planned_launches(family, shape, dtype)):
                        key = (arch, specialisation(launch))
                        if key in seen:
                            continue
                        seen.add(key)
                        m = launch.meta
                        fast = precision(__import__("torch").__dict__[dtype])[2]
                        jobs.append(dict(arch=arch, dtype=dtype, family=family, shape=shape,
                                         index=i, kernel=launch.kernel.fn.__name__, fast=fast,
                                         config=" ".join(f"{k}={m[k]}" for k in
                                                         ("BT", "SK", "BH", "RP", "RGP", "FE",
                                                          "F", "KP") if k in m)))
    return jobs


def check(row):
    """Problems of one compilation (empty when it passes)."""
    if row["error"]:
        return ["compile failed: " + row["error"]]
    problems = []
    if row["shared"] > SMEM_LIMIT[row["arch"]]:
        problems.append(f"shared memory {row['shared']} > limit {SMEM_LIMIT[row['arch']]}")
    if row["spills"]:
        problems.append(f"spills {row['spills']} bytes")
    if row["regs"] * 32 * row["warps"] > REGISTER_FILE:
        problems.append(f"{row['regs']} registers x {32 * row['warps']} threads > "
                        f"{REGISTER_FILE}")
    uses_trig = row["kernel"].startswith("stream_")
    if uses_trig and row["trig"] != ("sfu" if row["fast"] else "libdevice"):
        problems.append(f"sin/cos compiled to {row['trig']}")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--quick", action="store_true", help="the benchmark shapes and the extremes")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--family", default="all", choices=["all", "op", "lora"])
    args = ap.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="radargate-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache  # empty cache: every compilation really runs
    families = ("op", "lora") if args.family == "all" else (args.family,)
    jobs = plan_jobs(args.quick, args.arch, args.dtypes, families)
    print(f"compiling {len(jobs)} distinct (arch, kernel, specialisation) combinations with "
          f"{args.jobs} process(es), Triton cache {cache} (empty)", flush=True)
    print(f"{'arch':>4} {'dtype':8} {'kernel':24} {'config':40} {'warps':>5} {'regs':>4} "
          f"{'spill':>5} {'smem':>7} {'trig':>9}  shape  status")
    rows, failed = [], 0
    # spawned, not forked, workers: a fork of this process (torch and triton loaded, the pool's
    # own threads running) left both workers blocked on an inherited lock once (seen 2026-12-05)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        for row in pool.map(compile_job, jobs):
            rows.append(row)
            probs = check(row)
            failed += bool(probs)
            fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
            print(f"{row['arch']:>4} {row['dtype']:8} {row['kernel']:24} {row['config']:40} "
                  f"{fmt(row['warps']):>5} {fmt(row['regs']):>4} {fmt(row['spills']):>5} "
                  f"{fmt(row['shared']):>7} {row['trig']:>9}  {row['shape']}  "
                  f"{'ok' if not probs else 'FAIL: ' + '; '.join(probs)}", flush=True)
    ok = [r for r in rows if not r["error"]]
    if ok:
        print(f"summary: {len(rows)} compiled, {failed} failed; max registers "
              f"{max(r['regs'] for r in ok)}, max spill bytes {max(r['spills'] for r in ok)}, "
              f"max shared {max(r['shared'] for r in ok)} bytes; "
              f"{sum(r['seconds'] for r in rows):.0f} s of compile time")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
