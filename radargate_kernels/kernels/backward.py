"""Fused backward kernels (SPEC "Backward").

``radargate_bwd_rows_kernel`` (grid: token blocks) makes two passes over D per token block:
pass A recomputes the rotation and accumulates dg and grad_d = dalpha B^T; the K x K chain
(drho, softmax, dC, S, dZ) runs in registers; pass B writes dV = g R(-alpha) dy + normalisation
term + dZ A^T, and stores dg and dZ.

``radargate_bwd_params_kernel`` (grid: feature chunks x token groups) reduces the parameter
gradients dB, dbeta and dA over its tokens in registers and writes one fp32 partial per token
group; the host sums the partials (deterministic, no atomics).
"""
import triton
import triton.language as tl

from .common import (block_dot, block_masks, expert_of_row, kk_offsets, load_chunk_angles,
                     load_halves, load_param_chunk, load_rows, load_token_halves, pair_offsets,
                     rotate, row_ids, store_rows)


@triton.jit
def _row_chunk(DY, V, B, BETA, blk, T, voff, cols, cmask, h, r, rr, d, eid, valid, stride_dy_t,
               stride_dy_d, stride_v_d, stride_b_r, stride_b_h, stride_beta_e, stride_beta_h,
               KP: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, HAS_BETA: tl.constexpr,
               ACC: tl.constexpr):
    """What both passes of the row kernel load per column chunk: dy (per token, broadcast to
    the rows), v, the chunk of B and the angles -> (dy1, dy2, v1, v2, cos alpha, sin alpha, Bc):
    [R, BH] tiles and Bc [RP, BH]."""
    dy1, dy2 = load_token_halves(DY, blk, T, cols, h, stride_dy_t, stride_dy_d, cmask, KP, BT,
                                 BH, ACC)
    Bc = load_param_chunk(B, rr, cols, r, h, stride_b_r, stride_b_h, ACC)
    v1, v2, cos_a, sin_a = load_chunk_angles(V, voff, cols, h, stride_v_d, d, Bc, BETA, eid, valid,
                                             cmask, stride_beta_e, stride_beta_h, HAS_BETA, ACC)
    return dy1, dy2, v1, v2, cos_a, sin_a, Bc


