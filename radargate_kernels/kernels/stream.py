"""The streaming kernels: every pass over the output features, for both ops.

What a row's expert output ``v`` is depends on the op (constexpr ``V_FROM_S``):
- ``radar_gate``: v = expert_out[t, k], loaded;
- the fused layer (``radar_gate_lora``): v = s[t, e] B_e, recomputed chunk by chunk on tensor
  cores from the low-rank activations s [T, E, r] (contiguous; row (t, k) reads expert
  e = ids[t, k], or k) and lora_B [E, r, D]. Without ids the slots' products are one batched
  dot ([SK, BT, r] x [SK, r, BH]); with ids each row's s sits in its expert's lanes of an
  [R, FE r] tile (FE experts per chunk), so one dot serves rows of different experts.

With u = R(alpha) v, y = sum_k g_k u_k and w = R(-alpha) dy, the gradients are
dg = <w, v>, dv = g w and dalpha = g (v1 w2 - v2 w1) (pairs v1 = v[:h], v2 = v[h:]).

- ``stream_fwd_kernel`` (grid: token blocks x pair chunks): y.
- ``stream_bwd_rows_kernel`` (grid: token blocks; the reductions over the features): dg,
  dd = dalpha U^T and, fused layer, ds = dv B_e^T.
- ``stream_bwd_cols_kernel`` (grid: pair chunks x token groups; the reductions over the
  tokens): one fp32 partial per token group of dU, dbeta and (fused layer) the streaming part of
  dB, summed by the host in a fixed order (deterministic, no atomics); radar_gate also writes
  dV = g w + M v + dZ A^T (M, dZ: relation.py's backward) and partials of dA = V^T dZ.
"""
import triton
import triton.language as tl

from .tile import (angles, block_rows, cos_sin, expert_of, load_pairs, load_rows, mm,
                   mm_exact_nan, rotate, store_rows, to_rows, token_pairs, token_sum)


