"""Fused forward kernel: SPEC steps 1-6 in one launch.

Two passes over D: pass 1 accumulates the Gram matrix (of the rows scaled by their max |v|, so
squares never overflow) and z = V A; the relation map, softmax and d = rho z - z are computed in
registers; pass 2 rotates, stretches and sums into y. With ``ONE_PASS`` (rows narrow enough for
one [R, D/2] tile, launch.pick_config) the tile loaded for the Gram matrix is kept and rotated:
expert_out is read once; a program then runs a group of token blocks (launch.forward_group) and
loads A, B and (where it fits) all of angle_bias once for all of them. Saves the small per-token
state (n, C, rho, z, d) for the backward.
The WIDE plan (K > 32, or K > 16 with r > 32) runs the two passes as two launches (STAGE).
"""
import triton
import triton.language as tl

from .common import (block_dot, block_masks, cos_sin_angles, expert_of_row, kk_offsets,
                     load_chunk_angles, load_halves, load_param_chunk, non_finite, pair_offsets,
                     relational_context, rotate, row_ids, store_rows)


@triton.jit
def relation(gram, m, valid, K, tau_inv, eps, KP: tl.constexpr, BT: tl.constexpr):
    """SPEC steps 1-2 from the block-diagonal Gram tile of the scaled rows ``v / m`` (m [R]: each
    row's max |v|, 0 for a zero row) -> (n [R], C [R, R], rho [R, R]).

    Scaling keeps the squares finite for any finite |v| (|v|^2 overflows fp32 above ~1e19):
    n = max(m |v/m|, eps) and C_ij = gram_ij (m_i / n_i) (m_j / n_j)."""
    same, off = block_masks(K, KP, BT, valid)
    ri = tl.arange(0, BT * KP)
    diag = ri[:, None] == ri[None, :]
    dg = tl.where(diag, gram, 0.0)
    n_row = tl.maximum(m * tl.sqrt(tl.sum(dg, axis=1)), eps)
    n_col = tl.maximum(m * tl.sqrt(tl.sum(dg, axis=0)), eps)
    q_row = m / n_row
    q_col = m / n_col
    C = tl.where(same, gram * (q_row[:, None] * q_col[None, :]), 0.0)
    logits = tl.where(off, C * tau_inv, -float("inf"))
    mx = tl.max(logits, axis=1)
    mx = tl.where(mx == -float("inf"), 0.0, mx)
    e = tl.where(off, tl.exp(logits - mx[:, None]), 0.0)
    den = tl.sum(e, axis=1)
    rho = e / tl.where(den > 0, den, 1.0)[:, None]
    return n_row, C, rho, same


@triton.jit
def _a_halves(A, cols, rr, h, r, stride_a_d, stride_a_r, DT: tl.constexpr):
    """Rows ``cols`` and ``cols + h`` of A -> two [BH, RP] tiles in DT."""
    a1 = load_param_chunk(A, cols, rr, h, r, stride_a_d, stride_a_r, DT)
    a2 = load_param_chunk(A + h * stride_a_d, cols, rr, h, r, stride_a_d, stride_a_r, DT)
    return a1, a2


@triton.jit
def _z_of(v1, v2, a1, a2, V_PREC: tl.constexpr, ACC: tl.constexpr):
    """z contribution of one chunk of column pairs: v1 a1 + v2 a2 -> [R, RP]."""
    return (tl.dot(v1, a1.to(ACC), input_precision=V_PREC, out_dtype=ACC)
            + tl.dot(v2, a2.to(ACC), input_precision=V_PREC, out_dtype=ACC))


