"""The relation part (SPEC steps 1-3 and their backward) of both ops, one small kernel each way.

radar_gate (a program: BT tokens as R = BT * KP rows, stream.py's layout with SK = KP; a token's
K x K matrices are the diagonal blocks of an R x R tile; products across tokens take the other
token's non-finite entries as 0, tile.other_tokens_safe):
- ``op_relation_fwd_kernel``: over D, the Gram matrix of the rows scaled by a power of two near
  max |v| (exact, so no square overflows), then z = V A; n = max(|v|, eps), C, rho = softmax over
  the other active slots j != i of C / tau, d = rho z - z (0 for a slot without others). Stores
  n, C, rho, z, d for the backward. With ids (HAS_IDS), a slot with id < 0 is masked: never
  read, out of every token's relation.
- ``op_relation_bwd_kernel``: from dd: drho_ij = <dd_i, z_j>, dC = rho (drho - rowsum(rho drho))
  / tau, S = dC + dC^T, dZ = rho^T dd - dd, and M = S / (n n^T) - diag(q_i / n_i^2) with
  q_i = sum_j S_ij C_ij (0 where the eps floor holds): dv = M v + dZ A^T (stream.py's columns).
"""
import triton
import triton.language as tl

from .tile import (block_rows, expert_of, finite_or_zero, load_pairs, load_rows, load_tile, mm,
                   non_finite, other_tokens_safe, store_rows)


