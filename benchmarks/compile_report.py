"""Ahead-of-time compile report: every kernel at every configuration the launcher can choose.

    python -m benchmarks.compile_report [--arch 80 90] [--quick] [--jobs 2]

No GPU needed: a stand-in driver makes ``kernel.warmup`` compile for the requested arch with the
ptxas shipped in the triton wheel, using the argument list the real launcher builds
(``launch.plan_forward`` / ``plan_backward``), so the specialisation (integer and pointer
divisibility, constexprs) is the one a real launch gets. For each (kernel, dtype, config) it prints
registers, spill bytes (from ``ptxas -v``), shared memory and the shared-memory limit check.
Exit status 1 if any configuration fails to compile, exceeds the shared-memory limit or spills
(the launcher has no autotuning: every configuration it can choose is a default pick).
Must not run with TRITON_INTERPRET=1 (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# per-block opt-in shared memory limits (CUDA C programming guide, compute capability table)
SMEM_LIMIT = {80: 166912, 90: 232448}
REGISTER_FILE = 65536  # 32-bit registers per block (and per SM), sm_80 and sm_90
DTYPES = ("float16", "bfloat16", "float32")

# Shape classes the kernels support (K 1..64, D 2..16384, r 1..64), chosen to hit every branch
# of pick_config; E is the number of experts in angle_bias.
FULL_K = (1, 2, 3, 4, 8, 13, 32, 40, 64)  # MAX_K = 64 (launch.py); K > 32: the WIDE plan
FULL_D = (2, 64, 130, 512, 4096, 16384)  # 512: the widest single-pass forward tile (16 x 256)
FULL_R = (1, 8, 17, 32, 64)           # MAX_RANK = 64
FULL_E = (None, 16, 128)              # None: no angle_bias (and no expert_ids); MAX_E = 128
QUICK = [  # (K, D, r, E): the benchmark shape and the extremes of the supported range
    (8, 4096, 8, 8),
    (8, 512, 8, 16),  # the widest single-pass forward
    (1, 2, 1, None),
    (32, 16384, 32, 128),
    (16, 4096, 64, 128),  # the widest rank (r <= 64 at K <= 16)
    (40, 130, 17, 64),    # K > 32: the WIDE plan (two forward stages, the chain kernel)
]
PARTIAL_NEEDS = ((True, False, False), (False, True, False), (False, False, True),
                 (False, True, True))
T_REPR = 64  # tokens in the representative launch (the kernels never specialise T, nor the
#               forward's group size or the column kernel's block count: one compilation
#               stands for every T)
# "int64 strides": expert_out laid out so that its strides exceed 2^31 (e.g. a feature-major view
# of a tensor with T*K*D >= 2^31 elements). Triton then passes those strides as i64: a different
# specialisation, compiled here for the benchmark shape in every mode (--quick included).
LARGE_STRIDES = {"stride_v_t": 2 ** 31 + 16, "stride_v_k": 2 ** 31 + 32, "stride_v_d": 2 ** 32 + 16}


# Fused-layer kernels (kernels/lora_stream.py): K and E are loops and grid axes, so only the LoRA
# rank r, the RotationGate rank rg, out (-> chunk width) and the flags shape a compilation.
# (r, rg, out, ids and angle_bias): the extremes of the supported range (r, rg <= 64).
LORA_KERNELS = ("lora_fwd_kernel", "lora_bwd_rows_kernel", "lora_bwd_params_kernel")
LORA_FULL = [(r, rg, out, flags) for r in (1, 8, 17, 64) for rg in (1, 8, 64)
             for out in (2, 64, 4096) for flags in (False, True)]
LORA_QUICK = [(8, 8, 4096, True), (64, 64, 4096, True), (1, 1, 2, False)]
LORA_K, LORA_E = 64, 128  # representative K and E of a launch (do not reach the compilation)
# The relation kernel (kernels/lora_relation.py): K, E, r, rg and ids all shape its tiles
# (KP, F = E or K padded x r padded <= 64, RP, RGP): (K, E, r, rg, ids) covering the range
# lora_launch.relation_fits allows (each one asserted to fit).
RELATION_FULL = [(1, 1, 1, 1, False), (1, 1, 64, 64, False), (8, 8, 8, 8, False),
                 (16, 16, 4, 64, False), (2, 2, 32, 8, False), (4, 4, 16, 8, False),
                 (32, 32, 1, 8, False), (32, 32, 2, 64, False), (2, 8, 8, 8, True),
                 (2, 4, 16, 64, True), (32, 64, 1, 8, True), (8, 2, 32, 1, True),
                 (2, 2, 32, 64, True), (32, 8, 8, 64, True), (16, 8, 8, 64, True),
                 (8, 8, 8, 64, True)]
RELATION_QUICK = [(8, 8, 8, 8, False), (32, 8, 8, 64, True), (2, 4, 16, 64, True)]
# P, Q and their gradients (lora_factors_kernel, lora_factors_bwd_kernel): (E, r, rg) with
# E r <= 64 (where the relation kernel runs), out = 4096.
FACTORS_FULL = [(1, 1, 1), (8, 8, 8), (8, 8, 64), (2, 32, 64), (4, 16, 8)]
FACTORS_QUICK = [(8, 8, 8), (2, 32, 64)]
FACTORS_KERNELS = ("lora_factors_kernel", "lora_factors_bwd_kernel")
# The down-projection GEMMs (kernels/lora_down.py): (E, r) -> RP and the column block.
DOWN_FULL = [(1, 1), (8, 8), (3, 17), (2, 32), (128, 64)]  # (2, 32): dA kernel with dx
DOWN_QUICK = [(8, 8), (128, 64)]
DOWN_KERNELS = ("lora_down_fwd_kernel", "lora_down_dx_kernel", "lora_down_da_kernel")


def shape_classes(quick: bool):
    if quick:
        return QUICK
    out = []
    for K in FULL_K:
        for D in FULL_D:
            for r in FULL_R:
                for E in FULL_E:
                    out.append((K, D, r, None if E is None else max(E, K)))
    # fewer experts than slots (ids repeat experts): the angle_bias tile paths at K > E
    return out + [(40, 4096, 8, 16), (64, 130, 64, 16), (32, 2, 64, 16)]


def _config_key(kernel, cfg, has_beta):
    # the fields each kernel's compilation depends on (others do not reach it)
    if kernel == "radargate_bwd_columns_kernel":
        return (cfg.KP, cfg.BT_COLS, cfg.RP, cfg.BH_COLS, cfg.BH_DV, cfg.EP if has_beta else 0,
                cfg.WARPS_COLS)
    if kernel == "radargate_bwd_rows_kernel":
        return (cfg.KP, cfg.BT, cfg.RP, cfg.BH_BWD, cfg.WARPS_BWD)
    if kernel == "radargate_bwd_chain_kernel":
        return (cfg.KP, cfg.RP, cfg.WARPS_BWD)
    from radargate_kernels.kernels.launch import beta_tile_forward, grouped_forward
    return (cfg.KP, cfg.BT_FORWARD, cfg.RP, cfg.BH_FWD, cfg.BH_STATE, cfg.WARPS_FWD,
            cfg.ONE_PASS, grouped_forward(cfg), cfg.EP if beta_tile_forward(cfg, has_beta) else 0)


def plan_jobs(quick: bool, archs, dtypes=DTYPES):
    """Distinct (arch, dtype, kernel, config) jobs, each with its representative shape."""
    from radargate_kernels.kernels.launch import pick_config
    from radargate_kernels.kernels.lora_launch import pick_lora_config
    kernels = ("radargate_fwd_kernel", "radargate_bwd_rows_kernel", "radargate_bwd_columns_kernel",
               "radargate_bwd_chain_kernel")
    jobs, seen = [], set()
    for arch in archs:
        for dtype in dtypes:
            for (K, D, r, E) in shape_classes(quick):
                has_beta = E is not None
                cfg = pick_config(K, D // 2, r, E if has_beta else K, has_beta,
                                  2 if dtype != "float32" else 4)
                for kern in kernels:
                    if kern == "radargate_bwd_chain_kernel" and not cfg.WIDE:
                        continue  # launched only in the WIDE plan
                    # r == 1 is a different specialisation (Triton makes integer arguments equal
                    # to 1 constants): an r = 1 compile does not stand for r = 8 at the same
                    # config; nor does D = 2 (D/2 == 1) for other D
                    key = (arch, dtype, kern, has_beta, r == 1, D == 2,
                           _config_key(kern, cfg, has_beta))
                    if key in seen:
                        continue
                    seen.add(key)
                    # the column kernel as two launches (dV, then parameter gradients), the
                    # WIDE forward's two stages: each launch
                    parts = (0, 1) if (kern == "radargate_bwd_columns_kernel" and cfg.SPLIT_COLS
                                       or kern == "radargate_fwd_kernel" and cfg.WIDE) else (0,)
                    for part in parts:
                        jobs.append(dict(arch=arch, dtype=dtype, kernel=kern, K=K, D=D, r=r, E=E,
                                         part=part))
            for (K, E) in ((8, 16), (40, 64)):  # i64 strides, also in the WIDE plan
                for kern in kernels:
                    if kern == "radargate_bwd_chain_kernel":
                        continue  # takes no expert_out strides
                    wide = pick_config(K, 2048, 8, E, True, 4 if dtype == "float32" else 2).WIDE
                    parts = (0, 1) if wide and kern != "radargate_bwd_rows_kernel" else (0,)
                    for part in parts:
                        jobs.append(dict(arch=arch, dtype=dtype, kernel=kern, K=K, D=4096, r=8,
                                         E=E, large=True, part=part))
            # ... and at D = 512, where contiguous rows would take the single-pass forward
            jobs.append(dict(arch=arch, dtype=dtype, kernel="radargate_fwd_kernel", K=8, D=512,
                             r=8, E=16, large=True))
            # the parameter kernel computing only some of dA, dB, dbeta (frozen gate parts), in
            # the one-launch plan and in the WIDE plan's parameter launch (part 1)
            for need in PARTIAL_NEEDS:
                jobs.append(dict(arch=arch, dtype=dtype, kernel="radargate_bwd_columns_kernel",
                                 K=8, D=4096, r=8, E=16, need=need))
                jobs.append(dict(arch=arch, dtype=dtype, kernel="radargate_bwd_columns_kernel",
                                 K=40, D=4096, r=8, E=64, need=need, part=1))
            for (r, rg, out, flags) in (LORA_QUICK if quick else LORA_FULL):
                cfg = pick_lora_config(r, rg, out // 2)
                for kern in LORA_KERNELS:
                    key = (arch, dtype, kern, flags, cfg)
                    if key in seen:
                        continue
                    seen.add(key)
                    jobs.append(dict(arch=arch, dtype=dtype, kernel=kern, K=LORA_K, D=out, r=r,
                                     E=LORA_E if flags else None, rg=rg))
            for (K, E, r, rg, ids) in (RELATION_QUICK if quick else RELATION_FULL):
                if dtype == dtypes[0]:  # the kernels read s, P, Q in the compute dtype only
                    for kern in ("lora_relation_kernel", "lora_relation_bwd_kernel"):
                        if kern.endswith("bwd_kernel") and K > 8:
                            continue  # relation_backward_fits: K <= 8
                        jobs.append(dict(arch=arch, dtype="float32", kernel=kern, K=K, D=0, r=r,
                                         E=E if ids else None, rg=rg))
            # the packed backward row kernel: the relation points with K <= 16, with angle_bias
            # where there are ids, at out = 2 and 4096
            # and the packed parameter kernel, with and without angle_bias (its dbeta tile)
            for (K, E, r, rg, ids) in (RELATION_QUICK if quick else RELATION_FULL):
                if K > 16:
                    continue
                for out in ((4096,) if quick else (2, 4096)):
                    jobs.append(dict(arch=arch, dtype=dtype, kernel="lora_bwd_rows_packed_kernel",
                                     K=K, D=out, r=r, E=E if ids else None, rg=rg))
                    for beta in ((True,) if quick else (True, False)) if r <= 32 else ():
                        jobs.append(dict(arch=arch, dtype=dtype, K=K, D=out, r=r, rg=rg,
                                         kernel="lora_bwd_params_packed_kernel",
                                         E=E if ids else None, beta=beta))
            for (E, r, rg) in (FACTORS_QUICK if quick else FACTORS_FULL):
                for kern in FACTORS_KERNELS:
                    jobs.append(dict(arch=arch, dtype=dtype, kernel=kern, K=E, D=4096, r=r, E=E,
                                     rg=rg))
            for (E, r) in (DOWN_QUICK if quick else DOWN_FULL):
                for kern in DOWN_KERNELS:
                    # the dA kernel with and without the dx it writes when both are needed;
                    # the backward kernels dense and top-2 (ds_all built from ds and ids)
                    for with_dx in ((True, False) if kern == "lora_down_da_kernel" else (None,)):
                        for topk in (None, 2) if kern != "lora_down_fwd_kernel" else (None,):
                            jobs.append(dict(arch=arch, dtype=dtype, kernel=kern, K=E, D=4096,
                                             r=r, E=E, rg=0, with_dx=with_dx, topk=topk))
    return jobs


class _StandInDriver:
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


def _ptxas_usage(ptx: str, arch: int):
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path  # the ptxas triton itself uses for this arch
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, f"-arch={sm}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    if res.returncode != 0 or regs is None:
        raise RuntimeError(f"ptxas failed: {log[-500:]}")
    return int(regs.group(1)), int(spill_st.group(1)) + int(spill_ld.group(1))


def _plan_lora(job, dt):
    """The launch the fused layer's host code plans for this job's shape (K = 64, E = 128)."""
    import torch
    from radargate_kernels.kernels import lora_launch as LL
    K, out, r, rg = job["K"], job["D"], job["r"], job["rg"]
    flags = job["E"] is not None
    E = job["E"] if flags else K
    T = T_REPR
    s = torch.empty((T, K, r), dtype=torch.float32)
    d = torch.empty((T, K, rg), dtype=torch.float32)
    g = torch.empty((T, K), dtype=dt)
    ids = torch.zeros((T, K), dtype=torch.int64) if flags else None
    if job["kernel"].startswith("lora_relation"):
        assert LL.relation_fits(K, E, r, flags), job
        P = torch.empty((E, r, E, r), dtype=torch.float32)
        Q = torch.empty((E, r, rg), dtype=torch.float32)
        if job["kernel"] == "lora_relation_kernel":
            _, launches = LL.plan_relation(s, ids, P, Q, 1.0, 1e-6)
        else:
            assert LL.relation_backward_fits(K, E, r, flags), job
            _, launches = LL.plan_relation_backward(s, ids, P, Q, d, s.clone(), 1.0, 1e-6)
        return launches[0], None
    if job["kernel"].startswith("lora_factors"):
        B = torch.empty((E, r, out), dtype=dt)
        A_rot = torch.empty((out, rg), dtype=dt)
        if job["kernel"] == "lora_factors_kernel":
            _, launches = LL.plan_factors(B, A_rot, torch.float32)
        else:
            dP = torch.empty((E, r, E, r), dtype=torch.float32)
            bad = torch.zeros(LL.relation_columns(E, E, r, True), dtype=torch.int32)
            _, launches = LL.plan_factors_backward(dP, torch.empty((E, r, rg)), bad, B, A_rot,
                                                   torch.float32)
        return launches[0], None
    if job["kernel"].startswith("lora_down_"):
        x = torch.empty((T, out), dtype=dt)
        lora_A = torch.empty((E, out, r), dtype=dt)
        if job["kernel"] == "lora_down_fwd_kernel":
            _, launches = LL.plan_down_forward(x, lora_A, 1.0, torch.float32)
        else:
            # dense: ds_all [T, E, r]; top-k (job["topk"]): ds [T, k, r] and ids
            k = job.get("topk") or E
            ds = torch.empty((T, k, r), dtype=torch.float32)
            ids_d = torch.zeros((T, k), dtype=torch.int64) if job.get("topk") else None
            # the dx kernel: only dx needed; the dA kernel with dx needed too or not
            dx_kernel = job["kernel"] == "lora_down_dx_kernel"
            _, launches = LL.plan_down_backward(ds, ids_d, x, lora_A, 1.0,
                                                dx_kernel or job["with_dx"], not dx_kernel)
            launches = [la for la in launches if la.kernel.fn.__name__ == job["kernel"]]
        return launches[0], None
    B = torch.empty((E, r, out), dtype=dt)
    U = torch.empty((rg, out // 2), dtype=dt)
    beta = torch.empty((E, out // 2), dtype=dt) if job.get("beta", flags) else None
    if job["kernel"] == "lora_bwd_params_packed_kernel":
        assert LL.packed_params_fits(K, E, r, flags), job
        dP = torch.empty((E, r, E, r), dtype=torch.float32)
        _, launches = LL.plan_params_backward_packed(
            torch.empty((T, out), dtype=dt), s, g, d, ids, B, U, beta, dP,
            torch.empty((E, r, rg)), torch.zeros(LL.relation_columns(K, E, r, flags),
                                                 dtype=torch.int32),
            torch.empty((out, rg), dtype=dt))
        return launches[0], None
    if job["kernel"] == "lora_fwd_kernel":
        _, launches = LL.plan_stream_forward(s, g, d, ids, B, U, beta, dt)
        return launches[0], LL.pick_lora_config(r, rg, out // 2)
    dy = torch.empty((T, out), dtype=dt)
    if job["kernel"].startswith("lora_bwd_rows"):
        packed = LL.rows_packed_fits(K, E, r, flags)
        assert packed == (job["kernel"] == "lora_bwd_rows_packed_kernel"), job
        _, launches = LL.plan_rows_backward(dy, s, g, d, ids, B, U, beta)
    else:
        dB = torch.empty((E, r, out), dtype=torch.float32)
        _, launches = LL.plan_params_backward(dy, s, g, d, ids, B, U, beta, dB)
    return launches[0], LL.pick_lora_config(r, rg, out // 2)


def _lora_config(job, launch, lc):
    m = launch.meta
    if job["kernel"].startswith("lora_relation"):
        return (f"KP={m['KP']} BT={m['BT']} F={m['F']} RP={m['RP']} RGP={m['RGP']}"
                + (" ids" if m["HAS_IDS"] else ""))
    if job["kernel"].startswith("lora_factors"):
        return (f"F={m.get('FP', m.get('F'))} RGP={m['RGP']} BO={m['BO']} E={job['E']} "
                f"r={job['r']}")
    if job["kernel"] == "lora_bwd_rows_packed_kernel":
        return (f"KP={m['KP']} BT={m['BT']} F={m['F']} BH={m['BH']} RGP={m['RGP']}"
                + (" ids+bias" if job["E"] is not None else ""))
    if job["kernel"] == "lora_bwd_params_packed_kernel":
        return (f"KP={m['KP']} BT={m['BT']} F={m['F']} EB={m['EB']} BH={m['BH']} "
                f"RGP={m['RGP']}" + (" ids" if m["HAS_IDS"] else "")
                + (" per-slot" if m.get("PER_SLOT") else "") + (" bias" if m["HAS_BETA"] else ""))
    if job["kernel"].startswith("lora_down_"):
        return (f"BM={m['BM']} BN={m['BN']} BK={m['BK']} RP={m['RP']} E={job['E']}"
                + (" +dx" if m.get("WITH_DX") else "") + (" top-k" if m.get("HAS_IDS") else ""))
    return (f"BT={m.get('BT', lc.BT)} BH={m['BH']}" + (f" NCH={m['NCH']}" if "NCH" in m else "")
            + f" RP={lc.RP} RGP={lc.RGP} rg={job['rg']}"
            + (" ids+bias" if job["E"] is not None else ""))


def compile_job(job):
    """Compile one job; returns the job dict with regs, spills, shared, seconds, error."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_report must run without TRITON_INTERPRET=1")
    import torch
    import triton
    triton.runtime.driver.set_active(_StandInDriver(job["arch"]))
    from radargate_kernels.kernels import launch as L
    dt = getattr(torch, job["dtype"])
    K, D, r, E = job["K"], job["D"], job["r"], job["E"]
    T = T_REPR
    # with int64 strides the features are not contiguous (the launch rule sees that): plan from
    # a feature-strided view, then pass the large strides
    V = (torch.empty((T, D, K), dtype=dt).transpose(1, 2) if job.get("large") else
         torch.empty((T, K, D), dtype=dt))
    g = torch.empty((T, K), dtype=dt)
    A = torch.empty((D, r), dtype=dt)
    B = torch.empty((r, D // 2), dtype=dt)
    beta = torch.empty((E, D // 2), dtype=dt) if E is not None else None
    ids = torch.zeros((T, K), dtype=torch.int64) if E is not None else None
    t0 = time.time()
    out = dict(job)
    try:
        if job["kernel"].startswith("lora_"):
            launch, lc = _plan_lora(job, dt)
            compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
            regs, spills = _ptxas_usage(compiled.asm["ptx"], job["arch"])
            out.update(regs=regs, spills=spills, shared=int(compiled.metadata.shared),
                       warps=launch.meta["num_warps"], error=None,
                       config=_lora_config(job, launch, lc))
            out["seconds"] = time.time() - t0
            return out
        if job["kernel"] == "radargate_fwd_kernel":
            _, launches = L.plan_forward(V, g, A, B, beta, ids, 1.0, 1e-6)
            launch = launches[job.get("part", 0)]
        else:
            (y, n, C, rho, z, d), _ = L.plan_forward(V, g, A, B, beta, ids, 1.0, 1e-6)
            _, launches = L.plan_backward(y, V, g, A, B, beta, ids, n, C, rho, z, d, 1.0, 1e-6,
                                          job.get("need", (True, True, True)))
            launch = [ln for ln in launches
                      if ln.kernel.fn.__name__ == job["kernel"]][job.get("part", 0)]
        assert launch.kernel.fn.__name__ == job["kernel"]
        args = list(launch.args)
        if job.get("large"):
            names = launch.kernel.arg_names
            for name, value in LARGE_STRIDES.items():
                args[names.index(name)] = value
        compiled = launch.kernel.warmup(*args, grid=launch.grid, **launch.meta)
        regs, spills = _ptxas_usage(compiled.asm["ptx"], job["arch"])
        cfg = L.pick_config(K, D // 2, r, E if E is not None else K, E is not None,
                            V.element_size())
        out.update(regs=regs, spills=spills, shared=int(compiled.metadata.shared),
                   warps=launch.meta["num_warps"], error=None,
                   config=f"KP={cfg.KP} BT={launch.meta.get('BT', 1)} RP={cfg.RP} "
                          f"BH={launch.meta.get('BH', 0)}"
                          + (f" EP={cfg.EP}" if "EP" in launch.meta and E is not None else "")
                          + ((f" 1-pass G={args[launch.kernel.arg_names.index('GROUP')]}"
                              if launch.meta.get("GROUPED") else " 1-pass")
                             if launch.meta.get("ONE_PASS") else "")
                          + (f" stage{launch.meta['STAGE']}" if launch.meta.get("STAGE") else "")
                          + (" M-v-blocks" if launch.meta.get("MV_BLOCKS") else "")
                          + ((" dV-only" if not any(launch.meta[k] for k in
                                                    ("NEED_A", "NEED_B", "NEED_BETA"))
                              else " params-only") if launch.meta.get("NEED_DV") is not None
                             and cfg.SPLIT_COLS else "")
                          + (" need=" + "".join("AB" [i] if i < 2 else "b" for i, f in
                                                enumerate(job["need"]) if f)
                             if job.get("need") else "")
                          + (" i64-strides" if job.get("large") else ""))
    except Exception as exc:  # reported, and makes the exit status non-zero
        out.update(regs=None, spills=None, shared=None, warps=None, config="?",
                   error=f"{type(exc).__name__}: {str(exc)[:300]}")
    out["seconds"] = time.time() - t0
    return out


def check(row):
    """List of problems with one compiled configuration (empty when it passes)."""
    problems = []
    if row["error"]:
        problems.append("compile failed: " + row["error"])
    else:
        if row["shared"] > SMEM_LIMIT[row["arch"]]:
            problems.append(f"shared memory {row['shared']} > limit {SMEM_LIMIT[row['arch']]}")
        if row["spills"]:
            problems.append(f"spills {row['spills']} bytes")
        if row["regs"] * 32 * row["warps"] > REGISTER_FILE:
            # ptxas honours maxnreg even where such a block could never launch
            problems.append(f"{row['regs']} registers x {32 * row['warps']} threads > "
                            f"{REGISTER_FILE} (too many resources to launch)")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--quick", action="store_true", help="benchmark shape and range extremes only")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--family", default="all", choices=["all", "op", "lora"],
                    help="op: radar_gate's kernels; lora: the fused layer's kernels")
    args = ap.parse_args(argv)
    # enable_fp_fusion is passed by Launch explicitly (no TRITON_DEFAULT_FP_FUSION needed)
    jobs = plan_jobs(args.quick, args.arch, args.dtypes)
    if args.family != "all":
        jobs = [j for j in jobs if j["kernel"].startswith("lora_") == (args.family == "lora")]
    print(f"compiling {len(jobs)} (arch, dtype, kernel, config) combinations with {args.jobs} "
          f"process(es)", flush=True)
    hdr = (f"{'arch':>4} {'dtype':8} {'kernel':28} {'config':34} {'warps':>5} {'regs':>4} "
           f"{'spill':>5} {'smem':>7} {'limit':>7} {'K':>3} {'D':>6} {'r':>3} {'E':>4} status")
    print(hdr)
    rows, failed = [], 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(compile_job, jobs):
            rows.append(row)
            probs = check(row)
            failed += bool(probs)
            status = "ok" if not probs else "FAIL: " + "; ".join(probs)
            fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
            print(f"{row['arch']:>4} {row['dtype']:8} {row['kernel']:28} {row['config']:34} "
                  f"{fmt(row['warps']):>5} {fmt(row['regs']):>4} {fmt(row['spills']):>5} "
                  f"{fmt(row['shared']):>7} {SMEM_LIMIT[row['arch']]:>7} {row['K']:>3} "
                  f"{row['D']:>6} {row['r']:>3} {fmt(row['E']):>4} {status}", flush=True)
    ok = [r for r in rows if not r["error"]]
    if ok:
        print(f"summary: {len(rows)} compiled, {failed} failed; max registers "
              f"{max(r['regs'] for r in ok)}, max spill bytes {max(r['spills'] for r in ok)}, "
              f"max shared {max(r['shared'] for r in ok)} bytes; "
              f"{sum(r['seconds'] for r in rows):.0f} s of compile time")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
