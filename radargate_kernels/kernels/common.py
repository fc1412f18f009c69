"""Triton helpers shared by the forward and backward kernels.

Layout used by every kernel: a program owns ``BT`` tokens and flattens (token, slot) into
``R = BT * KP`` rows (``KP`` = K padded to a power of two). Row ``a`` is token
``a // KP``, slot ``a % KP``. Per-token K x K matrices live as the diagonal blocks of an
R x R tile, so every product is a plain 2-D ``tl.dot`` and padding rows are masked.
Feature columns are walked in chunks of ``BH`` pairs: column ``p`` pairs with ``p + h``.
"""
import triton
import triton.language as tl


@triton.jit
def row_ids(blk, T, K, KP: tl.constexpr, BT: tl.constexpr):
    """Rows of token block ``blk`` -> (token int64 [R], slot [R], row-is-real mask [R])."""
    rows = tl.arange(0, BT * KP)
    tok = blk * BT + rows // KP
    slot = rows % KP
    valid = (tok < T) & (slot < K)
    return tok.to(tl.int64), slot, valid


@triton.jit
def block_masks(K, KP: tl.constexpr, BT: tl.constexpr, valid):
    """Masks on the R x R tile: same token (both rows real), and same token off the diagonal."""
    ri = tl.arange(0, BT * KP)
    same = ((ri[:, None] // KP) == (ri[None, :] // KP)) & valid[:, None] & valid[None, :]
    off = same & (ri[:, None] != ri[None, :])
    return same, off


@triton.jit
def pair_offsets(row_off, cols, h, s_d):
    """int64 element offsets of columns ``cols`` and ``cols + h`` for rows at ``row_off`` [R]."""
    c = cols[None, :].to(tl.int64)
    return row_off[:, None] + c * s_d, row_off[:, None] + (c + h) * s_d


@triton.jit
def load_halves(ptr, row_off, cols, h, s_d, mask, ACC: tl.constexpr):
    """Load columns ``cols`` and ``cols + h`` of rows at ``row_off`` -> two [R, BH] tiles in ACC."""
    off1, off2 = pair_offsets(row_off, cols, h, s_d)
    x1 = tl.load(ptr + off1, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(ptr + off2, mask=mask, other=0.0).to(ACC)
    return x1, x2


@triton.jit
def load_token_halves(ptr, blk, T, cols, h, s_t, s_d, cmask, KP: tl.constexpr,
                      BT: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr):
    """Load a per-token [T, D] tensor (``dy``) once per token and broadcast it to the R rows."""
    tb = blk * BT + tl.arange(0, BT)
    return load_tokens_where(ptr, tb, tb < T, cols, h, s_t, s_d, cmask, KP, BT, BH, ACC)


@triton.jit
def load_tokens_where(ptr, tb, on, cols, h, s_t, s_d, cmask, KP: tl.constexpr,
                      BT: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr):
    """load_token_halves for the tokens tb [BT] where ``on`` (others read nothing, give 0)."""
    x1, x2 = load_halves(ptr, tb.to(tl.int64) * s_t, cols, h, s_d, on[:, None] & cmask[None, :],
                         ACC)
    return to_rows(x1, KP, BT, BH), to_rows(x2, KP, BT, BH)


@triton.jit
def to_rows(x, KP: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """Broadcast a per-token tile [BT, BH] to the program's R = BT * KP rows -> [R, BH]."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], (BT, KP, BH)), (BT * KP, BH))


@triton.jit
def load_rows(ptr, row_idx, valid, ncols, RP: tl.constexpr, ACC: tl.constexpr):
    """Load [R, RP] of a contiguous [T*K, ncols] state tensor (z, d, dZ) at flat rows ``row_idx``."""
    rr = tl.arange(0, RP)
    m = valid[:, None] & (rr[None, :] < ncols)
    return tl.load(ptr + row_idx[:, None] * ncols + rr[None, :], mask=m, other=0.0).to(ACC)


@triton.jit
def store_rows(ptr, x, row_idx, valid, ncols, RP: tl.constexpr):
    rr = tl.arange(0, RP)
    m = valid[:, None] & (rr[None, :] < ncols)
    tl.store(ptr + row_idx[:, None] * ncols + rr[None, :], x, mask=m)


@triton.jit
def kk_offsets(tok, slot, K):
    """Offsets of the per-token K x K state (C, rho) [T, K, K] for the R x R tile."""
    return tok[:, None] * K * K + slot[:, None] * K + slot[None, :]


@triton.jit
def token_rows(ptr, t, kb, K, ncols, RP: tl.constexpr, ACC: tl.constexpr):
    """Rows ``kb`` (slots, masked by kb < K) of token ``t`` of a contiguous [T, K, ncols] state
    tensor (z, grad_d) -> [len(kb), RP]."""
    return load_rows(ptr, tl.cast(t, tl.int64) * K + kb, kb < K, ncols, RP, ACC)


@triton.jit
def relational_context(RHO, Z, t, slot, valid, K, r, KP: tl.constexpr, RP: tl.constexpr,
                       ACC: tl.constexpr):
    """SPEC step 3 for one token ``t`` (rows = its KP slots) from its stored rho [T, K, K] and
    z [T, K, r]: d = rho z - z (0 when K = 1) -> [KP, RP]. The product runs over blocks of 16
    slots loaded from memory, so no operand holds all KP slots (a 64-slot contraction in
    registers spilled, compile report); one token per program, so a plain dot keeps NaN/Inf
    inside the token."""
    base = tl.cast(t, tl.int64) * K
    d = tl.zeros((KP, RP), dtype=ACC)
    for j0 in range(0, K, 16):
        kb = j0 + tl.arange(0, 16)
        rho_b = tl.load(RHO + (base + slot)[:, None] * K + kb[None, :],
                        mask=valid[:, None] & (kb < K)[None, :], other=0.0).to(ACC)
        d += tl.dot(rho_b, token_rows(Z, t, kb, K, r, RP, ACC), input_precision="ieee",
                    out_dtype=ACC)
    d -= load_rows(Z, base + slot, valid, r, RP, ACC)
    return tl.where(K > 1, d, 0.0)


@triton.jit
def load_param_chunk(ptr, rows, cols, nrows, ncols, s_r, s_c, ACC: tl.constexpr):
    """Load a [len(rows), len(cols)] tile of a 2-D parameter (B, A, beta), masked."""
    m = (rows[:, None] < nrows) & (cols[None, :] < ncols)
    off = rows[:, None].to(tl.int64) * s_r + cols[None, :].to(tl.int64) * s_c
    return tl.load(ptr + off, mask=m, other=0.0).to(ACC)


@triton.jit
def angles(d, Bc, beta_ptr, eid, valid, cols, cmask, stride_beta_e, stride_beta_h,
           HAS_BETA: tl.constexpr, ACC: tl.constexpr, TC: tl.constexpr = False):
    """SPEC step 4 for one chunk: alpha = d B (+ beta[ids]) -> [R, BH]. TC: d B on tensor cores
    (dot_tf32x2: B's values must be exact in tf32)."""
    if TC:
        alpha = dot_tf32x2(d, Bc, ACC)
    else:
        alpha = tl.dot(d, Bc, input_precision="ieee", out_dtype=ACC)
    if HAS_BETA:
        alpha += gather_bias_rows(beta_ptr, eid, valid, cols, cmask, stride_beta_e,
                                  stride_beta_h, ACC)
    return alpha


@triton.jit
def gather_bias_rows(beta_ptr, eid, valid, cols, cmask, stride_beta_e, stride_beta_h,
                     ACC: tl.constexpr):
    """Columns ``cols`` of each row's angle_bias row, read per row -> [R, BH]; 0 for rows
    without an expert (eid -1)."""
    m = (valid & (eid >= 0))[:, None] & cmask[None, :]
    off = eid.to(tl.int64)[:, None] * stride_beta_e + cols[None, :].to(tl.int64) * stride_beta_h
    return tl.load(beta_ptr + off, mask=m, other=0.0).to(ACC)


@triton.jit
def bias_of_rows(tile, eid, valid):
    """Each row's row of an angle_bias chunk held as a tile [EP, BH] (all experts, rows >= E
    zero) -> [R, BH]; 0 for rows without an expert (eid -1). Loading the E rows once and
    selecting in registers reads angle_bias once per tile instead of once per row."""
    ok = valid & (eid >= 0)
    idx = tl.broadcast_to(tl.where(ok, eid, 0)[:, None], (eid.shape[0], tile.shape[1]))
    return tl.where(ok[:, None], tl.gather(tile, idx, 0), 0.0)


@triton.jit
def bias_rows_by_dot(tile, eid, valid, PREC: tl.constexpr, ACC: tl.constexpr):
    """bias_of_rows as a one-hot product: onehot(eid) [R, EP] @ tile [EP, BH] -> [R, BH], exact
    on tensor cores (PREC "tf32": a 0/1 weight times an fp16/bf16 value, exact in tf32, plus
    zeros). The tile stays a dot operand instead of a gather source (the gather spilled 72-128
    bytes in the single-pass forward at sm_80, compile report). Every entry must be finite (a
    non-finite one would reach every row through 0 * inf): see cos_sin_angles."""
    ok = valid & (eid >= 0)
    onehot = ((eid[:, None] == tl.arange(0, tile.shape[0])[None, :]) & ok[:, None]).to(ACC)
    return tl.dot(onehot, tile.to(ACC), input_precision=PREC, out_dtype=ACC)


@triton.jit
def cos_sin_angles(d, Bc, beta_ptr, beta_tile, eid, valid, cols, cmask, stride_beta_e,
                   stride_beta_h, HAS_BETA: tl.constexpr, BETA_TILE: tl.constexpr,
                   ACC: tl.constexpr, TC: tl.constexpr = False, BY_DOT: tl.constexpr = False,
                   tile_bad=False, PREC: tl.constexpr = "tf32"):
    """The per-chunk angle sequence of every kernel that rotates: alpha = d Bc + the angle_bias
    row of each row's expert (gathered per row from ``beta_ptr``, or with BETA_TILE selected in
    registers from ``beta_tile`` [EP, BH], the chunk of all experts) -> (cos alpha, sin alpha),
    each [R, BH]. TC: d Bc on tensor cores (angles). BY_DOT: the tile's rows are selected by a
    one-hot product (bias_rows_by_dot, precision PREC), except where ``tile_bad`` (the tile holds
    a non-finite value): then they are gathered per row from memory, so such a value reaches
    only the rows of its expert."""
    alpha = angles(d, Bc, beta_ptr, eid, valid, cols, cmask, stride_beta_e, stride_beta_h,
                   HAS_BETA and not BETA_TILE, ACC, TC)
    if HAS_BETA and BETA_TILE:
        if BY_DOT:
            if tile_bad:
                alpha += gather_bias_rows(beta_ptr, eid, valid, cols, cmask, stride_beta_e,
                                          stride_beta_h, ACC)
            else:
                alpha += bias_rows_by_dot(beta_tile, eid, valid, PREC, ACC)
        else:
            alpha += bias_of_rows(beta_tile, eid, valid)
    return tl.cos(alpha), tl.sin(alpha)


@triton.jit
def load_chunk_angles(V, voff, cols, h, stride_v_d, d, Bc, beta_ptr, eid, valid, cmask,
                      stride_beta_e, stride_beta_h, HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """Load v's column pairs (cols, cols + h) of the rows at ``voff`` and the chunk's angles
    (cos_sin_angles, angle_bias gathered per row) -> (v1, v2, cos alpha, sin alpha), each
    [R, BH]."""
    v1, v2 = load_halves(V, voff, cols, h, stride_v_d, valid[:, None] & cmask[None, :], ACC)
    cos_a, sin_a = cos_sin_angles(d, Bc, beta_ptr, Bc, eid, valid, cols, cmask, stride_beta_e,
                                  stride_beta_h, HAS_BETA, False, ACC)
    return v1, v2, cos_a, sin_a


@triton.jit
def tf32_parts(x):
    """Split fp32 x into hi + lo, both exactly representable in tf32 (10 explicit mantissa bits,
    lower bits cleared): hi + lo = x to 2^-20 relative."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # -8192: 0xFFFFE000
    lo = x - hi  # exact
    lo = (lo.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def dot_tf32x2(a, b, ACC: tl.constexpr):
    """a @ b on tensor cores where b's values are exact in tf32 (fp16/bf16 inputs, parameters)
    and a is a computed fp32 tile: two tf32 products of a's tf32 parts with b. Every product of
    tf32 values is exact in fp32, so the Triton interpreter computes what the GPU does (up to
    the order of the fp32 sums). An infinite entry of a gives NaN (its lo part is inf - inf)
    where an ieee dot may give +-inf; the row kernel's consumers (angles, the K x K chain) turn
    either into NaN alike."""
    hi, lo = tf32_parts(a)
    return (tl.dot(hi, b, input_precision="tf32", out_dtype=ACC)
            + tl.dot(lo, b, input_precision="tf32", out_dtype=ACC))


@triton.jit
def non_finite(X):
    return (X != X) | (tl.abs(X) == float("inf"))


@triton.jit
def block_dot(M, X, same, ACC: tl.constexpr):
    """M [R, R] (zero across tokens) @ X [R, C], as independent per-token products.

    A plain dot would leak a token's NaN/Inf into the other tokens of the tile through
    0 * nan. Non-finite entries of X are zeroed for the product and put back as NaN exactly where
    a dense per-token product has them: column c of every row of the token. ``same`` is the
    same-token mask of block_masks."""
    bad = non_finite(X)
    out = tl.dot(M, tl.where(bad, 0.0, X), input_precision="ieee", out_dtype=ACC)
    if tl.sum(bad.to(tl.int32)) > 0:  # only tiles holding non-finite values pay for this
        cnt = tl.dot(same.to(ACC), bad.to(ACC), input_precision="ieee", out_dtype=ACC)
        out = tl.where(cnt > 0, float("nan"), out)
    return out


@triton.jit
def support_dot(M, X, sup_m, sup_x, ACC: tl.constexpr):
    """M [A, R] @ X [R, C] where only the entries in sup_m [A, R] / sup_x [R, C] (bool) are terms;
    the other entries are zeros standing for "no term" (a row's lanes outside its expert, rows
    of other tokens). A plain dot would carry a non-finite entry to every output of its row or
    column through 0 * nan: here non-finite entries are zeroed for the product and put back as
    NaN exactly at the outputs (a, c) with a term through them (M[a, i] non-finite and
    sup_x[i, c], or X[i, c] non-finite and sup_m[a, i])."""
    bad_m = non_finite(M)
    bad_x = non_finite(X)
    out = tl.dot(tl.where(bad_m, 0.0, M), tl.where(bad_x, 0.0, X), input_precision="ieee",
                 out_dtype=ACC)
    if tl.sum(bad_m.to(tl.int32)) + tl.sum(bad_x.to(tl.int32)) > 0:  # only such tiles pay
        cnt = tl.dot(sup_m.to(ACC), bad_x.to(ACC), input_precision="ieee", out_dtype=ACC) \
            + tl.dot(bad_m.to(ACC), sup_x.to(ACC), input_precision="ieee", out_dtype=ACC)
        out = tl.where(cnt > 0, float("nan"), out)
    return out


@triton.jit
def rotate(x1, x2, c, s):
    """Givens rotation of the pairs (x1, x2) by the angle with cosine c and sine s."""
    return c * x1 - s * x2, s * x1 + c * x2


@triton.jit
def expert_of_row(ids_ptr, tok, slot, valid, s_it, s_ik, E, HAS_IDS: tl.constexpr):
    """Expert index of each row: ids[t, k], or k without ids. Out-of-range ids map to -1."""
    if HAS_IDS:
        e = tl.load(ids_ptr + tok * s_it + slot.to(tl.int64) * s_ik, mask=valid, other=-1)
        e = e.to(tl.int32)
        e = tl.where((e >= 0) & (e < E), e, -1)
    else:
        e = slot
    return e
