"""Triton kernels of the fused layer's down projection ``s = scaling * x A_e`` and its gradients.

``lora_A [E, in, r]`` is read in place as the matrix ``A_cat [in, E * RP]`` whose column
``c = e * RP + a`` is ``A[e, :, a]`` (RP = r padded to a power of two, padding columns masked),
so all experts are one GEMM and x is read once per column block (once while E * RP <= BN).
x and lora_A are loaded in their own dtypes and multiplied in the compute dtype (fp32, fp64 for
fp64 inputs); no upcast copy of x is ever written.

- ``lora_down_fwd_kernel`` (grid: token blocks x column blocks):
  ``s_all[t, e, a] = scaling * sum_i x[t, i] A[e, i, a]`` -> s_all [T, E, r] (compute dtype).
- ``lora_down_dx_kernel`` (grid: token blocks, walking the input blocks):
  ``dx[t, i] = sum_{e, a} ds_all[t, e, a] A[e, i, a]`` (dtype of dx).
- ``lora_down_da_kernel`` (grid: input blocks x column blocks):
  ``dA[e, i, a] = sum_t x[t, i] ds_all[t, e, a]``, the tokens walked in a fixed order by one
  program per tile: deterministic, no atomics. With WITH_DX (one column block: E * RP <= BN)
  it also writes dx for its input block from the ds_all tiles it loads anyway (no dx kernel).
``ds_all [T, E, r]`` (compute dtype) is the gradient of s_all; both backward kernels
multiply by ``scaling``. With top-k ids they read the slots' gradient ``ds [T, K, r]``
(contiguous) and ids instead and build ds_all tiles in registers (``ds_all_tile``): no
[T, E, r] tensor, and each program reads K r values per token rather than E r.
"""
import triton
import triton.language as tl


@triton.jit
def a_cat_tile(LA, ii, cc, n_in, E, r, s_ae, s_ai, s_ar, RP: tl.constexpr, ACC: tl.constexpr):
    """A_cat[ii, cc] = A[cc // RP, ii, cc % RP] -> [len(ii), len(cc)] in ACC (0 where padded)."""
    e = cc // RP
    a = cc % RP
    m = (ii[:, None] < n_in) & ((e < E) & (a < r))[None, :]
    off = ii[:, None].to(tl.int64) * s_ai + (e.to(tl.int64) * s_ae + a * s_ar)[None, :]
    return tl.load(LA + off, mask=m, other=0.0).to(ACC)


@triton.jit
def s_all_offsets(tok, cc, T, E, r, RP: tl.constexpr):
    """Offsets and mask of s_all / ds_all [T, E, r] (contiguous) at tokens tok, columns cc."""
    e = cc // RP
    a = cc % RP
    m = (tok < T)[:, None] & ((e < E) & (a < r))[None, :]
    return tok.to(tl.int64)[:, None] * (E * r) + (e * r + a)[None, :], m


