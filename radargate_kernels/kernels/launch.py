"""Host side of the kernels: the one place that picks block sizes, computes strides and launches.

Shapes: V [T, K, D], g [T, K], A [D, r], B [r, h] (h = D/2), beta [E, h] or None,
ids [T, K] or None. Forward returns y [T, D] and the per-token state
(n [T, K], C [T, K, K], rho [T, K, K], z [T, K, r], d [T, K, r]) in the compute dtype
(fp32, fp64 for fp64 inputs); backward returns (dV, dg, dA, dB, dbeta).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .backward import (radargate_bwd_chain_kernel, radargate_bwd_columns_kernel,
                       radargate_bwd_rows_kernel, radargate_bwd_rows_wide_kernel)
from ..reference import compute_dtype
from .forward import radargate_fwd_kernel, radargate_fwd_wide_kernel

# Limits of the fused kernels (see docs/launch_config.md). Beyond them radar_gate(backend="auto")
# uses the PyTorch reference and backend="triton" raises ValueError.
MAX_K = 64      # K = 33..64: one token of 64 rows per program, the K x K work from memory in
#                 slot blocks over more launches (WIDE, docs/launch_config.md)
WIDE_K = 32     # K above this runs the WIDE launch plan
MAX_RANK = 64   # RP = 64: 0 spills at every K (K > 16 with r > 32 runs the WIDE plan)
MAX_E = 128
ROWS_TARGET = 32  # R = BT * KP rows per program: tokens are packed until R reaches this
ROWS_TARGET_WIDE = 16  # ... for rank > 16, where the [R, r] state tiles are wider
ONE_PASS_ELEMS = 4096  # largest [R, D/2] tile of the single-pass forward (e.g. 16 x 256)
# single-pass forward: token blocks per program until the parameter tiles it loads once are at
# most 1/PARAM_SHARE of the expert_out it reads, and at most MAX_GROUP blocks
PARAM_SHARE = 8
MAX_GROUP = 16
GROUP_ROWS = 16  # ... for programs of at most this many rows (32-row tiles holding the parameter
#                  tiles spilled 56-168 bytes at D = 130: those load them per block, as before)


@dataclass(frozen=True)
class LaunchConfig:
    KP: int            # K padded to a power of two
    BT: int            # tokens per program (R = BT * KP rows)
    RP: int            # rank padded (>= 16 for tl.dot)
    EP: int            # experts padded (angle_bias gradient tile)
    BH_FWD: int        # feature pairs per chunk: forward kernel
    BH_BWD: int        #   backward row kernel
    BH_COLS: int       #   backward column kernel (dV and parameter gradients; pairs per program)
    WARPS_FWD: int
    WARPS_BWD: int
    WARPS_COLS: int
    num_stages: int = 1
    ONE_PASS: bool = False  # forward: whole rows in one chunk, expert_out read once
    BT_FWD: int = 0          # forward's tokens per program (0: BT)
    BT_COLS: int = 0         # backward column kernel's tokens per step (0: BT)
    SPLIT_COLS: bool = False  # backward column kernel: dV and parameter gradients as two launches
    WIDE: bool = False        # K > 32 or (K > 16, r > 32): forward and row kernels in stages, K x K
    #                           products in slot blocks from memory
    BH_STATE: int = 0         # WIDE: the forward's first stage (Gram matrix and z)
    BH_DV: int = 0            # WIDE: the column kernel's dV launch (pairs per program)

    @property
    def BT_FORWARD(self) -> int:
        return self.BT_FWD or self.BT

    @property
    def R(self) -> int:
        return self.BT * self.KP


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def kernel_limits_ok(K: int, r: int, E: int, has_beta: bool) -> str | None:
    """None if the fused kernels handle this shape, else the reason they do not."""
    if K > MAX_K:
        return f"K = {K} experts per token exceeds the fused kernels' limit of {MAX_K}"
    if r > MAX_RANK:
        return f"rank r = {r} exceeds the fused kernels' limit of {MAX_RANK}"
    if has_beta and E > MAX_E:
        return f"E = {E} experts in angle_bias exceeds the fused kernels' limit of {MAX_E}"
    return None


def pick_config(K: int, h: int, r: int, E: int, has_beta: bool,
                itemsize: int = 2, unit_stride: bool = True) -> LaunchConfig:
    """Block sizes and warps from the shape, the element size of expert_out (bytes) and whether
    its features are contiguous (``unit_stride``); the rule and its evidence:
    docs/launch_config.md."""
    KP = _pow2(K)
    RP = max(16, _pow2(r))
    BT = max(1, (ROWS_TARGET if RP <= 16 else ROWS_TARGET_WIDE) // KP)
    EP = max(16, _pow2(E)) if has_beta else 16
    small_rank = RP <= 16
    cap = max(16, _pow2(h))  # no chunk wider than the padded row
    # 128-byte row segments per load: 64 pairs of 2-byte, 32 of 4-byte elements (fp32 at 64
    # spilled in the forward, compile report)
    bh_fwd = min(cap, 64 if small_rank and itemsize <= 2 else 32)
    bh_bwd = min(cap, 32 if small_rank else 16)
    # backward column kernel (R = 16 rows, or one token at K > 16): 64 pairs where its dV, dA,
    # dB and dbeta tiles fit, half that per step up in rank or angle_bias width, 16 at K > 16
    # or r > 32 (each wider choice spilled 8-2200 bytes, compile report)
    wide = K > WIDE_K or (KP > 16 and RP > 32)
    if KP > 16 or RP > 32:
        bh_cols = 16
    else:
        bh_cols = (64 if RP <= 16 else 32) // (2 if EP > 32 else 1)
    if wide and EP <= 64 and KP * RP < 64 * 64:
        # the WIDE plan's parameter launch (no dV in it): 32 pairs fit up to 64 experts except
        # at 64 slots with r > 32 (684-996 bytes spilled there; 128 experts: 376-1648); every
        # chunk re-reads the rows' d and dZ (8 r bytes per row)
        bh_cols = 32
    bh_cols = min(cap, bh_cols)
    # single-pass forward: when a program's whole rows fit a [R, D/2] tile of at most
    # ONE_PASS_ELEMS elements per half, with R as small as tl.dot allows (16 rows, or K padded),
    # expert_out is loaded once (Gram, z, relation, rotation from registers); wider rows keep
    # the two-pass kernel. 2-byte inputs only: fp32 tiles of 16 x 128 already spilled
    # (176-1256 B on sm_90, ieee fp32 dots), fp16/bf16 up to 16 x 256 and 32 x 128 did not
    # (compile report; docs/launch_config.md).
    one_rows = max(16, KP)
    # Contiguous features only: with another feature stride every element of the tile needs its
    # own 64-bit address (no vector loads) and the kept tile with the held parameters spilled
    # 160 bytes (int64 strides, K = 8, D = 512, sm_80); such layouts take two passes.
    one_pass = (small_rank and itemsize <= 2 and one_rows * cap <= ONE_PASS_ELEMS and not wide
                and unit_stride)
    if wide:
        # one 64-row token per program: 32 pairs in the rotating stage (64 spilled 144 bytes
        # at D = 130, bf16, sm_80), 16 in the Gram stage (compile report)
        bh_fwd = min(cap, 32)
    return LaunchConfig(
        KP=KP, BT=BT, RP=RP, EP=EP, BH_FWD=cap if one_pass else bh_fwd, BH_BWD=bh_bwd,
        BH_COLS=bh_cols,
        WARPS_FWD=8,
        WARPS_BWD=8,
        WARPS_COLS=8,
        ONE_PASS=one_pass, BT_FWD=one_rows // KP if one_pass else BT,
        BT_COLS=max(1, 16 // KP),
        # one token of K > 16 slots with r > 16: dV and the parameter gradients together spilled
        # 8-60 bytes (fp32; compile report), so they run as two launches
        SPLIT_COLS=(KP > 16 and RP > 16) or wide,
        WIDE=wide, BH_STATE=min(cap, 16) if wide else 0,
        # WIDE dV launch: M v in slot blocks holds no [KP, KP] tile, so its chunk can be wider
        # (64 / 32 / 16 pairs at r <= 16 / 32 / 64: each wider choice spilled 258-3076 bytes;
        # compile report); every chunk re-reads the token's M (4 K^2 bytes)
        BH_DV=min(cap, 64 if RP <= 16 else 32 if RP <= 32 else 16) if wide else 0,
    )


def forward_group(cfg: LaunchConfig, T: int, K: int, D: int, r: int, E: int,
                  has_beta: bool) -> int:
    """Token blocks per program of the single-pass forward (1 for the other plans). Its program
    loads A, B and (beta_tile_forward) angle_bias once and reuses them for every block, so the
    parameter reads per program are fixed while the expert_out it reads grows with the group:
    blocks are added until the parameters are at most 1/PARAM_SHARE of it in elements (one
    dtype for all), MAX_GROUP at most, then spread evenly over the programs."""
    n_blocks = triton.cdiv(T, cfg.BT_FORWARD) if T > 0 else 0
    if not grouped_forward(cfg) or n_blocks <= 1:
        return 1
    params = D * r + r * (D // 2) + (E * (D // 2) if beta_tile_forward(cfg, has_beta)
                                     else 0)
    block = cfg.BT_FORWARD * K * D
    group = min(MAX_GROUP, n_blocks, triton.cdiv(PARAM_SHARE * params, block))
    return triton.cdiv(n_blocks, triton.cdiv(n_blocks, group))


def grouped_forward(cfg: LaunchConfig) -> bool:
    """The single-pass forward holds its parameter tiles and runs token groups (GROUP_ROWS)."""
    return cfg.ONE_PASS and cfg.BT_FORWARD * cfg.KP <= GROUP_ROWS


def beta_tile_forward(cfg: LaunchConfig, has_beta: bool) -> bool:
    """Single-pass forward: angle_bias held as one [EP, h] tile per program (each row's row
    selected by a one-hot product) rather than gathered per row, when it is no larger than a
    half of the rows' tile."""
    return has_beta and grouped_forward(cfg) and cfg.EP * cfg.BH_FWD <= ONE_PASS_ELEMS


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32



