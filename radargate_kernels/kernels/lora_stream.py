"""Triton kernels of the fused RadarGate-LoRA layer: the streaming part over the output features.

Expert k of token t outputs ``v = s[t, k] B_e`` (e = ids[t, k], or k without ids), with
``s [T, K, r]`` the scaled low-rank activations and ``lora_B [E, r, out]``; ``v`` is recomputed
chunk by chunk from s and B and never stored. The angles come from ``d [T, K, rg]`` (the relation
part, computed from s alone) as ``alpha = d U + beta[e]`` with ``U = rot_up [rg, out/2]``.

- ``lora_fwd_kernel`` (grid: col blocks x token blocks): ``y = sum_k g_k R(alpha_k) v_k``, v and
  alpha one rank at a time, two chunks of column pairs per program (s, d read once for both).
- ``lora_bwd_rows_kernel`` (grid: token blocks): per (token, slot) row, one pass over all
  columns: ``dg = <dy, u>``, ``dd = dalpha U^T``, ``ds = dv B_e^T`` with ``dv = g R(-alpha) dy``.
- ``lora_bwd_rows_packed_kernel`` (grid: token blocks): the same, with all slots of a token in
  one program (lora_relation.py's [R, F] layout): dy read once per token, not once per slot.
  Used where that layout fits (K <= 16, E r <= 64); the slot loop elsewhere.
- ``lora_bwd_params_kernel`` (grid: col chunks x experts): rows sorted by expert on the host,
  so each program owns ``dB[e, :, chunk]`` (adding to the relation part it holds on entry) and
  ``dbeta[e, chunk]`` (no atomics) and writes one partial of ``drot_up`` per expert, summed on
  the host in fixed order. Used where the packed kernel below is not.
- ``lora_bwd_params_packed_kernel`` (grid: col chunks x (token groups x expert groups)): the
  same gradients in the packed [R, F] layout, all slots of a token per step, with the gradients
  through P and Q (lora_relation.factor_grads) added, so no relation-part dB is written and
  read back. Dense (slot k is expert k): dB reduced slot by slot, all experts in one program,
  dy read once per token; with ids: groups of 16 expert columns, dy read once per token and
  group. Used where the packed row kernel runs and r <= 32.
"""
import triton
import triton.language as tl

from .common import (angles, expert_of_row, load_param_chunk, load_rows,
                     load_token_halves, load_tokens_where, pair_offsets, rotate, row_ids,
                     store_rows, support_dot)
from .lora_relation import expert_column_offsets, factor_grads, factor_rows


@triton.jit
def slot_rows(tok, k, K, T, IDS, s_it, s_ik, E, HAS_IDS: tl.constexpr):
    """Flat row index tok*K + k (int64), expert of each row (-1 if none) and row validity."""
    tmask = tok < T
    if HAS_IDS:
        e = tl.load(IDS + tok * s_it + k * s_ik, mask=tmask, other=-1).to(tl.int32)
    else:
        e = tl.zeros_like(tok).to(tl.int32) + k
    valid = tmask & (e >= 0) & (e < E)  # an out-of-range id (unchecked under compile) adds nothing
    return tok * K + k, tl.where(valid, e, 0), valid


@triton.jit
def add_slot_bias(alpha, BETA, eid, valid, k, cols, cmask, s_be, s_bh, HAS_BETA: tl.constexpr,
                  HAS_IDS: tl.constexpr, ACC: tl.constexpr):
    """alpha [BT, BH] + beta[e, cols] of each row's expert (without ids every row of slot k has
    expert k: one [BH] row of beta, loaded once)."""
    if HAS_BETA:
        if HAS_IDS:
            m = valid[:, None] & cmask[None, :]
            off = eid.to(tl.int64)[:, None] * s_be + cols[None, :].to(tl.int64) * s_bh
            alpha += tl.load(BETA + off, mask=m, other=0.0).to(ACC)
        else:
            bk = tl.load(BETA + tl.cast(k, tl.int64) * s_be + cols.to(tl.int64) * s_bh,
                         mask=cmask, other=0.0).to(ACC)
            alpha += bk[None, :]
    return alpha


