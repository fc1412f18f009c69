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

from .tile import block_rows, load_rows, load_tile, mm, other_tokens_safe, store_rows


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
    dg = tl.where(ri[:, None] == ri[None, :], gram, 0.0)
    n_row = tl.maximum(m * tl.sqrt(tl.sum(dg, axis=1)), eps)
    n_col = tl.maximum(m * tl.sqrt(tl.sum(dg, axis=0)), eps)
    C = tl.where(same, gram * ((m / n_row)[:, None] * (m / n_col)[None, :]), 0.0)
    logits = tl.where(off, C * tau_inv, -float("inf"))
    mx = tl.max(logits, axis=1)
    ex = tl.where(off, tl.exp(logits - tl.where(mx == -float("inf"), 0.0, mx)[:, None]), 0.0)
    den = tl.sum(ex, axis=1)
    return n_row, C, ex / tl.where(den > 0, den, 1.0)[:, None], same, off


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
    gram = tl.zeros((R, R), dtype=ACC)
    z = tl.zeros((R, RP), dtype=ACC)
    m = tl.zeros((R,), dtype=ACC)
    for c0 in range(0, h, BH):
        cols = c0 + tl.arange(0, BH)
        cm = cols < h
        c = cols[None, :].to(tl.int64) * s_vd
        vm = valid[:, None] & cm[None, :]
        # a 16-bit input tile is exact in tf32, and so is its scaling by a power of two: these
        # tensor-core products are exact (the bf16 dot itself is not emulated by the interpreter)
        v1 = tl.load(V + voff[:, None] + c, mask=vm, other=0.0).to(ACC)
        v2 = tl.load(V + voff[:, None] + c + h * s_vd, mask=vm, other=0.0).to(ACC)
        a1 = load_tile(A, cols, rr, h, r, s_ad, s_ar, ACC)
        a2 = load_tile(A + h * s_ad, cols, rr, h, r, s_ad, s_ar, ACC)
        z += mm(v1, a1, PREC) + mm(v2, a2, PREC)  # z = V A
        # Gram matrix of the rows scaled by a power of two, rescaled (exactly) as it grows
        big = tl.maximum(tl.max(tl.abs(v1), axis=1), tl.max(tl.abs(v2), axis=1))
        m_new = pow2_below(tl.maximum(m, big))
        f = tl.where(m > 0, m / m_new, 0.0)
        gram = gram * (f[:, None] * f[None, :])
        inv = (1.0 / m_new)[:, None]
        s1 = v1 * inv
        s2 = v2 * inv
        gram += mm(s1, tl.trans(s1), PREC) + mm(s2, tl.trans(s2), PREC)
        m = m_new
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
    drho = tl.where(off, mm(dd, tl.trans(z), "ieee"), 0.0)  # row i of dd with row j of z
    dC = tl.where(same, rho * (drho - tl.sum(rho * drho, axis=1)[:, None]) * tau_inv, 0.0)
    S = dC + tl.trans(dC)
    q = tl.where(n > eps, tl.sum(S * C, axis=1), 0.0)  # <v^_i, dv^_i>
    dz = mm(tl.trans(rho), other_tokens_safe(dd, BT), "ieee") - dd
    dz = tl.where(K > 1, dz, 0.0 * dd)  # d = 0 when K = 1: z gets no gradient
    inv = 1.0 / n
    Mt = S * inv[:, None] * inv[None, :]
    Mt = tl.where(ri[:, None] == ri[None, :], Mt - (q * inv * inv)[:, None], Mt)
    tl.store(MR + kk, Mt, mask=same)
    store_rows(DZ, dz, row, valid, r, RP)
