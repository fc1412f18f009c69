"""radar_gate's relation part (SPEC steps 1-3 and their backward) in one small kernel each.

A program owns BT tokens as R = BT * KP rows (all slots of a token: stream.py's layout with
SK = KP); each token's K x K matrices are the diagonal blocks of an R x R tile, and the products
between rows of different tokens take the other token's rows with non-finite entries as 0
(tile.other_tokens_safe): a token with a non-finite v or dd has non-finite rows of its own.

- ``op_relation_fwd_kernel`` (grid: token blocks): one pass over D accumulates the Gram matrix
  of the rows scaled by a power of two near their max |v| (exact in the input dtype, so no square
  overflows and a 16-bit tile's products stay exact) and z = V A; then
  n = max(|v|, eps), C, rho = softmax over j != i of C / tau, d = rho z - z (d = 0 when K = 1).
  Stores n [T, K], C and rho [T, K, K], z and d [T, K, r] (the state the backward reads).
- ``op_relation_bwd_kernel`` (grid: token blocks): from dd = dL/dd [T, K, r] (stream.py's row
  kernel): drho_ij = <dd_i, z_j>, dC = rho (drho - rowsum(rho drho)) / tau, S = dC + dC^T,
  dZ = rho^T dd - dd, and the normalisation's backward as one matrix on v,
  M = S / (n n^T) - diag(<v^_i, dv^_i> / n_i^2) with <v^_i, dv^_i> = sum_j S_ij C_ij
  (0 where the eps floor holds): dv (relation part) = M v + dZ A^T (stream.py's column kernel).
"""
import triton
import triton.language as tl

from .tile import (block_rows, expert_of, load_pairs, load_rows, load_tile, mm, non_finite,
                   other_tokens_safe, store_rows)