@triton.jit
def chunk_angles(d, valid, Uc, BETA, eid, k, cols, cmask, s_be, s_bh, HAS_BETA: tl.constexpr,
                 HAS_IDS: tl.constexpr, ACC: tl.constexpr):
    """alpha [BT, BH] = d U[:, cols] (+ beta[e, cols]) -> (cos, sin); d [BT, RGP] of the rows."""
    alpha = tl.dot(d, Uc, input_precision="ieee", out_dtype=ACC)
    alpha = add_slot_bias(alpha, BETA, eid, valid, k, cols, cmask, s_be, s_bh, HAS_BETA, HAS_IDS,
                          ACC)
    return tl.cos(alpha), tl.sin(alpha)


@triton.jit
def b_rows(LB, eid, a, cols, h, s_le, s_lr, s_lo, m, ACC: tl.constexpr):
    """Row a of B_e at columns cols and cols + h, gathered per row's expert -> 2 x [BT, BH]."""
    o1, o2 = pair_offsets(eid.to(tl.int64) * s_le + a * s_lr, cols, h, s_lo)
    b1 = tl.load(LB + o1, mask=m, other=0.0).to(ACC)
    b2 = tl.load(LB + o2, mask=m, other=0.0).to(ACC)
    return b1, b2


@triton.jit
def expert_b_chunk(LB, e, rr, cols, r, h, s_le, s_lr, s_lo, ACC: tl.constexpr):
    """B_e at columns cols and cols + h, all ranks -> 2 x [RP, BH] (one expert for all rows)."""
    base = LB + tl.cast(e, tl.int64) * s_le
    return (load_param_chunk(base, rr, cols, r, h, s_lr, s_lo, ACC),
            load_param_chunk(base + h * s_lo, rr, cols, r, h, s_lr, s_lo, ACC))


@triton.jit
def slot_rows_tile(S, row, valid, rr, r, ACC: tl.constexpr):
    """Rows ``row`` of a contiguous [T * K, r] tensor (s, d) -> [BT, len(rr)] (padding 0)."""
    return tl.load(S + row[:, None] * r + rr[None, :], mask=valid[:, None] & (rr[None, :] < r),
                   other=0.0).to(ACC)


@triton.jit
def slot_outer(s_rows, X, BT: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr,
               BH: tl.constexpr):
    """sum over the block's tokens t of s[t, k, a] X[t, k, :] -> [KP, RP, BH]; s_rows [BT KP, RP]
    and X [BT KP, BH] in the packed row order (row t KP + k). Products stay within a slot, so a
    non-finite entry reaches only its own slot's outputs."""
    s3 = tl.reshape(s_rows, (BT, KP, RP))
    x3 = tl.reshape(X, (BT, KP, BH))
    return tl.sum(s3[:, :, :, None] * x3[:, :, None, :], axis=0)


@triton.jit
def rank_rows(LB, eid, k, a, cols, h, s_le, s_lr, s_lo, m, HAS_IDS: tl.constexpr,
              ACC: tl.constexpr):
    """Row a of each row's B_e at columns cols and cols + h: gathered per row with ids
    (2 x [BT, BH]); without ids every row has expert k: one row, 2 x [1, BH]."""
    if HAS_IDS:
        b1, b2 = b_rows(LB, eid, a, cols, h, s_le, s_lr, s_lo, m, ACC)
    else:
        o1, o2 = pair_offsets(tl.zeros((1,), dtype=tl.int64) + (tl.cast(k, tl.int64) * s_le
                                                              + a * s_lr), cols, h, s_lo)
        cm = (cols < h)[None, :]
        b1 = tl.load(LB + o1, mask=cm, other=0.0).to(ACC)
        b2 = tl.load(LB + o2, mask=cm, other=0.0).to(ACC)
    return b1, b2


@triton.jit
def gate_row(U, gi, cols, h, s_ug, s_uh, ACC: tl.constexpr):
    """Row gi of rot_up at columns cols -> [1, BH]."""
    return tl.load(U + gi * s_ug + cols[None, :].to(tl.int64) * s_uh, mask=(cols < h)[None, :],
                   other=0.0).to(ACC)


@triton.jit
def stretch_rotate(y1, y2, v1, v2, alpha, g, BETA, eid, valid, k, cols, h, s_be, s_bh,
                   HAS_BETA: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr):
    """(y1, y2) + g R(alpha + beta[e]) (v1, v2) for one chunk of column pairs."""
    alpha = add_slot_bias(alpha, BETA, eid, valid, k, cols, cols < h, s_be, s_bh, HAS_BETA,
                          HAS_IDS, ACC)
    u1, u2 = rotate(v1, v2, tl.cos(alpha), tl.sin(alpha))
    return y1 + g[:, None] * u1, y2 + g[:, None] * u2


