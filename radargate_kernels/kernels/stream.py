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
- ``stream_bwd_rows_kernel`` (the reductions over the features): dg, dd = dalpha U^T and,
  fused layer, ds = dv B_e^T.
- ``stream_bwd_cols_kernel`` (the reductions over the tokens, per chunk of column pairs): one
  fp32 partial per program group of dU, dbeta and (fused layer) the streaming part of dB, summed
  by the host in a fixed order (deterministic, no atomics); radar_gate also writes
  dV = g w + M v + dZ A^T (M, dZ: relation.py's backward) and partials of dA = V^T dZ.
radar_gate's backward walks token blocks (M v needs a token's slots together). The fused
layer's walks one expert's rows per program (``ROWS``: the (t, k) rows sorted by expert,
``OFFS``: where each expert's start), so v = s B_e is a plain dot with that expert's B, and
every sum over rows stays within its expert: no one-hot product, nothing to keep apart.
"""
import triton
import triton.language as tl

from .tile import (angles, block_rows, cos_sin, expert_of, finite_or_zero, load_pairs,
                   load_rows, mm, non_finite, other_tokens_safe, rotate, store_rows, token_sum)


@triton.jit
def slot_major(x, SK: tl.constexpr):
    """[BT * SK, N] rows -> [SK, BT, N] (the slots' tiles for a batched dot)."""
    return tl.permute(tl.reshape(x, (x.shape[0] // SK, SK, x.shape[1])), (1, 0, 2))


@triton.jit
def row_major(x):
    """[SK, BT, N] -> [BT * SK, N]."""
    return tl.reshape(tl.permute(x, (1, 0, 2)), (x.shape[0] * x.shape[1], x.shape[2]))


@triton.jit
def lanes_lora_b(LB, f0, cols, cm, h, r, E, s_le, s_lr, s_ld, RP: tl.constexpr,
                 FE: tl.constexpr, ACC: tl.constexpr):
    """lora_B rows of experts f0 .. f0 + FE - 1 at columns cols, cols + h -> two [FE * RP, BH]
    tiles."""
    ln = tl.arange(0, FE * RP)
    f = f0 + ln // RP
    a = ln % RP
    off = (f.to(tl.int64) * s_le + a * s_lr)[:, None]
    c = cols[None, :].to(tl.int64)
    on = ((f < E) & (a < r))[:, None] & cm[None, :]
    return (tl.load(LB + off + c * s_ld, mask=on, other=0.0).to(ACC),
            tl.load(LB + off + (c + h) * s_ld, mask=on, other=0.0).to(ACC))


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
    HAS_BETA: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr, VPREC: tl.constexpr,
    ACC: tl.constexpr,
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
        # v of the rows at columns cols and cols + h: v1, v2 [R, BH] (0 on masked rows)
        if not V_FROM_S:
            v1, v2 = load_pairs(V, tok * s_vt + slot.to(tl.int64) * s_vk, cols, h, s_vd,
                                valid[:, None] & cm[None, :], ACC)
        elif HAS_IDS:
            v1 = tl.zeros((BT * SK, BH), dtype=ACC)
            v2 = tl.zeros((BT * SK, BH), dtype=ACC)
            ln = tl.arange(0, FE * RP)
            for f0 in range(0, E, FE):
                # only chunks holding an expert of the tile's rows (16 rows: at most 16 of E)
                if tl.sum(((e >= f0) & (e < f0 + FE)).to(tl.int32)) > 0:
                    # each row's s in its expert's lanes of experts f0 .. f0 + FE - 1
                    f = f0 + ln // RP
                    on = (valid[:, None] & (f[None, :] == e[:, None])) & (ln % RP < r)[None, :]
                    sx = tl.load(S + (tok * E)[:, None] * r + (f * r + ln % RP)[None, :],
                                 mask=on, other=0.0).to(ACC)
                    b1, b2 = lanes_lora_b(LB, f0, cols, cm, h, r, E, s_le, s_lr, s_ld, RP, FE,
                                          ACC)
                    # other experts' non-finite B stays out (their lanes hold 0); a row of an
                    # expert with one is non-finite anyway through its token's context d
                    v1 += mm(sx, finite_or_zero(b1), VPREC)
                    v2 += mm(sx, finite_or_zero(b2), VPREC)
        else:
            s3 = slot_major(load_rows(S, tok * E + slot, valid, r, RP, ACC), SK)
            # lora_B of slots kc .. kc + SK - 1 (slot k is expert k) -> two [SK, RP, BH] tiles
            b1, b2 = lanes_lora_b(LB, kc, cols, cm, h, r, K, s_le, s_lr, s_ld, RP, SK, ACC)
            v1 = row_major(mm(s3, tl.reshape(b1, (SK, RP, BH)), VPREC))
            v2 = row_major(mm(s3, tl.reshape(b2, (SK, RP, BH)), VPREC))
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


@triton.jit
def expert_block(ROWS, OFFS, e, blk, T, K, BT: tl.constexpr, HAS_IDS: tl.constexpr):
    """Block ``blk`` of the rows of expert e -> (token int64, slot, flat row int64, valid), each
    [BT]. With ids from ROWS (flat rows t K + k sorted by expert) and OFFS [E + 1] (where each
    expert's start); without, expert e's rows are (t, e) for every token t."""
    a = tl.cast(blk, tl.int64) * BT + tl.arange(0, BT)  # T K may pass 2^31
    if HAS_IDS:
        start = tl.load(OFFS + e)
        valid = a < tl.load(OFFS + e + 1) - start
        row = tl.load(ROWS + start + a, mask=valid, other=0).to(tl.int64)
        return row // K, (row % K).to(tl.int32), row, valid
    else:
        return a, tl.zeros((BT,), dtype=tl.int32) + e, a * K + e, a < T


@triton.jit
def expert_count(OFFS, e, T, HAS_IDS: tl.constexpr):
    """How many rows expert e has."""
    return tl.load(OFFS + e + 1) - tl.load(OFFS + e) if HAS_IDS else T


@triton.jit
def expert_b(LB, e, cols, cm, h, r, s_le, s_lr, s_ld, RP: tl.constexpr, ACC: tl.constexpr):
    """lora_B of expert e at columns cols and cols + h -> two [RP, BH] tiles."""
    a = tl.arange(0, RP)
    off = e.to(tl.int64) * s_le + a[:, None] * s_lr
    c = cols[None, :].to(tl.int64)
    m = (a < r)[:, None] & cm[None, :]
    return (tl.load(LB + off + c * s_ld, mask=m, other=0.0).to(ACC),
            tl.load(LB + off + (c + h) * s_ld, mask=m, other=0.0).to(ACC))


@triton.jit
def bwd_terms(V, S, LB, G, DCTX, U, BETA, DY, tok, slot, row, e, valid, cols, cm, h, r, rg, E,
              s_vt, s_vk, s_vd, s_le, s_lr, s_ld, s_gt, s_gk, s_ur, s_uh, s_be, s_bh, s_yt, s_yd,
              RP: tl.constexpr, RGP: tl.constexpr, V_FROM_S: tl.constexpr,
              HAS_BETA: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr,
              VPREC: tl.constexpr, ACC: tl.constexpr):
    """What both backward kernels recompute for one chunk of rows: v, the context d, and
    w = R(-alpha) dy -> (v1, v2, w1, w2, g [R, 1], dalpha = g (v1 w2 - v2 w1), d, s rows, B_e
    halves). Fused layer: the rows are one expert's (e: that expert for every row)."""
    on = valid[:, None] & cm[None, :]
    dy1, dy2 = load_pairs(DY, tok * s_yt, cols, h, s_yd, on, ACC)
    rr = tl.arange(0, RP)
    if V_FROM_S:
        s_rows = tl.load(S + (tok * E + e)[:, None] * r + rr[None, :],
                         mask=valid[:, None] & (rr < r)[None, :], other=0.0).to(ACC)
        b1, b2 = expert_b(LB, tl.max(e, axis=0), cols, cm, h, r, s_le, s_lr, s_ld, RP, ACC)
        v1 = mm(s_rows, b1, VPREC)
        v2 = mm(s_rows, b2, VPREC)
    else:
        v1, v2 = load_pairs(V, tok * s_vt + slot.to(tl.int64) * s_vk, cols, h, s_vd, on, ACC)
        s_rows, b1, b2 = v1, v1, v1  # (not used by radar_gate)
    alpha, d = angles(DCTX, U, BETA, row, e, valid, cols, cm, rg, s_ur, s_uh, s_be, s_bh, RGP,
                      HAS_BETA, PREC, ACC)
    c, s = cos_sin(alpha, FAST)
    w1, w2 = rotate(dy1, dy2, c, -s)
    g = tl.load(G + tok * s_gt + slot.to(tl.int64) * s_gk, mask=valid, other=0.0).to(ACC)[:, None]
    return v1, v2, w1, w2, g, g * (v1 * w2 - v2 * w1), d, s_rows, b1, b2


@triton.jit(do_not_specialize=["T"])
def stream_bwd_rows_kernel(
    V, S, LB, G, DCTX, U, BETA, IDS, ROWS, OFFS, DY, DG, DD, DS,
    T, K, h, r, rg, E,
    s_vt, s_vk, s_vd, s_le, s_lr, s_ld, s_gt, s_gk, s_ur, s_uh, s_be, s_bh, s_it, s_ik,
    s_yt, s_yd,
    BT: tl.constexpr, SK: tl.constexpr, BH: tl.constexpr, RP: tl.constexpr,
    RGP: tl.constexpr, V_FROM_S: tl.constexpr, HAS_IDS: tl.constexpr, HAS_BETA: tl.constexpr,
    FAST: tl.constexpr, PREC: tl.constexpr, VPREC: tl.constexpr, ACC: tl.constexpr,
):
    """The reductions over the features, per row: dg = <w, v>, dd = g (v1 w2 - v2 w1) U^T and,
    fused layer, ds = g w B_e^T, stored at the rows' places in contiguous [T, K, ...] outputs
    DG, DD, DS. radar_gate: grid (token blocks,), slots in chunks of SK; fused layer: grid
    (E, groups), program (e, p) takes the blocks p, p + groups, ... of expert e's rows."""
    p0 = tl.program_id(0)  # fused layer: the expert; radar_gate: the token block
    if V_FROM_S:
        first = tl.program_id(1)
        stop = tl.cdiv(expert_count(OFFS, p0, T, HAS_IDS), BT)
        step = tl.num_programs(1)
    else:
        first, stop, step = 0, K, SK
    gg = tl.arange(0, RGP)
    for it in range(first, stop, step):
        if V_FROM_S:  # block it of expert p0's rows
            tok, slot, row, valid = expert_block(ROWS, OFFS, p0, it, T, K, BT, HAS_IDS)
            e = tl.zeros((BT,), dtype=tl.int32) + p0
        else:  # slots it .. it + SK - 1 of token block p0
            tok, slot, valid = block_rows(p0, it, T, K, BT, SK)
            e = expert_of(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS)
            row = tok * K + slot
            valid = e >= 0
        R: tl.constexpr = tok.shape[0]
        dg = tl.zeros((R,), dtype=ACC)
        dd = tl.zeros((R, RGP), dtype=ACC)
        ds = tl.zeros((R, RP), dtype=ACC)
        for c0 in range(0, h, BH):
            cols = c0 + tl.arange(0, BH)
            cm = cols < h
            v1, v2, w1, w2, _, _, _, _, b1, b2 = bwd_terms(
                V, S, LB, G, DCTX, U, BETA, DY, tok, slot, row, e, valid, cols, cm, h, r, rg, E,
                s_vt, s_vk, s_vd, s_le, s_lr, s_ld, s_gt, s_gk, s_ur, s_uh, s_be, s_bh, s_yt,
                s_yd, RP, RGP, V_FROM_S, HAS_BETA, FAST, PREC, VPREC, ACC)
            dg += tl.sum(v1 * w1 + v2 * w2, axis=1)
            ut = tl.load(U + gg[None, :].to(tl.int64) * s_ur + cols[:, None].to(tl.int64) * s_uh,
                         mask=cm[:, None] & (gg < rg)[None, :], other=0.0).to(ACC)
            dd += mm(v1 * w2 - v2 * w1, ut, PREC)
            if V_FROM_S:
                ds += mm(w1, tl.trans(b1), PREC) + mm(w2, tl.trans(b2), PREC)
        g = tl.load(G + tok * s_gt + slot.to(tl.int64) * s_gk, mask=valid, other=0.0).to(ACC)
        tl.store(DG + row, dg.to(DG.dtype.element_ty), mask=valid)
        store_rows(DD, g[:, None] * dd, row, valid, rg, RGP)
        if V_FROM_S:
            store_rows(DS, g[:, None] * ds, row, valid, r, RP)


@triton.jit(do_not_specialize=["T", "n_blocks"])
def stream_bwd_cols_kernel(
    V, S, LB, G, DCTX, U, BETA, IDS, ROWS, OFFS, DY, MR, DZ, A,
    DV, PU, PBETA, PW,
    T, K, h, r, rg, E, n_blocks,
    s_vt, s_vk, s_vd, s_le, s_lr, s_ld, s_gt, s_gk, s_ur, s_uh, s_be, s_bh, s_it, s_ik,
    s_yt, s_yd, s_ad, s_ar,
    BT: tl.constexpr, SK: tl.constexpr, BH: tl.constexpr, RP: tl.constexpr,
    RGP: tl.constexpr, EP: tl.constexpr, V_FROM_S: tl.constexpr, HAS_IDS: tl.constexpr,
    HAS_BETA: tl.constexpr, NEED_DU: tl.constexpr, NEED_DBETA: tl.constexpr,
    NEED_DW: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr, VPREC: tl.constexpr,
    ACC: tl.constexpr,
):
    """The reductions over the tokens for one chunk of BH column pairs (grid axis 0), into one
    fp32 partial per program group: PU of dU, PBETA of dbeta, PW of dB (fused layer, its
    streaming part [., E, r, D]) or of dA ([G, D, r], radar_gate).
    Fused layer: grid (chunks, E, groups), program (c, e, p) over blocks p, p + groups, ... of
    expert e's rows; partials PU [groups, E, rg, h], PBETA [groups, E, h], PW [groups, E, r, D].
    radar_gate: grid (chunks, groups), program (c, p) over token blocks p, p + groups, ...;
    partials PU [groups, rg, h], PBETA [groups, E, h]; also writes DV [T, K, D] =
    g w + M v + dZ A^T (SK slots per tile; M v over all the token's slot chunks). With ids its
    dbeta is a one-hot product of rows whose non-finite entries are zeroed, and a second one
    counts them per expert and column: those entries are NaN at the end (as the reference's
    index_add gives)."""
    cols = tl.program_id(0) * BH + tl.arange(0, BH)
    cm = cols < h
    gg = tl.arange(0, RGP)
    rr = tl.arange(0, RP)
    d_u = tl.zeros((RGP, BH), dtype=ACC)
    if V_FROM_S:
        e0 = tl.program_id(1)
        grp = tl.program_id(2)
        n_grp = tl.num_programs(2)
        d_b1 = tl.zeros((RP, BH), dtype=ACC)
        d_b2 = tl.zeros((RP, BH), dtype=ACC)
        d_beta = tl.zeros((BH,), dtype=ACC)
        n_blk = tl.cdiv(expert_count(OFFS, e0, T, HAS_IDS), BT)
        for blk in range(grp, n_blk, n_grp):
            tok, slot, row, valid = expert_block(ROWS, OFFS, e0, blk, T, K, BT, HAS_IDS)
            e = tl.zeros((BT,), dtype=tl.int32) + e0
            v1, v2, w1, w2, g, da, d, s_rows, _, _ = bwd_terms(
                V, S, LB, G, DCTX, U, BETA, DY, tok, slot, row, e, valid, cols, cm, h, r, rg, E,
                s_vt, s_vk, s_vd, s_le, s_lr, s_ld, s_gt, s_gk, s_ur, s_uh, s_be, s_bh, s_yt,
                s_yd, RP, RGP, V_FROM_S, HAS_BETA, FAST, PREC, VPREC, ACC)
            if NEED_DU:
                d_u += mm(tl.trans(d), da, PREC)
            if NEED_DBETA:
                d_beta += tl.sum(da, axis=0)
            if NEED_DW:
                st = tl.trans(s_rows)
                d_b1 += mm(st, g * w1, PREC)
                d_b2 += mm(st, g * w2, PREC)
        slab = grp.to(tl.int64) * E + e0  # this program's [group, expert] slab of the partials
        if NEED_DBETA:
            tl.store(PBETA + slab * h + cols, d_beta, mask=cm)
        if NEED_DW:
            off = (slab * r + rr[:, None]) * (2 * h) + cols[None, :]
            m = (rr < r)[:, None] & cm[None, :]
            tl.store(PW + off, d_b1, mask=m)
            tl.store(PW + off + h, d_b2, mask=m)
    else:
        grp = tl.program_id(1)
        n_grp = tl.num_programs(1)
        slab = grp.to(tl.int64)  # this program's group slab of the partials
        ee = tl.arange(0, EP)
        d_beta = tl.zeros((EP, BH), dtype=ACC)  # with ids (one-hot over experts)
        n_bad = tl.zeros((EP, BH), dtype=ACC)  # with ids: non-finite dalpha per expert, column
        d_a1 = tl.zeros((RP, BH), dtype=ACC)    # dA^T at rows cols, cols + h
        d_a2 = tl.zeros((RP, BH), dtype=ACC)
        for kc in range(0, K, SK):
            dbk = tl.zeros((SK, BH), dtype=ACC)  # without ids: each slot's dbeta
            for blk in range(grp, n_blocks, n_grp):
                tok, slot, inr = block_rows(blk, kc, T, K, BT, SK)
                e = expert_of(IDS, tok, slot, inr, s_it, s_ik, E, HAS_IDS)
                valid = e >= 0  # (a masked slot's dV is written as zeros)
                row = tok * K + slot
                v1, v2, w1, w2, g, da, d, _, _, _ = bwd_terms(
                    V, S, LB, G, DCTX, U, BETA, DY, tok, slot, row, e, valid, cols, cm, h, r,
                    rg, E, s_vt, s_vk, s_vd, s_le, s_lr, s_ld, s_gt, s_gk, s_ur, s_uh, s_be, s_bh,
                    s_yt, s_yd, RP, RGP, V_FROM_S, HAS_BETA, FAST, PREC, VPREC, ACC)
                if NEED_DU:
                    d_u += mm(tl.trans(d), da, PREC)
                if NEED_DBETA:
                    if HAS_IDS:
                        hot = ee[:, None] == e[None, :]  # [EP, R]
                        n_bad += mm(hot.to(ACC), non_finite(da).to(ACC), PREC)  # counts: exact
                        d_beta += mm(hot.to(ACC), finite_or_zero(da), PREC)
                    else:  # slot k is expert k: the sum over each slot's tokens
                        dbk += tl.sum(slot_major(da, SK), axis=1)
                dz = load_rows(DZ, row, valid, r, RP, ACC)
                if NEED_DW:  # dA^T = dZ^T V
                    d_a1 += mm(tl.trans(dz), v1, PREC)
                    d_a2 += mm(tl.trans(dz), v2, PREC)
                # dV = g w + dZ A^T + M v (M: zero across tokens; a token with a non-finite v
                # has a non-finite M of its own)
                off = (row * (2 * h))[:, None] + cols[None, :]
                am = cm[:, None] & (rr < r)[None, :]
                for half in tl.static_range(2):
                    a = tl.load(A + (cols + half * h)[:, None].to(tl.int64) * s_ad
                                + rr[None, :] * s_ar, mask=am, other=0.0).to(ACC)
                    dv = g * (w1 if half == 0 else w2) + mm(dz, tl.trans(a), PREC)
                    for jc in range(0, K, SK):  # M v over the token's slot chunks
                        vj = v1 if half == 0 else v2
                        if SK < K:  # (a masked slot's v: its M column is 0, a NaN zeroed)
                            tj, sj, okj = block_rows(blk, jc, T, K, BT, SK)
                            vj = finite_or_zero(tl.load(
                                V + (tj * s_vt + sj.to(tl.int64) * s_vk)[:, None]
                                + (cols + half * h)[None, :].to(tl.int64) * s_vd,
                                mask=okj[:, None] & cm[None, :], other=0.0).to(ACC))
                        ri = tl.arange(0, BT * SK)
                        same = (ri[:, None] // SK == ri[None, :] // SK) & valid[:, None] \
                            & (jc + ri % SK < K)[None, :]
                        m_t = tl.load(MR + row[:, None] * K + (jc + ri % SK)[None, :], mask=same,
                                      other=0.0).to(ACC)
                        dv += mm(m_t, other_tokens_safe(vj, BT), PREC)
                    dv = tl.where(valid[:, None], dv, 0.0)
                    tl.store(DV + off + half * h, dv.to(DV.dtype.element_ty),
                             mask=inr[:, None] & cm[None, :])
            if NEED_DBETA and not HAS_IDS:  # slots kc .. kc + SK - 1 of PBETA [G, K, h]
                jk = kc + tl.arange(0, SK)[:, None]
                tl.store(PBETA + (slab * K + jk) * h + cols[None, :], dbk,
                         mask=(jk < K) & cm[None, :])
        if NEED_DBETA and HAS_IDS:
            tl.store(PBETA + (slab * E + ee[:, None]) * h + cols[None, :],
                     tl.where(n_bad > 0, float("nan"), d_beta),
                     mask=(ee < E)[:, None] & cm[None, :])
        if NEED_DW:  # dA [G, D, r]: rows cols and cols + h, from dA^T [RP, BH]
            off = (slab * 2 * h + cols[None, :]) * r + rr[:, None]
            m = (rr < r)[:, None] & cm[None, :]
            tl.store(PW + off, d_a1, mask=m)
            tl.store(PW + off + h * r, d_a2, mask=m)
    if NEED_DU:  # PU [G, (E,) rg, h]
        tl.store(PU + (slab * rg + gg[:, None]) * h + cols[None, :], d_u,
                 mask=(gg < rg)[:, None] & cm[None, :])
