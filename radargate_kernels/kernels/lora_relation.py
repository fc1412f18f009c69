"""Triton kernels of the fused layer's relation part: SPEC steps 1-3 from the low-rank s.

- ``lora_relation_kernel`` (grid: token blocks): s [T, K, r] -> d [T, K, rg].
- ``lora_relation_bwd_kernel`` (grid: token groups): dd -> ds (added in place) and per-group
  partials of dP, dQ, and flags of the experts of tokens with non-finite gradients.
- ``lora_factors_kernel`` / ``lora_factors_bwd_kernel``: P = B B^T, Q = B rot_down (one
  program) and their gradients dB, drot_down (grid: out chunks; ``factor_grads``, which the
  packed parameter kernel of lora_stream.py calls too).

A program owns BT tokens as R = BT * KP rows (the layout of common.py). Row (t, k) of expert
e = ids[t, k] (or k) is placed in its expert's columns of an [R, F] tile (F = EP * RP, column
c = e * RP + a holds s[t, k, a]), so with ``P_flat [F, F] = (B_e B_f^T)`` and
``Q_flat [F, rg] = (B_e rot_down)`` every per-token product is one plain ``tl.dot``:
``Gram = W P_flat W^T`` (W = the rows scaled by their max |s|, so no square overflows) and
``z = S Q_flat``; then the radar_gate forward's relation (n, C, rho) and ``d = rho z - z``.
Above 32 columns P_flat is walked in column chunks of FC (a whole [64, 64] fp32 tile of P
spilled), taking the matching columns of the rows' s from registers (s is read once) where that
compiles without spills (lora_launch.relation_s_in_registers), else re-loading them. Used
while K <= 32 and F <= 64 (the backward: K <= 8), lora_launch.relation_fits; beyond, the
PyTorch part.
"""
import triton
import triton.language as tl

from .common import block_dot, expert_of_row, load_rows, non_finite, row_ids, store_rows
from .forward import relation


