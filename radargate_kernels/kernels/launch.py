"""Host side of every kernel: the one table of launch settings (``settings``), grids, strides and
the launches, for radar_gate (``forward`` / ``backward``) and the fused layer's streaming part
(``stream_forward`` / ``stream_backward``).

radar_gate, V [T, K, D], g [T, K], A [D, r], B [r, D/2], beta [E, D/2] or None, ids [T, K] or None:
  forward:  op_relation_fwd (n, C, rho, z, d) -> stream_fwd (y)                  2 launches
  backward: stream_bwd_rows (dg, dd) -> op_relation_bwd (M, dZ) -> stream_bwd_cols (dV and
            partials of dA, dB, dbeta, summed here)                              3 launches
The fused layer (lora.py) runs its GEMMs in torch and calls stream_forward (1 launch) and
stream_backward (2 launches). State tensors are in the compute dtype (fp32; fp64 for fp64).
"""
from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from ..reference import compute_dtype
from .relation import (lora_relation_bwd_kernel, lora_relation_fwd_kernel, op_relation_bwd_kernel,
                       op_relation_fwd_kernel)
from .stream import stream_bwd_cols_kernel, stream_bwd_rows_kernel, stream_fwd_kernel

MAX_K = 64      # slots per token (radar_gate: a token's K x K tile in one program, R <= 64 rows)
MAX_RANK = 64   # the fused layer's LoRA rank r and RotationGate rank rg
MAX_OP_RANK = 32  # radar_gate's r: at r = 64 its column kernel spilled (sm_80 with angle_bias)
MAX_E = 128     # experts with angle_bias or expert_ids
GRID_AXIS_MAX = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0: 2^31 - 1)

# FMA contraction of a * b + c: Triton's default up to 3.9, passed explicitly so every version
# compiles the same arithmetic (the compile report and the tolerance table assume it).
ENABLE_FP_FUSION = True


@torch.compiler.assume_constant_result  # dynamo cannot trace triton's C getenv; fixed per process
def interpreting() -> bool:
    """True when the Triton interpreter runs the kernels (TRITON_INTERPRET, as Triton reads it)."""
    return bool(triton.knobs.runtime.interpret)


def pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def precision(dtype: torch.dtype):
    """(ACC, PREC, FAST, VPREC) for inputs of ``dtype``: the accumulation dtype; PREC, the
    precision of dots with a computed fp32 operand: tf32 tensor cores for fp16/bf16 inputs (the
    angles d U always as two tf32 products of d's tf32 parts, tile.angles: their error is
    absolute), the FMA pipe's ieee for fp32 and fp64; whether sin/cos use the special-function
    units (fp16/bf16) or libdevice's accurate routines; VPREC, the precision of v = s B_e (the
    fused layer): tf32x2 for fp16 (s as two tf32 parts: fp16's 11-bit outputs need more than
    one tf32 product), else PREC. tests/conftest.py makes the interpreter's tf32 dots truncate
    their operands as tensor cores do, so the tests check these choices."""
    if dtype == torch.float64:
        return tl.float64, "ieee", False, "ieee"
    if dtype == torch.float32:
        return tl.float32, "ieee", False, "ieee"
    return tl.float32, "tf32", True, "tf32" if dtype == torch.bfloat16 else "tf32x2"


def kernel_limits_ok(K: int, r: int, E: int, has_e: bool) -> str | None:
    """None if radar_gate's kernels take this shape, else why not (backend='auto' then runs the
    PyTorch path, backend='triton' raises)."""
    if K > MAX_K:
        return f"K = {K} experts per token exceeds the kernels' limit of {MAX_K}"
    if r > MAX_OP_RANK:
        return f"rank r = {r} exceeds the kernels' limit of {MAX_OP_RANK}"
    if has_e and E > MAX_E:
        return f"E = {E} experts exceed the kernels' limit of {MAX_E}"
    return None