@triton.jit
def ds_all_tile(DS, IDS, tok, c0, T, K, E, r, s_it, s_ik, BN: tl.constexpr, RP: tl.constexpr,
                HAS_IDS: tl.constexpr, ACC: tl.constexpr):
    """ds_all [len(tok), BN] at tokens tok, columns c0 .. c0 + BN - 1 (c = e * RP + a).
    Without ids, DS is ds_all [T, E, r] itself. With ids, DS is ds [T, K, r] and each slot's
    row is added to its expert's columns here: per slot one [len(tok), RP] row load (only rows
    whose expert lies in these columns: each ds value read once) widened in registers to the
    block's columns (whole experts) and kept where the expert matches (a non-finite value
    reaches only its own expert's columns; repeated ids add up)."""
    cc = c0 + tl.arange(0, BN)
    if HAS_IDS:  # the block holds whole experts (BN >= RP, both powers of two, c0 % RP == 0)
        tl.static_assert(BN % RP == 0)
        e = cc // RP
        tm = tok < T
        aa = tl.arange(0, RP)
        e_lo = c0 // RP
        acc = tl.zeros((tok.shape[0], BN), dtype=ACC)
        for k in range(0, K):
            ek = tl.load(IDS + tok.to(tl.int64) * s_it + k * s_ik, mask=tm, other=-1)
            # rows whose expert lies in this block (an out-of-range id, unchecked under
            # torch.compile, adds nothing)
            rm = tm & (ek >= e_lo) & (ek < e_lo + BN // RP) & (ek < E)
            row = tl.load(DS + (tok.to(tl.int64) * K + k)[:, None] * r + aa[None, :],
                          mask=rm[:, None] & (aa < r)[None, :], other=0.0).to(ACC)
            wide = tl.reshape(tl.broadcast_to(row[:, None, :], (tok.shape[0], BN // RP, RP)),
                              (tok.shape[0], BN))
            acc += tl.where(ek[:, None] == e[None, :], wide, 0.0)
    else:
        off, m = s_all_offsets(tok, cc, T, E, r, RP)
        acc = tl.load(DS + off, mask=m, other=0.0).to(ACC)
    return acc


@triton.jit
def lora_down_fwd_kernel(X, LA, S, T, n_in, E, r, scaling, s_xt, s_xi, s_ae, s_ai, s_ar,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                    ACC: tl.constexpr, PREC: tl.constexpr):
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    cc = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for i0 in range(0, n_in, BK):
        ii = i0 + tl.arange(0, BK)
        x = tl.load(X + tok.to(tl.int64)[:, None] * s_xt + ii[None, :] * s_xi,
                    mask=(tok < T)[:, None] & (ii < n_in)[None, :], other=0.0).to(ACC)
        a = a_cat_tile(LA, ii, cc, n_in, E, r, s_ae, s_ai, s_ar, RP, ACC)
        acc += tl.dot(x, a, input_precision=PREC, out_dtype=ACC)
    off, m = s_all_offsets(tok, cc, T, E, r, RP)
    tl.store(S + off, acc * scaling, mask=m)


@triton.jit
def lora_down_dx_kernel(DS, IDS, LA, DX, T, K, n_in, E, r, scaling, s_it, s_ik, s_ae, s_ai,
                        s_ar, s_dxt, s_dxi, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, RP: tl.constexpr, ONE_K: tl.constexpr,
                        HAS_IDS: tl.constexpr, ACC: tl.constexpr):
    """Grid: token blocks; the program walks all input blocks. With ONE_K (all E * RP columns
    in one step of BK) its ds_all tile is loaded once for all of them (else once per input
    block)."""
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    cc0 = tl.arange(0, BK)
    if ONE_K:
        ds0 = ds_all_tile(DS, IDS, tok, 0, T, K, E, r, s_it, s_ik, BK, RP, HAS_IDS, ACC)
    for i0 in range(0, n_in, BN):
        ii = i0 + tl.arange(0, BN)
        if ONE_K:
            acc = tl.dot(ds0, tl.trans(a_cat_tile(LA, ii, cc0, n_in, E, r, s_ae, s_ai, s_ar, RP,
                                                  ACC)), input_precision="ieee", out_dtype=ACC)
        else:
            acc = tl.zeros((BM, BN), dtype=ACC)
            for c0 in range(0, E * RP, BK):
                cc = c0 + tl.arange(0, BK)
                ds = ds_all_tile(DS, IDS, tok, c0, T, K, E, r, s_it, s_ik, BK, RP, HAS_IDS, ACC)
                a = a_cat_tile(LA, ii, cc, n_in, E, r, s_ae, s_ai, s_ar, RP, ACC)
                acc += tl.dot(ds, tl.trans(a), input_precision="ieee", out_dtype=ACC)
        store_dx(DX, acc * scaling, tok, ii, T, n_in, s_dxt, s_dxi)


@triton.jit
def store_dx(DX, dx, tok, ii, T, n_in, s_dxt, s_dxi):
    """dx [len(tok), len(ii)] at tokens tok, input features ii, in DX's dtype."""
    tl.store(DX + tok.to(tl.int64)[:, None] * s_dxt + ii[None, :] * s_dxi,
             dx.to(DX.dtype.element_ty), mask=(tok < T)[:, None] & (ii < n_in)[None, :])


@triton.jit
def lora_down_da_kernel(X, DS, IDS, DA, LA, DX, T, K, n_in, E, r, scaling, s_xt, s_xi, s_it,
                        s_ik, s_dae, s_dai, s_dar, s_ae, s_ai, s_ar, s_dxt, s_dxi,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                        WITH_DX: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr):
    ii = tl.program_id(0) * BM + tl.arange(0, BM)
    cc = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=ACC)
    if WITH_DX:  # this input block of A_cat, all its columns: dx = ds A_cat^T per token block
        a_t = tl.trans(a_cat_tile(LA, ii, cc, n_in, E, r, s_ae, s_ai, s_ar, RP, ACC)) * scaling
    for t0 in range(0, T, BK):
        tt = t0 + tl.arange(0, BK)
        x = tl.load(X + tt.to(tl.int64)[None, :] * s_xt + ii[:, None] * s_xi,
                    mask=(ii < n_in)[:, None] & (tt < T)[None, :], other=0.0).to(ACC)
        ds = ds_all_tile(DS, IDS, tt, tl.program_id(1) * BN, T, K, E, r, s_it, s_ik, BN, RP,
                         HAS_IDS, ACC)
        acc += tl.dot(x, ds, input_precision="ieee", out_dtype=ACC)
        if WITH_DX:
            store_dx(DX, tl.dot(ds, a_t, input_precision="ieee", out_dtype=ACC), tt, ii, T, n_in,
                     s_dxt, s_dxi)
    e = cc // RP
    a = cc % RP
    off = ii[:, None].to(tl.int64) * s_dai + (e.to(tl.int64) * s_dae + a * s_dar)[None, :]
    tl.store(DA + off, (acc * scaling).to(DA.dtype.element_ty),
             mask=(ii < n_in)[:, None] & ((e < E) & (a < r))[None, :])
