"""Fused backward kernels (SPEC "Backward"): expert_out and dy are read twice, once per kernel.

``radargate_bwd_rows_kernel`` (grid: token blocks) walks D once per token block: it recomputes
the rotation and accumulates dg and grad_d = dalpha B^T, then runs the K x K chain (drho, softmax,
dC, S, dZ) in registers and stores dg, dZ [T, K, r] and the per-token matrix
M = S / (n n^T) - diag(<v^_i, dv^_i> / n_i^2) [T, K, K] that applies the normalisation's
backward to v: dv_i (relation part) = sum_j M_ij v_j.

``radargate_bwd_columns_kernel`` (grid: feature chunks x token groups) walks the tokens once per
feature chunk: it recomputes the angles and writes dV = g R(-alpha) dy + M v + dZ A^T, and reduces
the parameter gradients dB, dbeta and dA over its tokens in registers into one fp32 partial per
token group; the host sums the partials (deterministic, no atomics).

The WIDE plan (K > 32, or K > 16 with r > 32; launch.pick_config) runs one token per program:
the row kernel's first stage stores grad_d, ``radargate_bwd_chain_kernel`` runs the K x K chain
from memory over blocks of 16 slots or ranks, and the column kernel runs as a dV launch (M v
over slot blocks, ``_mv_blocks``) and a parameter launch: expert_out is read three times.
"""
import triton
import triton.language as tl

from .common import (block_dot, block_masks, cos_sin_angles, dot_tf32x2, expert_of_row,
                     kk_offsets, load_halves, load_param_chunk, load_rows, load_token_halves,
                     pair_offsets, rotate, row_ids, store_rows, token_rows)


@triton.jit
def _dalpha(dy1, dy2, v1, v2, cos_a, sin_a, g):
    """u = R(alpha) v and dalpha = g (dy[p+h] u[p] - dy[p] u[p+h]) -> (u1, u2, dalpha)."""
    u1, u2 = rotate(v1, v2, cos_a, sin_a)
    return u1, u2, g[:, None] * (dy2 * u1 - dy1 * u2)


@triton.jit
def softmax_cosine_backward(drho, rho, C, n, same, tau_inv, eps):
    """From drho [R, R] through the softmax and the cosines: dC = rho (drho - rowsum(rho drho))
    / tau, S = dC + dC^T and q_i = <v^_i, dv^_i> = sum_j S_ij C_ij (0 where the eps floor held)
    -> (S [R, R], q [R])."""
    dC = tl.where(same, rho * (drho - tl.sum(rho * drho, axis=1)[:, None]) * tau_inv, 0.0)
    S = dC + tl.trans(dC)
    return S, tl.where(n > eps, tl.sum(S * C, axis=1), 0.0)


@triton.jit
def normalisation_matrix(S, q, n):
    """The normalisation's backward as one matrix on v: dv_i += (sum_j S_ij v_j / n_j - q_i v_i
    / n_i) / n_i = sum_j M_ij v_j, M = S / (n n^T) - diag(q / n^2) -> M [R, R]."""
    inv_n = 1.0 / n
    ri = tl.arange(0, n.shape[0])
    Mt = S * inv_n[:, None] * inv_n[None, :]
    return tl.where(ri[:, None] == ri[None, :], Mt - (q * inv_n * inv_n)[:, None], Mt)


