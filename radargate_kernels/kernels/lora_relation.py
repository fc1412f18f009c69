"""Triton kernel of the fused layer's relation part: SPEC steps 1-3 from the low-rank s.

``lora_relation_kernel`` (grid: token blocks): s [T, K, r] -> d [T, K, rg], reading s once.
A program owns BT tokens as R = BT * KP rows (the layout of common.py). Row (t, k) of expert
e = ids[t, k] (or k) is placed in its expert's columns of an [R, F] tile (F = EP * RP, column
c = e * RP + a holds s[t, k, a]), so with ``P_flat [F, F] = (B_e B_f^T)`` and
``Q_flat [F, rg] = (B_e rot_down)`` every per-token product is one plain ``tl.dot``:
``Gram = W P_flat W^T`` (W = the rows scaled by their max |s|, so no square overflows),
``z = S Q_flat`` (above 32 columns P_flat is walked in column chunks of FC = 32, re-loading
those columns of s, so s is read three times: a [64, 64] fp32 tile of P spilled); then the radar_gate forward's relation (n, C, rho) and ``d = rho z - z``.
Used while K <= 32 and F <= 64 (lora_launch.relation_fits; beyond, the tiles spilled); larger E * r use the PyTorch part.
"""
import triton
import triton.language as tl

from .common import block_dot, row_ids, store_rows
from .forward import relation


@triton.jit
def expert_columns(S, IDS, tok, slot, valid, K, E, r, s_it, s_ik, cc, RP: tl.constexpr,
                   HAS_IDS: tl.constexpr, ACC: tl.constexpr):
    """The rows' s placed in their experts' columns cc -> [R, len(cc)] (0 elsewhere; an
    out-of-range id, unchecked under torch.compile, gives a zero row). Only each row's own
    expert's lanes are loaded, so a walk over all column chunks reads s once."""
    if HAS_IDS:
        e = tl.load(IDS + tok * s_it + slot.to(tl.int64) * s_ik, mask=valid, other=-1)
        e = e.to(tl.int32)
    else:
        e = slot
    a = cc % RP
    m = (valid & (e >= 0) & (e < E))[:, None] & ((cc // RP)[None, :] == e[:, None]) \
        & (a < r)[None, :]
    off = (tok * K + slot)[:, None] * r + a[None, :]
    return tl.load(S + off, mask=m, other=0.0).to(ACC)


@triton.jit
def lora_relation_kernel(S, IDS, PF, QF, DD, T, K, E, r, rg, s_it, s_ik, tau_inv, eps,
                         KP: tl.constexpr, BT: tl.constexpr, F: tl.constexpr, FC: tl.constexpr,
                         RP: tl.constexpr, RGP: tl.constexpr, HAS_IDS: tl.constexpr,
                         ACC: tl.constexpr):
    tok, slot, valid = row_ids(tl.program_id(0), T, K, KP, BT)
    cc = tl.arange(0, F)
    Sx = expert_columns(S, IDS, tok, slot, valid, K, E, r, s_it, s_ik, cc, RP, HAS_IDS, ACC)
    mx = tl.max(tl.abs(Sx), axis=1)
    m = tl.where(mx > 0, mx, 1.0)  # row scale (1 for a zero row), as reference.row_scale
    W = Sx / m[:, None]
    flat = ((cc // RP) * r + cc % RP).to(tl.int64)  # row of P [E r, E r] and Q [E r, rg]
    cm = (cc // RP < E) & (cc % RP < r)
    gg = tl.arange(0, RGP)
    if FC == F:  # one chunk (F <= 32): P_flat [F, F] and Q_flat [F, rg] whole, s read once
        P = tl.load(PF + flat[:, None] * (E * r) + flat[None, :], mask=cm[:, None] & cm[None, :],
                    other=0.0).to(ACC)
        gram = tl.dot(tl.dot(W, P, input_precision="ieee", out_dtype=ACC), tl.trans(W),
                      input_precision="ieee", out_dtype=ACC)
        Q = tl.load(QF + flat[:, None] * rg + gg[None, :], mask=cm[:, None] & (gg < rg)[None, :],
                    other=0.0).to(ACC)
        z = tl.dot(Sx, Q, input_precision="ieee", out_dtype=ACC)
    else:  # P_flat in column chunks (its [F, F] tile would spill); the chunks' s re-loaded
        gram = tl.zeros((BT * KP, BT * KP), dtype=ACC)
        z = tl.zeros((BT * KP, RGP), dtype=ACC)
        for c0 in range(0, F, FC):
            c2 = c0 + tl.arange(0, FC)
            f2 = ((c2 // RP) * r + c2 % RP).to(tl.int64)
            m2 = (c2 // RP < E) & (c2 % RP < r)
            P = tl.load(PF + flat[:, None] * (E * r) + f2[None, :],
                        mask=cm[:, None] & m2[None, :], other=0.0).to(ACC)
            S2 = expert_columns(S, IDS, tok, slot, valid, K, E, r, s_it, s_ik, c2, RP, HAS_IDS,
                                ACC)
            gram += tl.dot(tl.dot(W, P, input_precision="ieee", out_dtype=ACC),
                           tl.trans(S2 / m[:, None]), input_precision="ieee", out_dtype=ACC)
        for c0 in range(0, F, FC):  # z = S Q_flat in a loop of its own (fewer live registers)
            c2 = c0 + tl.arange(0, FC)
            f2 = ((c2 // RP) * r + c2 % RP).to(tl.int64)
            m2 = (c2 // RP < E) & (c2 % RP < r)
            S2 = expert_columns(S, IDS, tok, slot, valid, K, E, r, s_it, s_ik, c2, RP, HAS_IDS,
                                ACC)
            Q = tl.load(QF + f2[:, None] * rg + gg[None, :],
                        mask=m2[:, None] & (gg < rg)[None, :], other=0.0).to(ACC)
            z += tl.dot(S2, Q, input_precision="ieee", out_dtype=ACC)
    n, C, rho, same = relation(gram, m, valid, K, tau_inv, eps, KP, BT)
    d = block_dot(rho, z, same, ACC) - z
    d = tl.where(K > 1, d, z * 0.0)  # SPEC: with K = 1, d = 0 (NaN stays NaN, as the reference)
    store_rows(DD, d, tok * K + slot, valid, rg, RGP)
