"""Host side of the fused-layer kernels (lora_stream.py): block sizes, strides, launches.

Shapes: s [T, K, r] and d [T, K, rg] (compute dtype, contiguous), g [T, K], ids [T, K] or None,
lora_B [E, r, out], rot_up [rg, h] (h = out/2), angle_bias [E, h] or None.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .launch import Launch, _acc, _pow2, _v_prec, param_groups
from .lora_down import lora_down_da_kernel, lora_down_dx_kernel, lora_down_fwd_kernel
from .lora_relation import (lora_factors_bwd_kernel, lora_factors_kernel, lora_relation_bwd_kernel,
                            lora_relation_kernel)
from .lora_stream import (lora_bwd_params_kernel, lora_bwd_params_packed_kernel,
                          lora_bwd_rows_kernel, lora_bwd_rows_packed_kernel, lora_fwd_kernel)


@dataclass(frozen=True)
class LoraConfig:
    BT: int        # tokens per program (backward rows)
    BT_FWD: int    # tokens per program (forward)
    BH_FWD: int    # feature pairs per chunk (forward: two chunks per program)
    BH: int        # feature pairs per chunk (backward rows)
    BH_PARAMS: int  # feature pairs per program (parameter kernel)
    BR: int        # expert-sorted rows per step (parameter kernel)
    RP: int        # LoRA rank padded (>= 16 for tl.dot)
    RGP: int       # RotationGate rank padded
    WARPS_FWD: int
    WARPS_ROWS: int
    WARPS_PARAMS: int


# The forward stream kernel's tile: 8 tokens x 256 column pairs per chunk, two chunks per
# program (same registers as 16 x 128: no dot operands, v and alpha one rank at a time), so s
# and d are read once per 512 pairs (out = 1024: once per token)
FWD_TOKENS = 8
FWD_PAIRS = 256


def pick_lora_config(r: int, rg: int, h: int) -> LoraConfig:
    """Block sizes: K and E are loops / grid axes, so only r, rg and h shape the tiles. The
    parameter kernel holds three [rank, BH] accumulators and the B_e, rot_up chunks: its chunk
    shrinks as the padded rank grows (64 / 32 / 16 pairs at rank 16 / 32 / 64). Row-kernel
    chunks of 64 pairs spilled 16-32 bytes (fp16, sm_80); 32 gives 0 spills while both padded
    ranks are 16, and 16 above (the dense path holds s [BT, RP], two B_k tiles [RP, BH] and the
    rot_up chunk [RGP, BH]: 32 pairs spilled 16-40 bytes at RP = 32/64 or RGP = 64, sm_80/sm_90)
    (compile report, --family lora)."""
    RP, RGP = max(16, _pow2(r)), max(16, _pow2(rg))
    cap = max(16, _pow2(h))
    bh_params = {16: 64, 32: 32, 64: 16}[max(RP, RGP)]
    bh_rows = 32 if max(RP, RGP) == 16 else 16
    return LoraConfig(BT=16, BT_FWD=FWD_TOKENS, BH_FWD=min(FWD_PAIRS, cap), BH=min(bh_rows, cap),
                      BH_PARAMS=min(bh_params, cap), BR=16, RP=RP, RGP=RGP, WARPS_FWD=8,
                      WARPS_ROWS=8, WARPS_PARAMS=8)


def _prep(s, ids, lora_B, rot_up, angle_bias):
    T, K, r = s.shape
    E, _, out = lora_B.shape
    h, rg = out // 2, rot_up.shape[0]
    cfg = pick_lora_config(r, rg, h)
    ids_t = ids if ids is not None else s
    beta_t = angle_bias if angle_bias is not None else s
    s_ids = ids.stride() if ids is not None else (0, 0)
    s_beta = angle_bias.stride() if angle_bias is not None else (0, 0)
    meta = dict(HAS_BETA=angle_bias is not None, ACC=_acc(s.dtype), RGP=cfg.RGP, maxnreg=255)
    return T, K, r, E, out, h, rg, cfg, ids_t, beta_t, s_ids, s_beta, meta


def plan_stream_forward(s, g, d, ids, lora_B, rot_up, angle_bias, out_dtype):
    """-> (y [T, out] in out_dtype, [Launch])."""
    T, K, r, E, out, h, rg, cfg, ids_t, beta_t, s_ids, s_beta, meta = _prep(
        s, ids, lora_B, rot_up, angle_bias)
    y = torch.empty((T, out), dtype=out_dtype, device=s.device)
    launches = []
    if T > 0:
        nch = 2 if h > cfg.BH_FWD else 1  # two chunks per program: s, d read half as often
        fmeta = {k: v for k, v in meta.items() if k != "RGP"}
        launches.append(Launch(lora_fwd_kernel, (
            triton.cdiv(h, nch * cfg.BH_FWD), triton.cdiv(T, cfg.BT_FWD)), (
            s, g, d, ids_t, lora_B, rot_up, beta_t, y, T, K, h, r, rg, E,
            *g.stride(), *s_ids, *lora_B.stride(), *rot_up.stride(), *s_beta, *y.stride()),
            dict(fmeta, BT=cfg.BT_FWD, BH=cfg.BH_FWD, NCH=nch, HAS_IDS=ids is not None,
                 num_warps=cfg.WARPS_FWD)))
    return y, launches


DOWN_TILE = 64  # the down-projection GEMMs' tile edge (tokens, input features, E * RP columns)
DOWN_K = 32     # ... and their reduction step
DA_ROWS = 64    # input rows per program of the dA kernel (128 while r padded <= 16)
DA_ROWS_WIDE = 128


def _down_blocks(E, r):
    """(RP, column block): r padded to a power of two; E * RP columns in blocks of <= 64."""
    RP = _pow2(r)
    return RP, min(DOWN_TILE, max(16, _pow2(E * RP)))


def plan_down_forward(x, lora_A, scaling, ct):
    """x [T, in], lora_A [E, in, r] -> (s_all [T, E, r] in ct = scaling * x A_e, [Launch])."""
    T, n_in = x.shape
    E, _, r = lora_A.shape
    RP, BN = _down_blocks(E, r)
    s_all = (torch.empty if n_in else torch.zeros)((T, E, r), dtype=ct, device=x.device)
    prec = _v_prec(x.dtype) if lora_A.dtype == x.dtype else "ieee"
    launches = []
    if T > 0 and n_in > 0:
        grid = (triton.cdiv(T, DOWN_TILE), triton.cdiv(E * RP, BN))
        launches.append(Launch(lora_down_fwd_kernel, grid,
                               (x, lora_A, s_all, T, n_in, E, r, float(scaling), *x.stride(),
                                *lora_A.stride()),
                               dict(BM=DOWN_TILE, BN=BN, RP=RP, ACC=_acc(ct), PREC=prec,
                                    # tensor-core tiles (tf32) are lighter than FMA ones (ieee)
                                    **(dict(BK=DOWN_TILE, num_warps=4) if prec == "tf32"
                                       else dict(BK=DOWN_K, num_warps=8)))))
    return s_all, launches


def plan_down_backward(ds, ids, x, lora_A, scaling, need_dx, need_dA):
    """ds [T, K, r] (contiguous, compute dtype: the gradient of s / scaling; K = E and ds =
    ds_all without ids), ids [T, K] or None -> ((dx [T, in] in x's dtype or None, dA [E, in, r]
    in lora_A's dtype or None), [Launch])."""
    T, n_in = x.shape
    E, _, r = lora_A.shape
    K = ds.shape[1]
    RP, BN = _down_blocks(E, r)
    ids_t, s_ids = (ids, ids.stride()) if ids is not None else (ds, (0, 0))
    meta = dict(RP=RP, ACC=_acc(ds.dtype), HAS_IDS=ids is not None, num_warps=8)
    if ids is not None:  # ptxas' own register target spilled 12-44 bytes there (64-128 regs)
        meta["maxnreg"] = 255
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    new_dA = torch.empty_like if n_in else torch.zeros_like
    dA = new_dA(lora_A, memory_format=torch.contiguous_format) if need_dA else None
    # the dA kernel takes 128 input rows per program while RP <= 16 (ds, re-read once per
    # input block, then half as often: cheaper than the separate dx kernel's single read of it),
    # else 64 and, with one column block, writes dx too from the ds tiles it loads anyway
    # (dense only: building the tiles from top-k slots there spilled 28-44 bytes, sm_80)
    da_rows = DA_ROWS_WIDE if RP <= 16 else DA_ROWS
    with_dx = need_dx and need_dA and E * RP <= BN and ids is None and da_rows == DA_ROWS
    launches = []
    if need_dx and not with_dx and T > 0 and n_in > 0:
        # the whole E * RP <= 64 columns as one reduction step while RP <= 16: ds loaded once
        # per program (at RP = 32 that [32, 64] tile held across the input blocks spilled
        # 184-240 bytes, fp16/bf16); else steps of 32, top-k: whole experts per step (part of
        # one, r = 64 in steps of 32, spilled 32 bytes)
        one_k = E * RP <= DOWN_TILE and RP <= 16
        BK = BN if one_k else (DOWN_K if ids is None else max(DOWN_K, RP))
        launches.append(Launch(lora_down_dx_kernel, (triton.cdiv(T, DOWN_K),),
                               (ds, ids_t, lora_A, dx, T, K, n_in, E, r, float(scaling), *s_ids,
                                *lora_A.stride(), *dx.stride()),
                               dict(meta, BM=DOWN_K, BN=DOWN_TILE, BK=BK, ONE_K=one_k,
                                    # ptxas' own target spilled 8-16 bytes at E RP = 64, RP >= 32
                                    # (fp32); with maxnreg, 64 bytes at E RP = 96 (fp32)
                                    **({"maxnreg": 255} if E * RP <= DOWN_TILE else {}))))
    if need_dA and n_in > 0:  # also at T = 0: dA = 0 (the loop over tokens is empty)
        # ds (fp32, small) is re-read once per input block, x once per column block
        # (128 rows spilled 36 bytes at RP = 32 / 64 and 1108 with dx: fp16/bf16, sm_90);
        # 16-token steps with dx or top-k slots (32 spilled 24-60 bytes: fp32, sm_80/sm_90)
        dx_t = dx if with_dx else dA
        launches.append(Launch(lora_down_da_kernel, (triton.cdiv(n_in, da_rows),
                                                     triton.cdiv(E * RP, BN)),
                               (x, ds, ids_t, dA, lora_A, dx_t, T, K, n_in, E, r, float(scaling),
                                *x.stride(), *s_ids, *dA.stride(), *lora_A.stride(),
                                *(dx.stride() if with_dx else (0, 0))),
                               dict(meta, BM=da_rows, BN=BN,
                                    BK=16 if with_dx or ids is not None else DOWN_K,
                                    WITH_DX=with_dx)))
    return (dx, dA), launches


def _run(planned):
    out, launches = planned
    for launch in launches:
        launch.run()
    return out


def down_forward(x, lora_A, scaling, ct):
    return _run(plan_down_forward(x, lora_A, scaling, ct))


def down_backward(ds, ids, x, lora_A, scaling, need_dx, need_dA):
    return _run(plan_down_backward(ds, ids, x, lora_A, scaling, need_dx, need_dA))


RELATION_MAX_F = 64  # largest E * r (padded) of the relation kernel's expert columns: 128
# spilled 8-32 bytes (fp32, sm_80/sm_90) at several (K, r) (compile report, --family lora)
RELATION_ROWS = 32   # R = BT * KP rows per program; so K <= 32 (R x R tiles, as radar_gate's)
RELATION_ROWS_BWD = 16  # ... in the backward kernel, which holds more tiles


def relation_columns(K, E, r, has_ids):
    """F: the relation kernel's expert columns, (E, or K without ids) padded x r padded."""
    return max(16, _pow2(E if has_ids else K) * _pow2(r))


def relation_fits(K, E, r, has_ids) -> bool:
    """True when the relation kernel handles this shape (else the PyTorch relation part)."""
    return K <= RELATION_ROWS and relation_columns(K, E, r, has_ids) <= RELATION_MAX_F


def relation_s_in_registers(backward, KP, F, rg) -> bool:
    """Whether the relation kernels take the column chunks of s from registers (s read once)
    rather than re-loading them per chunk (three reads). Registers spilled (fp32, sm_90; compile
    report, --family lora) at F = 64 with gate rank 64 in the forward (288 bytes at K = 16) and
    at F = 64 with 8 slots per token in the backward (12-20 bytes); every other configuration
    of the report compiles without spills either way."""
    return F < 64 or not (KP >= 8 if backward else _pow2(rg) >= 64)


def plan_factors(lora_B, rot_down, ct):
    """lora_B [E, r, out], rot_down [out, rg] (E r <= RELATION_MAX_F) -> ((P [E, r, E, r],
    Q [E, r, rg]) in ct, [Launch]): one program reads lora_B and rot_down once."""
    E, r, out = lora_B.shape
    rg = rot_down.shape[1]
    P = torch.empty((E, r, E, r), dtype=ct, device=lora_B.device)
    Q = torch.empty((E, r, rg), dtype=ct, device=lora_B.device)
    prec = _v_prec(lora_B.dtype) if rot_down.dtype == lora_B.dtype else "ieee"
    return (P, Q), [Launch(lora_factors_kernel, (1,), (
        lora_B, rot_down, P, Q, E, r, out, rg, *lora_B.stride(), *rot_down.stride()),
        dict(FP=max(16, _pow2(E * r)), RGP=max(16, _pow2(rg)), BO=32, ACC=_acc(ct), PREC=prec,
             num_warps=8, maxnreg=255))]


def factors(lora_B, rot_down, ct):
    return _run(plan_factors(lora_B, rot_down, ct))


def plan_factors_backward(dP, dQ, bad, lora_B, rot_down, ct):
    """Backward of plan_factors (where relation_fits: E r padded <= 64): dP [E, r, E, r],
    dQ [E, r, rg] (contiguous, ct), bad [F] (relation_backward's flags) -> ((dB [E, r, out],
    drot_down [out, rg]) in ct, contiguous, [Launch])."""
    E, r, out = lora_B.shape
    rg = rot_down.shape[1]
    dB = torch.empty((E, r, out), dtype=ct, device=lora_B.device)
    dA_rot = torch.empty((out, rg), dtype=ct, device=lora_B.device)
    return (dB, dA_rot), [Launch(lora_factors_bwd_kernel, (triton.cdiv(out, 32),), (
        lora_B, rot_down, dP, dQ, bad, dB, dA_rot, E, r, out, rg, *lora_B.stride(),
        *rot_down.stride()),
        dict(F=relation_columns(E, E, r, True), RP=_pow2(r), RGP=max(16, _pow2(rg)), BO=32,
             ACC=_acc(ct), num_warps=8, maxnreg=255))]


def factors_backward(dP, dQ, bad, lora_B, rot_down, ct):
    return _run(plan_factors_backward(dP, dQ, bad, lora_B, rot_down, ct))


def plan_relation(s, ids, P, Q, tau, eps):
    """s [T, K, r] (contiguous), ids [T, K] or None, P [E, r, E, r], Q [E, r, rg] (contiguous,
    compute dtype; E = K without ids) -> (d [T, K, rg], [Launch])."""
    T, K, r = s.shape
    E, rg = P.shape[0], Q.shape[2]
    KP, F = _pow2(K), relation_columns(K, E, r, ids is not None)
    d = torch.empty((T, K, rg), dtype=s.dtype, device=s.device)
    launches = []
    if T > 0:
        BT = max(1, RELATION_ROWS // KP)
        launches.append(Launch(lora_relation_kernel, (triton.cdiv(T, BT),), (
            s, ids if ids is not None else s, P, Q, d, T, K, E, r, rg,
            *(ids.stride() if ids is not None else (0, 0)), 1.0 / tau, eps),
            dict(KP=KP, BT=BT, F=F, FC=F if F <= 32 else 32, RP=_pow2(r), RGP=max(16, _pow2(rg)),
                 HAS_IDS=ids is not None, S_REGS=relation_s_in_registers(False, KP, F, rg),
                 ACC=_acc(s.dtype), num_warps=8, maxnreg=255)))
    return d, launches


def relation(s, ids, P, Q, tau, eps):
    return _run(plan_relation(s, ids, P, Q, tau, eps))


def relation_backward_fits(K, E, r, has_ids) -> bool:
    """True when the relation backward kernel handles this shape (else autograd through
    relation_lowrank, chunk by chunk)."""
    # K = 16 (one token per program) spilled 12 bytes (sm_90, rg = 64): K <= 8 here
    return K <= RELATION_ROWS_BWD // 2 and relation_fits(K, E, r, has_ids)


def plan_relation_backward(s, ids, P, Q, dd, ds, tau, eps):
    """Backward of plan_relation: dd [T, K, rg] -> ds (the streaming part [T, K, r],
    contiguous, on entry) += the relation part, in place; -> ((PP [G, F, F], PQ [G, F, RGP]),
    [Launch]): per-token-group partials of dP_flat and dQ_flat (see relation_backward)."""
    T, K, r = s.shape
    E, rg = P.shape[0], Q.shape[2]
    KP, F, RGP = _pow2(K), relation_columns(K, E, r, ids is not None), max(16, _pow2(rg))
    BT = max(1, RELATION_ROWS_BWD // KP)
    n_blocks = triton.cdiv(T, BT)
    # token groups: as many as fill the GPU (the kernel is compute-bound: R x R and F x F tiles
    # per 16 rows); each stores a whole [F, F + RGP] fp32 partial, summed on the host
    G = param_groups(n_blocks, 1, s.device) if T > 0 else 0
    new = torch.empty if G else torch.zeros
    PP = new((max(G, 1), F, F), dtype=s.dtype, device=s.device)
    PQ = new((max(G, 1), F, RGP), dtype=s.dtype, device=s.device)
    PBAD = new((max(G, 1), F), dtype=torch.int32, device=s.device)
    launches = []
    if G:
        launches.append(Launch(lora_relation_bwd_kernel, (G,), (
            s, ids if ids is not None else s, P, Q, dd, ds, PP, PQ, PBAD, T, K, E, r, rg,
            *(ids.stride() if ids is not None else (0, 0)), n_blocks, 1.0 / tau, eps),
            dict(KP=KP, BT=BT, F=F, FC=min(F, 16), RP=_pow2(r), RGP=RGP,
                 HAS_IDS=ids is not None, S_REGS=relation_s_in_registers(True, KP, F, rg),
                 ACC=_acc(s.dtype), num_warps=8, maxnreg=255)))
    return (PP, PQ, PBAD), launches


def relation_backward(s, ids, P, Q, dd, ds, tau, eps):
    """-> (dP [E, r, E, r], dQ [E, r, rg], bad [F] int32); ds += the relation part of its
    gradient. bad flags the padded columns (B_cat rows) of experts used by a token whose
    gradient is non-finite: their terms are left out of dP and dQ, and the factor kernels make
    those rows of dB non-finite, as the reference has them."""
    PP, PQ, PBAD = _run(plan_relation_backward(s, ids, P, Q, dd, ds, tau, eps))
    E, r, rg = P.shape[0], P.shape[1], Q.shape[2]
    RP = _pow2(r)
    F = PP.shape[1]
    one = PP.shape[0] == 1
    dP = (PP[0] if one else PP.sum(0)).view(F // RP, RP, F // RP, RP)[:E, :r, :E, :r]
    dQ = (PQ[0] if one else PQ.sum(0)).view(F // RP, RP, -1)[:E, :r, :rg]
    return dP.contiguous(), dQ.contiguous(), PBAD[0] if one else PBAD.amax(0)


def expert_order(ids, T, K, E, device):
    """(token, slot) rows sorted by expert (stable, on the device: no host sync) and the offsets
    of each expert's segment [E + 1]. Out-of-range ids are sorted past the last expert."""
    flat = (ids.reshape(-1).long() if ids is not None
            else torch.arange(K, device=device).repeat(T))
    key = torch.where((flat >= 0) & (flat < E), flat, E)
    order = torch.argsort(key, stable=True)
    offs = torch.zeros(E + 1, dtype=torch.int64, device=device)
    offs[1:] = torch.cumsum(torch.bincount(key, minlength=E + 1)[:E], 0)
    return order, offs


PACKED_ROWS = 16  # R of lora_bwd_rows_packed_kernel: K <= 16 slots of BT tokens
PACKED_BH = 16    # its feature pairs per chunk (32 spilled 8-72 bytes at F = 64)


def rows_packed_fits(K, E, r, has_ids) -> bool:
    """True when the backward row kernel can hold all slots of a token ([R, F] layout)."""
    return K <= PACKED_ROWS and relation_fits(K, E, r, has_ids)


def plan_rows_backward(dy, s, g, d, ids, lora_B, rot_up, angle_bias):
    """-> ((ds [T, K, r], dg [T, K], dd [T, K, rg]), [Launch]), in the compute dtype of s."""
    T, K, r, E, out, h, rg, cfg, ids_t, beta_t, s_ids, s_beta, meta = _prep(
        s, ids, lora_B, rot_up, angle_bias)
    ct = s.dtype
    packed = rows_packed_fits(K, E, r, ids is not None)
    # packed with ids: zeroed, rows with an out-of-range id (unchecked under compile) store
    # nothing; every other row stores its own expert's r lanes
    ds = (torch.zeros if packed and ids is not None else torch.empty)((T, K, r), dtype=ct,
                                                                      device=s.device)
    dg = torch.empty((T, K), dtype=ct, device=s.device)
    dd = torch.empty((T, K, rg), dtype=ct, device=s.device)
    launches = []
    if T > 0 and packed:
        KP = _pow2(K)
        BT = max(1, PACKED_ROWS // KP)
        launches.append(Launch(lora_bwd_rows_packed_kernel, (triton.cdiv(T, BT),), (
            s, g, d, ids_t, lora_B, rot_up, beta_t, dy, ds, dg, dd, T, K, h, r, rg, E,
            *g.stride(), *s_ids, *lora_B.stride(), *rot_up.stride(), *s_beta, *dy.stride()),
            dict(meta, KP=KP, BT=BT, F=relation_columns(K, E, r, ids is not None), RP=_pow2(r),
                 BH=PACKED_BH, HAS_IDS=ids is not None, num_warps=8)))
    elif T > 0:
        launches.append(Launch(lora_bwd_rows_kernel, (triton.cdiv(T, cfg.BT),), (
            s, g, d, ids_t, lora_B, rot_up, beta_t, dy, ds, dg, dd, T, K, h, r, rg, E,
            *g.stride(), *s_ids, *lora_B.stride(), *rot_up.stride(), *s_beta, *dy.stride()),
            dict(meta, BT=cfg.BT, BH=cfg.BH, RP=cfg.RP, HAS_IDS=ids is not None,
                 num_warps=cfg.WARPS_ROWS)))
    return (ds, dg, dd), launches


def plan_params_backward(dy, s, g, d, ids, lora_B, rot_up, angle_bias, dB):
    """-> ((dB, pU [E, rg, h], dbeta [E, h] or None), [Launch]). ``dB`` [E, r, out] (contiguous,
    compute dtype) holds the gradient's relation part on entry; the kernel adds the streaming
    part in place (each program owns its [r, chunk] of one expert: no atomics). pU are the
    per-expert partials of drot_up."""
    T, K, r, E, out, h, rg, cfg, ids_t, beta_t, s_ids, s_beta, meta = _prep(
        s, ids, lora_B, rot_up, angle_bias)
    ct = s.dtype
    pU = torch.empty((E, rg, h), dtype=ct, device=s.device)  # every element is written
    dbeta = torch.empty((E, h), dtype=ct, device=s.device) if angle_bias is not None else None
    order, offs = expert_order(ids, T, K, E, s.device)
    launch = Launch(lora_bwd_params_kernel, (triton.cdiv(h, cfg.BH_PARAMS), E), (
        s, g, d, order, offs, lora_B, rot_up, beta_t, dy, dB,
        dbeta if dbeta is not None else dB, pU, K, h, r, rg,
        *g.stride(), *lora_B.stride(), *rot_up.stride(), *s_beta, *dy.stride()),
        dict(meta, BH=cfg.BH_PARAMS, BR=cfg.BR, RP=cfg.RP, num_warps=cfg.WARPS_PARAMS))
    return (dB, pU, dbeta), [launch]


PACKED_PARAMS_FG = 16      # padded expert columns per program of lora_bwd_params_packed_kernel
PACKED_GROUP_TOKENS = 1024  # fewest tokens per token group: its partials (E r out 4 B) stay small


def packed_params_blocks(r, rg, h):
    """(BH feature pairs, warps) of lora_bwd_params_packed_kernel. 64 pairs while both padded
    ranks are <= 16; 32 above (64 spilled 8-40 bytes at rg = 64 or r >= 32, fp32, sm_90). A
    chunk of 16 pairs (h <= 16) at gate rank <= 16 runs on 4 warps (8 spilled 8-16 bytes there,
    fp32, sm_80; at gate rank 64, 4 spilled) (compile report, --family lora)."""
    RGP = max(16, _pow2(rg))
    BH = min(32 if RGP > 16 or _pow2(r) >= 32 else 64, max(16, _pow2(h)))
    return BH, 4 if BH == 16 and RGP == 16 else 8


def packed_params_fits(K, E, r, has_ids) -> bool:
    """True when lora_bwd_params_packed_kernel runs (else lora_bwd_params_kernel): the packed
    row layout fits and r <= 32 (r = 64, one expert per tile, spilled 8-164 bytes)."""
    return rows_packed_fits(K, E, r, has_ids) and r <= 32


def plan_params_backward_packed(dy, s, g, d, ids, lora_B, rot_up, angle_bias, dP, dQ, bad,
                                rot_down):
    """The parameter gradients where rows_packed_fits, relation part included: dP [E, r, E, r],
    dQ [E, r, rg] (contiguous, compute dtype), bad [F] (relation_backward's flags) ->
    ((pB [NG, E r, out], pU [NG n_eg, rg, h],
    pbeta [NG, E, h] or None, drot_down [out, rg]), [Launch]): partials per token group (NG = 1
    unless the token count needs more programs to fill a GPU) and, for drot_up, per expert group
    (n_eg = F / FG); params_backward_packed sums them. Compute dtype (storing a lone partial
    in its parameter's dtype spilled 8 bytes at BH = 32, fp16/bf16, sm_90)."""
    T, K, r, E, out, h, rg, cfg, ids_t, beta_t, s_ids, s_beta, meta = _prep(
        s, ids, lora_B, rot_up, angle_bias)
    ct = s.dtype
    KP = _pow2(K)
    BT = max(1, PACKED_ROWS // KP)
    BH, warps = packed_params_blocks(r, rg, h)
    F = relation_columns(K, E, r, ids is not None)
    per_slot = ids is None and KP * _pow2(r) == F  # slot k is expert k: no F-wide dot
    FG = F if per_slot else min(F, max(PACKED_PARAMS_FG, _pow2(r)))  # whole experts per program
    n_eg = F // FG
    n_blocks, n_chunks = triton.cdiv(T, BT), triton.cdiv(h, BH)
    NG = max(1, min(param_groups(max(n_blocks, 1), n_chunks * n_eg, s.device),
                    T // PACKED_GROUP_TOKENS))
    pB = torch.empty((NG, E * r, out), dtype=ct, device=s.device)  # every element is written
    pU = torch.empty((NG * n_eg, rg, h), dtype=ct, device=s.device)
    pbeta = torch.empty((NG, E, h), dtype=ct, device=s.device) if angle_bias is not None \
        else None
    dA_rot = torch.empty((out, rg), dtype=ct, device=s.device)
    launch = Launch(lora_bwd_params_packed_kernel, (n_chunks, NG * n_eg), (
        s, g, d, ids_t, lora_B, rot_up, beta_t, dy, rot_down, dP, dQ, bad, pB, pU,
        pbeta if pbeta is not None else pU, dA_rot, T, K, h, r, rg, E, n_blocks, n_eg,
        *g.stride(), *s_ids, *lora_B.stride(), *rot_up.stride(), *s_beta, *dy.stride(),
        *rot_down.stride()),
        dict(meta, KP=KP, BT=BT, F=F, FG=FG, RP=_pow2(r), EB=max(16, F // _pow2(r)), BH=BH,
             PER_SLOT=per_slot, HAS_IDS=ids is not None, num_warps=warps))
    return (pB, pU, pbeta, dA_rot), [launch]


def params_backward_packed(dy, s, g, d, ids, lora_B, rot_up, angle_bias, dP, dQ, bad,
                           rot_down):
    """-> (dB [E, r, out], drot_up [rg, h], dbeta [E, h] or None, drot_down [out, rg]),
    compute dtype; the token groups' partials summed in a fixed order (no atomics)."""
    pB, pU, pbeta, dA_rot = _run(plan_params_backward_packed(
        dy, s, g, d, ids, lora_B, rot_up, angle_bias, dP, dQ, bad, rot_down))
    E, r, out = lora_B.shape
    dB = (pB[0] if pB.shape[0] == 1 else pB.sum(0)).view(E, r, out)
    dU = pU[0] if pU.shape[0] == 1 else pU.sum(0)
    dbeta = None if pbeta is None else (pbeta[0] if pbeta.shape[0] == 1 else pbeta.sum(0))
    return dB, dU, dbeta, dA_rot


def stream_forward(s, g, d, ids, lora_B, rot_up, angle_bias, out_dtype):
    return _run(plan_stream_forward(s, g, d, ids, lora_B, rot_up, angle_bias, out_dtype))


def stream_backward_rows(dy, s, g, d, ids, lora_B, rot_up, angle_bias):
    """-> (ds, dg, dd): the per-(token, slot) gradients, in the compute dtype of s."""
    return _run(plan_rows_backward(dy, s, g, d, ids, lora_B, rot_up, angle_bias))


def stream_backward_params(dy, s, g, d, ids, lora_B, rot_up, angle_bias, dB):
    """-> (dB, drot_up, dbeta or None); dB is updated in place (see plan_params_backward)."""
    dB, pU, dbeta = _run(plan_params_backward(dy, s, g, d, ids, lora_B, rot_up, angle_bias, dB))
    return dB, pU.sum(0), dbeta