# T (and the column kernel's block count) are never specialised, as in the forward: a launch of
# one token compiles to the kernel benchmarks/compile_report.py checks
@triton.jit(do_not_specialize=["T"])
def radargate_bwd_rows_kernel(
    V, G, B, BETA, IDS, DY,               # inputs
    N, CM, RHO, Z, CTX,                   # saved state (CTX: the relational context d)
    DG, DZ, M,                            # outputs: dg [T,K], dZ [T,K,r], M [T,K,K] (state dtype)
    T, K, h, r, E,
    stride_v_t, stride_v_k, stride_v_d, stride_g_t, stride_g_k,
    stride_b_r, stride_b_h, stride_beta_e, stride_beta_h, stride_ids_t, stride_ids_k,
    stride_dy_t, stride_dy_d,
    tau_inv, eps,
    KP: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, BH: tl.constexpr, EP: tl.constexpr,
    HAS_BETA: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, TC: tl.constexpr,
    BETA_TILE: tl.constexpr, STAGE: tl.constexpr = 0,
):
    # TC: products with B on tensor cores (dot_tf32x2; fp16/bf16 inputs, whose values are exact
    # in tf32), else ieee. BETA_TILE: angle_bias read as a chunk of all E experts (fewer than
    # the block's rows) and selected per row in registers, instead of one load per (token, slot)
    blk = tl.program_id(0)
    er = tl.arange(0, EP)
    tok, slot, valid = row_ids(blk, T, K, KP, BT)
    voff = tok * stride_v_t + slot.to(tl.int64) * stride_v_k
    rr = tl.arange(0, RP)
    flat = tok * K + slot
    same, off = block_masks(K, KP, BT, valid)
    kk = kk_offsets(tok, slot, K)
    d = load_rows(CTX, flat, valid, r, RP, ACC)
    g = tl.load(G + tok * stride_g_t + slot.to(tl.int64) * stride_g_k, mask=valid,
                other=0.0).to(ACC)
    eid = expert_of_row(IDS, tok, slot, valid, stride_ids_t, stride_ids_k, E, HAS_IDS)

    # one pass over D: dg_i = <dy, u_i>, grad_d = dalpha B^T
    dg = tl.zeros((BT * KP,), dtype=ACC)
    grad_d = tl.zeros((BT * KP, RP), dtype=ACC)
    for c0 in range(0, h, BH):
        cols = c0 + tl.arange(0, BH)
        cmask = cols < h
        dy1, dy2 = load_token_halves(DY, blk, T, cols, h, stride_dy_t, stride_dy_d, cmask, KP, BT,
                                     BH, ACC)
        Bc = load_param_chunk(B, rr, cols, r, h, stride_b_r, stride_b_h, ACC)
        v1, v2 = load_halves(V, voff, cols, h, stride_v_d, valid[:, None] & cmask[None, :], ACC)
        if HAS_BETA and BETA_TILE:
            beta_c = load_param_chunk(BETA, er, cols, E, h, stride_beta_e, stride_beta_h, ACC)
        else:
            beta_c = Bc  # not read
        cos_a, sin_a = cos_sin_angles(d, Bc, BETA, beta_c, eid, valid, cols, cmask,
                                      stride_beta_e, stride_beta_h, HAS_BETA, BETA_TILE, ACC, TC)
        u1, u2, dalpha = _dalpha(dy1, dy2, v1, v2, cos_a, sin_a, g)
        dg += tl.sum(dy1 * u1 + dy2 * u2, axis=1)
        if TC:
            grad_d += dot_tf32x2(dalpha, tl.trans(Bc), ACC)
        else:
            grad_d += tl.dot(dalpha, tl.trans(Bc), input_precision="ieee", out_dtype=ACC)

    if STAGE == 1:
        # WIDE: grad_d goes where dZ would (a scratch buffer); radargate_bwd_chain_kernel
        # runs the K x K chain from memory in slot blocks
        tl.store(DG + flat, dg.to(DG.dtype.element_ty), mask=valid)
        store_rows(DZ, grad_d, flat, valid, r, RP)
    else:
        # K x K chain in registers
        n = tl.load(N + flat, mask=valid, other=1.0).to(ACC)
        C = tl.load(CM + kk, mask=same, other=0.0).to(ACC)
        rho = tl.load(RHO + kk, mask=same, other=0.0).to(ACC)
        z = load_rows(Z, flat, valid, r, RP, ACC)
        drho = tl.where(off, tl.dot(grad_d, tl.trans(z), input_precision="ieee", out_dtype=ACC),
                        0.0)
        S, q = softmax_cosine_backward(drho, rho, C, n, same, tau_inv, eps)
        dZ = block_dot(tl.trans(rho), grad_d, same, ACC) - grad_d
        dZ = tl.where(K > 1, dZ, 0.0)  # d = 0 when K = 1, so z gets no gradient
        Mt = normalisation_matrix(S, q, n)
        tl.store(DG + flat, dg.to(DG.dtype.element_ty), mask=valid)
        store_rows(DZ, dZ, flat, valid, r, RP)
        tl.store(M + kk, Mt, mask=same)