@triton.jit
def radargate_bwd_rows_kernel(
    V, G, A, B, BETA, IDS, DY,            # inputs
    N, CM, RHO, Z, CTX,                   # saved state (CTX: the relational context d)
    DV, DG, DZ,                           # outputs: dV [T,K,D], dg [T,K], dZ [T,K,r] (state dtype)
    T, K, h, r, E,
    stride_v_t, stride_v_k, stride_v_d, stride_g_t, stride_g_k, stride_a_d, stride_a_r,
    stride_b_r, stride_b_h, stride_beta_e, stride_beta_h, stride_ids_t, stride_ids_k,
    stride_dy_t, stride_dy_d,
    stride_dv_t, stride_dv_k, stride_dv_d,
    tau_inv, eps,
    KP: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, BH: tl.constexpr,
    HAS_BETA: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr,
):
    blk = tl.program_id(0)
    tok, slot, valid = row_ids(blk, T, K, KP, BT)
    voff = tok * stride_v_t + slot.to(tl.int64) * stride_v_k
    rr = tl.arange(0, RP)
    flat = tok * K + slot
    same, off = block_masks(K, KP, BT, valid)
    kk = kk_offsets(tok, slot, K)
    n = tl.load(N + flat, mask=valid, other=1.0).to(ACC)
    C = tl.load(CM + kk, mask=same, other=0.0).to(ACC)
    rho = tl.load(RHO + kk, mask=same, other=0.0).to(ACC)
    z = load_rows(Z, flat, valid, r, RP, ACC)
    d = load_rows(CTX, flat, valid, r, RP, ACC)
    g = tl.load(G + tok * stride_g_t + slot.to(tl.int64) * stride_g_k, mask=valid,
                other=0.0).to(ACC)
    eid = expert_of_row(IDS, tok, slot, valid, stride_ids_t, stride_ids_k, E, HAS_IDS)

    # pass A: dg_i = <dy, u_i>, dalpha, grad_d = dalpha B^T
    dg = tl.zeros((BT * KP,), dtype=ACC)
    grad_d = tl.zeros((BT * KP, RP), dtype=ACC)
    for c0 in range(0, h, BH):
        cols = c0 + tl.arange(0, BH)
        cmask = cols < h
        dy1, dy2, v1, v2, cos_a, sin_a, Bc = _row_chunk(
            DY, V, B, BETA, blk, T, voff, cols, cmask, h, r, rr, d, eid, valid, stride_dy_t,
            stride_dy_d, stride_v_d, stride_b_r, stride_b_h, stride_beta_e, stride_beta_h, KP, BT,
            BH, HAS_BETA, ACC)
        u1, u2 = rotate(v1, v2, cos_a, sin_a)
        dg += tl.sum(dy1 * u1 + dy2 * u2, axis=1)
        dalpha = g[:, None] * (dy2 * u1 - dy1 * u2)
        grad_d += tl.dot(dalpha, tl.trans(Bc), input_precision="ieee", out_dtype=ACC)

    # K x K chain in registers
    drho = tl.where(off, tl.dot(grad_d, tl.trans(z), input_precision="ieee", out_dtype=ACC), 0.0)
    dC = tl.where(same, rho * (drho - tl.sum(rho * drho, axis=1)[:, None]) * tau_inv, 0.0)
    S = dC + tl.trans(dC)
    q = tl.where(n > eps, tl.sum(S * C, axis=1), 0.0)  # <v^_i, dv^_i>; 0 where the eps floor held
    dZ = block_dot(tl.trans(rho), grad_d, same, ACC) - grad_d
    dZ = tl.where(K > 1, dZ, 0.0)  # d = 0 when K = 1, so z gets no gradient
    inv_n = 1.0 / n
    tl.store(DG + flat, dg.to(DG.dtype.element_ty), mask=valid)
    store_rows(DZ, dZ, flat, valid, r, RP)

    # pass B: dV
    dvoff = tok * stride_dv_t + slot.to(tl.int64) * stride_dv_k
    for c0 in range(0, h, BH):
        cols = c0 + tl.arange(0, BH)
        cmask = cols < h
        m = valid[:, None] & cmask[None, :]
        dy1, dy2, v1, v2, cos_a, sin_a, Bc = _row_chunk(
            DY, V, B, BETA, blk, T, voff, cols, cmask, h, r, rr, d, eid, valid, stride_dy_t,
            stride_dy_d, stride_v_d, stride_b_r, stride_b_h, stride_beta_e, stride_beta_h, KP, BT,
            BH, HAS_BETA, ACC)
        dv1, dv2 = rotate(dy1, dy2, cos_a, -sin_a)  # R(-alpha) dy
        vh1 = v1 * inv_n[:, None]
        vh2 = v2 * inv_n[:, None]
        dvh1 = block_dot(S, vh1, same, ACC)
        dvh2 = block_dot(S, vh2, same, ACC)
        a1 = load_param_chunk(A, cols, rr, h, r, stride_a_d, stride_a_r, ACC)
        a2 = load_param_chunk(A + h * stride_a_d, cols, rr, h, r, stride_a_d, stride_a_r, ACC)
        dv1 = g[:, None] * dv1 + (dvh1 - q[:, None] * vh1) * inv_n[:, None] \
            + tl.dot(dZ, tl.trans(a1), input_precision="ieee", out_dtype=ACC)
        dv2 = g[:, None] * dv2 + (dvh2 - q[:, None] * vh2) * inv_n[:, None] \
            + tl.dot(dZ, tl.trans(a2), input_precision="ieee", out_dtype=ACC)
        o1, o2 = pair_offsets(dvoff, cols, h, stride_dv_d)
        tl.store(DV + o1, dv1.to(DV.dtype.element_ty), mask=m)
        tl.store(DV + o2, dv2.to(DV.dtype.element_ty), mask=m)