@triton.jit
def same_token(valid, KP: tl.constexpr):
    """Masks on the R x R tile: same token (both rows real), same token off the diagonal, and
    the diagonal."""
    ri = tl.arange(0, valid.shape[0])
    same = ((ri[:, None] // KP) == (ri[None, :] // KP)) & valid[:, None] & valid[None, :]
    eye = ri[:, None] == ri[None, :]
    return same, same & ~eye, same & eye


@triton.jit
def cosines_softmax(gram, m, same, off, diag, tau_inv, eps, act=None):
    """SPEC steps 1-2 on pair tiles (the last two axes are rows i, j; ``same``: one token's
    pair of real rows, ``off`` without, ``diag`` with i = j) from the Gram matrix of the rows
    scaled by m (> 0, a power of two) -> (n, C, rho): n = max(m |v / m|, eps),
    C_ij = gram_ij (m_i / n_i) (m_j / n_j), rho = softmax over j != i of C / tau. ``act``
    (radar_gate with ids: 1.0 for an active row, 0.0 for a masked one, whose v is 0) takes the
    masked columns out of the softmax by a factor, not by a mask (a mask from loaded values
    on the 64-row tile made ptxas spill)."""
    n = tl.maximum(m * tl.sqrt(tl.sum(tl.where(diag, gram, 0.0), axis=-1)), eps)
    q = m / n
    C = tl.where(same, gram * (tl.expand_dims(q, -1) * tl.expand_dims(q, -2)), 0.0)
    # |C| <= 1, so exp(C / tau - max) needs the max only for small tau; a row without another
    # slot (K = 1) gives rho = 0. Masked columns count 3 below their C (< any active one's)
    # for the max, and 0 in the sum.
    Cm = C - 3.0 * (1.0 - tl.expand_dims(act, -2)) if act is not None else C
    mx = tl.max(tl.where(off, Cm, -float("inf")), axis=-1)
    ex = tl.where(off, tl.exp((Cm - tl.expand_dims(tl.where(mx == -float("inf"), 0.0, mx), -1))
                              * tau_inv), 0.0)
    ex = ex * tl.expand_dims(act, -2) if act is not None else ex
    den = tl.sum(ex, axis=-1)
    return n, C, ex / tl.expand_dims(tl.where(den > 0, den, 1.0), -1)


@triton.jit
def softmax_backward(drho, rho, C, n, same, tau_inv, eps):
    """Backward of cosines_softmax from drho (0 off ``off``) -> (S = dC + dC^T, q_i =
    <v^_i, dv^_i> = sum_j S_ij C_ij, 0 where the eps floor holds)."""
    dC = tl.where(same, rho * (drho - tl.expand_dims(tl.sum(rho * drho, axis=-1), -1))
                  * tau_inv, 0.0)
    S = dC + (tl.permute(dC, (0, 2, 1)) if len(dC.shape) == 3 else tl.trans(dC))  # + dC_ji
    return S, tl.where(n > eps, tl.sum(S * C, axis=-1), 0.0)


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


@triton.jit
def has_other(rho):
    """[R] whether a row has another active slot in its token (its reference weights sum to 1,
    else to 0: K = 1, or one active slot), so that its context d is rho z - z, else 0."""
    return (tl.sum(rho, axis=1) > 0).to(rho.dtype)[:, None]


@triton.jit(do_not_specialize=["T"])
def op_relation_fwd_kernel(
    V, A, IDS, N, CM, RHO, Z, DCTX,
    T, K, E, h, r, s_vt, s_vk, s_vd, s_ad, s_ar, s_it, s_ik, tau_inv, eps,
    KP: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, RP: tl.constexpr,
    HAS_IDS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """A masked slot (ids < 0) is never read (its v counts as 0) and is out of the softmax; its
    own state is written but never read (every consumer masks it)."""
    tok, slot, valid = block_rows(tl.program_id(0), 0, T, K, BT, KP)
    row = tok * K + slot
    act = (expert_of(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS) >= 0).to(ACC)
    voff = tok * s_vt + slot.to(tl.int64) * s_vk
    rr = tl.arange(0, RP)
    R: tl.constexpr = BT * KP
    # two passes over D (the second from L2): the Gram matrix, then z = V A (one accumulator
    # live at a time: both together spilled at 64 rows on sm_80)
    ok = (act > 0)[:, None]
    gram = tl.zeros((R, R), dtype=ACC)
    m = tl.zeros((R,), dtype=ACC)
    for c0 in range(0, h, BH):
        cols = c0 + tl.arange(0, BH)
        v1, v2 = load_pairs(V, voff, cols, h, s_vd, ok & (cols < h)[None, :], ACC)
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
        v1, v2 = load_pairs(V, voff, cols, h, s_vd, ok & (cols < h)[None, :], ACC)
        z += mm(v1, load_tile(A, cols, rr, h, r, s_ad, s_ar, ACC), PREC) \
            + mm(v2, load_tile(A, cols + h, rr, 2 * h, r, s_ad, s_ar, ACC), PREC)  # z = V A
    same, off, diag = same_token(valid, KP)
    n, C, rho = cosines_softmax(gram, tl.where(m > 0, m, 1.0), same, off, diag, tau_inv, eps,
                                act if HAS_IDS else None)
    # d = rho z - z, and 0 for a slot without others (a NaN stays NaN). (A non-finite z: its
    # token's rho is non-finite too.)
    d = mm(rho, other_tokens_safe(z, BT), "ieee") - z * has_other(rho)
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
    """A masked slot needs no care here: its dd is 0 and it is out of rho, so its M and dZ
    entries come out 0."""
    tok, slot, valid = block_rows(tl.program_id(0), 0, T, K, BT, KP)
    row = tok * K + slot
    rr = tl.arange(0, RP)
    R: tl.constexpr = BT * KP
    ri = tl.arange(0, R)
    same, off, _ = same_token(valid, KP)
    kk = row[:, None] * K + (ri % KP)[None, :]
    n = tl.load(N + row, mask=valid, other=1.0).to(ACC)
    C = tl.load(CM + kk, mask=same, other=0.0).to(ACC)
    rho = tl.load(RHO + kk, mask=same, other=0.0).to(ACC)
    z = load_rows(Z, row, valid, r, RP, ACC)
    dd = load_rows(DD, row, valid, r, RP, ACC)
    # through d = rho z - z: drho_ij = <dd_i, z_j>, dz = rho^T dd - dd (no -dd for a slot
    # without others)
    S, q = softmax_backward(tl.where(off, mm(dd, tl.trans(z), "ieee"), 0.0), rho, C, n, same,
                            tau_inv, eps)
    dz = mm(tl.trans(rho), other_tokens_safe(dd, BT), "ieee") - dd * has_other(rho)
    inv = 1.0 / n
    Mt = S * inv[:, None] * inv[None, :]
    Mt = tl.where(ri[:, None] == ri[None, :], Mt - (q * inv * inv)[:, None], Mt)
    tl.store(MR + kk, Mt, mask=same)
    store_rows(DZ, dz, row, valid, r, RP)


# ---- the fused layer's relation part, from the low-rank s ---------------------------------------
# v = s B_e: <v_i, v_j> = s_i P[e_i, e_j] s_j^T with P = B B^T, z_i = s_i Q[e_i] with
# Q = B rot_down (torch GEMMs, lora.py). K x K matrices are [BT, KP, KP] tiles (no product mixes
# tokens). A token's lanes: its s_all row [E, r] as F = E padded x RP values. For slot k,
# u = w_k P[e_k, :] is one [BT, RP] x [RP, F] dot; u times the token's lanes X (s_all / m per
# expert), summed per expert, at each slot's expert is the Gram row k (w = s / m, m a power of 2).

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
    return finite_or_zero(tl.load(PTR + flat[:, None] * width + cols[None, :],
                                  mask=on[:, None] & col_on[None, :], other=0.0).to(ACC))


@triton.jit
def bad_experts(PF, QF, E, r, rg, EL: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr):
    """Experts whose B holds a non-finite value [EL]: a non-finite entry in the expert's own
    block of P (B_e B_e^T) or its rows of Q. (A cross block P[e, f] is non-finite when either
    B is: it does not tell which.)"""
    ee = tl.arange(0, EL)[:, None, None]
    aa = tl.arange(0, RP)[None, :, None]
    bb = tl.arange(0, RP)[None, None, :]
    gg = tl.arange(0, RGP)[None, None, :]
    row = ee * r + aa
    on = (ee < E) & (aa < r)
    pd = tl.load(PF + row * (E * r) + ee * r + bb, mask=on & (bb < r), other=0.0)
    q = tl.load(QF + row * rg + gg, mask=on & (gg < rg), other=0.0)
    return (tl.max(tl.max(non_finite(pd).to(tl.int32), axis=2), axis=1)
            + tl.max(tl.max(non_finite(q).to(tl.int32), axis=2), axis=1)) > 0


@triton.jit
def at_slots(x, ex, EL: tl.constexpr):
    """x [BT, EL] per expert -> [BT, KP] at each slot's expert ex [BT, KP] (a select)."""
    el = tl.arange(0, EL)[None, None, :]
    return tl.sum(tl.where(ex[:, :, None] == el, tl.expand_dims(x, 1), 0.0), axis=2)


@triton.jit
def slot_col(x, k):
    """Column k of x [BT, KP] or [BT, KP, N] -> [BT] or [BT, N]."""
    kk = tl.arange(0, x.shape[1])
    at_k = kk[None, :, None] == k if len(x.shape) == 3 else kk[None, :] == k
    return tl.sum(tl.where(at_k, x, 0), axis=1)


@triton.jit
def put_slot(x, k, col):
    """x [BT, KP(, N)] with column k set to col [BT(, N)]."""
    kk = tl.arange(0, x.shape[1])
    at_k = kk[None, :, None] == k if len(x.shape) == 3 else kk[None, :] == k
    return tl.where(at_k, tl.expand_dims(col, 1), x)


@triton.jit
def slot_pairs(ex):
    """Masks on [BT, KP, KP] from the slots' experts ex [BT, KP] (-1: no row): both rows real,
    and the diagonal ([1, KP, KP]); and whether each slot has another real one [BT, KP, 1]
    (else its context d is 0)."""
    valid = ex >= 0
    kk = tl.arange(0, ex.shape[1])
    same = valid[:, :, None] & valid[:, None, :]
    eye = (kk[:, None] == kk[None, :])[None, :, :]
    return same, eye, tl.max((same & ~eye).to(tl.int32), axis=2)[:, :, None] > 0


@triton.jit
def lowrank_relation(S, IDS, PF, QF, bad, blk, T, K, E, r, rg, s_it, s_ik, tau_inv, eps,
                     KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, RP: tl.constexpr,
                     RGP: tl.constexpr, HAS_IDS: tl.constexpr, PREC: tl.constexpr,
                     ACC: tl.constexpr):
    """SPEC steps 1-3 for the BT tokens of block ``blk`` from s_all [T, E, r] -> (tokens t,
    experts ex [BT, KP] (-1: no row), lanes X [BT, F], z [BT, KP, RGP], m, n [BT, KP],
    C, rho [BT, KP, KP])."""
    EL: tl.constexpr = F // RP
    t = (blk * BT + tl.arange(0, BT)).to(tl.int64)  # (blk * BT < T < 2^31)
    kk = tl.arange(0, KP)
    real = (t < T)[:, None] & (kk < K)[None, :]
    ex = expert_of(IDS, t[:, None], kk[None, :], real, s_it, s_ik, E, HAS_IDS)
    # the token's lanes, scaled per expert row; experts it does not use zeroed (their s may be
    # non-finite without touching it)
    el = tl.arange(0, EL)
    used = tl.max((ex[:, :, None] == el[None, None, :]).to(tl.int32), axis=1) > 0  # [BT, EL]
    flat, on = lanes(0, F, E, r, RP)
    x = tl.load(S + t[:, None] * (E * r) + flat[None, :], mask=(t < T)[:, None] & on[None, :],
                other=0.0).to(ACC)
    x3 = tl.reshape(x, (BT, EL, RP))
    mx = pow2_below(tl.max(tl.abs(x3), axis=2))
    X = tl.reshape(tl.where(used[:, :, None], x3 / mx[:, :, None], 0.0), (BT, F))
    gram = tl.zeros((BT, KP, KP), dtype=ACC)
    z = tl.zeros((BT, KP, RGP), dtype=ACC)
    m = tl.full((BT, KP), 1.0, dtype=ACC)
    gg = tl.arange(0, RGP)
    rr = tl.arange(0, RP)
    for k in range(K):
        e = slot_col(ex, k)
        s = tl.load(S + (t * E + e)[:, None] * r + rr[None, :],
                    mask=(e >= 0)[:, None] & (rr < r)[None, :], other=0.0).to(ACC)
        mk = pow2_below(tl.max(tl.abs(s), axis=1))
        u = tl.zeros((BT, F), dtype=ACC)
        zk = tl.zeros((BT, RGP), dtype=ACC)
        # u = w P[e, :] and z = s Q[e], one expert's rows at a time (all rows' one without ids),
        # in loops apart (one region's dots share one register layout: docs/launch_config.md)
        for j in range(0 if HAS_IDS else k, E if HAS_IDS else k + 1):
            mine = (e == j)[:, None]
            if tl.max(mine.to(tl.int32)) > 0:
                u += mm(tl.where(mine, s / mk[:, None], 0.0),
                        lane_tile(PF, E * r, j * RP, RP, flat, on, E, r, RP, ACC), PREC)
        for j in range(0 if HAS_IDS else k, E if HAS_IDS else k + 1):
            mine = (e == j)[:, None]
            if tl.max(mine.to(tl.int32)) > 0:
                zk += mm(tl.where(mine, s, 0.0),
                         lane_tile(QF, rg, j * RP, RP, gg, gg < rg, E, r, RP, ACC), PREC)
        gram = put_slot(gram, k, at_slots(tl.sum(tl.reshape(u * X, (BT, EL, RP)), axis=2), ex,
                                          EL))
        z = put_slot(z, k, zk)
        m = put_slot(m, k, mk)
    # a row of an expert whose B (hence P, Q) holds a non-finite value: non-finite, as its v
    rb = at_slots(bad[None, :].to(ACC), ex, EL) > 0
    gram = tl.where(rb[:, :, None] | rb[:, None, :], float("nan"), gram)
    z = tl.where(rb[:, :, None], float("nan"), z)
    same, eye, _ = slot_pairs(ex)
    n, C, rho = cosines_softmax(gram, m, same, same & ~eye, same & eye, tau_inv, eps)
    return t, ex, X, z, m, n, C, rho


@triton.jit
def expert_blocks(PF, j, E, r, EL: tl.constexpr, RP: tl.constexpr, ACC: tl.constexpr):
    """Expert j's rows of P_flat per expert of the lanes: [EL, RP, RP] with [e, b, a] =
    P[j, a, e, b], non-finite entries zeroed."""
    e3 = tl.arange(0, EL)[:, None, None]
    b3 = tl.arange(0, RP)[None, :, None]
    a3 = tl.arange(0, RP)[None, None, :]
    return finite_or_zero(tl.load(PF + (j * r + a3) * (E * r) + e3 * r + b3,
                                  mask=(e3 < E) & (a3 < r) & (b3 < r), other=0.0).to(ACC))


@triton.jit(do_not_specialize=["T"])
def lora_relation_fwd_kernel(
    S, IDS, PF, QF, DCTX,
    T, K, E, r, rg, s_it, s_ik, tau_inv, eps,
    KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
    HAS_IDS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """d [T, K, rg] = rho z - z (0 for a slot without others: K = 1, or one real slot; and for
    a masked slot) for one block of BT tokens (grid: token blocks)."""
    bad = bad_experts(PF, QF, E, r, rg, F // RP, RP, RGP)
    t, ex, X, z, m, n, C, rho = lowrank_relation(
        S, IDS, PF, QF, bad, tl.program_id(0), T, K, E, r, rg, s_it, s_ik, tau_inv, eps, KP, BT,
        F, RP, RGP, HAS_IDS, PREC, ACC)
    _, _, others = slot_pairs(ex)
    d = -z * others.to(ACC)  # (a NaN z stays NaN)
    for j in range(K):  # d_i += rho_ij z_j
        d += slot_col(tl.permute(rho, (0, 2, 1)), j)[:, :, None] * slot_col(z, j)[:, None, :]
    kk = tl.arange(0, KP)[None, :, None]
    gg = tl.arange(0, RGP)[None, None, :]
    tl.store(DCTX + (t[:, None, None] * K + kk) * rg + gg, d,
             mask=(t < T)[:, None, None] & (kk < K) & (gg < rg))


@triton.jit(do_not_specialize=["T", "n_blocks"])
def lora_relation_bwd_kernel(
    S, IDS, PF, QF, DD, DS, DSPLIT, PP, PQ,
    T, K, E, r, rg, s_it, s_ik, n_blocks, tau_inv, eps, scale,
    KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
    HAS_IDS: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Backward of lora_relation_fwd_kernel. Grid (G groups of token blocks p, p + G, ...;
    E experts): program (g, j) recomputes the relation and, from dd [T, K, rg], handles the rows
    of expert j: adds their relation part to ds (DS [T, K, r] holds the streaming part) and
    stores ``scale * ds``, or with SPLIT each token's ``scale * ds`` added up over its slots of
    expert j, as bf16 hi and lo parts in DSPLIT [T, 2, E r] (hi + lo = the fp32 value to 2^-17:
    the operand of one 16-bit GEMM each for dx and dA, lora.py); and its group's partials of
    expert j's rows of dP_flat (PP [G, F, F]) and dQ_flat (PQ [G, F, RGP]). A token with a
    non-finite term has its terms zeroed for the sums and makes NaN the entries of dP between
    its experts, and dQ of its experts (dB is NaN for exactly the experts of such tokens)."""
    EL: tl.constexpr = F // RP
    j = tl.program_id(1)
    bad = bad_experts(PF, QF, E, r, rg, EL, RP, RGP)
    gg = tl.arange(0, RGP)
    rr = tl.arange(0, RP)
    el = tl.arange(0, EL)
    acc_p = tl.zeros((RP, F), dtype=ACC)
    acc_q = tl.zeros((RP, RGP), dtype=ACC)
    hit = tl.zeros((EL,), dtype=tl.int32)  # experts sharing a token that has a bad term with j
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        t, ex, X, z, m, n, C, rho = lowrank_relation(
            S, IDS, PF, QF, bad, blk, T, K, E, r, rg, s_it, s_ik, tau_inv, eps, KP, BT, F, RP,
            RGP, HAS_IDS, PREC, ACC)
        same, eye, others = slot_pairs(ex)
        kk = tl.arange(0, KP)[None, :, None]
        dd = tl.load(DD + (t[:, None, None] * K + kk) * rg + gg[None, None, :],
                     mask=(t < T)[:, None, None] & (kk < K) & (gg < rg)[None, None, :],
                     other=0.0).to(ACC)
        # through d = rho z - z: drho_ij = <dd_i, z_j>, dz_j = sum_i rho_ij dd_i - dd_j (no
        # -dd_j for a slot without others)
        drho_t = tl.zeros((BT, KP, KP), dtype=ACC)  # [t, j, i]
        dz = -dd * others.to(ACC)
        for i in range(K):
            drho_t = put_slot(drho_t, i, tl.sum(dd * slot_col(z, i)[:, None, :], axis=2))
            dz += slot_col(rho, i)[:, :, None] * slot_col(dd, i)[:, None, :]
        drho = tl.where(same & ~eye, tl.permute(drho_t, (0, 2, 1)), 0.0)
        S_, q = softmax_backward(drho, rho, C, n, same, tau_inv, eps)
        # gradient of the Gram matrix of w (C_ij = gram_ij qq_i qq_j, qq = m / n): S / 2 off
        # the diagonal (dC counted once per ordered pair), the norms' -q qq^2 / 2 on it
        qq = m / n
        dG = tl.where(same & ~eye, 0.5 * S_ * (qq[:, :, None] * qq[:, None, :]), 0.0)
        dG = tl.where(same & eye, -0.5 * (q * qq * qq)[:, :, None], dG)
        tok_bad = (tl.max(tl.max(non_finite(dG).to(tl.int32), axis=2), axis=1)
                   + tl.max(tl.max(non_finite(dz).to(tl.int32), axis=2), axis=1)
                   + tl.max(non_finite(X).to(tl.int32), axis=1)) > 0
        used = tl.max((ex[:, :, None] == el[None, None, :]).to(tl.int32), axis=1) > 0
        ds_j = tl.zeros((BT, RP), dtype=ACC)
        # three passes over the slots k of expert j: its rows' ds, dQ[j] += s_k^T dz_k and
        # dP[j, :] += w_k^T V; apart, as the dots of one region share one register layout
        # (docs/launch_config.md)
        for step in tl.static_range(3):
            for k in range(K):
                e = slot_col(ex, k)
                mine = e == j
                if tl.max(mine.to(tl.int32)) > 0:
                    s = tl.load(S + (t * E + e)[:, None] * r + rr[None, :],
                                mask=mine[:, None] & (rr < r)[None, :], other=0.0).to(ACC)
                    mk = pow2_below(tl.max(tl.abs(s), axis=1))
                    # V = sum_l dG_kl W_l [BT, F] in lanes, W_l from the token's lanes X at
                    # each slot's expert (dge: dG_kl per expert of l, its slots added up)
                    dkl = slot_col(tl.permute(dG, (0, 2, 1)), k)
                    dge = tl.sum(tl.where(ex[:, :, None] == el[None, None, :], dkl[:, :, None],
                                          0.0), axis=1)
                    V = tl.reshape(tl.reshape(X, (BT, EL, RP)) * dge[:, :, None], (BT, F))
                    ok = (mine & ~tok_bad)[:, None]
                    if step == 0:
                        # (dG W P)_k = V P[j, :]^T (P symmetric), / m for W = S / m: per
                        # expert of the lanes, one batched dot
                        vp = tl.dot(tl.permute(tl.reshape(V, (BT, EL, RP)), (1, 0, 2)),
                                    expert_blocks(PF, j, E, r, EL, RP, ACC),
                                    input_precision=PREC, out_dtype=ACC)
                        qj = lane_tile(QF, rg, j * RP, RP, gg, gg < rg, E, r, RP, ACC)
                        ds = (2.0 * tl.sum(vp, axis=0) / mk[:, None]
                              + mm(slot_col(dz, k), tl.trans(qj), PREC))
                        row = t * K + k
                        ds = (load_rows(DS, row, mine, r, RP, ACC) + ds) * scale
                        if SPLIT:
                            ds_j += tl.where(mine[:, None], ds, 0.0)
                        else:
                            store_rows(DS, ds, row, mine, r, RP)
                    elif step == 1:
                        acc_q = tl.dot(tl.trans(tl.where(ok, s, 0.0)),
                                       tl.where(ok, slot_col(dz, k), 0.0), acc=acc_q,
                                       input_precision=PREC, out_dtype=ACC)
                    else:
                        acc_p = tl.dot(tl.trans(tl.where(ok, s / mk[:, None], 0.0)),
                                       tl.where(ok, V, 0.0), acc=acc_p, input_precision=PREC,
                                       out_dtype=ACC)
                        hit += tl.sum((used & (mine & tok_bad)[:, None]).to(tl.int32), axis=0)
        if SPLIT:  # expert j's columns of every token (0 where it has no slot of j)
            hi = ds_j.to(tl.bfloat16)
            lo = (ds_j - hi.to(ACC)).to(tl.bfloat16)
            at = t[:, None] * (2 * E * r) + j * r + rr[None, :]
            keep = (t < T)[:, None] & (rr < r)[None, :]
            tl.store(DSPLIT + at, hi, mask=keep)
            tl.store(DSPLIT + at + E * r, lo, mask=keep)
    pid = tl.program_id(0).to(tl.int64)
    rows = j * RP + rr
    lane_hit = tl.reshape(tl.broadcast_to((hit > 0)[:, None], (EL, RP)), (F,))
    tl.store(PP + pid * F * F + rows[:, None] * F + tl.arange(0, F)[None, :],
             tl.where(lane_hit[None, :], float("nan"), acc_p))
    tl.store(PQ + pid * F * RGP + rows[:, None] * RGP + gg[None, :],
             tl.where(tl.max(hit) > 0, float("nan"), acc_q))