# The WIDE plan's first stage (STAGE 1) as its own compilation without Triton's h == 1 (D = 2)
# specialisation: with it, fp32 at r > 32 with 128 experts spilled 296-528 bytes, without it 0;
# the one-launch kernel keeps it (without it 8 bytes spilled at K = 32, r = 17, D = 2, fp16).
radargate_bwd_rows_wide_kernel = triton.jit(radargate_bwd_rows_kernel.fn,
                                            do_not_specialize=["h", "T"])


@triton.jit
def radargate_bwd_chain_kernel(
    N, CM, RHO, Z, GD,                    # saved state and grad_d [T,K,r] (row kernel, STAGE 1)
    DZ, M,                                # outputs: dZ [T,K,r], M [T,K,K]
    K, r, tau_inv, eps,
    KP: tl.constexpr, RP: tl.constexpr, ACC: tl.constexpr,
):
    """The row kernel's K x K chain in the WIDE plan (K > 32, or K > 16 with r > 32), one token
    per program, from memory: drho = grad_d z^T over rank blocks of 16 and dZ = rho^T grad_d -
    grad_d over slot blocks of 16, so no dot operand holds all 64 slots or 64 ranks (in
    registers that spilled, compile report)."""
    t = tl.program_id(0)
    slot = tl.arange(0, KP)
    valid = slot < K
    flat = tl.cast(t, tl.int64) * K + slot
    same = valid[:, None] & valid[None, :]
    off = same & (slot[:, None] != slot[None, :])
    kk = tl.cast(t, tl.int64) * K * K + slot[:, None] * K + slot[None, :]
    drho = tl.zeros((KP, KP), dtype=ACC)
    for c0 in range(0, r, 16):
        rc = c0 + tl.arange(0, 16)
        m = valid[:, None] & (rc < r)[None, :]
        gd_b = tl.load(GD + flat[:, None] * r + rc[None, :], mask=m, other=0.0).to(ACC)
        z_b = tl.load(Z + flat[:, None] * r + rc[None, :], mask=m, other=0.0).to(ACC)
        drho += tl.dot(gd_b, tl.trans(z_b), input_precision="ieee", out_dtype=ACC)
    dZ = tl.zeros((KP, RP), dtype=ACC)
    for j0 in range(0, K, 16):
        kb = j0 + tl.arange(0, 16)
        # rho^T's columns kb: rho[t, kb, slot]
        rho_t = tl.load(RHO + tl.cast(t, tl.int64) * K * K + kb[None, :] * K + slot[:, None],
                        mask=valid[:, None] & (kb < K)[None, :], other=0.0).to(ACC)
        dZ += tl.dot(rho_t, token_rows(GD, t, kb, K, r, RP, ACC), input_precision="ieee",
                     out_dtype=ACC)
    dZ -= load_rows(GD, flat, valid, r, RP, ACC)
    n = tl.load(N + flat, mask=valid, other=1.0).to(ACC)
    C = tl.load(CM + kk, mask=same, other=0.0).to(ACC)
    rho = tl.load(RHO + kk, mask=same, other=0.0).to(ACC)
    S, q = softmax_cosine_backward(tl.where(off, drho, 0.0), rho, C, n, same, tau_inv, eps)
    Mt = normalisation_matrix(S, q, n)
    store_rows(DZ, tl.where(K > 1, dZ, 0.0), flat, valid, r, RP)
    tl.store(M + kk, Mt, mask=same)


