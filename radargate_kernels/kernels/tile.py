"""Triton helpers every kernel shares: the row layout, loads, angles, trigonometry, dots.

Layout. A program owns ``BT`` tokens and a chunk of ``SK`` expert slots (kc .. kc + SK - 1) as
``R = BT * SK`` rows; row ``a`` is token ``blk * BT + a // SK``, slot ``kc + a % SK``. Feature
columns are walked in chunks of ``BH`` pairs: column ``p`` pairs with ``p + h`` (SPEC step 5).
Every offset into a [T, ...] tensor is int64.

Precision. Accumulation is fp32 (fp64 for fp64 inputs: ``ACC``). ``PREC`` is the precision of a
dot whose operand is a computed fp32 tile: "tf32" (tensor cores) for fp16/bf16 inputs, "ieee"
for fp32/fp64. Dots of two 16-bit input tiles use their own dtype (exact products).
"""
import triton
import triton.language as tl

TWO_PI_HI = tl.constexpr(6.28125)   # 2 pi = TWO_PI_HI + TWO_PI_LO; TWO_PI_HI has 9 bits, so
TWO_PI_LO = tl.constexpr(0.0019353071795864769)  # k * HI is exact for |k| < 2^15
INV_TWO_PI = tl.constexpr(0.15915494309189535)

# Set for the interpreter before import (tests): the GPU-only approximations below are then
# emulated with the accurate functions on the same reduced argument.
if triton.knobs.runtime.interpret:
    @triton.jit
    def _approx_cos(x):
        return tl.cos(x)

    @triton.jit
    def _approx_sin(x):
        return tl.sin(x)
else:  # pragma: no cover - compiled for CUDA only (benchmarks/compile_report.py checks the PTX)
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def _approx_cos(x):
        return libdevice.fast_cosf(x)   # cos.approx.ftz.f32: one special-function-unit op

    @triton.jit
    def _approx_sin(x):
        return libdevice.fast_sinf(x)   # sin.approx.ftz.f32


@triton.jit
def cos_sin(a, FAST: tl.constexpr):
    """(cos a, sin a). FAST (fp16/bf16 inputs): reduce a to [-pi, pi] (two-constant Cody-Waite,
    with an fma) and use the special-function units' approximations, absolute error below
    2^-21 there (CUDA programming guide, __sinf/__cosf); else the accurate libdevice routines."""
    if FAST:
        k = tl.floor(a * INV_TWO_PI + 0.5)
        x = tl.fma(-k, TWO_PI_LO, a - k * TWO_PI_HI)
        return _approx_cos(x), _approx_sin(x)
    else:
        return tl.cos(a), tl.sin(a)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b in fp32 (fp64 for fp64 operands) at precision PREC: "ieee", "tf32", or "tf32x2":
    two tf32 products of a's tf32 parts (a = hi + lo to 2^-20 relative) with b, for a computed
    a and a b of 16-bit input values (exact in tf32)."""
    if PREC == "tf32x2":
        hi = tf32_part(a)
        return (tl.dot(hi, b, input_precision="tf32", out_dtype=a.dtype)
                + tl.dot(tf32_part(a - hi), b, input_precision="tf32", out_dtype=a.dtype))
    else:
        return tl.dot(a, b, input_precision=PREC, out_dtype=a.dtype)


@triton.jit
def tf32_part(x):
    """x (fp32) with its 13 low mantissa bits cleared: exactly representable in tf32."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def non_finite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def finite_or_zero(x):
    """x with its non-finite entries replaced by 0: the operand of a product whose zeros stand
    for "no term" (one-hot lanes, other tokens' rows), so that 0 * inf cannot carry a value of
    one row or expert into another. Where a non-finite value must still show, the kernels put it
    back from a count of them (stream_bwd_cols_kernel) or it arrives by another route (a token
    with a non-finite v has non-finite cosines, hence a non-finite context d and angles)."""
    return tl.where(non_finite(x), 0.0, x)


@triton.jit
def other_tokens_safe(x, BT: tl.constexpr):
    """finite_or_zero(x) as the right operand of a block-diagonal per-token product when the
    tile holds several tokens (BT > 1); x itself for one token (nothing to keep apart)."""
    return finite_or_zero(x) if BT > 1 else x