@triton.jit
def store_y(Y, tok, T, cols, h, s_yt, s_yd, y1, y2):
    o1, o2 = pair_offsets(tok * s_yt, cols, h, s_yd)
    ym = (tok < T)[:, None] & (cols < h)[None, :]
    tl.store(Y + o1, y1.to(Y.dtype.element_ty), mask=ym)
    tl.store(Y + o2, y2.to(Y.dtype.element_ty), mask=ym)


@triton.jit
def lora_fwd_kernel(
    S, G, D, IDS, LB, U, BETA, Y,
    T, K, h, r, rg, E,
    s_gt, s_gk, s_it, s_ik, s_le, s_lr, s_lo, s_ug, s_uh, s_be, s_bh, s_yt, s_yd,
    BT: tl.constexpr, BH: tl.constexpr, NCH: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_IDS: tl.constexpr, ACC: tl.constexpr,
):
    """Grid: (column blocks of NCH chunks of BH pairs) x token blocks. Per slot k, v = s B_e
    and alpha = d U are built one rank at a time (outer products of a [BT] column of s or d
    with a row of B_e or U: no padding of r, rg to 16 and no dot operand tiles), each s and d
    value loaded once per program and used for its NCH (1 or 2) chunks."""
    cols = tl.program_id(0) * (NCH * BH) + tl.arange(0, BH)
    cols2 = cols + BH
    tok = (tl.program_id(1) * BT + tl.arange(0, BT)).to(tl.int64)
    y1 = tl.zeros((BT, BH), dtype=ACC)
    y2 = tl.zeros((BT, BH), dtype=ACC)
    w1 = tl.zeros((BT, BH), dtype=ACC)
    w2 = tl.zeros((BT, BH), dtype=ACC)
    for k in range(0, K):
        row, eid, valid = slot_rows(tok, k, K, T, IDS, s_it, s_ik, E, HAS_IDS)
        m1 = valid[:, None] & (cols < h)[None, :]
        m2 = valid[:, None] & (cols2 < h)[None, :]
        v1 = tl.zeros((BT, BH), dtype=ACC)
        v2 = tl.zeros((BT, BH), dtype=ACC)
        x1 = tl.zeros((BT, BH), dtype=ACC)
        x2 = tl.zeros((BT, BH), dtype=ACC)
        for a in range(0, r):
            sa = tl.load(S + row * r + a, mask=valid, other=0.0).to(ACC)[:, None]
            b1, b2 = rank_rows(LB, eid, k, a, cols, h, s_le, s_lr, s_lo, m1, HAS_IDS, ACC)
            v1 += sa * b1
            v2 += sa * b2
            if NCH == 2:
                b1, b2 = rank_rows(LB, eid, k, a, cols2, h, s_le, s_lr, s_lo, m2, HAS_IDS, ACC)
                x1 += sa * b1
                x2 += sa * b2
        al = tl.zeros((BT, BH), dtype=ACC)
        al2 = tl.zeros((BT, BH), dtype=ACC)
        for gi in range(0, rg):
            dg = tl.load(D + row * rg + gi, mask=valid, other=0.0).to(ACC)[:, None]
            al += dg * gate_row(U, gi, cols, h, s_ug, s_uh, ACC)
            if NCH == 2:
                al2 += dg * gate_row(U, gi, cols2, h, s_ug, s_uh, ACC)
        g = tl.load(G + tok * s_gt + k * s_gk, mask=valid, other=0.0).to(ACC)
        y1, y2 = stretch_rotate(y1, y2, v1, v2, al, g, BETA, eid, valid, k, cols, h, s_be, s_bh,
                                HAS_BETA, HAS_IDS, ACC)
        if NCH == 2:
            w1, w2 = stretch_rotate(w1, w2, x1, x2, al2, g, BETA, eid, valid, k, cols2, h, s_be,
                                    s_bh, HAS_BETA, HAS_IDS, ACC)
    store_y(Y, tok, T, cols, h, s_yt, s_yd, y1, y2)
    if NCH == 2:
        store_y(Y, tok, T, cols2, h, s_yt, s_yd, w1, w2)