@triton.jit
def _mv_blocks(M, V, t, slot, valid, cols, cmask, K, h, stride_v_t, stride_v_k, stride_v_d,
               KP: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr):
    """M v for the columns ``cols`` of one token ``t`` (rows = its KP slots), over blocks of 16
    slots loaded from memory (M [T, K, K], V [T, K, D]) -> two [KP, BH] tiles: the WIDE plan,
    where the product with the whole [KP, KP] tile in registers spilled (compile report)."""
    mv1 = tl.zeros((KP, BH), dtype=ACC)
    mv2 = tl.zeros((KP, BH), dtype=ACC)
    t64 = tl.cast(t, tl.int64)
    for j0 in range(0, K, 16):
        kb = j0 + tl.arange(0, 16)
        kval = kb < K
        m_b = tl.load(M + (t64 * K + slot)[:, None] * K + kb[None, :],
                      mask=valid[:, None] & kval[None, :], other=0.0).to(ACC)
        vb1, vb2 = load_halves(V, t64 * stride_v_t + kb.to(tl.int64) * stride_v_k, cols, h,
                               stride_v_d, kval[:, None] & cmask[None, :], ACC)
        mv1 += tl.dot(m_b, vb1, input_precision="ieee", out_dtype=ACC)
        mv2 += tl.dot(m_b, vb2, input_precision="ieee", out_dtype=ACC)
    return mv1, mv2