@triton.jit
def _stretch_sum_store(Y, g, u1, u2, tb, T, cols, cmask, h, stride_y_t, stride_y_d,
                       KP: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """SPEC step 6 for one chunk: y[t, cols] = sum over the token's K rows of g * u; store."""
    y1 = tl.sum(tl.reshape(g[:, None] * u1, (BT, KP, BH)), axis=1)
    y2 = tl.sum(tl.reshape(g[:, None] * u2, (BT, KP, BH)), axis=1)
    y_off1, y_off2 = pair_offsets(tb.to(tl.int64) * stride_y_t, cols, h, stride_y_d)
    ym = (tb < T)[:, None] & cmask[None, :]
    tl.store(Y + y_off1, y1.to(Y.dtype.element_ty), mask=ym)
    tl.store(Y + y_off2, y2.to(Y.dtype.element_ty), mask=ym)


@triton.jit
def _relation_and_state(gram, m, z, tok, slot, valid, K, r, tau_inv, eps, N, CM, RHO, Z, CTX,
                        KP: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr,
                        ACC: tl.constexpr, STAGE: tl.constexpr):
    """SPEC steps 1-3 in registers from the Gram tile and z; stores the saved state n, C, rho, z
    and (STAGE 0) d -> d [R, RP] (STAGE 1: z, unused; stage 2 computes d)."""
    n, C, rho, same = relation(gram, m, valid, K, tau_inv, eps, KP, BT)
    flat = tok * K + slot
    tl.store(N + flat, n, mask=valid)
    kk = kk_offsets(tok, slot, K)
    tl.store(CM + kk, C, mask=same)
    tl.store(RHO + kk, rho, mask=same)
    store_rows(Z, z, flat, valid, r, RP)
    d = z
    if STAGE == 0:
        d = block_dot(rho, z, same, ACC) - z
        d = tl.where(K > 1, d, 0.0)  # SPEC: with K = 1, d = 0
        store_rows(CTX, d, flat, valid, r, RP)
    return d


@triton.jit
def _one_pass_block(blk, V, G, A, B, IDS, Y, N, CM, RHO, Z, CTX, a1, a2, Bc, BETA, beta_tile,
                    beta_bad, T, K, h, r, E,
                    stride_v_t, stride_v_k, stride_v_d, stride_g_t, stride_g_k, stride_a_d,
                    stride_a_r, stride_b_r, stride_b_h, stride_beta_e, stride_beta_h,
                    stride_ids_t, stride_ids_k, stride_y_t, stride_y_d, tau_inv, eps,
                    KP: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, BH: tl.constexpr,
                    HAS_BETA: tl.constexpr, BETA_TILE: tl.constexpr, HAS_IDS: tl.constexpr,
                    ACC: tl.constexpr, V_PREC: tl.constexpr, HOLD: tl.constexpr):
    """The whole forward of token block ``blk`` from one [R, BH >= h] tile of its rows (loaded
    once, kept for the rotation). HOLD: with the parameter tiles a1, a2 (A), Bc (B) and
    beta_tile (angle_bias, BETA_TILE; beta_bad: it holds a non-finite value) loaded by the
    caller; else A and B are loaded here where they are used (angle_bias per row)."""
    rr = tl.arange(0, RP)
    tok, slot, valid = row_ids(blk, T, K, KP, BT)
    voff = tok * stride_v_t + slot.to(tl.int64) * stride_v_k
    cols = tl.arange(0, BH)
    cmask = cols < h
    g = tl.load(G + tok * stride_g_t + slot.to(tl.int64) * stride_g_k, mask=valid,
                other=0.0).to(ACC)
    eid = expert_of_row(IDS, tok, slot, valid, stride_ids_t, stride_ids_k, E, HAS_IDS)
    # the tile is kept in expert_out's own dtype (half the registers of a widened copy)
    v1, v2 = load_halves(V, voff, cols, h, stride_v_d, valid[:, None] & cmask[None, :],
                         V.dtype.element_ty)
    if not HOLD:
        a1, a2 = _a_halves(A, cols, rr, h, r, stride_a_d, stride_a_r, ACC)
    z = _z_of(v1.to(ACC), v2.to(ACC), a1, a2, V_PREC, ACC)
    m = tl.maximum(tl.max(tl.abs(v1), axis=1), tl.max(tl.abs(v2), axis=1)).to(ACC)
    inv = 1.0 / tl.where(m > 0, m, 1.0)
    # Gram matrix of the scaled rows v / m (no square overflows)
    s1 = v1.to(ACC) * inv[:, None]
    s2 = v2.to(ACC) * inv[:, None]
    gram = tl.dot(s1, tl.trans(s1), input_precision=V_PREC, out_dtype=ACC)
    gram += tl.dot(s2, tl.trans(s2), input_precision=V_PREC, out_dtype=ACC)
    d = _relation_and_state(gram, m, z, tok, slot, valid, K, r, tau_inv, eps, N, CM, RHO, Z, CTX,
                            KP, BT, RP, ACC, 0)
    if not HOLD:
        Bc = load_param_chunk(B, rr, cols, r, h, stride_b_r, stride_b_h, ACC)
    cos_a, sin_a = cos_sin_angles(d, Bc.to(ACC), BETA, beta_tile, eid, valid, cols, cmask,
                                  stride_beta_e, stride_beta_h, HAS_BETA, BETA_TILE, ACC,
                                  BY_DOT=True, tile_bad=beta_bad, PREC=V_PREC)
    u1, u2 = rotate(v1.to(ACC), v2.to(ACC), cos_a, sin_a)
    _stretch_sum_store(Y, g, u1, u2, blk * BT + tl.arange(0, BT), T, cols, cmask, h,
                       stride_y_t, stride_y_d, KP, BT, BH)


# T and GROUP are never specialised (Triton makes an integer argument equal to 1 a constant and
# tracks divisibility by 16): a launch of one token or one block compiles to the same kernel as
# any other, the one benchmarks/compile_report.py checks (the T == 1 specialisation of a first
# grouped version, parameters held at 32 rows, spilled 128-168 bytes at K = 32, D = 130 on sm_80)
NOT_SPECIALISED = ["T", "GROUP"]


@triton.jit(do_not_specialize=NOT_SPECIALISED)
def radargate_fwd_kernel(
    V, G, A, B, BETA, IDS,              # inputs
    Y, N, CM, RHO, Z, CTX,              # outputs: y [T, D]; state n [T,K], C, rho [T,K,K], z and
                                        # the relational context d (CTX) [T,K,r]
    T, K, h, r, E, GROUP,
    stride_v_t, stride_v_k, stride_v_d, stride_g_t, stride_g_k, stride_a_d, stride_a_r,
    stride_b_r, stride_b_h, stride_beta_e, stride_beta_h, stride_ids_t, stride_ids_k,
    stride_y_t, stride_y_d,
    tau_inv, eps,
    KP: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, BH: tl.constexpr,
    HAS_BETA: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, V_PREC: tl.constexpr,
    ONE_PASS: tl.constexpr, STAGE: tl.constexpr = 0, EP: tl.constexpr = 16,
    BETA_TILE: tl.constexpr = False, GROUPED: tl.constexpr = True,
):
    # ONE_PASS: a program runs GROUP consecutive token blocks, each from one kept tile of its
    # rows; the parameter tiles (A, B and with BETA_TILE all of angle_bias, [EP, BH]) are loaded
    # once per program in their own dtype and reused by every block.
    # Otherwise one token block per program, two passes over D. STAGE 0: the whole forward in
    # one launch. The WIDE plan (K > 32, or K > 16 with r > 32; one token per program) runs it as
    # two launches whose tiles fit: STAGE 1 stores n, C, rho and z (pass 1, relation); STAGE 2
    # computes d = rho z - z from them in slot blocks (relational_context), stores d and rotates
    # (pass 2).
    pid = tl.program_id(0)
    rr = tl.arange(0, RP)
    if ONE_PASS and GROUPED:
        cols = tl.arange(0, BH)
        a1, a2 = _a_halves(A, cols, rr, h, r, stride_a_d, stride_a_r, A.dtype.element_ty)
        Bc = load_param_chunk(B, rr, cols, r, h, stride_b_r, stride_b_h, B.dtype.element_ty)
        beta_tile = Bc  # (not read without BETA_TILE)
        beta_bad = False
        if HAS_BETA and BETA_TILE:
            beta_tile = load_param_chunk(BETA, tl.arange(0, EP), cols, E, h, stride_beta_e,
                                         stride_beta_h, BETA.dtype.element_ty)
            beta_bad = tl.sum(non_finite(beta_tile).to(tl.int32)) > 0
        stop = tl.minimum(pid * GROUP + GROUP, tl.cdiv(T, BT))
        for blk in range(pid * GROUP, stop):
            _one_pass_block(blk, V, G, A, B, IDS, Y, N, CM, RHO, Z, CTX, a1, a2, Bc, BETA,
                            beta_tile, beta_bad, T, K, h, r, E,
                            stride_v_t, stride_v_k, stride_v_d, stride_g_t, stride_g_k,
                            stride_a_d, stride_a_r, stride_b_r, stride_b_h,
                            stride_beta_e, stride_beta_h, stride_ids_t, stride_ids_k,
                            stride_y_t, stride_y_d, tau_inv, eps,
                            KP, BT, RP, BH, HAS_BETA, BETA_TILE, HAS_IDS, ACC, V_PREC, True)
    elif ONE_PASS:
        # one block per program, parameters loaded where used (32-row tiles: holding them
        # spilled 56-168 bytes, compile report)
        _one_pass_block(pid, V, G, A, B, IDS, Y, N, CM, RHO, Z, CTX, 0, 0, 0, BETA, 0, False,
                        T, K, h, r, E,
                        stride_v_t, stride_v_k, stride_v_d, stride_g_t, stride_g_k,
                        stride_a_d, stride_a_r, stride_b_r, stride_b_h,
                        stride_beta_e, stride_beta_h, stride_ids_t, stride_ids_k,
                        stride_y_t, stride_y_d, tau_inv, eps,
                        KP, BT, RP, BH, HAS_BETA, False, HAS_IDS, ACC, V_PREC, False)
    else:
        blk = pid
        tok, slot, valid = row_ids(blk, T, K, KP, BT)
        voff = tok * stride_v_t + slot.to(tl.int64) * stride_v_k
        if STAGE == 2:
            d = relational_context(RHO, Z, blk, slot, valid, K, r, KP, RP, ACC)
            store_rows(CTX, d, tok * K + slot, valid, r, RP)
        else:
            # pass 1 over D: z = V A and the Gram matrix of the rows scaled by their running
            # max |v| (rescaled when the max grows, as an online softmax does), so no square
            # overflows
            gram = tl.zeros((BT * KP, BT * KP), dtype=ACC)
            z = tl.zeros((BT * KP, RP), dtype=ACC)
            m = tl.zeros((BT * KP,), dtype=ACC)
            for c0 in range(0, h, BH):
                cols = c0 + tl.arange(0, BH)
                cmask = cols < h
                v1, v2 = load_halves(V, voff, cols, h, stride_v_d,
                                     valid[:, None] & cmask[None, :], ACC)
                a1, a2 = _a_halves(A, cols, rr, h, r, stride_a_d, stride_a_r, ACC)
                z += _z_of(v1, v2, a1, a2, V_PREC, ACC)
                m_new = tl.maximum(m, tl.maximum(tl.max(tl.abs(v1), axis=1),
                                                 tl.max(tl.abs(v2), axis=1)))
                inv = 1.0 / tl.where(m_new > 0, m_new, 1.0)
                f = m * inv
                gram = gram * (f[:, None] * f[None, :])
                v1 = v1 * inv[:, None]  # the scaled rows (v is not needed unscaled any more)
                v2 = v2 * inv[:, None]
                gram += tl.dot(v1, tl.trans(v1), input_precision=V_PREC, out_dtype=ACC)
                gram += tl.dot(v2, tl.trans(v2), input_precision=V_PREC, out_dtype=ACC)
                m = m_new
            d = _relation_and_state(gram, m, z, tok, slot, valid, K, r, tau_inv, eps, N, CM,
                                    RHO, Z, CTX, KP, BT, RP, ACC, STAGE)

        if STAGE != 1:
            # pass 2 over D: rotate, stretch, sum over the K slots of each token
            g = tl.load(G + tok * stride_g_t + slot.to(tl.int64) * stride_g_k, mask=valid,
                        other=0.0).to(ACC)
            eid = expert_of_row(IDS, tok, slot, valid, stride_ids_t, stride_ids_k, E, HAS_IDS)
            tb = blk * BT + tl.arange(0, BT)
            for c0 in range(0, h, BH):
                cols = c0 + tl.arange(0, BH)
                cmask = cols < h
                Bc = load_param_chunk(B, rr, cols, r, h, stride_b_r, stride_b_h, ACC)
                v1, v2, cos_a, sin_a = load_chunk_angles(V, voff, cols, h, stride_v_d, d, Bc, BETA,
                                                         eid, valid, cmask, stride_beta_e,
                                                         stride_beta_h, HAS_BETA, ACC)
                u1, u2 = rotate(v1, v2, cos_a, sin_a)
                _stretch_sum_store(Y, g, u1, u2, tb, T, cols, cmask, h, stride_y_t, stride_y_d, KP,
                                   BT, BH)


# The WIDE plan's two stages as their own compilation without Triton's h == 1 (D = 2)
# specialisation: with it, fp32 stage 1 at r = 17..32 spilled 56-72 bytes, without it 0
# (compile report); the one-launch kernel keeps the compilation its report verified.
radargate_fwd_wide_kernel = triton.jit(radargate_fwd_kernel.fn,
                                       do_not_specialize=["h"] + NOT_SPECIALISED)