@triton.jit
def lora_bwd_rows_kernel(
    S, G, D, IDS, LB, U, BETA, DY,
    DS, DG, DDD,                           # outputs: ds [T,K,r], dg [T,K], dd [T,K,rg] (fp32/64)
    T, K, h, r, rg, E,
    s_gt, s_gk, s_it, s_ik, s_le, s_lr, s_lo, s_ug, s_uh, s_be, s_bh, s_dyt, s_dyd,
    BT: tl.constexpr, BH: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
    HAS_BETA: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr,
):
    tok = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rr = tl.arange(0, RP)
    gg = tl.arange(0, RGP)
    for k in range(0, K):
        row, eid, valid = slot_rows(tok, k, K, T, IDS, s_it, s_ik, E, HAS_IDS)
        g = tl.load(G + tok * s_gt + k * s_gk, mask=valid, other=0.0).to(ACC)
        sk = slot_rows_tile(S, row, valid, rr, r, ACC)  # s and d once per slot, for every chunk
        dk = slot_rows_tile(D, row, valid, gg, rg, ACC)
        dg = tl.zeros((BT,), dtype=ACC)
        dd = tl.zeros((BT, RGP), dtype=ACC)
        ds = tl.zeros((BT, RP), dtype=ACC)
        for c0 in range(0, h, BH):
            cols = c0 + tl.arange(0, BH)
            cmask = cols < h
            m = valid[:, None] & cmask[None, :]
            Uc = load_param_chunk(U, gg, cols, rg, h, s_ug, s_uh, ACC)
            c, sn = chunk_angles(dk, valid, Uc, BETA, eid, k, cols, cmask, s_be, s_bh, HAS_BETA,
                                 HAS_IDS, ACC)
            o1, o2 = pair_offsets(tok * s_dyt, cols, h, s_dyd)
            dy1 = tl.load(DY + o1, mask=m, other=0.0).to(ACC)
            dy2 = tl.load(DY + o2, mask=m, other=0.0).to(ACC)
            dv1, dv2 = rotate(dy1, dy2, c, -sn)  # R(-alpha) dy; times g below
            dv1 = g[:, None] * dv1
            dv2 = g[:, None] * dv2
            if HAS_IDS:
                v1 = tl.zeros((BT, BH), dtype=ACC)
                v2 = tl.zeros((BT, BH), dtype=ACC)
                for a in range(0, r):  # one gather of B_e's row a serves v and ds
                    sa = tl.sum(tl.where(rr[None, :] == a, sk, 0.0), axis=1)
                    b1, b2 = b_rows(LB, eid, a, cols, h, s_le, s_lr, s_lo, m, ACC)
                    v1 += sa[:, None] * b1
                    v2 += sa[:, None] * b2
                    dsa = tl.sum(dv1 * b1 + dv2 * b2, axis=1)
                    ds += tl.where(rr[None, :] == a, dsa[:, None], 0.0)
            else:  # one B_k tile: v = s B_k and ds += dv B_k^T as dots
                Bk1, Bk2 = expert_b_chunk(LB, k, rr, cols, r, h, s_le, s_lr, s_lo, ACC)
                v1 = tl.dot(sk, Bk1, input_precision="ieee", out_dtype=ACC)
                v2 = tl.dot(sk, Bk2, input_precision="ieee", out_dtype=ACC)
                ds += tl.dot(dv1, tl.trans(Bk1), input_precision="ieee", out_dtype=ACC)
                ds += tl.dot(dv2, tl.trans(Bk2), input_precision="ieee", out_dtype=ACC)
            u1, u2 = rotate(v1, v2, c, sn)
            dg += tl.sum(dy1 * u1 + dy2 * u2, axis=1)
            dalpha = g[:, None] * (dy2 * u1 - dy1 * u2)
            dd += tl.dot(dalpha, tl.trans(Uc), input_precision="ieee", out_dtype=ACC)
        tl.store(DG + row, dg, mask=valid)
        tl.store(DS + row[:, None] * r + rr[None, :], ds, mask=valid[:, None] & (rr[None, :] < r))
        tl.store(DDD + row[:, None] * rg + gg[None, :], dd,
                 mask=valid[:, None] & (gg[None, :] < rg))