@triton.jit
def expert_column_offsets(e, tok, slot, valid, K, r, cc, RP: tl.constexpr):
    """Offsets into a contiguous [T, K, r] tensor (s, ds) of the rows placed in their experts'
    columns cc (column c = e * RP + a holds element a of a row of expert e; e from
    common.expert_of_row, -1 for an out-of-range id, which masks its whole row) and the mask of
    each row's own lanes -> ([R, len(cc)], [R, len(cc)]). Only own lanes are on, so a walk over
    all column chunks touches each element once."""
    a = cc % RP
    m = (valid & (e >= 0))[:, None] & ((cc // RP)[None, :] == e[:, None]) & (a < r)[None, :]
    return (tok * K + slot)[:, None] * r + a[None, :], m


@triton.jit
def expert_columns(S, e, tok, slot, valid, K, r, cc, RP: tl.constexpr, ACC: tl.constexpr):
    """The rows' s placed in their experts' columns cc -> [R, len(cc)] (0 elsewhere)."""
    off, m = expert_column_offsets(e, tok, slot, valid, K, r, cc, RP)
    return tl.load(S + off, mask=m, other=0.0).to(ACC)


@triton.jit
def scaled_expert_rows(S, e, tok, slot, valid, K, r, cc, RP: tl.constexpr, ACC: tl.constexpr):
    """-> (S_x [R, F], m [R], W = S_x / m): each row's max |s| as its scale (1 for a zero row,
    as reference.row_scale), so the Gram matrix of W has no overflowing square."""
    Sx = expert_columns(S, e, tok, slot, valid, K, r, cc, RP, ACC)
    mx = tl.max(tl.abs(Sx), axis=1)
    m = tl.where(mx > 0, mx, 1.0)
    return Sx, m, Sx / m[:, None]


@triton.jit
def factor_rows(c, E, r, RP: tl.constexpr):
    """Row of P_flat [E r, E r] / Q_flat [E r, rg] holding padded column c, and its mask."""
    return ((c // RP) * r + c % RP).to(tl.int64), (c // RP < E) & (c % RP < r)


@triton.jit
def p_columns(PF, flat, cm, c2, E, r, RP: tl.constexpr, ACC: tl.constexpr):
    """Columns c2 of P_flat -> ([F, len(c2)] tile, their rows of Q_flat, their mask)."""
    f2, m2 = factor_rows(c2, E, r, RP)
    return tl.load(PF + flat[:, None] * (E * r) + f2[None, :], mask=cm[:, None] & m2[None, :],
                   other=0.0).to(ACC), f2, m2


@triton.jit
def halves(X, R: tl.constexpr, F: tl.constexpr):
    """X [R, F] -> (X[:, :F/2], X[:, F/2:]) in registers."""
    return tl.split(tl.permute(tl.reshape(X, (R, 2, F // 2)), (0, 2, 1)))


@triton.jit
def column_chunk(X, j: tl.constexpr, R: tl.constexpr, F: tl.constexpr, FC: tl.constexpr):
    """Columns j FC .. (j + 1) FC - 1 of X [R, F] (F / FC in 1, 2, 4) -> [R, FC], taken from
    registers (no reload)."""
    if FC == F:
        out = X
    else:
        lo, hi = halves(X, R, F)
        half = lo if j < F // FC // 2 else hi
        if F // FC == 2:
            out = half
        else:
            q0, q1 = halves(half, R, F // 2)
            out = q0 if j % 2 == 0 else q1
    return out


@triton.jit
def gram_and_z(S, Sx, W, m, e, tok, slot, valid, K, PF, QF, flat, cm, gg, E, r, rg,
               F: tl.constexpr, FC: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
               RGP: tl.constexpr, S_REGS: tl.constexpr, ACC: tl.constexpr):
    """Gram = W P_flat W^T [R, R] and z = S_x Q_flat [R, RGP] from the rows' s in their
    experts' columns (Sx [R, F], W = Sx / m), with P_flat walked in column chunks of FC (a
    whole [64, 64] fp32 tile of it spilled); z takes a loop of its own (fewer live registers).
    Each chunk's columns of W and Sx are taken from registers (S_REGS, an unrolled walk: s is
    read once) or re-loaded from S in a loop (own lanes only: where the former spilled)."""
    gram = tl.zeros((R, R), dtype=ACC)
    z = tl.zeros((R, RGP), dtype=ACC)
    if S_REGS:
        for c0 in tl.static_range(0, F, FC):
            P, _, _ = p_columns(PF, flat, cm, c0 + tl.arange(0, FC), E, r, RP, ACC)
            gram = gram_chunk(gram, W, P, column_chunk(W, c0 // FC, R, F, FC), ACC)
        for c0 in tl.static_range(0, F, FC):
            Q = q_rows(QF, c0 + tl.arange(0, FC), gg, E, r, rg, RP, ACC)
            z += tl.dot(column_chunk(Sx, c0 // FC, R, F, FC), Q, input_precision="ieee",
                        out_dtype=ACC)
    else:
        for c0 in range(0, F, FC):
            c2 = c0 + tl.arange(0, FC)
            P, _, _ = p_columns(PF, flat, cm, c2, E, r, RP, ACC)
            Wc = expert_columns(S, e, tok, slot, valid, K, r, c2, RP, ACC) / m[:, None]
            gram = gram_chunk(gram, W, P, Wc, ACC)
        for c0 in range(0, F, FC):
            c2 = c0 + tl.arange(0, FC)
            z += tl.dot(expert_columns(S, e, tok, slot, valid, K, r, c2, RP, ACC),
                        q_rows(QF, c2, gg, E, r, rg, RP, ACC), input_precision="ieee",
                        out_dtype=ACC)
    return gram, z


@triton.jit
def gram_chunk(gram, W, P, Wc, ACC: tl.constexpr):
    """gram + (W P_flat[:, chunk]) W[:, chunk]^T."""
    return gram + tl.dot(tl.dot(W, P, input_precision="ieee", out_dtype=ACC), tl.trans(Wc),
                         input_precision="ieee", out_dtype=ACC)


@triton.jit
def q_rows(QF, c2, gg, E, r, rg, RP: tl.constexpr, ACC: tl.constexpr):
    """Rows of Q_flat [E r, rg] holding the padded columns c2 -> [len(c2), RGP] (0 padding)."""
    f2, m2 = factor_rows(c2, E, r, RP)
    return tl.load(QF + f2[:, None] * rg + gg[None, :], mask=m2[:, None] & (gg < rg)[None, :],
                   other=0.0).to(ACC)


@triton.jit
def lora_relation_kernel(S, IDS, PF, QF, DD, T, K, E, r, rg, s_it, s_ik, tau_inv, eps,
                         KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FC: tl.constexpr,
                         RP: tl.constexpr, RGP: tl.constexpr, HAS_IDS: tl.constexpr,
                         S_REGS: tl.constexpr, ACC: tl.constexpr):
    tok, slot, valid = row_ids(tl.program_id(0), T, K, KP, BT)
    e = expert_of_row(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
    cc = tl.arange(0, F)
    Sx, m, W = scaled_expert_rows(S, e, tok, slot, valid, K, r, cc, RP, ACC)
    flat, cm = factor_rows(cc, E, r, RP)
    gg = tl.arange(0, RGP)
    gram, z = gram_and_z(S, Sx, W, m, e, tok, slot, valid, K, PF, QF, flat, cm, gg, E, r, rg, F,
                         FC, BT * KP, RP, RGP, S_REGS, ACC)
    n, C, rho, same = relation(gram, m, valid, K, tau_inv, eps, KP, BT)
    d = block_dot(rho, z, same, ACC) - z
    d = tl.where(K > 1, d, z * 0.0)  # SPEC: with K = 1, d = 0 (NaN stays NaN, as the reference)
    store_rows(DD, d, tok * K + slot, valid, rg, RGP)


@triton.jit
def lora_factors_kernel(LB, AR, PF, QF, E, r, out, rg, s_le, s_lr, s_lo, s_ao, s_ag,
                        FP: tl.constexpr, RGP: tl.constexpr, BO: tl.constexpr,
                        ACC: tl.constexpr, PREC: tl.constexpr):
    """One program: P_flat = B_cat B_cat^T [E r, E r] and Q_flat = B_cat rot_down [E r, rg]
    (B_cat [E r, out]: lora_B's rows), reading lora_B and rot_down once, in a fixed order."""
    c = tl.arange(0, FP)
    cm = c < E * r
    boff = (c // r).to(tl.int64) * s_le + (c % r) * s_lr
    gg = tl.arange(0, RGP)
    P = tl.zeros((FP, FP), dtype=ACC)
    Q = tl.zeros((FP, RGP), dtype=ACC)
    for o0 in range(0, out, BO):
        oo = o0 + tl.arange(0, BO)
        om = oo < out
        Bc = tl.load(LB + boff[:, None] + oo[None, :].to(tl.int64) * s_lo,
                     mask=cm[:, None] & om[None, :], other=0.0).to(ACC)
        Ac = tl.load(AR + oo[:, None].to(tl.int64) * s_ao + gg[None, :] * s_ag,
                     mask=om[:, None] & (gg < rg)[None, :], other=0.0).to(ACC)
        P += tl.dot(Bc, tl.trans(Bc), input_precision=PREC, out_dtype=ACC)
        Q += tl.dot(Bc, Ac, input_precision=PREC, out_dtype=ACC)
    tl.store(PF + c[:, None] * (E * r) + c[None, :], P, mask=cm[:, None] & cm[None, :])
    tl.store(QF + c[:, None] * rg + gg[None, :], Q, mask=cm[:, None] & (gg < rg)[None, :])


@triton.jit
def lora_relation_bwd_kernel(S, IDS, PF, QF, DDD, DS, PP, PQ, PBAD, T, K, E, r, rg, s_it,
                             s_ik, n_blocks, tau_inv, eps, KP: tl.constexpr, BT: tl.constexpr,
                             F: tl.constexpr, FC: tl.constexpr, RP: tl.constexpr,
                             RGP: tl.constexpr, HAS_IDS: tl.constexpr, S_REGS: tl.constexpr,
                             ACC: tl.constexpr):
    """Backward of lora_relation_kernel (grid: token groups; group p walks the token blocks
    p, p + G, ...): dd [T, K, rg] -> ds [T, K, r] += the relation part (DS holds the streaming
    part on entry), and this group's partials of dP_flat [F, F] and dQ_flat [F, RGP] (PP, PQ
    [G, ...], summed on the host in a fixed order: no atomics) and its flags of the lanes of
    tokens with non-finite gradients (PBAD [G, F], int32). Recomputes the forward's Gram
    matrix, rho and z from s; P_flat is walked in column chunks of FC (as in the forward)."""
    pid = tl.program_id(0)
    cc = tl.arange(0, F)
    flat_c, cm = factor_rows(cc, E, r, RP)
    gg = tl.arange(0, RGP)
    ri = tl.arange(0, BT * KP)
    diag = ri[:, None] == ri[None, :]
    acc_p = tl.zeros((F, F), dtype=ACC)
    acc_q = tl.zeros((F, RGP), dtype=ACC)
    acc_bad = tl.zeros((F,), dtype=tl.int32)
    for blk in range(pid, n_blocks, tl.num_programs(0)):
        tok, slot, valid = row_ids(blk, T, K, KP, BT)
        e = expert_of_row(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
        Sx, m, W = scaled_expert_rows(S, e, tok, slot, valid, K, r, cc, RP, ACC)
        gram, z = gram_and_z(S, Sx, W, m, e, tok, slot, valid, K, PF, QF, flat_c, cm, gg, E, r,
                             rg, F, FC, BT * KP, RP, RGP, S_REGS, ACC)  # the forward's, again
        n, C, rho, same = relation(gram, m, valid, K, tau_inv, eps, KP, BT)
        off = same & (ri[:, None] != ri[None, :])
        dd = load_rows(DDD, tok * K + slot, valid, rg, RGP, ACC)
        # d = rho z - z: SPEC's backward chain, as in radar_gate's row kernel
        drho = tl.where(off, tl.dot(dd, tl.trans(z), input_precision="ieee", out_dtype=ACC), 0.0)
        dC = tl.where(same, rho * (drho - tl.sum(rho * drho, axis=1)[:, None]) * tau_inv, 0.0)
        q = tl.where(n > eps, tl.sum((dC + tl.trans(dC)) * C, axis=1), 0.0)
        dz = block_dot(tl.trans(rho), dd, same, ACC) - dd
        dz = tl.where(K > 1, dz, 0.0)
        # gradient of the scaled Gram matrix (C_ij = gram_ij qq_i qq_j, qq = m / n): dC
        # off the diagonal, the norms' -q qq^2 / 2 on it; gram = W P W^T
        qq = m / n
        dG = tl.where(off, dC * (qq[:, None] * qq[None, :]), 0.0)
        dG = tl.where(diag & same, -0.5 * (q * qq * qq)[:, None], dG)
        # a token with a non-finite dd or s: its terms are left out of dP and dQ (a sum over
        # the tile's rows would carry them to every expert through 0 * nan) and its experts'
        # lanes are flagged instead (BAD: their rows of dB are the reference's non-finite
        # ones); its ds is NaN, as the reference's
        lanes = expert_column_offsets(e, tok, slot, valid, K, r, cc, RP)[1]
        rowbad = (tl.max(non_finite(dd).to(tl.int32), axis=1)
                  + tl.max(non_finite(Sx).to(tl.int32), axis=1)) > 0
        tokbad = tl.sum(tl.where(same & rowbad[None, :], 1, 0), axis=1) > 0
        acc_bad = tl.maximum(acc_bad, tl.max(tl.where(tokbad[:, None] & lanes, 1, 0), axis=0))
        dGW = block_dot(dG, W, same, ACC)
        ok = ~tokbad[:, None]
        acc_p += tl.dot(tl.trans(tl.where(ok, W, 0.0)), tl.where(ok, dGW, 0.0),
                        input_precision="ieee", out_dtype=ACC)
        acc_q += tl.dot(tl.trans(tl.where(ok, Sx, 0.0)), tl.where(ok, dz, 0.0),
                        input_precision="ieee", out_dtype=ACC)
        dGW = (dGW + block_dot(tl.trans(dG), W, same, ACC)) / m[:, None]  # dS = dGW P + dz Q^T
        for c0 in range(0, F, FC):
            c2 = c0 + tl.arange(0, FC)
            P, _, _ = p_columns(PF, flat_c, cm, c2, E, r, RP, ACC)
            Q = q_rows(QF, c2, gg, E, r, rg, RP, ACC)
            dS = tl.dot(dGW, P, input_precision="ieee", out_dtype=ACC) \
                + tl.dot(dz, tl.trans(Q), input_precision="ieee", out_dtype=ACC)
            dS = tl.where(tokbad[:, None], float("nan"), dS)
            off_s, own = expert_column_offsets(e, tok, slot, valid, K, r, c2, RP)
            ds = tl.load(DS + off_s, mask=own, other=0.0)
            tl.store(DS + off_s, ds + dS.to(ds.dtype), mask=own)
    tl.store(PP + pid.to(tl.int64) * F * F + cc[:, None] * F + cc[None, :], acc_p)
    tl.store(PQ + pid.to(tl.int64) * F * RGP + cc[:, None] * RGP + gg[None, :], acc_q)
    tl.store(PBAD + pid.to(tl.int64) * F + cc, acc_bad)


@triton.jit
def factor_grads(LB, AR, DPF, DQF, BAD, DAR, cc, oo, om, store_dar, E, r, rg, s_le, s_lr,
                 s_lo, s_ao, s_ag, F: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
                 ACC: tl.constexpr):
    """Gradients through P_flat = B_cat B_cat^T and Q_flat = B_cat rot_down at the out columns
    oo [BO] (mask om): returns dB_cat[cc, oo] = ((dP + dP^T) B_cat + dQ rot_down^T)[cc, oo],
    shape cc.shape + [BO], for padded columns cc of any shape ending in a broadcast axis ([FG, 1]
    or [KP, RP, 1]: the caller's accumulator layout) and, if store_dar, stores
    drot_down[oo] = B_cat[:, oo]^T dQ into DAR [out, rg] (contiguous). BAD [F] (int32,
    lora_relation_bwd_kernel's flags): flagged rows of dB are NaN, and all of drot_down if any.
    Column c is B_cat's row factor_rows(c). Both reductions run one index at a time (outer
    products of a column of dP or dQ with a row of B_cat or rot_down): the FMA dots of whole
    tiles held replicated operands and spilled at 64 rows."""
    flat_c, cm = factor_rows(cc, E, r, RP)
    ooc = oo.to(tl.int64)
    gg = tl.arange(0, RGP)
    n = E * r
    acc = tl.zeros(cc.shape, dtype=ACC) * tl.zeros((oo.shape[0],), dtype=ACC)
    dAt = tl.zeros((RGP, oo.shape[0]), dtype=ACC)  # drot_down[oo]^T
    for j in range(0, n):
        brow = tl.load(LB + (j // r).to(tl.int64) * s_le + (j % r) * s_lr + ooc * s_lo, mask=om,
                       other=0.0).to(ACC)  # row j of B_cat [E r, out]
        dpc = tl.load(DPF + flat_c * n + j, mask=cm, other=0.0) \
            + tl.load(DPF + j * n + flat_c, mask=cm, other=0.0)  # column j of dP + dP^T
        acc += dpc.to(ACC) * brow
        dq = tl.load(DQF + j * rg + gg, mask=gg < rg, other=0.0).to(ACC)
        dAt += dq[:, None] * brow[None, :]
    bad = tl.load(BAD + tl.arange(0, F))
    dAt = tl.where(tl.max(bad) > 0, float("nan"), dAt)
    if store_dar:
        tl.store(DAR + ooc[None, :] * rg + gg[:, None], dAt, mask=(gg < rg)[:, None] & om[None, :])
    for gi in range(0, rg):
        arow = tl.load(AR + ooc * s_ao + gi * s_ag, mask=om, other=0.0).to(ACC)  # rot_down[oo, gi]
        acc += tl.load(DQF + flat_c * rg + gi, mask=cm, other=0.0).to(ACC) * arow
    return tl.where(tl.load(BAD + cc) > 0, float("nan"), acc)


@triton.jit
def lora_factors_bwd_kernel(LB, AR, DPF, DQF, BAD, DB, DAR, E, r, out, rg, s_le, s_lr, s_lo,
                            s_ao, s_ag, F: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
                            BO: tl.constexpr, ACC: tl.constexpr):
    """Gradients through P_flat = B_cat B_cat^T and Q_flat = B_cat rot_down (grid: chunks of
    BO out features, each program owning its columns: no reduction across programs), for the
    paths without the packed parameter kernel: factor_grads -> DB [E, r, out] (contiguous,
    compute dtype) and DAR [out, rg]. Rows in the relation kernel's [F] column layout."""
    cc = tl.arange(0, F)
    oo = tl.program_id(0) * BO + tl.arange(0, BO)
    om = oo < out
    dB = factor_grads(LB, AR, DPF, DQF, BAD, DAR, cc[:, None], oo, om, True, E, r, rg, s_le, s_lr,
                      s_lo, s_ao, s_ag, F, RP, RGP, ACC)
    flat_c, cm = factor_rows(cc, E, r, RP)
    tl.store(DB + flat_c[:, None] * out + oo[None, :], dB, mask=cm[:, None] & om[None, :])
