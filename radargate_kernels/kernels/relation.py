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
    """The power of two at or below m > 0 (its exponent field; 2^-126 or 2^-1022 for a subnormal
    m, 1 where m is 0): scaling by it is exact."""
    if m.dtype == tl.float64:
        ex = (m.to(tl.int64, bitcast=True) >> 52) & 0x7FF
        p = (tl.maximum(ex, 1) << 52).to(tl.float64, bitcast=True)
    else:
        ex = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
        p = (tl.maximum(ex, 1) << 23).to(tl.float32, bitcast=True)
    return tl.where(m > 0, p, 1.0)


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
def in_lanes(x, e, c0, FC: tl.constexpr, RP: tl.constexpr):
    """Rows x [R, RP] placed in their experts' lanes, lanes c0 .. c0 + FC (c0 a multiple of RP)
    -> ([R, FC], own lanes [R, FC])."""
    R: tl.constexpr = x.shape[0]
    lanes = tl.reshape(tl.broadcast_to(x[:, None, :], (R, FC // RP, RP)), (R, FC))
    own = ((c0 + tl.arange(0, FC)) // RP)[None, :] == e[:, None]
    return tl.where(own, lanes, 0.0), own


@triton.jit
def of_lanes(x, own, RP: tl.constexpr):
    """[R, FC] lanes -> [R, RP]: each row's own expert's lanes (a select, nothing multiplied)."""
    R: tl.constexpr = x.shape[0]
    FC: tl.constexpr = x.shape[1]
    return tl.sum(tl.reshape(tl.where(own, x, 0.0), (R, FC // RP, RP)), axis=1)


@triton.jit
def lanes(c0, FC: tl.constexpr, E, r, RP: tl.constexpr):
    """Lanes c0 .. c0 + FC -> (their rows of a flat factor [E r, ...], whether they are real)."""
    ln = c0 + tl.arange(0, FC)
    return (ln // RP) * r + ln % RP, (ln // RP < E) & (ln % RP < r)


@triton.jit
def lane_tile(PTR, width, c0, FC: tl.constexpr, cols, col_on, E, r, RP: tl.constexpr,
              ACC: tl.constexpr):
    """Rows of lanes c0 .. c0 + FC of a flat factor [E r, width] (P_flat or Q_flat), columns
    ``cols``, non-finite entries zeroed -> [FC, len(cols)]."""
    flat, on = lanes(c0, FC, E, r, RP)
    x = tl.load(PTR + flat[:, None] * width + cols[None, :], mask=on[:, None] & col_on[None, :],
                other=0.0).to(ACC)
    return tl.where(non_finite(x), 0.0, x)


@triton.jit
def bad_lanes(PF, QF, E, r, rg, F: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr):
    """Lanes of the experts whose B holds a non-finite value [F]: a non-finite entry in the
    expert's own block of P (B_e B_e^T, every row of it then has one) or its rows of Q. (A cross
    block P[e, f] is non-finite when either B is: it does not tell which.)"""
    ln = tl.arange(0, F)
    aa = tl.arange(0, RP)
    gg = tl.arange(0, RGP)
    flat, on = lanes(0, F, E, r, RP)
    pd = tl.load(PF + flat[:, None] * (E * r) + ((ln // RP) * r)[:, None] + aa[None, :],
                 mask=on[:, None] & (aa < r)[None, :], other=0.0)
    q = tl.load(QF + flat[:, None] * rg + gg[None, :], mask=on[:, None] & (gg < rg)[None, :],
                other=0.0)
    return (tl.max(non_finite(pd).to(tl.int32), axis=1)
            + tl.max(non_finite(q).to(tl.int32), axis=1)) > 0


@triton.jit
def lowrank_relation(S, IDS, PF, QF, bad_lane, blk, T, K, E, r, rg, s_it, s_ik, tau_inv, eps,
                     KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FC: tl.constexpr,
                     RP: tl.constexpr, RGP: tl.constexpr, HAS_IDS: tl.constexpr,
                     PREC: tl.constexpr, ACC: tl.constexpr):
    """SPEC steps 1-3 for token block ``blk`` from s_all [T, E, r] -> the rows, s [R, RP], m
    (a power of two near max |s|), z and the relation (n, C, rho, same, off).
    P and Q are read in chunks of FC lanes (from L2): whole [128, 128] tiles spilled."""
    tok, slot, valid = block_rows(blk, 0, T, K, BT, KP)
    e = expert_of(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
    valid = e >= 0
    rr = tl.arange(0, RP)
    gg = tl.arange(0, RGP)
    s = tl.load(S + (tok * E + e)[:, None] * r + rr[None, :],
                mask=valid[:, None] & (rr < r)[None, :], other=0.0).to(ACC)
    m = pow2_below(tl.max(tl.abs(s), axis=1))
    w, own = in_lanes(s / m[:, None], e, 0, F, RP)
    R: tl.constexpr = BT * KP
    # W P (rows [R, F]) and z = S_x Q, one expert's rows of P and Q at a time ([RP, F] and
    # [RP, RGP] tiles: whole [F, F] ones spilled at F = 128); experts without rows skipped
    wp = tl.zeros((R, F), dtype=ACC)
    z = tl.zeros((R, RGP), dtype=ACC)
    fl, on = lanes(0, F, E, r, RP)
    for ex in range(E):
        mine = (e == ex)[:, None]
        if tl.max(mine.to(tl.int32)) > 0:
            se = tl.where(mine, s, 0.0)
            wp += mm(se / m[:, None], lane_tile(PF, E * r, ex * RP, RP, fl, on, E, r, RP, ACC),
                     PREC)
            z += mm(se, lane_tile(QF, rg, ex * RP, RP, gg, gg < rg, E, r, RP, ACC), PREC)
    gram = mm(wp, tl.trans(w), PREC)
    # a row of an expert whose B (hence P, Q) holds a non-finite value: non-finite, as its v
    row_bad = tl.sum((own & bad_lane[None, :]).to(tl.int32), axis=1) > 0
    gram = tl.where(row_bad[:, None] | row_bad[None, :], float("nan"), gram)
    z = tl.where(row_bad[:, None], float("nan"), z)
    n, C, rho, same, off = cosines_softmax(gram, m, valid, tau_inv, eps, KP)
    return tok, slot, valid, e, s, m, z, n, C, rho, same, off


@triton.jit
def store_ds(DS, DSPLIT, ds, tok, row, valid, e, T, E, r, BT: tl.constexpr, KP: tl.constexpr,
             F: tl.constexpr, RP: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr):
    """ds [R, RP] to DS [T, K, r], or with SPLIT each token's rows added up per expert (slots
    to experts: own lanes, a select) as bf16 hi and lo parts in DSPLIT [T, 2, E r]."""
    if SPLIT:
        x = tl.sum(tl.reshape(in_lanes(ds, e, 0, F, RP)[0], (BT, KP, F)), axis=1)  # [BT, F]
        hi = x.to(tl.bfloat16)
        lo = (x - hi.to(ACC)).to(tl.bfloat16)
        tb = tl.max(tl.reshape(tok, (BT, KP)), axis=1)
        flat, on = lanes(0, F, E, r, RP)
        at = tb[:, None] * (2 * E * r) + flat[None, :]
        keep = (tb < T)[:, None] & on[None, :]
        tl.store(DSPLIT + at, hi, mask=keep)
        tl.store(DSPLIT + at + E * r, lo, mask=keep)
    else:
        store_rows(DS, ds, row, valid, r, RP)


@triton.jit(do_not_specialize=["T"])
def lora_relation_fwd_kernel(
    S, IDS, PF, QF, DCTX,
    T, K, E, r, rg, s_it, s_ik, tau_inv, eps,
    KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, RP: tl.constexpr,
    RGP: tl.constexpr, HAS_IDS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """d [T, K, rg] = rho z - z (0 when K = 1) for one token block (grid: token blocks)."""
    bad = bad_lanes(PF, QF, E, r, rg, F, RP, RGP)
    tok, slot, valid, e, s, m, z, n, C, rho, same, off = lowrank_relation(
        S, IDS, PF, QF, bad, tl.program_id(0), T, K, E, r, rg, s_it, s_ik, tau_inv, eps, KP, BT,
        F, FC, RP, RGP, HAS_IDS, PREC, ACC)
    d = mm(rho, other_tokens_safe(z, BT), "ieee") - z
    store_rows(DCTX, tl.where(K > 1, d, 0.0 * z), tok * K + slot, valid, rg, RGP)


@triton.jit(do_not_specialize=["T", "n_blocks"])
def lora_relation_bwd_kernel(
    S, IDS, PF, QF, DD, DS, DSPLIT, PP, PQ,
    T, K, E, r, rg, s_it, s_ik, n_blocks, tau_inv, eps, scale,
    KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, FP: tl.constexpr,
    RP: tl.constexpr, RGP: tl.constexpr, HAS_IDS: tl.constexpr, SPLIT: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Backward of lora_relation_fwd_kernel over token blocks p, p + G, ... (grid: G groups x
    F / FP column chunks of dP, each recomputing the relation; the first also does ds and dQ):
    from dd [T, K, rg], adds the relation part to ds (DS [T, K, r] holds the streaming part)
    and stores ``scale * ds`` back, or with SPLIT, each token's ``scale * ds`` added up per expert
    (slots to experts) as bf16 hi and lo parts in DSPLIT [T, 2, E r] (hi + lo = the fp32 value to
    2^-17: the operand of one 16-bit GEMM each for dx and dA, lora.py); and this group's partials
    of dP_flat (PP [G, F, F], its FP columns) and dQ_flat (PQ [G, F, RGP]). A token with a non-finite gradient
    has its terms zeroed for the sums and marks its experts' lanes: dP is NaN where both lanes
    are marked, dQ on marked lanes (so dB is NaN for exactly the experts of such tokens).
    """
    bad = bad_lanes(PF, QF, E, r, rg, F, RP, RGP)
    ln = tl.arange(0, F)
    gg = tl.arange(0, RGP)
    first = tl.program_id(1) == 0  # the column chunk that also does ds and dQ
    c0p = tl.program_id(1) * FP  # this program's columns of dP: c0p .. c0p + FP
    acc_p = tl.zeros((F, FP), dtype=ACC)
    acc_q = tl.zeros((F, RGP), dtype=ACC)
    hits = tl.zeros((F,), dtype=tl.int32)  # lanes reached by a token with a non-finite term
    hits_c = tl.zeros((FP,), dtype=tl.int32)  # the same for this program's columns
    R: tl.constexpr = BT * KP
    ri = tl.arange(0, R)
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        tok, slot, valid, e, s, m, z, n, C, rho, same, off = lowrank_relation(
            S, IDS, PF, QF, bad, blk, T, K, E, r, rg, s_it, s_ik, tau_inv, eps, KP, BT, F, FC,
            RP, RGP, HAS_IDS, PREC, ACC)
        row = tok * K + slot
        dd = load_rows(DD, row, valid, rg, RGP, ACC)
        S_, q, dz = chain_backward(dd, z, n, C, rho, same, off, K, tau_inv, eps, BT)
        # gradient of the Gram matrix of w (C_ij = gram_ij qq_i qq_j, qq = m / n): S / 2 off
        # the diagonal (dC counted once per ordered pair), the norms' -q qq^2 / 2 on it
        qq = m / n
        dG = tl.where(same & (ri[:, None] != ri[None, :]), 0.5 * S_ * (qq[:, None] * qq[None, :]),
                      0.0)
        dG = tl.where(same & (ri[:, None] == ri[None, :]), -0.5 * (q * qq * qq)[:, None], dG)
        w, own = in_lanes(s / m[:, None], e, 0, F, RP)  # W = S_x / m
        if first:
            # ds = (2 dG W P + dz Q^T) on the own lanes (/ m for W = S_x / m), in lane chunks
            ds = load_rows(DS, row, valid, r, RP, ACC)
            for c0 in range(0, F, FC):
                fl, on = lanes(c0, FC, E, r, RP)
                wp = mm(w, lane_tile(PF, E * r, 0, F, fl, on, E, r, RP, ACC), PREC)
                ds += of_lanes(2.0 * mm(dG, other_tokens_safe(wp, BT), PREC) / m[:, None]
                               + mm(dz, tl.trans(lane_tile(QF, rg, c0, FC, gg, gg < rg, E, r,
                                                           RP, ACC)), PREC),
                               in_lanes(s, e, c0, FC, RP)[1], RP)
            store_ds(DS, DSPLIT, ds * scale, tok, row, valid, e, T, E, r, BT, KP, F, RP, SPLIT,
                     ACC)
        # dP[:, cp] += W^T (dG W[:, cp]), dQ += S_x^T dz: rows of tokens with a non-finite
        # term zeroed, the lanes of their rows marked
        row_nf = (tl.max(non_finite(dG).to(tl.int32), axis=1)
                  + tl.max(non_finite(w).to(tl.int32), axis=1)
                  + tl.max(non_finite(dz).to(tl.int32), axis=1)) > 0
        tok_bad = tl.sum((same & row_nf[None, :]).to(tl.int32), axis=1) > 0
        ok = (~tok_bad)[:, None]
        wc, own_c = in_lanes(s / m[:, None], e, c0p, FP, RP)
        acc_p = tl.dot(tl.trans(tl.where(ok, w, 0.0)),
                       mm(tl.where(ok, dG, 0.0), tl.where(ok, wc, 0.0), PREC),
                       acc=acc_p, input_precision=PREC)
        acc_q = tl.dot(tl.trans(tl.where(ok, w * m[:, None], 0.0)), tl.where(ok, dz, 0.0),
                       acc=acc_q, input_precision=PREC)
        hits += tl.sum((own & tok_bad[:, None]).to(tl.int32), axis=0)
        hits_c += tl.sum((own_c & tok_bad[:, None]).to(tl.int32), axis=0)
    pid = tl.program_id(0).to(tl.int64)
    hit = hits > 0
    tl.store(PP + pid * F * F + ln[:, None] * F + (c0p + tl.arange(0, FP))[None, :],
             tl.where(hit[:, None] & (hits_c > 0)[None, :], float("nan"), acc_p))
    if first:
        tl.store(PQ + pid * F * RGP + ln[:, None] * RGP + gg[None, :],
                 tl.where(hit[:, None], float("nan"), acc_q))