@triton.jit
def slot_major(x, SK: tl.constexpr):
    """[BT * SK, N] rows -> [SK, BT, N] (the slots' tiles for a batched dot)."""
    return tl.permute(tl.reshape(x, (x.shape[0] // SK, SK, x.shape[1])), (1, 0, 2))


@triton.jit
def row_major(x):
    """[SK, BT, N] -> [BT * SK, N]."""
    return tl.reshape(tl.permute(x, (1, 0, 2)), (x.shape[0] * x.shape[1], x.shape[2]))


@triton.jit
def slot_lora_b(LB, kc, cols, cm, h, r, K, s_le, s_lr, s_ld, SK: tl.constexpr,
                RP: tl.constexpr, ACC: tl.constexpr):
    """lora_B of slots kc .. kc + SK - 1 (no ids: slot k is expert k) at columns cols, cols + h
    -> two [SK, RP, BH] tiles."""
    j = tl.arange(0, SK)[:, None, None]
    a = tl.arange(0, RP)[None, :, None]
    off = (kc + j).to(tl.int64) * s_le + a * s_lr + cols[None, None, :].to(tl.int64) * s_ld
    m = (kc + j < K) & (a < r) & cm[None, None, :]
    b1 = tl.load(LB + off, mask=m, other=0.0).to(ACC)
    b2 = tl.load(LB + off + h * s_ld, mask=m, other=0.0).to(ACC)
    return b1, b2


@triton.jit
def expert_lanes(S, tok, e, valid, f0, r, E, RP: tl.constexpr, FE: tl.constexpr,
                 ACC: tl.constexpr):
    """Each row's s placed in its expert's lanes of experts f0 .. f0 + FE - 1 -> (tile
    [R, FE * RP], own lanes [R, FE * RP])."""
    ln = tl.arange(0, FE * RP)
    f = f0 + ln // RP
    a = ln % RP
    on = (valid[:, None] & (f[None, :] == e[:, None])) & (a < r)[None, :]
    x = tl.load(S + (tok * E)[:, None] * r + (f * r + a)[None, :], mask=on, other=0.0)
    return x.to(ACC), on


@triton.jit
def lanes_lora_b(LB, f0, cols, cm, h, r, E, s_le, s_lr, s_ld, RP: tl.constexpr,
                 FE: tl.constexpr, ACC: tl.constexpr):
    """lora_B rows of experts f0 .. f0 + FE - 1 at columns cols, cols + h -> two [FE * RP, BH]
    tiles and their mask."""
    ln = tl.arange(0, FE * RP)
    f = f0 + ln // RP
    a = ln % RP
    off = (f.to(tl.int64) * s_le + a * s_lr)[:, None] + cols[None, :].to(tl.int64) * s_ld
    on = ((f < E) & (a < r))[:, None] & cm[None, :]
    b1 = tl.load(LB + off, mask=on, other=0.0).to(ACC)
    b2 = tl.load(LB + off + h * s_ld, mask=on, other=0.0).to(ACC)
    return b1, b2, on


@triton.jit
def expert_values(V, S, LB, tok, slot, e, valid, kc, cols, cm, h, r, K, E,
                  s_vt, s_vk, s_vd, s_le, s_lr, s_ld, BT: tl.constexpr, SK: tl.constexpr,
                  RP: tl.constexpr, FE: tl.constexpr, V_FROM_S: tl.constexpr,
                  HAS_IDS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """v of the rows at columns cols and cols + h -> (v1, v2), each [R, BH] (0 on masked rows)."""
    if not V_FROM_S:
        return load_pairs(V, tok * s_vt + slot.to(tl.int64) * s_vk, cols, h, s_vd,
                          valid[:, None] & cm[None, :], ACC)
    elif HAS_IDS:
        v1 = tl.zeros((BT * SK, cols.shape[0]), dtype=ACC)
        v2 = tl.zeros((BT * SK, cols.shape[0]), dtype=ACC)
        for f0 in range(0, E, FE):
            sx, on = expert_lanes(S, tok, e, valid, f0, r, E, RP, FE, ACC)
            b1, b2, bon = lanes_lora_b(LB, f0, cols, cm, h, r, E, s_le, s_lr, s_ld, RP, FE, ACC)
            v1 += mm_exact_nan(sx, b1, on, bon, PREC)
            v2 += mm_exact_nan(sx, b2, on, bon, PREC)
        return v1, v2
    else:
        s3 = slot_major(load_rows(S, tok * E + slot, valid, r, RP, ACC), SK)
        b1, b2 = slot_lora_b(LB, kc, cols, cm, h, r, K, s_le, s_lr, s_ld, SK, RP, ACC)
        return row_major(mm(s3, b1, PREC)), row_major(mm(s3, b2, PREC))


@triton.jit
def grad_s(w1, w2, e, valid, LB, kc, cols, cm, h, r, K, E, s_le, s_lr, s_ld,
           SK: tl.constexpr, RP: tl.constexpr, FE: tl.constexpr, HAS_IDS: tl.constexpr,
           PREC: tl.constexpr, ACC: tl.constexpr):
    """One chunk's w B_e^T -> [R, RP] (dv = g w, so ds = g w B_e^T)."""
    if HAS_IDS:
        ds = tl.zeros((w1.shape[0], RP), dtype=ACC)
        for f0 in range(0, E, FE):
            b1, b2, _ = lanes_lora_b(LB, f0, cols, cm, h, r, E, s_le, s_lr, s_ld, RP, FE, ACC)
            x = mm(w1, tl.trans(b1), PREC) + mm(w2, tl.trans(b2), PREC)  # [R, FE * RP]
            ln = tl.arange(0, FE * RP)
            own = valid[:, None] & ((f0 + ln // RP)[None, :] == e[:, None])
            # a select, not a product: other experts' (possibly non-finite) lanes stay out
            ds += tl.sum(tl.reshape(tl.where(own, x, 0.0), (w1.shape[0], FE, RP)), axis=1)
        return ds
    else:
        b1, b2 = slot_lora_b(LB, kc, cols, cm, h, r, K, s_le, s_lr, s_ld, SK, RP, ACC)
        x = mm(slot_major(w1, SK), tl.permute(b1, (0, 2, 1)), PREC) \
            + mm(slot_major(w2, SK), tl.permute(b2, (0, 2, 1)), PREC)
        return row_major(x)


# T (and the number of token blocks) are never specialised: Triton makes an integer argument
# equal to 1 a constant, so a one-token launch would compile another kernel than the one
# benchmarks/compile_report.py checks.
@triton.jit(do_not_specialize=["T"])
def stream_fwd_kernel(
    V, S, LB, G, DCTX, U, BETA, IDS, Y,
    T, K, h, r, rg, E,
    s_vt, s_vk, s_vd, s_le, s_lr, s_ld, s_gt, s_gk, s_ur, s_uh, s_be, s_bh, s_it, s_ik,
    BT: tl.constexpr, SK: tl.constexpr, BH: tl.constexpr, RP: tl.constexpr,
    RGP: tl.constexpr, FE: tl.constexpr, V_FROM_S: tl.constexpr, HAS_IDS: tl.constexpr,
    HAS_BETA: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """y [T, D] (contiguous) = sum_k g_k R(d_k U + beta_e) v_k for one token block and one chunk
    of BH column pairs, walking the slots in chunks of SK."""
    blk = tl.program_id(0)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    cm = cols < h
    y1 = tl.zeros((BT, BH), dtype=ACC)
    y2 = tl.zeros((BT, BH), dtype=ACC)
    for kc in range(0, K, SK):
        tok, slot, valid = block_rows(blk, kc, T, K, BT, SK)
        e = expert_of(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
        valid = e >= 0
        v1, v2 = expert_values(V, S, LB, tok, slot, e, valid, kc, cols, cm, h, r, K, E,
                               s_vt, s_vk, s_vd, s_le, s_lr, s_ld, BT, SK, RP, FE, V_FROM_S,
                               HAS_IDS, PREC, ACC)
        alpha, _ = angles(DCTX, U, BETA, tok * K + slot, e, valid, cols, cm, rg, s_ur, s_uh,
                          s_be, s_bh, RGP, HAS_BETA, PREC, ACC)
        c, s = cos_sin(alpha, FAST)
        g = tl.load(G + tok * s_gt + slot.to(tl.int64) * s_gk, mask=valid, other=0.0).to(ACC)
        u1, u2 = rotate(v1, v2, c, s)
        y1 += token_sum(g[:, None] * u1, SK)
        y2 += token_sum(g[:, None] * u2, SK)
    tb = (blk * BT + tl.arange(0, BT)).to(tl.int64)
    off = tb[:, None] * (2 * h) + cols[None, :]
    m = (tb < T)[:, None] & cm[None, :]
    tl.store(Y + off, y1.to(Y.dtype.element_ty), mask=m)
    tl.store(Y + off + h, y2.to(Y.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T"])
def stream_bwd_rows_kernel(
    V, S, LB, G, DCTX, U, BETA, IDS, DY, DG, DD, DS,
    T, K, h, r, rg, E,
    s_vt, s_vk, s_vd, s_le, s_lr, s_ld, s_gt, s_gk, s_ur, s_uh, s_be, s_bh, s_it, s_ik,
    s_yt, s_yd,
    BT: tl.constexpr, SK: tl.constexpr, BH: tl.constexpr, RP: tl.constexpr,
    RGP: tl.constexpr, FE: tl.constexpr, V_FROM_S: tl.constexpr, HAS_IDS: tl.constexpr,
    HAS_BETA: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Per row (t, k) of one token block: dg = <w, v>, dd = g (v1 w2 - v2 w1) U^T and, fused
    layer, ds = g w B_e^T, each reduced over all feature pairs (contiguous [T, K, ...] outputs)."""
    blk = tl.program_id(0)
    for kc in range(0, K, SK):
        tok, slot, valid = block_rows(blk, kc, T, K, BT, SK)
        e = expert_of(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
        valid = e >= 0
        row = tok * K + slot
        dg = tl.zeros((BT * SK,), dtype=ACC)
        dd = tl.zeros((BT * SK, RGP), dtype=ACC)
        ds = tl.zeros((BT * SK, RP), dtype=ACC)
        gg = tl.arange(0, RGP)
        for c0 in range(0, h, BH):
            cols = c0 + tl.arange(0, BH)
            cm = cols < h
            dy1, dy2 = token_pairs(DY, blk, T, cols, cm, h, s_yt, s_yd, BT, SK, ACC)
            v1, v2 = expert_values(V, S, LB, tok, slot, e, valid, kc, cols, cm, h, r, K, E,
                                   s_vt, s_vk, s_vd, s_le, s_lr, s_ld, BT, SK, RP, FE, V_FROM_S,
                                   HAS_IDS, PREC, ACC)
            alpha, _ = angles(DCTX, U, BETA, row, e, valid, cols, cm, rg, s_ur, s_uh, s_be, s_bh,
                              RGP, HAS_BETA, PREC, ACC)
            c, s = cos_sin(alpha, FAST)
            w1, w2 = rotate(dy1, dy2, c, -s)
            dg += tl.sum(v1 * w1 + v2 * w2, axis=1)
            ut = tl.load(U + gg[None, :].to(tl.int64) * s_ur + cols[:, None].to(tl.int64) * s_uh,
                         mask=cm[:, None] & (gg < rg)[None, :], other=0.0).to(ACC)
            dd += mm(v1 * w2 - v2 * w1, ut, PREC)
            if V_FROM_S:
                ds += grad_s(w1, w2, e, valid, LB, kc, cols, cm, h, r, K, E, s_le, s_lr, s_ld,
                             SK, RP, FE, HAS_IDS, PREC, ACC)
        g = tl.load(G + tok * s_gt + slot.to(tl.int64) * s_gk, mask=valid, other=0.0).to(ACC)
        tl.store(DG + row, dg.to(DG.dtype.element_ty), mask=valid)
        store_rows(DD, g[:, None] * dd, row, valid, rg, RGP)
        if V_FROM_S:
            store_rows(DS, g[:, None] * ds, row, valid, r, RP)


@triton.jit(do_not_specialize=["T", "n_blocks"])
def stream_bwd_cols_kernel(
    V, S, LB, G, DCTX, U, BETA, IDS, DY, MR, DZ, A,
    DV, PU, PBETA, PW,
    T, K, h, r, rg, E, n_blocks,
    s_vt, s_vk, s_vd, s_le, s_lr, s_ld, s_gt, s_gk, s_ur, s_uh, s_be, s_bh, s_it, s_ik,
    s_yt, s_yd, s_ad, s_ar,
    BT: tl.constexpr, SK: tl.constexpr, BH: tl.constexpr, RP: tl.constexpr,
    RGP: tl.constexpr, EP: tl.constexpr, FE: tl.constexpr, V_FROM_S: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_BETA: tl.constexpr, NEED_DU: tl.constexpr,
    NEED_DBETA: tl.constexpr, NEED_DW: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr,
    ACC: tl.constexpr,
):
    """One chunk of BH column pairs over the token blocks grp, grp + G, ... (G = token groups):
    this group's fp32 partials PU [G, rg, h] of dU, PBETA [G, E, h] of dbeta and PW of dB
    ([G, E, r, D], fused layer: the streaming part) or of dA ([G, D, r], radar_gate, which also
    writes DV [T, K, D] = g w + M v + dZ A^T; there SK = K padded, all slots of a token in one
    tile, and MR [T, K, K], DZ [T, K, r] come from relation.py's backward)."""
    cols = tl.program_id(0) * BH + tl.arange(0, BH)
    cm = cols < h
    grp = tl.program_id(1)
    n_grp = tl.num_programs(1)
    f0 = tl.program_id(2) * FE  # fused layer with ids: this program's experts of dB (the other
    first = tl.program_id(2) == 0  # partials come from the programs of expert chunk 0)
    R: tl.constexpr = BT * SK
    gg = tl.arange(0, RGP)
    ee = tl.arange(0, EP)
    rr = tl.arange(0, RP)
    ln = tl.arange(0, FE * RP)
    d_u = tl.zeros((RGP, BH), dtype=ACC)
    d_beta = tl.zeros((EP, BH), dtype=ACC)
    dw1 = tl.zeros((FE * RP, BH), dtype=ACC)  # fused layer with ids: all experts' rows of dB
    dw2 = tl.zeros((FE * RP, BH), dtype=ACC)  # radar_gate: dA rows cols ([BH, RP] transposed)
    for kc in range(0, K, SK):
        dk1 = tl.zeros((SK, RP, BH), dtype=ACC)  # fused layer without ids: the slots' dB
        dk2 = tl.zeros((SK, RP, BH), dtype=ACC)
        for blk in range(grp, n_blocks, n_grp):
            tok, slot, valid = block_rows(blk, kc, T, K, BT, SK)
            e = expert_of(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
            valid = e >= 0
            row = tok * K + slot
            dy1, dy2 = token_pairs(DY, blk, T, cols, cm, h, s_yt, s_yd, BT, SK, ACC)
            v1, v2 = expert_values(V, S, LB, tok, slot, e, valid, kc, cols, cm, h, r, K, E,
                                   s_vt, s_vk, s_vd, s_le, s_lr, s_ld, BT, SK, RP, FE, V_FROM_S,
                                   HAS_IDS, PREC, ACC)
            alpha, d = angles(DCTX, U, BETA, row, e, valid, cols, cm, rg, s_ur, s_uh, s_be, s_bh,
                              RGP, HAS_BETA, PREC, ACC)
            c, s = cos_sin(alpha, FAST)
            g = tl.load(G + tok * s_gt + slot.to(tl.int64) * s_gk, mask=valid,
                        other=0.0).to(ACC)[:, None]
            w1, w2 = rotate(dy1, dy2, c, -s)
            da = g * (v1 * w2 - v2 * w1)
            rows_on = valid[:, None] & cm[None, :]
            if NEED_DU:
                d_u += mm(tl.trans(d), da, PREC)
            if NEED_DBETA:
                hot = ee[:, None] == e[None, :]
                d_beta += mm_exact_nan(hot.to(ACC), da, hot, rows_on, PREC)
            if V_FROM_S and NEED_DW:
                if HAS_IDS:
                    sx, on = expert_lanes(S, tok, e, valid, f0, r, E, RP, FE, ACC)
                    dw1 += mm_exact_nan(tl.trans(sx), g * w1, tl.trans(on), rows_on, PREC)
                    dw2 += mm_exact_nan(tl.trans(sx), g * w2, tl.trans(on), rows_on, PREC)
                else:
                    st = tl.permute(slot_major(load_rows(S, tok * E + slot, valid, r, RP, ACC),
                                               SK), (0, 2, 1))
                    dk1 += mm(st, slot_major(g * w1, SK), PREC)
                    dk2 += mm(st, slot_major(g * w2, SK), PREC)
            if not V_FROM_S:
                # the relation part: M v within each token (zeros across tokens stay out)
                ri = tl.arange(0, R)
                same = (ri[:, None] // SK == ri[None, :] // SK) & valid[:, None] & valid[None, :]
                m_t = tl.load(MR + (tok * K + slot)[:, None] * K + (kc + ri % SK)[None, :],
                              mask=same, other=0.0).to(ACC)
                dz = load_rows(DZ, row, valid, r, RP, ACC)
                am = cm[:, None] & (rr < r)[None, :]
                a1 = tl.load(A + cols[:, None].to(tl.int64) * s_ad + rr[None, :] * s_ar, mask=am,
                             other=0.0).to(ACC)
                a2 = tl.load(A + (cols + h)[:, None].to(tl.int64) * s_ad + rr[None, :] * s_ar,
                             mask=am, other=0.0).to(ACC)
                dv1 = g * w1 + mm_exact_nan(m_t, v1, same, rows_on, PREC) + mm(dz, tl.trans(a1),
                                                                               PREC)
                dv2 = g * w2 + mm_exact_nan(m_t, v2, same, rows_on, PREC) + mm(dz, tl.trans(a2),
                                                                               PREC)
                off = (row * (2 * h))[:, None] + cols[None, :]
                tl.store(DV + off, dv1.to(DV.dtype.element_ty), mask=rows_on)
                tl.store(DV + off + h, dv2.to(DV.dtype.element_ty), mask=rows_on)
                if NEED_DW:  # dA rows cols and cols + h: (v^T dZ)^T [RP, BH] (FE = 1 here)
                    dw1 += mm(tl.trans(dz), v1, PREC)
                    dw2 += mm(tl.trans(dz), v2, PREC)
        if V_FROM_S and NEED_DW and not HAS_IDS:
            j = tl.arange(0, SK)[:, None, None]
            a = rr[None, :, None]
            c3 = cols[None, None, :]
            off = ((grp.to(tl.int64) * E + kc + j) * r + a) * (2 * h) + c3
            m = (kc + j < K) & (a < r) & cm[None, None, :]
            tl.store(PW + off, dk1, mask=m)
            tl.store(PW + off + h, dk2, mask=m)
    base = grp.to(tl.int64) * h
    if NEED_DU and first:
        tl.store(PU + (base * rg + gg[:, None] * h) + cols[None, :], d_u,
                 mask=(gg < rg)[:, None] & cm[None, :])
    if NEED_DBETA and first:
        tl.store(PBETA + (base * E + ee[:, None] * h) + cols[None, :], d_beta,
                 mask=(ee < E)[:, None] & cm[None, :])
    if NEED_DW:
        if V_FROM_S and HAS_IDS:
            f = f0 + ln // RP
            off = ((grp.to(tl.int64) * E + f) * r + ln % RP)[:, None] * (2 * h) + cols[None, :]
            m = ((f < E) & (ln % RP < r))[:, None] & cm[None, :]
            tl.store(PW + off, dw1, mask=m)
            tl.store(PW + off + h, dw2, mask=m)
        elif not V_FROM_S:  # dA [G, D, r]: rows cols and cols + h, stored from [RP, BH]
            off = (grp.to(tl.int64) * 2 * h + cols[None, :]) * r + rr[:, None]
            m = (rr < r)[:, None] & cm[None, :]
            tl.store(PW + off, dw1, mask=m)
            tl.store(PW + off + h * r, dw2, mask=m)