@triton.jit
def same_token(valid, KP: tl.constexpr):
    """Masks on the R x R tile: same token (both rows real), same token off the diagonal."""
    ri = tl.arange(0, valid.shape[0])
    same = ((ri[:, None] // KP) == (ri[None, :] // KP)) & valid[:, None] & valid[None, :]
    return same, same & (ri[:, None] != ri[None, :])


@triton.jit
def cosines_softmax(gram, m, valid, tau_inv, eps, KP: tl.constexpr):
    """SPEC steps 1-2 from the block-diagonal Gram tile of the scaled rows v / m (m [R] > 0) ->
    (n [R], C [R, R], rho [R, R], same, off): n = max(m |v / m|, eps),
    C_ij = gram_ij (m_i / n_i) (m_j / n_j), rho = softmax over j != i of C / tau."""
    same, off = same_token(valid, KP)
    ri = tl.arange(0, valid.shape[0])
    n = tl.maximum(m * tl.sqrt(tl.sum(tl.where(ri[:, None] == ri[None, :], gram, 0.0), axis=1)),
                   eps)
    q = m / n
    C = tl.where(same, gram * (q[:, None] * q[None, :]), 0.0)
    # softmax over j != i of C / tau (|C| <= 1, so exp(C / tau - max) needs the max only for
    # small tau); rows without another slot (K = 1) give rho = 0
    mx = tl.max(tl.where(off, C, -float("inf")), axis=1)
    ex = tl.where(off, tl.exp((C - tl.where(mx == -float("inf"), 0.0, mx)[:, None]) * tau_inv),
                  0.0)
    den = tl.sum(ex, axis=1)
    return n, C, ex / tl.where(den > 0, den, 1.0)[:, None], same, off


@triton.jit
def chain_backward(dd, z, n, C, rho, same, off, K, tau_inv, eps, BT: tl.constexpr):
    """SPEC's backward from dd [R, RGP] through d = rho z - z, the softmax and the cosines ->
    (S = dC + dC^T [R, R], q = <v^_i, dv^_i> = sum_j S_ij C_ij (0 where the eps floor holds),
    dz = rho^T dd - dd [R, RGP], 0 when K = 1)."""
    drho = tl.where(off, mm(dd, tl.trans(z), "ieee"), 0.0)  # row i of dd with row j of z
    dC = tl.where(same, rho * (drho - tl.sum(rho * drho, axis=1)[:, None]) * tau_inv, 0.0)
    S = dC + tl.trans(dC)
    q = tl.where(n > eps, tl.sum(S * C, axis=1), 0.0)
    dz = mm(tl.trans(rho), other_tokens_safe(dd, BT), "ieee") - dd
    return S, q, tl.where(K > 1, dz, 0.0 * dd)  # d = 0 when K = 1: z gets no gradient


@triton.jit
def pow2_below(m):
    """A power of two within a factor of two of m > 0 (1 where m is 0): scaling by it is exact."""
    return tl.where(m > 0, tl.exp2(tl.floor(tl.log2(tl.where(m > 0, m, 1.0)))), 1.0)


@triton.jit(do_not_specialize=["T"])
def op_relation_fwd_kernel(
    V, A, N, CM, RHO, Z, DCTX,
    T, K, h, r, s_vt, s_vk, s_vd, s_ad, s_ar, tau_inv, eps,
    KP: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, RP: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    blk = tl.program_id(0)
    tok, slot, valid = block_rows(blk, 0, T, K, BT, KP)
    voff = tok * s_vt + slot.to(tl.int64) * s_vk
    rr = tl.arange(0, RP)
    R: tl.constexpr = BT * KP
    # two passes over D (the second from L2): the Gram matrix, then z = V A (one accumulator
    # live at a time: both together spilled at 64 rows on sm_80)
    gram = tl.zeros((R, R), dtype=ACC)
    m = tl.zeros((R,), dtype=ACC)
    for c0 in range(0, h, BH):
        v1, v2 = load_pairs(V, voff, c0 + tl.arange(0, BH), h, s_vd,
                            valid[:, None] & (c0 + tl.arange(0, BH) < h)[None, :], ACC)
        # the rows scaled by a power of two, rescaled (exactly) as it grows: a 16-bit input
        # tile stays exact in tf32, so these tensor-core products are exact
        big = tl.maximum(tl.max(tl.abs(v1), axis=1), tl.max(tl.abs(v2), axis=1))
        m_new = pow2_below(tl.maximum(m, big))
        f = tl.where(m > 0, m / m_new, 0.0)
        gram = gram * (f[:, None] * f[None, :])
        inv = (1.0 / m_new)[:, None]
        s1 = v1 * inv
        s2 = v2 * inv
        gram += mm(s1, tl.trans(s1), PREC) + mm(s2, tl.trans(s2), PREC)
        m = m_new
    z = tl.zeros((R, RP), dtype=ACC)
    for c0 in range(0, h, BH):
        cols = c0 + tl.arange(0, BH)
        v1, v2 = load_pairs(V, voff, cols, h, s_vd, valid[:, None] & (cols < h)[None, :], ACC)
        z += mm(v1, load_tile(A, cols, rr, h, r, s_ad, s_ar, ACC), PREC) \
            + mm(v2, load_tile(A, cols + h, rr, 2 * h, r, s_ad, s_ar, ACC), PREC)  # z = V A
    n, C, rho, same, _ = cosines_softmax(gram, tl.where(m > 0, m, 1.0), valid, tau_inv, eps, KP)
    d = mm(rho, other_tokens_safe(z, BT), "ieee") - z  # (a non-finite z: its token's rho is too)
    d = tl.where(K > 1, d, 0.0 * z)  # SPEC: d = 0 when K = 1 (a NaN stays NaN)
    row = tok * K + slot
    kk = row[:, None] * K + (tl.arange(0, R) % KP)[None, :]
    tl.store(N + row, n, mask=valid)
    tl.store(CM + kk, C, mask=same)
    tl.store(RHO + kk, rho, mask=same)
    store_rows(Z, z, row, valid, r, RP)
    store_rows(DCTX, d, row, valid, r, RP)


@triton.jit(do_not_specialize=["T"])
def op_relation_bwd_kernel(
    DD, N, CM, RHO, Z, MR, DZ,
    T, K, r, tau_inv, eps,
    KP: tl.constexpr, BT: tl.constexpr, RP: tl.constexpr, ACC: tl.constexpr,
):
    blk = tl.program_id(0)
    tok, slot, valid = block_rows(blk, 0, T, K, BT, KP)
    row = tok * K + slot
    rr = tl.arange(0, RP)
    R: tl.constexpr = BT * KP
    ri = tl.arange(0, R)
    same, off = same_token(valid, KP)
    kk = row[:, None] * K + (ri % KP)[None, :]
    n = tl.load(N + row, mask=valid, other=1.0).to(ACC)
    C = tl.load(CM + kk, mask=same, other=0.0).to(ACC)
    rho = tl.load(RHO + kk, mask=same, other=0.0).to(ACC)
    z = load_rows(Z, row, valid, r, RP, ACC)
    dd = load_rows(DD, row, valid, r, RP, ACC)
    S, q, dz = chain_backward(dd, z, n, C, rho, same, off, K, tau_inv, eps, BT)
    inv = 1.0 / n
    Mt = S * inv[:, None] * inv[None, :]
    Mt = tl.where(ri[:, None] == ri[None, :], Mt - (q * inv * inv)[:, None], Mt)
    tl.store(MR + kk, Mt, mask=same)
    store_rows(DZ, dz, row, valid, r, RP)


# ---- the fused layer's relation part, from the low-rank s ---------------------------------------
# With LoRA experts v = s B_e, so <v_i, v_j> = s_i P[e_i, e_j] s_j^T with P = B B^T and
# z_i = s_i Q[e_i] with Q = B rot_down (torch GEMMs, lora.py). A row's s sits in its expert's
# lanes of an [R, F] tile (F = E padded x RP: lane f RP + a holds element a of expert f's row), so
# Gram = W P_flat W^T and z = S Q_flat are plain dots (W = s / m, m a power of two near max |s|).

@triton.jit
def in_lanes(x, e, F: tl.constexpr, RP: tl.constexpr):
    """Rows x [R, RP] placed in their experts' lanes -> ([R, F], own lanes [R, F])."""
    R: tl.constexpr = x.shape[0]
    lanes = tl.reshape(tl.broadcast_to(x[:, None, :], (R, F // RP, RP)), (R, F))
    own = (tl.arange(0, F) // RP)[None, :] == e[:, None]
    return tl.where(own, lanes, 0.0), own


@triton.jit
def of_lanes(x, own, RP: tl.constexpr):
    """[R, F] lanes -> [R, RP]: each row's own expert's lanes (a select, nothing multiplied)."""
    R: tl.constexpr = x.shape[0]
    F: tl.constexpr = x.shape[1]
    return tl.sum(tl.reshape(tl.where(own, x, 0.0), (R, F // RP, RP)), axis=1)


@triton.jit
def factor_tiles(PF, QF, E, r, rg, F: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
                 ACC: tl.constexpr):
    """P_flat [E r, E r] and Q_flat [E r, rg] in the lane layout, non-finite entries zeroed, and
    the lanes whose row of P or Q has one -> (P [F, F], Q [F, RGP], bad lanes [F])."""
    ln = tl.arange(0, F)
    flat = (ln // RP) * r + ln % RP
    on = (ln // RP < E) & (ln % RP < r)
    gg = tl.arange(0, RGP)
    P = tl.load(PF + flat[:, None] * (E * r) + flat[None, :], mask=on[:, None] & on[None, :],
                other=0.0).to(ACC)
    Q = tl.load(QF + flat[:, None] * rg + gg[None, :], mask=on[:, None] & (gg < rg)[None, :],
                other=0.0).to(ACC)
    bad = (tl.max(non_finite(P).to(tl.int32), axis=1) + tl.max(non_finite(Q).to(tl.int32),
                                                                  axis=1)) > 0
    return tl.where(non_finite(P), 0.0, P), tl.where(non_finite(Q), 0.0, Q), bad


@triton.jit
def lowrank_relation(S, IDS, P, Q, bad_lane, blk, T, K, E, r, s_it, s_ik, tau_inv, eps,
                     KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, RP: tl.constexpr,
                     HAS_IDS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """SPEC steps 1-3 for token block ``blk`` from s_all [T, E, r] -> the rows, the lane tiles
    (S_x, W = S_x / m, own), m, z and the relation (n, C, rho, same, off)."""
    tok, slot, valid = block_rows(blk, 0, T, K, BT, KP)
    e = expert_of(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
    valid = e >= 0
    rr = tl.arange(0, RP)
    s = tl.load(S + (tok * E + e)[:, None] * r + rr[None, :],
                mask=valid[:, None] & (rr < r)[None, :], other=0.0).to(ACC)
    m = pow2_below(tl.max(tl.abs(s), axis=1))
    sx, own = in_lanes(s, e, F, RP)
    w = sx / m[:, None]
    gram = mm(mm(w, P, PREC), tl.trans(w), PREC)
    z = mm(sx, Q, PREC)
    # a row of an expert whose B (hence P, Q) holds a non-finite value: non-finite, as its v
    row_bad = tl.sum((own & bad_lane[None, :]).to(tl.int32), axis=1) > 0
    gram = tl.where(row_bad[:, None] | row_bad[None, :], float("nan"), gram)
    z = tl.where(row_bad[:, None], float("nan"), z)
    n, C, rho, same, off = cosines_softmax(gram, m, valid, tau_inv, eps, KP)
    return tok, slot, valid, e, sx, w, own, m, z, n, C, rho, same, off


@triton.jit(do_not_specialize=["T"])
def lora_relation_fwd_kernel(
    S, IDS, PF, QF, DCTX,
    T, K, E, r, rg, s_it, s_ik, tau_inv, eps,
    KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
    HAS_IDS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """d [T, K, rg] = rho z - z (0 when K = 1) for one token block (grid: token blocks)."""
    P, Q, bad = factor_tiles(PF, QF, E, r, rg, F, RP, RGP, ACC)
    tok, slot, valid, e, sx, w, own, m, z, n, C, rho, same, off = lowrank_relation(
        S, IDS, P, Q, bad, tl.program_id(0), T, K, E, r, s_it, s_ik, tau_inv, eps, KP, BT, F,
        RP, HAS_IDS, PREC, ACC)
    d = mm(rho, other_tokens_safe(z, BT), "ieee") - z
    store_rows(DCTX, tl.where(K > 1, d, 0.0 * z), tok * K + slot, valid, rg, RGP)


@triton.jit(do_not_specialize=["T", "n_blocks"])
def lora_relation_bwd_kernel(
    S, IDS, PF, QF, DD, DS, DSPLIT, PP, PQ,
    T, K, E, r, rg, s_it, s_ik, n_blocks, tau_inv, eps, scale,
    KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
    HAS_IDS: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Backward of lora_relation_fwd_kernel over token blocks p, p + G, ... (grid: G groups):
    from dd [T, K, rg], adds the relation part to ds (DS [T, K, r] holds the streaming part)
    and stores ``scale * ds`` back, or with SPLIT, each token's ``scale * ds`` added up per expert
    (slots to experts) as bf16 hi and lo parts in DSPLIT [T, 2, E r] (hi + lo = the fp32 value to
    2^-17: the operand of one 16-bit GEMM each for dx and dA, lora.py); and this group's partials
    of dP_flat (PP [G, F, F]) and dQ_flat (PQ [G, F, RGP]). A token
    with a non-finite gradient puts NaN into exactly the entries of dP and dQ of its experts
    (its terms are zeroed for the sums, a count of them marks those entries)."""
    P, Q, bad = factor_tiles(PF, QF, E, r, rg, F, RP, RGP, ACC)
    ln = tl.arange(0, F)
    gg = tl.arange(0, RGP)
    rr = tl.arange(0, RP)
    acc_p = tl.zeros((F, F), dtype=ACC)
    acc_q = tl.zeros((F, RGP), dtype=ACC)
    hits_p = tl.zeros((F, F), dtype=ACC)  # pairs of lanes with a non-finite term
    hits_q = tl.zeros((F,), dtype=ACC)
    R: tl.constexpr = BT * KP
    ri = tl.arange(0, R)
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        tok, slot, valid, e, sx, w, own, m, z, n, C, rho, same, off = lowrank_relation(
            S, IDS, P, Q, bad, blk, T, K, E, r, s_it, s_ik, tau_inv, eps, KP, BT, F, RP,
            HAS_IDS, PREC, ACC)
        row = tok * K + slot
        dd = load_rows(DD, row, valid, rg, RGP, ACC)
        S_, q, dz = chain_backward(dd, z, n, C, rho, same, off, K, tau_inv, eps, BT)
        # gradient of the Gram matrix of w (C_ij = gram_ij qq_i qq_j, qq = m / n): S / 2 off
        # the diagonal (dC counted once per ordered pair), the norms' -q qq^2 / 2 on it
        qq = m / n
        dG = tl.where(same & (ri[:, None] != ri[None, :]), 0.5 * S_ * (qq[:, None] * qq[None, :]),
                      0.0)
        dG = tl.where(same & (ri[:, None] == ri[None, :]), -0.5 * (q * qq * qq)[:, None], dG)
        # ds = (2 dG W P + dz Q^T) on the own lanes, / m for W = S_x / m
        dGW = mm(dG, other_tokens_safe(w, BT), PREC)
        ds = of_lanes(2.0 * mm(dGW, P, PREC) / m[:, None] + mm(dz, tl.trans(Q), PREC), own, RP)
        ds = (load_rows(DS, row, valid, r, RP, ACC) + ds) * scale
        if SPLIT:  # per token and expert (own lanes: a select), then bf16 hi + lo
            x = tl.sum(tl.reshape(in_lanes(ds, e, F, RP)[0], (BT, KP, F)), axis=1)  # [BT, F]
            hi = x.to(tl.bfloat16)
            lo = (x - hi.to(ACC)).to(tl.bfloat16)
            tb = tl.max(tl.reshape(tok, (BT, KP)), axis=1)
            col = ((ln // RP) * r + ln % RP)[None, :]
            m = (tb < T)[:, None] & ((ln // RP < E) & (ln % RP < r))[None, :]
            off = tb[:, None] * (2 * E * r) + col
            tl.store(DSPLIT + off, hi, mask=m)
            tl.store(DSPLIT + off + E * r, lo, mask=m)
        else:
            store_rows(DS, ds, row, valid, r, RP)
        # dP += W^T (dG W), dQ += S_x^T dz: rows of tokens with a non-finite term zeroed and
        # counted at the lane pairs (own lanes of the token's rows) they would reach
        tok_bad = tl.sum((same & (tl.max(non_finite(dGW).to(tl.int32), axis=1)
                                  + tl.max(non_finite(dz).to(tl.int32), axis=1)
                                  > 0)[None, :]).to(tl.int32), axis=1) > 0
        ok = (~tok_bad)[:, None]
        acc_p += mm(tl.trans(tl.where(ok, w, 0.0)), tl.where(ok, dGW, 0.0), PREC)
        acc_q += mm(tl.trans(tl.where(ok, sx, 0.0)), tl.where(ok, dz, 0.0), PREC)
        own_bad = (own & tok_bad[:, None]).to(ACC)
        tok_lanes = mm(same.to(ACC), own_bad, PREC)  # a bad token's lanes, per row (0/1: exact)
        hits_p += mm(tl.trans(own_bad), tok_lanes, PREC)
        hits_q += tl.sum(own_bad, axis=0)
    pid = tl.program_id(0).to(tl.int64)
    tl.store(PP + pid * F * F + ln[:, None] * F + ln[None, :],
             tl.where(hits_p > 0, float("nan"), acc_p))
    tl.store(PQ + pid * F * RGP + ln[:, None] * RGP + gg[None, :],
             tl.where(hits_q[:, None] > 0, float("nan"), acc_q))