@triton.jit
def block_rows(blk, kc, T, K, BT: tl.constexpr, SK: tl.constexpr):
    """Rows of token block ``blk``, slots kc .. kc + SK - 1 -> (token int64 [R], slot [R],
    row is real [R])."""
    a = tl.arange(0, BT * SK)
    tok = (blk * BT + a // SK).to(tl.int64)  # < T < 2^31
    slot = kc + a % SK
    return tok, slot, (tok < T) & (slot < K)


@triton.jit
def expert_of(IDS, tok, slot, valid, s_it, s_ik, E, HAS_IDS: tl.constexpr):
    """Expert of each row: ids[t, k], or k without ids; -1 for a row without one (masked)."""
    if HAS_IDS:
        e = tl.load(IDS + tok * s_it + slot.to(tl.int64) * s_ik, mask=valid, other=-1).to(tl.int32)
        return tl.where(valid & (e >= 0) & (e < E), e, -1)
    else:
        return tl.where(valid, slot, -1)


@triton.jit
def load_pairs(ptr, row_off, cols, h, s_d, mask, ACC: tl.constexpr):
    """Columns ``cols`` and ``cols + h`` of the rows at int64 offsets ``row_off`` -> two
    [R, BH] tiles (ACC)."""
    c = cols[None, :].to(tl.int64)
    return (tl.load(ptr + row_off[:, None] + c * s_d, mask=mask, other=0.0).to(ACC),
            tl.load(ptr + row_off[:, None] + (c + h) * s_d, mask=mask, other=0.0).to(ACC))


@triton.jit
def token_sum(x, SK: tl.constexpr):
    """[BT * SK, BH] per row -> [BT, BH]: the sum over each token's slots."""
    return tl.sum(tl.reshape(x, (x.shape[0] // SK, SK, x.shape[1])), axis=1)


@triton.jit
def load_rows(ptr, row, valid, n, NP: tl.constexpr, ACC: tl.constexpr):
    """[R, NP] of a contiguous [T * K, n] tensor (d, z, dd, ...) at flat rows ``row``."""
    c = tl.arange(0, NP)
    m = valid[:, None] & (c < n)[None, :]
    return tl.load(ptr + row[:, None] * n + c[None, :], mask=m, other=0.0).to(ACC)


@triton.jit
def store_rows(ptr, x, row, valid, n, NP: tl.constexpr):
    c = tl.arange(0, NP)
    tl.store(ptr + row[:, None] * n + c[None, :], x.to(ptr.dtype.element_ty),
             mask=valid[:, None] & (c < n)[None, :])


@triton.jit
def load_tile(ptr, rows, cols, nrows, ncols, s_r, s_c, ACC: tl.constexpr):
    """[len(rows), len(cols)] of a 2-D parameter, masked (ACC)."""
    m = (rows[:, None] < nrows) & (cols[None, :] < ncols)
    return tl.load(ptr + rows[:, None].to(tl.int64) * s_r + cols[None, :].to(tl.int64) * s_c,
                   mask=m, other=0.0).to(ACC)


@triton.jit
def angles(DCTX, U, BETA, row, e, valid, cols, cm, rg, s_ur, s_uh, s_be, s_bh,
           RGP: tl.constexpr, HAS_BETA: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """SPEC step 4 for one chunk: alpha = d U[:, cols] (+ beta[e, cols]) -> [R, BH], and the
    rows' context d [R, RGP] (d: contiguous [T * K, rg] at flat rows ``row``)."""
    d = load_rows(DCTX, row, valid, rg, RGP, ACC)
    gg = tl.arange(0, RGP)
    Uc = tl.load(U + gg[:, None].to(tl.int64) * s_ur + cols[None, :].to(tl.int64) * s_uh,
                 mask=(gg < rg)[:, None] & cm[None, :], other=0.0).to(ACC)
    # the angles feed sin/cos, whose error is absolute: |alpha| 2^-10 from tf32's truncated d
    # would be 0.03 rad at |alpha| = 30, so d is split into its tf32 parts (tf32x2)
    a = mm(d, Uc, "tf32x2" if PREC == "tf32" else PREC)
    if HAS_BETA:
        ok = (valid & (e >= 0))[:, None] & cm[None, :]
        a += tl.load(BETA + e.to(tl.int64)[:, None] * s_be + cols[None, :].to(tl.int64) * s_bh,
                     mask=ok, other=0.0).to(ACC)
    return a, d


@triton.jit
def rotate(x1, x2, c, s):
    """Givens rotation of the pairs (x1, x2) by the angle with cosine c and sine s."""
    return c * x1 - s * x2, s * x1 + c * x2