def _v_prec(dtype):
    # fp16/bf16 values are exact in tf32, so the V x V and V x A products are exact on tensor
    # cores; fp32 needs full-precision ("ieee") products.
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


def _tensor_cores(dtype) -> bool:
    # products of a computed fp32 tile with fp16/bf16 values (inputs and parameters, exact in
    # tf32) on tensor cores as two tf32 products (common.dot_tf32x2); fp32/fp64 inputs: ieee
    return dtype in (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when the Triton interpreter runs the kernels (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# FMA contraction of a * b + c: on (Triton's default up to 3.9; its default changes in 3.10),
# passed explicitly so every Triton version compiles the same arithmetic. The tolerance table and
# the compile report (registers, spills) were measured with it on.
ENABLE_FP_FUSION = True


class Launch:
    """One kernel launch: ``kernel[grid](*args, **meta)``. Planned separately from running so
    that benchmarks/compile_report.py compiles exactly the specialisation a real launch gets."""

    def __init__(self, kernel, grid, args, meta):
        self.kernel, self.grid, self.args = kernel, grid, args
        self.meta = dict(meta, enable_fp_fusion=ENABLE_FP_FUSION)

    def run(self):
        dev = next((a.device for a in self.args if isinstance(a, torch.Tensor)), None)
        if dev is not None and dev.type == "cuda":
            # launch on the inputs' device, not the current one (multi-GPU device_map models)
            with torch.cuda.device(dev):
                self.kernel[self.grid](*self.args, **self.meta)
        elif interpreting():
            # the Triton interpreter patches triton.language globally while a kernel runs, so
            # concurrent launches from several threads must take turns (GPU launches need not)
            with _INTERPRETER_LOCK:
                self.kernel[self.grid](*self.args, **self.meta)
        else:
            self.kernel[self.grid](*self.args, **self.meta)


_INTERPRETER_LOCK = threading.Lock()


def _common(V, g, A, B, beta, ids):
    T, K, D = V.shape
    h, r = D // 2, A.shape[1]
    E = beta.shape[0] if beta is not None else K
    cfg = pick_config(K, h, r, E, beta is not None, V.element_size(), V.stride(2) == 1)
    dummy = V  # never read when the HAS_* flag is off
    beta_t = beta if beta is not None else dummy
    ids_t = ids if ids is not None else dummy
    s_beta = beta.stride() if beta is not None else (0, 0)
    s_ids = ids.stride() if ids is not None else (0, 0)
    strides = (*V.stride(), *g.stride())
    meta = dict(KP=cfg.KP, BT=cfg.BT, RP=cfg.RP, HAS_BETA=beta is not None,
                HAS_IDS=ids is not None, ACC=_acc(V.dtype), num_stages=cfg.num_stages,
                # let ptxas use up to the hardware's 255 registers: without the bound it capped
                # some 8-warp configs at 128 and spilled (compile report)
                maxnreg=255)
    return T, K, D, h, r, E, cfg, beta_t, ids_t, s_beta, s_ids, strides, meta


def plan_forward(V, g, A, B, beta, ids, tau: float, eps: float):
    """Allocate the forward outputs and plan its single launch -> ((y, n, C, rho, z, d), [Launch])."""
    T, K, D, h, r, E, cfg, beta_t, ids_t, s_beta, s_ids, strides, meta = _common(V, g, A, B, beta, ids)
    sd = compute_dtype(V.dtype)
    y = torch.empty((T, D), dtype=V.dtype, device=V.device)
    n = torch.empty((T, K), dtype=sd, device=V.device)
    C = torch.empty((T, K, K), dtype=sd, device=V.device)
    rho = torch.empty((T, K, K), dtype=sd, device=V.device)
    z = torch.empty((T, K, r), dtype=sd, device=V.device)
    d = torch.empty((T, K, r), dtype=sd, device=V.device)
    launches = []
    # one launch, or (WIDE) the state stage (n, C, rho, z) and then the rotating stage (d, y)
    stages = ((1, cfg.BH_STATE), (2, cfg.BH_FWD)) if cfg.WIDE else ((0, cfg.BH_FWD),)
    group = forward_group(cfg, T, K, D, r, E, beta is not None)
    beta_tile = beta_tile_forward(cfg, beta is not None)
    for stage, bh in stages if T > 0 else ():
        kernel = radargate_fwd_wide_kernel if cfg.WIDE else radargate_fwd_kernel
        launches.append(Launch(kernel, (triton.cdiv(triton.cdiv(T, cfg.BT_FORWARD), group),), (
            V, g, A, B, beta_t, ids_t, y, n, C, rho, z, d,
            T, K, h, r, E, group,
            *strides, *A.stride(), *B.stride(), *s_beta, *s_ids, *y.stride(),
            1.0 / tau, eps), dict(meta, BT=cfg.BT_FORWARD, BH=bh, ONE_PASS=cfg.ONE_PASS,
                                  V_PREC=_v_prec(V.dtype), num_warps=cfg.WARPS_FWD,
                                  STAGE=stage, BETA_TILE=beta_tile,
                                  GROUPED=grouped_forward(cfg),
                                  # (EP shapes only the angle_bias tile)
                                  EP=cfg.EP if beta_tile else 16)))
    return (y, n, C, rho, z, d), launches


def forward(V, g, A, B, beta, ids, tau: float, eps: float):
    """Run the fused forward. Returns (y, n, C, rho, z, d)."""
    outs, launches = plan_forward(V, g, A, B, beta, ids, tau, eps)
    for launch in launches:
        launch.run()
    return outs


def param_groups(n_blocks: int, n_chunks: int, device) -> int:
    """Token groups of the backward column kernel: enough programs to fill the GPU, few partials."""
    if device.type == "cuda" and not interpreting():
        target = 4 * _num_sms(device)
    else:
        target = 2  # interpreter: programs run one after another
    return max(1, min(n_blocks, triton.cdiv(target, n_chunks)))


def plan_backward(dy, V, g, A, B, beta, ids, n, C, rho, z, d, tau: float, eps: float,
                  need=(True, True, True)):
    """Allocate dV, dg and the partial buffers and plan the two backward launches. ``need`` =
    which of (dA, dB, dbeta) autograd asks for: the column kernel computes only those (dV
    always).

    -> ((dV, dg, pA, pB, pbeta), [Launch]); pA [NB, D, r], pB [NB, r, h], pbeta [NB, E, h]
    (or None) are fp32 partials of dA, dB, dbeta, one per token group.
    """
    T, K, D, h, r, E, cfg, beta_t, ids_t, s_beta, s_ids, strides, meta = _common(V, g, A, B, beta, ids)
    sd = compute_dtype(V.dtype)
    dV = torch.empty((T, K, D), dtype=V.dtype, device=V.device)
    dg = torch.empty((T, K), dtype=g.dtype, device=V.device)
    dZ = torch.empty((T, K, r), dtype=sd, device=V.device)
    M = torch.empty((T, K, K), dtype=sd, device=V.device)  # normalisation backward, per token
    n_blocks = triton.cdiv(T, cfg.BT)
    n_col_blocks = triton.cdiv(T, cfg.BT_COLS or cfg.BT)
    n_chunks = triton.cdiv(h, cfg.BH_COLS)
    need_a, need_b, need_beta = bool(need[0]), bool(need[1]), bool(need[2]) and beta is not None
    NB = param_groups(n_col_blocks, n_chunks, V.device) if T > 0 else 0
    # partials of what is not needed have no rows (their sums are zeros); the kernel gets a
    # valid pointer it never writes in their place
    pB = torch.empty((NB if need_b else 0, r, h), dtype=sd, device=V.device)
    pbeta = (torch.empty((NB if need_beta else 0, E, h), dtype=sd, device=V.device)
             if beta is not None else None)
    pA = torch.empty((NB if need_a else 0, D, r), dtype=sd, device=V.device)
    launches = []
    if T > 0:
        # WIDE: the row kernel stores grad_d = dalpha B^T (scratch), the chain kernel turns it
        # into dZ and M
        grad_d = torch.empty((T, K, r), dtype=sd, device=V.device) if cfg.WIDE else dZ
        rows_kernel = radargate_bwd_rows_wide_kernel if cfg.WIDE else radargate_bwd_rows_kernel
        launches.append(Launch(rows_kernel, (n_blocks,), (
            V, g, B, beta_t, ids_t, dy, n, C, rho, z, d, dg, grad_d, M,
            T, K, h, r, E,
            *strides, *B.stride(), *s_beta, *s_ids, *dy.stride(),
            1.0 / tau, eps), dict(meta, BH=cfg.BH_BWD, EP=cfg.EP, TC=_tensor_cores(V.dtype),
                                  BETA_TILE=E <= cfg.R, num_warps=cfg.WARPS_BWD,
                                  STAGE=1 if cfg.WIDE else 0)))
        if cfg.WIDE:
            launches.append(Launch(radargate_bwd_chain_kernel, (T,), (
                n, C, rho, z, grad_d, dZ, M, K, r, 1.0 / tau, eps),
                dict(KP=cfg.KP, RP=cfg.RP, ACC=meta["ACC"], num_warps=cfg.WARPS_BWD,
                     num_stages=cfg.num_stages, maxnreg=255)))
        # dV and the parameter gradients in one launch, or (SPLIT_COLS) dV first, then the
        # parameter gradients in a second launch that reads expert_out and dy again
        needs = ([(True, need_a, need_b, need_beta)] if not cfg.SPLIT_COLS else
                 [(True, False, False, False)]
                 + ([(False, need_a, need_b, need_beta)] if need_a or need_b or need_beta else []))
        for need_dv, na, nb, nbeta in needs:
            dv_only = cfg.WIDE and need_dv  # (WIDE always splits dV from the parameters)
            bh = cfg.BH_DV if dv_only else cfg.BH_COLS
            grid = ((triton.cdiv(h, bh), param_groups(n_col_blocks, triton.cdiv(h, bh), V.device))
                    if dv_only else (n_chunks, NB))
            launches.append(Launch(radargate_bwd_columns_kernel, grid, (
                V, g, A, B, beta_t, ids_t, dy, d, dZ, M, dV, pB if nb else dZ,
                pbeta if nbeta else dZ, pA if na else dZ,
                T, K, h, r, E, n_col_blocks,
                *strides, *A.stride(), *B.stride(), *s_beta, *s_ids, *dy.stride(), *dV.stride()),
                dict(meta, BT=cfg.BT_COLS or cfg.BT, BH=bh, EP=cfg.EP,
                     BETA_TILE=cfg.EP <= 32, num_warps=cfg.WARPS_COLS, NEED_DV=need_dv,
                     NEED_A=na, NEED_B=nb, NEED_BETA=nbeta,
                     MV_BLOCKS=dv_only)))
    return (dV, dg, pA, pB, pbeta), launches


def backward(dy, V, g, A, B, beta, ids, n, C, rho, z, d, tau: float, eps: float,
             need=(True, True, True)):
    """Run the fused backward. Returns (dV, dg, dA, dB, dbeta or an empty tensor); the
    parameter gradients ``need`` (dA, dB, dbeta) does not ask for are zeros, not computed."""
    (dV, dg, pA, pB, pbeta), launches = plan_backward(dy, V, g, A, B, beta, ids, n, C, rho, z, d,
                                                      tau, eps, need)
    for launch in launches:
        launch.run()
    # final deterministic reduction of the per-group partials (fixed order, no atomics); with
    # T = 0 there are no partials and the sums are zeros
    dA = pA.sum(0).to(A.dtype)
    dB = pB.sum(0).to(B.dtype)
    dbeta = pbeta.sum(0).to(beta.dtype) if beta is not None else V.new_empty(0)
    return dV, dg, dA, dB, dbeta