@triton.jit
def lora_bwd_params_kernel(
    S, G, D, ORDER, OFFS, LB, U, BETA, DY,
    DB, DBETA, PU,                        # dB [E,r,out] (in/out), dbeta [E,h], partials [E,rg,h]
    K, h, r, rg,
    s_gt, s_gk, s_le, s_lr, s_lo, s_ug, s_uh, s_be, s_bh, s_dyt, s_dyd,
    BR: tl.constexpr, BH: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
    HAS_BETA: tl.constexpr, ACC: tl.constexpr,
):
    cols = tl.program_id(0) * BH + tl.arange(0, BH)
    e = tl.program_id(1)
    cmask = cols < h
    rr = tl.arange(0, RP)
    gg = tl.arange(0, RGP)
    e64 = e.to(tl.int64)
    Uc = load_param_chunk(U, gg, cols, rg, h, s_ug, s_uh, ACC)
    Be1 = load_param_chunk(LB + e64 * s_le, rr, cols, r, h, s_lr, s_lo, ACC)
    Be2 = load_param_chunk(LB + e64 * s_le + h * s_lo, rr, cols, r, h, s_lr, s_lo, ACC)
    beta = tl.zeros((BH,), dtype=ACC)
    if HAS_BETA:
        beta = tl.load(BETA + e64 * s_be + cols.to(tl.int64) * s_bh, mask=cmask, other=0.0).to(ACC)
    ob1, ob2 = pair_offsets(e64 * r * 2 * h + rr.to(tl.int64) * 2 * h, cols, h, 1)
    mb = (rr[:, None] < r) & cmask[None, :]
    acc1 = tl.load(DB + ob1, mask=mb, other=0.0)  # dB holds the relation part on entry
    acc2 = tl.load(DB + ob2, mask=mb, other=0.0)
    acc_u = tl.zeros((RGP, BH), dtype=ACC)
    acc_beta = tl.zeros((BH,), dtype=ACC)
    start = tl.load(OFFS + e)
    end = tl.load(OFFS + e + 1)
    for i0 in range(start, end, BR):
        i = i0 + tl.arange(0, BR)
        valid = i < end
        row = tl.load(ORDER + i, mask=valid, other=0)  # flat (token, slot) rows of expert e
        tok = row // K
        k = row - tok * K
        m = valid[:, None] & cmask[None, :]
        s = tl.load(S + row[:, None] * r + rr[None, :], mask=valid[:, None] & (rr[None, :] < r),
                    other=0.0).to(ACC)
        d = tl.load(D + row[:, None] * rg + gg[None, :],
                    mask=valid[:, None] & (gg[None, :] < rg), other=0.0).to(ACC)
        g = tl.load(G + tok * s_gt + k * s_gk, mask=valid, other=0.0).to(ACC)
        alpha = tl.dot(d, Uc, input_precision="ieee", out_dtype=ACC) + beta[None, :]
        c = tl.cos(alpha)
        sn = tl.sin(alpha)
        v1 = tl.dot(s, Be1, input_precision="ieee", out_dtype=ACC)
        v2 = tl.dot(s, Be2, input_precision="ieee", out_dtype=ACC)
        u1, u2 = rotate(v1, v2, c, sn)
        o1, o2 = pair_offsets(tok * s_dyt, cols, h, s_dyd)
        dy1 = tl.load(DY + o1, mask=m, other=0.0).to(ACC)
        dy2 = tl.load(DY + o2, mask=m, other=0.0).to(ACC)
        dalpha = g[:, None] * (dy2 * u1 - dy1 * u2)
        dv1, dv2 = rotate(dy1, dy2, c, -sn)
        acc1 += tl.dot(tl.trans(s), g[:, None] * dv1, input_precision="ieee", out_dtype=ACC)
        acc2 += tl.dot(tl.trans(s), g[:, None] * dv2, input_precision="ieee", out_dtype=ACC)
        acc_u += tl.dot(tl.trans(d), dalpha, input_precision="ieee", out_dtype=ACC)
        acc_beta += tl.sum(dalpha, axis=0)
    tl.store(DB + ob1, acc1, mask=mb)
    tl.store(DB + ob2, acc2, mask=mb)
    if HAS_BETA:
        tl.store(DBETA + e64 * h + cols, acc_beta, mask=cmask)
    tl.store(PU + e64 * rg * h + gg[:, None] * h + cols[None, :], acc_u,
             mask=(gg[:, None] < rg) & cmask[None, :])