@triton.jit
def radargate_bwd_params_kernel(
    V, G, B, BETA, IDS, DY, CTX, DZ,      # inputs and state (d, dZ)
    PB, PBETA, PA,                        # partials: [NB, r, h], [NB, E, h], [NB, D, r]
    T, K, h, r, E, n_blocks,
    stride_v_t, stride_v_k, stride_v_d, stride_g_t, stride_g_k, stride_b_r, stride_b_h,
    stride_beta_e, stride_beta_h, stride_ids_t, stride_ids_k, stride_dy_t, stride_dy_d,
    KP: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, BH: tl.constexpr, EP: tl.constexpr,
    HAS_BETA: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr,
    NEED_A: tl.constexpr, NEED_B: tl.constexpr, NEED_BETA: tl.constexpr,
):
    # NEED_*: which of dA, dB, dbeta autograd asked for; the others are neither computed nor
    # stored (dA alone needs no rotation at all)
    cid = tl.program_id(0)
    grp = tl.program_id(1)
    n_groups = tl.num_programs(1)
    cols = cid * BH + tl.arange(0, BH)
    cmask = cols < h
    rr = tl.arange(0, RP)
    er = tl.arange(0, EP)
    Bc = load_param_chunk(B, rr, cols, r, h, stride_b_r, stride_b_h, ACC)
    acc_b = tl.zeros((RP, BH), dtype=ACC)
    acc_beta = tl.zeros((EP, BH), dtype=ACC)
    acc_a1 = tl.zeros((BH, RP), dtype=ACC)
    acc_a2 = tl.zeros((BH, RP), dtype=ACC)
    for blk in range(grp, n_blocks, n_groups):
        tok, slot, valid = row_ids(blk, T, K, KP, BT)
        voff = tok * stride_v_t + slot.to(tl.int64) * stride_v_k
        flat = tok * K + slot
        if NEED_B or NEED_BETA:
            dy1, dy2 = load_token_halves(DY, blk, T, cols, h, stride_dy_t, stride_dy_d, cmask, KP,
                                         BT, BH, ACC)
            g = tl.load(G + tok * stride_g_t + slot.to(tl.int64) * stride_g_k, mask=valid,
                        other=0.0).to(ACC)
            d = load_rows(CTX, flat, valid, r, RP, ACC)
            eid = expert_of_row(IDS, tok, slot, valid, stride_ids_t, stride_ids_k, E, HAS_IDS)
            v1, v2, cos_a, sin_a = load_chunk_angles(V, voff, cols, h, stride_v_d, d, Bc, BETA,
                                                     eid, valid, cmask, stride_beta_e,
                                                     stride_beta_h, HAS_BETA, ACC)
            u1, u2 = rotate(v1, v2, cos_a, sin_a)
            dalpha = g[:, None] * (dy2 * u1 - dy1 * u2)
            if NEED_B:
                acc_b += tl.dot(tl.trans(d), dalpha, input_precision="ieee", out_dtype=ACC)
            if NEED_BETA:
                onehot = ((er[:, None] == eid[None, :]) & valid[None, :]).to(ACC)
                acc_beta += tl.dot(onehot, dalpha, input_precision="ieee", out_dtype=ACC)
        else:
            v1, v2 = load_halves(V, voff, cols, h, stride_v_d, valid[:, None] & cmask[None, :],
                                 ACC)
        if NEED_A:
            dZ = load_rows(DZ, flat, valid, r, RP, ACC)
            acc_a1 += tl.dot(tl.trans(v1), dZ, input_precision="ieee", out_dtype=ACC)
            acc_a2 += tl.dot(tl.trans(v2), dZ, input_precision="ieee", out_dtype=ACC)
    g64 = grp.to(tl.int64)
    if NEED_B:
        mb = (rr[:, None] < r) & cmask[None, :]
        tl.store(PB + g64 * r * h + rr[:, None] * h + cols[None, :], acc_b, mask=mb)
    if NEED_BETA:
        me = (er[:, None] < E) & cmask[None, :]
        tl.store(PBETA + g64 * E * h + er[:, None] * h + cols[None, :], acc_beta, mask=me)
    if NEED_A:
        ma = cmask[:, None] & (rr[None, :] < r)
        pa = PA + g64 * 2 * h * r + cols[:, None] * r + rr[None, :]
        tl.store(pa, acc_a1, mask=ma)
        tl.store(pa + h * r, acc_a2, mask=ma)