def settings(kind: str, K: int, r: int, rg: int, E: int, has_ids: bool,
             dtype: torch.dtype) -> dict:
    """THE table: tokens per program (BT), slots per tile (SK), column pairs per chunk (BH), padded
    widths and warps of every kernel. kind: "op" (radar_gate; rg = r) or "lora" (fused layer).
    Every value is compiled by benchmarks/compile_report.py without spills (docs/launch_config.md:
    each narrower choice was forced by a spill there)."""
    KP, RP, RGP, EP = pow2(K), max(16, pow2(r)), max(16, pow2(rg)), max(16, pow2(E))
    wide_dots = precision(dtype)[3] != "tf32"  # tf32x2 / ieee dots hold more registers
    if kind == "op":
        # 32-row tiles: BT tokens of up to 32 slots (the relation kernels: all K slots of a
        # token, its K x K blocks in an R x R tile, R = 64 at K > 32)
        BT = max(1, 32 // KP)
        # the column kernel (dV with M v, and four accumulators): 16-row tiles
        cfg = dict(BT=BT, SK=min(KP, 32), BT_COLS=max(1, 16 // KP), SK_COLS=min(KP, 16), FE=1,
                   BH_FWD=32 if wide_dots else 64,
                   BH_ROWS=16 if wide_dots else 32, BH_COLS=16,
                   BH_REL=16 if KP > 32 else (32 if wide_dots else 64))
    else:
        # 16 tokens per tile (the batched dots' M), slots in chunks; with ids one slot per tile,
        # each row's s in its expert's lanes of FE experts (FE r <= 64 per dot)
        SK = min(KP, 4) if not has_ids else 1
        FE = max(1, min(EP if has_ids else 1, 64 // RP))
        cfg = dict(BT=16, SK=SK, FE=FE, BH_FWD=16 if wide_dots and RP > 16 else 32,
                   BH_ROWS=16 if wide_dots or RP > 16 else 32,
                   BH_COLS=32 if RP <= 16 and not wide_dots else 16, BH_REL=0)
    # the fused relation: 16 tokens per program (the M of its dots), F lanes per token
    cfg.update(KP=KP, RP=RP, RGP=RGP, EP=EP, F=pow2(E) * RP, BT_LREL=16, WARPS=8, STAGES=1)
    return cfg


class Launch:
    """One kernel launch, ``kernel[grid](*args, **meta)``, planned apart from running so that
    benchmarks/compile_report.py and roofline.py see exactly what a real launch gets."""

    def __init__(self, kernel, grid, args, meta):
        self.kernel, self.grid, self.args = kernel, tuple(grid), args
        self.meta = dict(meta, enable_fp_fusion=ENABLE_FP_FUSION)
        if not interpreting():
            # the most registers a thread may have at one block per SM (docs/launch_config.md)
            self.meta.setdefault("maxnreg", min(255, 65536 // (32 * self.meta.get("num_warps", 4))))
        if not (self.grid[0] < 2 ** 31 and all(g <= GRID_AXIS_MAX for g in self.grid[1:])):
            raise ValueError(f"{kernel.__name__}: grid {self.grid} is beyond CUDA's limits "
                             f"(axis 0 < 2^31, axes 1 and 2 <= {GRID_AXIS_MAX}): too many "
                             f"experts or tokens for one launch")

    def run(self):
        if 0 in self.grid:
            return
        dev = next((a.device for a in self.args if isinstance(a, torch.Tensor)), None)
        if dev is not None and dev.type == "cuda":
            with torch.cuda.device(dev):  # the inputs' device, not the current one
                self.kernel[self.grid](*self.args, **self.meta)
        else:  # the interpreter patches triton.language globally while it runs: one at a time
            with _INTERPRETER_LOCK:
                self.kernel[self.grid](*self.args, **self.meta)


_INTERPRETER_LOCK = threading.Lock()


def run(plan: str, *args, **kwargs):
    """Plans and runs: ``run("forward", V, ...)`` calls ``plan_forward(V, ...)``, runs its launches
    and returns its outputs (finish() called)."""
    launches, out = globals()["plan_" + plan](*args, **kwargs)
    for launch in launches:
        launch.run()
    return out() if callable(out) else out


def token_groups(n_blocks: int, n_chunks: int, device, per_sm: int = 4) -> int:
    """Program groups of a kernel reducing over tokens (one fp32 partial each): about ``per_sm``
    programs per SM over its ``n_chunks`` other programs."""
    if device.type == "cuda" and not interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = -(-per_sm * sms // max(1, n_chunks))
    else:
        target = 2  # the interpreter runs programs one after another
    return max(1, min(n_blocks, target, 1024))


def _strides(t, n):
    return tuple(t.stride()) if t is not None else (0,) * n


def _meta(cfg, dtype, bh, **flags):
    acc, prec, fast, vprec = precision(dtype)
    return dict(BT=cfg["BT"], SK=cfg["SK"], BH=bh, RP=cfg["RP"], RGP=cfg["RGP"], FAST=fast,
                PREC=prec, VPREC=vprec, ACC=acc, num_warps=cfg["WARPS"], num_stages=cfg["STAGES"],
                **flags)


def _stream_args(T, K, h, r, rg, E, V, S, LB, g, d, U, beta, ids):
    """The first arguments shared by the three streaming kernels (the unused of V / S, LB are
    dummies: their flags keep them unread), and their flags."""
    dummy = g
    return ((V if V is not None else dummy), (S if S is not None else dummy),
            (LB if LB is not None else dummy), g, d, U, beta if beta is not None else dummy,
            ids if ids is not None else dummy), \
        (T, K, h, r, rg, E), \
        (*_strides(V, 3), *_strides(LB, 3), *g.stride(), *U.stride(), *_strides(beta, 2),
         *_strides(ids, 2)), \
        dict(V_FROM_S=V is None, HAS_IDS=ids is not None, HAS_BETA=beta is not None)


# ---- radar_gate --------------------------------------------------------------------------------

def plan_forward(V, g, A, B, beta, ids, tau: float, eps: float):
    """-> (launches, (y, n, C, rho, z, d)). ids: rows of beta (without beta, slot numbers), -1
    at masked slots; None: every slot active, slot k is expert k."""
    T, K, D = V.shape
    h, r = D // 2, A.shape[1]
    E = beta.shape[0] if beta is not None else K
    cfg = settings("op", K, r, r, E, ids is not None, V.dtype)
    sd = compute_dtype(V.dtype)
    y = V.new_empty((T, D))
    n, C, rho = V.new_empty((T, K), dtype=sd), V.new_empty((T, K, K), dtype=sd), \
        V.new_empty((T, K, K), dtype=sd)
    z, d = V.new_empty((T, K, r), dtype=sd), V.new_empty((T, K, r), dtype=sd)
    acc, prec, _, _ = precision(V.dtype)
    nb = triton.cdiv(T, cfg["BT"])
    # its Gram and V A products take 16-bit input values (or them scaled by a power of two):
    # exact in tf32, whatever the input dtype's dots elsewhere
    rel = Launch(op_relation_fwd_kernel, (nb,),
                 (V, A, ids if ids is not None else g, n, C, rho, z, d, T, K, E, h, r,
                  *V.stride(), *A.stride(), *_strides(ids, 2), 1.0 / tau, eps),
                 dict(KP=cfg["KP"], BT=cfg["BT"], BH=cfg["BH_REL"], RP=cfg["RP"],
                      HAS_IDS=ids is not None, PREC="ieee" if prec == "ieee" else "tf32",
                      ACC=acc, num_warps=cfg["WARPS"], num_stages=cfg["STAGES"]))
    ptrs, sizes, strides, flags = _stream_args(T, K, h, r, r, E, V, None, None, g, d, B, beta,
                                               ids)
    fwd = Launch(stream_fwd_kernel, (nb, triton.cdiv(h, cfg["BH_FWD"])),
                 (*ptrs, y, *sizes, *strides), _meta(cfg, V.dtype, cfg["BH_FWD"], FE=1, **flags))
    return [rel, fwd], (y, n, C, rho, z, d)


def plan_backward(dy, V, g, A, B, beta, ids, n, C, rho, z, d, tau: float, eps: float,
                  need=(True, True, True)):
    """need = (dA, dB, dbeta). -> (launches, finish) where finish() returns
    (dV, dg, dA, dB, dbeta) once the launches ran (the partial sums happen there). A masked
    slot's dV and dg are zeros."""
    T, K, D = V.shape
    h, r = D // 2, A.shape[1]
    E = beta.shape[0] if beta is not None else K
    cfg = settings("op", K, r, r, E, ids is not None, V.dtype)
    sd = compute_dtype(V.dtype)
    acc = precision(V.dtype)[0]
    nb = triton.cdiv(T, cfg["BT"])
    # the rows kernel does not write a masked slot's dg and dd: zeros (the relation backward
    # reads every dd)
    dg = (g.new_zeros if ids is not None else g.new_empty)((T, K), dtype=V.dtype)
    dd = (V.new_zeros if ids is not None else V.new_empty)((T, K, r), dtype=sd)
    M, dZ = V.new_empty((T, K, K), dtype=sd), V.new_empty((T, K, r), dtype=sd)
    dV = V.new_empty((T, K, D))
    ptrs, sizes, strides, flags = _stream_args(T, K, h, r, r, E, V, None, None, g, d, B, beta,
                                               ids)
    rows = Launch(stream_bwd_rows_kernel, (nb,),
                  (*ptrs, g, g, dy, dg, dd, dd, *sizes, *strides, *dy.stride()),
                  _meta(cfg, V.dtype, cfg["BH_ROWS"], **flags))
    rel = Launch(op_relation_bwd_kernel, (nb,),
                 (dd, n, C, rho, z, M, dZ, T, K, r, 1.0 / tau, eps),
                 dict(KP=cfg["KP"], BT=cfg["BT"], RP=cfg["RP"], ACC=acc,
                      num_warps=cfg["WARPS"]))
    n_chunks = triton.cdiv(h, cfg["BH_COLS"])
    nb_cols = triton.cdiv(T, cfg["BT_COLS"])
    G = token_groups(nb_cols, n_chunks, V.device)
    need_dA, need_dB, need_dbeta = need[0], need[1], need[2] and beta is not None
    pA = V.new_empty((G, D, r) if need_dA else (1,), dtype=sd)
    pB = V.new_empty((G, r, h) if need_dB else (1,), dtype=sd)
    pbeta = V.new_empty((G, E, h) if need_dbeta else (1,), dtype=sd)
    cols = Launch(stream_bwd_cols_kernel, (n_chunks, G, 1),
                  (*ptrs, g, g, dy, M, dZ, A, dV, pB, pbeta, pA, *sizes, nb_cols, *strides,
                   *dy.stride(), *A.stride()),
                  dict(_meta(cfg, V.dtype, cfg["BH_COLS"], EP=cfg["EP"], NEED_DU=need_dB,
                             NEED_DBETA=need_dbeta, NEED_DW=need_dA, **flags),
                       BT=cfg["BT_COLS"], SK=cfg["SK_COLS"]))

    def finish():
        def total(p, on, like):
            return p.sum(0).to(like.dtype) if on else like.new_zeros(like.shape)  # contiguous
        dbeta = total(pbeta, need_dbeta, beta) if beta is not None else V.new_empty(0)
        return dV, dg, total(pA, need_dA, A), total(pB, need_dB, B), dbeta
    return [rows, rel, cols], finish


# ---- the fused layer's streaming part ----------------------------------------------------------

def _lora_common(s_all, g, d, ids, lora_B, U, beta):
    T, K = g.shape
    E, r, D = lora_B.shape
    rg = U.shape[0]
    cfg = settings("lora", K, r, rg, E, ids is not None, lora_B.dtype)
    ptrs, sizes, strides, flags = _stream_args(T, K, D // 2, r, rg, E, None, s_all, lora_B, g,
                                               d, U, beta, ids)
    return T, K, E, r, D, rg, cfg, ptrs, sizes, strides, flags


def plan_stream_forward(s_all, g, d, ids, lora_B, U, beta, out_dtype):
    """y [T, D] (out_dtype) = sum_k g_k R(d_k U + beta_e) (s[t, e] B_e): s_all [T, E, r] and
    d [T, K, rg] contiguous in the compute dtype. -> (launches, y)."""
    T, K, E, r, D, rg, cfg, ptrs, sizes, strides, flags = _lora_common(s_all, g, d, ids, lora_B,
                                                                       U, beta)
    y = s_all.new_empty((T, D), dtype=out_dtype)
    launch = Launch(stream_fwd_kernel, (triton.cdiv(T, cfg["BT"]),
                                        triton.cdiv(D // 2, cfg["BH_FWD"])),
                    (*ptrs, y, *sizes, *strides),
                    _meta(cfg, lora_B.dtype, cfg["BH_FWD"], FE=cfg["FE"], **flags))
    return [launch], y


def expert_rows(ids, T: int, K: int, E: int, device):
    """With ids: the (t, k) rows sorted by expert, as flat rows t K + k ([T K]), and where each
    expert's rows start ([E + 1]), int32 (int64 from 2^31 rows): device ops only (a stable sort
    and a search), no host sync. Without ids slot k is expert k and the kernels compute its rows
    (None, None)."""
    if ids is None:
        return None, None
    sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)
    starts = torch.searchsorted(sorted_ids, torch.arange(E + 1, device=device,
                                                         dtype=sorted_ids.dtype))
    index = torch.int32 if T * K < 2 ** 31 else torch.int64
    return order.to(index), starts.to(index)


def plan_stream_backward(dy, s_all, g, d, ids, lora_B, U, beta, need=(True, True, True)):
    """Gradients of stream_forward: need = (dB, dU, dbeta). -> (launches, finish), finish() ->
    (ds [T, K, r], dg [T, K], dd [T, K, rg], dB (streaming part, [E, r, D] compute dtype),
    dU, dbeta), the parameter gradients None where not needed."""
    T, K, E, r, D, rg, cfg, ptrs, sizes, strides, flags = _lora_common(s_all, g, d, ids, lora_B,
                                                                       U, beta)
    # with ids the rows kernel writes only rows of an expert: a masked slot's (id -1) are zeros
    new = s_all.new_zeros if ids is not None else s_all.new_empty
    ds, dd = new((T, K, r)), new((T, K, rg))
    dg = new((T, K), dtype=g.dtype)
    rows_, starts = expert_rows(ids, T, K, E, s_all.device)
    blocks = triton.cdiv(T * K, E * cfg["BT"])  # an expert's row blocks on average
    groups = min(max(1, blocks), max(1, token_groups(blocks * E, E, s_all.device)))
    if rows_ is None:
        rows_ = starts = g  # not read without ids
    rows = Launch(stream_bwd_rows_kernel, (E, groups),
                  (*ptrs, rows_, starts, dy, dg, dd, ds, *sizes, *strides, *dy.stride()),
                  _meta(cfg, lora_B.dtype, cfg["BH_ROWS"], **flags))
    h = D // 2
    n_chunks = triton.cdiv(h, cfg["BH_COLS"])
    G = min(max(1, blocks), token_groups(blocks * E, n_chunks * E, s_all.device))
    need_dB, need_dU, need_dbeta = need[0], need[1], need[2] and beta is not None
    pB = s_all.new_empty((G, E, r, D) if need_dB else (1,))
    pU = s_all.new_empty((G, E, rg, h) if need_dU else (1,))
    pbeta = s_all.new_empty((G, E, h) if need_dbeta else (1,))
    cols = Launch(stream_bwd_cols_kernel, (n_chunks, E, G),
                  (*ptrs, rows_, starts, dy, g, g, g, g, pU, pbeta, pB, *sizes, 0, *strides,
                   *dy.stride(), 0, 0),
                  _meta(cfg, lora_B.dtype, cfg["BH_COLS"], EP=cfg["EP"], NEED_DU=need_dU,
                        NEED_DBETA=need_dbeta, NEED_DW=need_dB, **flags))

    def finish():
        def total(p, on, dims):
            return p.sum(dims) if on else None
        return (ds, dg, dd, total(pB, need_dB, 0), total(pU, need_dU, (0, 1)),
                total(pbeta, need_dbeta, 0))
    return [rows, cols], finish


# ---- the fused layer's relation part ------------------------------------------------------------

RELATION_LANES = 128  # the relation kernels hold P_flat as one [F, F] tile, F = E padded x r padded


def relation_fits(K: int, E: int, r: int) -> bool:
    """Whether the fused layer's relation part runs in the Triton kernels (else in PyTorch)."""
    return K <= MAX_K and pow2(E) * max(16, pow2(r)) <= RELATION_LANES


def _relation_common(s_all, ids, P, Q, input_dtype):
    T, E, r = s_all.shape
    K = ids.shape[1] if ids is not None else E
    rg = Q.shape[-1]
    cfg = settings("lora", K, r, rg, E, ids is not None, input_dtype)
    acc, prec, _, _ = precision(input_dtype)
    # P, W and Q are computed fp32 values that set d, hence the angles: three tf32 products keep
    # fp32's accuracy (tf32 loses 2^-11 of d). The backward's products only scale gradients:
    # tf32 for bf16, three tf32 products for fp16 (3 bits finer; docs/launch_config.md)
    meta = dict(KP=cfg["KP"], BT=cfg["BT_LREL"], F=cfg["F"], RP=cfg["RP"], RGP=cfg["RGP"],
                HAS_IDS=ids is not None, PREC="tf32x3" if prec == "tf32" else prec, ACC=acc,
                num_warps=4)
    ptrs = (s_all, ids if ids is not None else s_all, P.reshape(E * r, E * r).contiguous(),
            Q.reshape(E * r, rg).contiguous())
    s_ids = tuple(ids.stride()) if ids is not None else (0, 0)
    return T, K, E, r, rg, cfg, meta, ptrs, s_ids


def plan_lora_relation(s_all, ids, P, Q, tau: float, eps: float, input_dtype):
    """d [T, K, rg] from s_all [T, E, r] and P [E, r, E, r], Q [E, r, rg] (compute dtype)."""
    T, K, E, r, rg, cfg, meta, ptrs, s_ids = _relation_common(s_all, ids, P, Q, input_dtype)
    d = s_all.new_empty((T, K, rg))
    return [Launch(lora_relation_fwd_kernel, (triton.cdiv(T, meta["BT"]),),
                   (*ptrs, d, T, K, E, r, rg, *s_ids, 1.0 / tau, eps), meta)], d


def plan_lora_relation_backward(s_all, ids, P, Q, dd, ds, tau: float, eps: float, input_dtype,
                                scale: float = 1.0, split=None):
    """Adds the relation part to ds [T, K, r] and scales it (in place), or with ``split`` (a
    [T, 2 E r] bf16 tensor) writes scale * ds per token and expert as bf16 hi | lo parts there;
    finish() -> (dP, dQ) summed over the program groups' partials."""
    T, K, E, r, rg, cfg, meta, ptrs, s_ids = _relation_common(s_all, ids, P, Q, input_dtype)
    nb = triton.cdiv(T, meta["BT"])
    F, RGP = cfg["F"], cfg["RGP"]
    G = token_groups(nb, E, s_all.device, per_sm=1)  # a [F, F] partial each: few
    pp, pq = s_all.new_empty((G, F, F)), s_all.new_empty((G, F, RGP))
    launch = Launch(lora_relation_bwd_kernel, (G, E),
                    (*ptrs, dd, ds, split if split is not None else ds, pp, pq, T, K, E, r, rg,
                     *s_ids, nb, 1.0 / tau, eps, float(scale)),
                    dict(meta, SPLIT=split is not None, num_warps=8,
                         PREC="tf32" if input_dtype == torch.bfloat16 else meta["PREC"]))

    def finish():
        RP = cfg["RP"]
        dP = pp.sum(0).view(F // RP, RP, F // RP, RP)[:E, :r, :E, :r]
        dQ = pq.sum(0).view(F // RP, RP, RGP)[:E, :r, :rg]
        return dP, dQ
    return [launch], finish