@triton.jit
def lora_bwd_rows_packed_kernel(
    S, G, D, IDS, LB, U, BETA, DY,
    DS, DG, DDD,                           # outputs: ds [T,K,r] (zeroed), dg [T,K], dd [T,K,rg]
    T, K, h, r, rg, E,
    s_gt, s_gk, s_it, s_ik, s_le, s_lr, s_lo, s_ug, s_uh, s_be, s_bh, s_dyt, s_dyd,
    KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, RP: tl.constexpr, RGP: tl.constexpr,
    BH: tl.constexpr, HAS_BETA: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr,
):
    """lora_bwd_rows_kernel with every slot of a token in one program (grid: token blocks):
    the R = BT * KP rows of lora_relation.py's layout, each row's s in its expert's columns of
    an [R, F] tile, so v = S_x B_cat and ds = dv B_cat^T are one dot each for all slots and dy
    is loaded once per token and chunk (broadcast to the token's rows), not once per slot."""
    blk = tl.program_id(0)
    tok, slot, valid = row_ids(blk, T, K, KP, BT)
    cc = tl.arange(0, F)
    eid = expert_of_row(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
    off_s, own = expert_column_offsets(eid, tok, slot, valid, K, r, cc, RP)
    Sx = tl.load(S + off_s, mask=own, other=0.0).to(ACC)
    flat = tok * K + slot
    gg = tl.arange(0, RGP)
    d = load_rows(D, flat, valid, rg, RGP, ACC)
    g = tl.load(G + tok * s_gt + slot.to(tl.int64) * s_gk, mask=valid, other=0.0).to(ACC)
    cb = (cc // RP < E) & (cc % RP < r)
    boff = (cc // RP).to(tl.int64) * s_le + (cc % RP) * s_lr  # row c of B_cat [E RP, out]
    dSx = tl.zeros((BT * KP, F), dtype=ACC)
    dd = tl.zeros((BT * KP, RGP), dtype=ACC)
    dg = tl.zeros((BT * KP,), dtype=ACC)
    for c0 in range(0, h, BH):
        cols = c0 + tl.arange(0, BH)
        cmask = cols < h
        o1, o2 = pair_offsets(boff, cols, h, s_lo)
        bm = cb[:, None] & cmask[None, :]
        B1 = tl.load(LB + o1, mask=bm, other=0.0).to(ACC)
        B2 = tl.load(LB + o2, mask=bm, other=0.0).to(ACC)
        Uc = load_param_chunk(U, gg, cols, rg, h, s_ug, s_uh, ACC)
        alpha = angles(d, Uc, BETA, eid, valid, cols, cmask, s_be, s_bh, HAS_BETA, ACC)
        c, sn = tl.cos(alpha), tl.sin(alpha)
        dy1, dy2 = load_token_halves(DY, blk, T, cols, h, s_dyt, s_dyd, cmask, KP, BT, BH, ACC)
        u1, u2 = rotate(tl.dot(Sx, B1, input_precision="ieee", out_dtype=ACC),
                        tl.dot(Sx, B2, input_precision="ieee", out_dtype=ACC), c, sn)
        dg += tl.sum(dy1 * u1 + dy2 * u2, axis=1)
        dalpha = g[:, None] * (dy2 * u1 - dy1 * u2)
        dd += tl.dot(dalpha, tl.trans(Uc), input_precision="ieee", out_dtype=ACC)
        dv1, dv2 = rotate(dy1, dy2, c, -sn)  # R(-alpha) dy; times g
        dSx += tl.dot(g[:, None] * dv1, tl.trans(B1), input_precision="ieee", out_dtype=ACC)
        dSx += tl.dot(g[:, None] * dv2, tl.trans(B2), input_precision="ieee", out_dtype=ACC)
    tl.store(DG + flat, dg, mask=valid)
    store_rows(DDD, dd, flat, valid, rg, RGP)
    tl.store(DS + off_s, dSx, mask=own)


@triton.jit
def lora_bwd_params_packed_kernel(
    S, G, D, IDS, LB, U, BETA, DY, AR, DPF, DQF, BAD,
    PB, PU, PBETA, DAR,   # partials dB [NG, E r, out], drot_up [NG * n_eg, rg, h], dbeta [NG, E, h]
    T, K, h, r, rg, E, n_blocks, n_eg,  # (fp32/64) and drot_down [out, rg]
    s_gt, s_gk, s_it, s_ik, s_le, s_lr, s_lo, s_ug, s_uh, s_be, s_bh, s_dyt, s_dyd, s_ao, s_ag,
    KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FG: tl.constexpr, RP: tl.constexpr,
    RGP: tl.constexpr, EB: tl.constexpr, BH: tl.constexpr, PER_SLOT: tl.constexpr,
    HAS_BETA: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr,
):
    """The parameter gradients in lora_bwd_rows_packed_kernel's [R, F] layout (grid: column
    chunks x (token groups x expert groups); token group p walks the token blocks p, p + NG,
    ...; expert group q owns the FG columns q FG .. (q + 1) FG - 1 of the F, i.e. FG / RP
    experts). All slots of a token are one step, so dy is read once per token, chunk and
    expert group (the expert-sorted kernel reads it once per slot). Per step:
    dB_cat[own] += S_x^T dv (rows of slot (t, k) sit in its expert's columns; PER_SLOT, i.e.
    dense with K padded x r padded = F: dB_k += s_k^T dv_k by slot_outer, FG = F), drot_up +=
    d^T dalpha, dbeta += onehot(e)^T dalpha. Token group 0 also adds the relation part
    (lora_relation.factor_grads: the gradients through P and Q), so no kernel of its own
    re-reads lora_B for it. No atomics: each program owns its partials' chunk (dB, dbeta: its
    experts' rows; drot_up: one partial per program row), summed on the host in fixed order."""
    cols = tl.program_id(0) * BH + tl.arange(0, BH)
    pid1 = tl.program_id(1)
    grp = pid1 // n_eg
    eg = pid1 - grp * n_eg
    cmask = cols < h
    cc = eg * FG + tl.arange(0, FG)  # this expert group's columns of the F
    gg = tl.arange(0, RGP)
    eb = tl.arange(0, EB)
    if PER_SLOT:  # without ids slot k is expert k: dB [KP, RP, BH] and dbeta [KP, BH] per slot
        rows = (tl.arange(0, KP)[:, None] * RP + tl.arange(0, RP)[None, :])[:, :, None]
        acc_beta = tl.zeros((KP, BH), dtype=ACC)
    else:
        rows = cc[:, None]
        acc_beta = tl.zeros((EB, BH), dtype=ACC)
    acc1 = tl.zeros(rows.shape, dtype=ACC) * tl.zeros((BH,), dtype=ACC)
    acc2 = tl.zeros(rows.shape, dtype=ACC) * tl.zeros((BH,), dtype=ACC)
    if grp == 0:  # the relation part, once per column
        acc1 = factor_grads(LB, AR, DPF, DQF, BAD, DAR, rows, cols, cmask, eg == 0, E, r, rg,
                            s_le, s_lr, s_lo, s_ao, s_ag, F, RP, RGP, ACC)
        acc2 = factor_grads(LB, AR, DPF, DQF, BAD, DAR, rows, cols + h, cmask, eg == 0, E, r, rg,
                            s_le, s_lr, s_lo, s_ao, s_ag, F, RP, RGP, ACC)
    acc_u = tl.zeros((RGP, BH), dtype=ACC)
    Uc = load_param_chunk(U, gg, cols, rg, h, s_ug, s_uh, ACC)
    rr = tl.arange(0, RP)
    for blk in range(grp, n_blocks, tl.num_programs(1) // n_eg):
        tok, slot, valid = row_ids(blk, T, K, KP, BT)
        eid = expert_of_row(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
        mine = valid & (eid >= 0) & (eid // (FG // RP) == eg)  # rows of this group's experts
        if PER_SLOT:
            s_rows = load_rows(S, tok * K + slot, mine, r, RP, ACC)  # [R, RP]
        else:
            off_s, own = expert_column_offsets(eid, tok, slot, mine, K, r, cc, RP)
            Sx = tl.load(S + off_s, mask=own, other=0.0).to(ACC)
        d = load_rows(D, tok * K + slot, mine, rg, RGP, ACC)
        g = tl.load(G + tok * s_gt + slot.to(tl.int64) * s_gk, mask=mine, other=0.0).to(ACC)
        alpha = angles(d, Uc, BETA, eid, mine, cols, cmask, s_be, s_bh, HAS_BETA, ACC)
        c, sn = tl.cos(alpha), tl.sin(alpha)
        # dy of the tokens with a slot in this expert group only (top-k: the others have none)
        tb = blk * BT + tl.arange(0, BT)
        on = (tb < T) & (tl.max(tl.reshape(mine.to(tl.int32), (BT, KP)), axis=1) > 0)
        dy1, dy2 = load_tokens_where(DY, tb, on, cols, h, s_dyt, s_dyd, cmask, KP, BT, BH, ACC)
        # v = s B_e one rank at a time from each row's own B_e rows (a dot over the F columns
        # holds 64-long operands per thread: spills)
        m = mine[:, None] & cmask[None, :]
        v1 = tl.zeros((BT * KP, BH), dtype=ACC)
        v2 = tl.zeros((BT * KP, BH), dtype=ACC)
        for a in range(0, r):
            if PER_SLOT:
                sa = tl.sum(tl.where(rr[None, :] == a, s_rows, 0.0), axis=1)
            else:
                sa = tl.sum(tl.where(cc[None, :] == eid[:, None] * RP + a, Sx, 0.0), axis=1)
            b1, b2 = b_rows(LB, eid, a, cols, h, s_le, s_lr, s_lo, m, ACC)
            v1 += sa[:, None] * b1
            v2 += sa[:, None] * b2
        u1, u2 = rotate(v1, v2, c, sn)
        dalpha = tl.where(m, g[:, None] * (dy2 * u1 - dy1 * u2), 0.0)
        dv1, dv2 = rotate(dy1, dy2, c, -sn)  # R(-alpha) dy; times g
        gdv1 = tl.where(m, g[:, None] * dv1, 0.0)
        gdv2 = tl.where(m, g[:, None] * dv2, 0.0)
        if PER_SLOT:  # dB_k += s_k^T g dv_k over the block's tokens: no F-wide dot, no groups
            acc1 += slot_outer(s_rows, gdv1, BT, KP, RP, BH)
            acc2 += slot_outer(s_rows, gdv2, BT, KP, RP, BH)
            if HAS_BETA:
                acc_beta += tl.sum(tl.reshape(dalpha, (BT, KP, BH)), axis=0)
        else:  # a row's terms go to its own expert's rows only, also when dy is not finite
            St, ownT = tl.trans(Sx), tl.trans(own)
            acc1 += support_dot(St, gdv1, ownT, m, ACC)
            acc2 += support_dot(St, gdv2, ownT, m, ACC)
            if HAS_BETA:
                onehot = tl.trans((eb[None, :] == eid[:, None]) & mine[:, None])  # [EB, R]
                acc_beta += support_dot(onehot.to(ACC), dalpha, onehot, m, ACC)
        acc_u += tl.dot(tl.trans(d), dalpha, input_precision="ieee", out_dtype=ACC)
    if PER_SLOT:
        acc1 = tl.reshape(acc1, (FG, BH))
        acc2 = tl.reshape(acc2, (FG, BH))
    flat_c, cm = factor_rows(cc, E, r, RP)  # row of B_cat [E r, out] holding column c
    bm = cm[:, None] & cmask[None, :]
    g64 = grp.to(tl.int64)
    p1, p2 = pair_offsets(g64 * E * r * 2 * h + flat_c * 2 * h, cols, h, 1)
    tl.store(PB + p1, acc1, mask=bm)
    tl.store(PB + p2, acc2, mask=bm)
    tl.store(PU + pid1.to(tl.int64) * rg * h + gg[:, None] * h + cols[None, :], acc_u,
             mask=(gg[:, None] < rg) & cmask[None, :])
    if HAS_BETA:
        if PER_SLOT:
            kb = tl.arange(0, KP)
            tl.store(PBETA + g64 * E * h + kb[:, None] * h + cols[None, :], acc_beta,
                     mask=(kb < E)[:, None] & cmask[None, :])
        else:
            ebm = (eb < E) & (eb // (FG // RP) == eg)
            tl.store(PBETA + g64 * E * h + eb[:, None] * h + cols[None, :], acc_beta,
                     mask=ebm[:, None] & cmask[None, :])