@triton.jit(do_not_specialize=["T", "n_blocks"])
def radargate_bwd_columns_kernel(
    V, G, A, B, BETA, IDS, DY, CTX, DZ, M,  # inputs and state (d, dZ, M)
    DV, PB, PBETA, PA,                      # dV [T,K,D]; partials [NB,r,h], [NB,E,h], [NB,D,r]
    T, K, h, r, E, n_blocks,
    stride_v_t, stride_v_k, stride_v_d, stride_g_t, stride_g_k, stride_a_d, stride_a_r,
    stride_b_r, stride_b_h, stride_beta_e, stride_beta_h, stride_ids_t, stride_ids_k,
    stride_dy_t, stride_dy_d, stride_dv_t, stride_dv_k, stride_dv_d,
    KP: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, BH: tl.constexpr, EP: tl.constexpr,
    HAS_BETA: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, BETA_TILE: tl.constexpr,
    NEED_DV: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr, NEED_BETA: tl.constexpr,
    MV_BLOCKS: tl.constexpr = False,
):
    # NEED_*: what this launch computes: dV, and which of dA, dB, dbeta autograd asked for; the
    # others are neither computed nor stored. dV and the parameter gradients come from one
    # launch except where launch.pick_config splits them (SPLIT_COLS). All products ieee: the
    # tensor-core split (dot_tf32x2) spilled here (docs/launch_config.md).
    # BETA_TILE: angle_bias's chunk for all experts loaded once per program and selected per
    # row (E <= 32; a wider tile held across the loop spilled), else one row per (token, slot)
    cid = tl.program_id(0)
    grp = tl.program_id(1)
    n_groups = tl.num_programs(1)
    cols = cid * BH + tl.arange(0, BH)
    cmask = cols < h
    rr = tl.arange(0, RP)
    er = tl.arange(0, EP)
    # the chunk's parameters, loaded once per program
    Bc = load_param_chunk(B, rr, cols, r, h, stride_b_r, stride_b_h, ACC)
    if NEED_DV:
        a1 = load_param_chunk(A, cols, rr, h, r, stride_a_d, stride_a_r, ACC)
        a2 = load_param_chunk(A + h * stride_a_d, cols, rr, h, r, stride_a_d, stride_a_r, ACC)
    if HAS_BETA and BETA_TILE:
        beta_c = load_param_chunk(BETA, er, cols, E, h, stride_beta_e, stride_beta_h, ACC)
    else:
        beta_c = Bc  # not read
    acc_b = tl.zeros((RP, BH), dtype=ACC)
    acc_beta = tl.zeros((EP, BH), dtype=ACC)
    acc_a1 = tl.zeros((BH, RP), dtype=ACC)
    acc_a2 = tl.zeros((BH, RP), dtype=ACC)
    for blk in range(grp, n_blocks, n_groups):
        tok, slot, valid = row_ids(blk, T, K, KP, BT)
        voff = tok * stride_v_t + slot.to(tl.int64) * stride_v_k
        flat = tok * K + slot
        if NEED_A or NEED_B or NEED_BETA or not MV_BLOCKS:
            v1, v2 = load_halves(V, voff, cols, h, stride_v_d, valid[:, None] & cmask[None, :],
                                 ACC)
        if NEED_DV or NEED_A:
            dZ = load_rows(DZ, flat, valid, r, RP, ACC)
        if NEED_DV or NEED_B or NEED_BETA:
            dy1, dy2 = load_token_halves(DY, blk, T, cols, h, stride_dy_t, stride_dy_d, cmask, KP,
                                         BT, BH, ACC)
            g = tl.load(G + tok * stride_g_t + slot.to(tl.int64) * stride_g_k, mask=valid,
                        other=0.0).to(ACC)
            d = load_rows(CTX, flat, valid, r, RP, ACC)
            eid = expert_of_row(IDS, tok, slot, valid, stride_ids_t, stride_ids_k, E, HAS_IDS)
            cos_a, sin_a = cos_sin_angles(d, Bc, BETA, beta_c, eid, valid, cols, cmask,
                                          stride_beta_e, stride_beta_h, HAS_BETA, BETA_TILE, ACC)
        if NEED_DV:
            # dV = g R(-alpha) dy + M v + dZ A^T
            dv1, dv2 = rotate(dy1, dy2, cos_a, -sin_a)
            if MV_BLOCKS:
                mv1, mv2 = _mv_blocks(M, V, blk, slot, valid, cols, cmask, K, h, stride_v_t,
                                      stride_v_k, stride_v_d, KP, BH, ACC)
            else:
                same, off = block_masks(K, KP, BT, valid)
                Mt = tl.load(M + kk_offsets(tok, slot, K), mask=same, other=0.0).to(ACC)
                mv1 = block_dot(Mt, v1, same, ACC)
                mv2 = block_dot(Mt, v2, same, ACC)
            dv1 = g[:, None] * dv1 + mv1 \
                + tl.dot(dZ, tl.trans(a1), input_precision="ieee", out_dtype=ACC)
            dv2 = g[:, None] * dv2 + mv2 \
                + tl.dot(dZ, tl.trans(a2), input_precision="ieee", out_dtype=ACC)
            o1, o2 = pair_offsets(tok * stride_dv_t + slot.to(tl.int64) * stride_dv_k, cols, h,
                                  stride_dv_d)
            m = valid[:, None] & cmask[None, :]
            tl.store(DV + o1, dv1.to(DV.dtype.element_ty), mask=m)
            tl.store(DV + o2, dv2.to(DV.dtype.element_ty), mask=m)
        if NEED_B or NEED_BETA:
            u1, u2, dalpha = _dalpha(dy1, dy2, v1, v2, cos_a, sin_a, g)
            if NEED_B:
                acc_b += tl.dot(tl.trans(d), dalpha, input_precision="ieee", out_dtype=ACC)
            if NEED_BETA:
                onehot = ((er[:, None] == eid[None, :]) & valid[None, :]).to(ACC)
                acc_beta += tl.dot(onehot, dalpha, input_precision="ieee", out_dtype=ACC)
        if NEED_A:
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
