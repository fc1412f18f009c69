"""The fused RadarGate-LoRA layer as one op: ``radar_gate_lora``. Expert outputs never exist.

With LoRA experts, expert k of token t outputs ``v = s B_e`` where ``s = scaling * x A_e`` has
rank r (e = ids[t, k], or k). Everything RadarGate needs before the rotation is low rank:
``<v_i, v_j> = s_i (B_ei B_ej^T) s_j^T`` and ``z_i = v_i A_rot = s_i (B_ei A_rot)``, so the
relation map and the context ``d`` come from ``s [T, K, r]`` and two small per-expert products
(``P = B B^T`` [E, r, E, r], ``Q = B A_rot`` [E, r, rg]) without touching the output features.
One streaming pass over the output features then recomputes ``v`` chunk by chunk from ``s`` and
``B``, rotates, stretches and sums into ``y``.

Saved for backward: x, weights, ids and the parameters -- nothing per (token, slot) of size
``out`` -- and, while they cost at most a quarter of x's bytes (``save_lowrank``; the
``recompute`` argument overrides it), s [T, K, r], d [T, K, rg] and the small P, Q, so that
backward need not recompute them (the down projection reads x again, the relation part s).
Backends:
- ``triton`` (CUDA, or TRITON_INTERPRET=1): GEMMs in torch (cuBLAS on a GPU: the down
  projection and its gradients, P, Q and the factor gradients), the relation part from s in two
  small kernels (``kernels/relation.py``; while K <= 64 and E padded x r padded <= 128 lanes,
  else in PyTorch, chunked over tokens) and the streaming part in three (``kernels/stream.py``);
- ``torch`` (any device, the CPU path): chunks of tokens; each chunk's expert outputs exist only
  while that chunk is computed, and backward recomputes them chunk by chunk.
Without ``rot_down``/``rot_up`` the op is plain weighted-sum LoRA-MoE gating, ``sum_k g_k v_k``,
computed as one GEMM ``(g s) B`` with no expert output at all (the fair baseline).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .cpu import rotate_stretch_sum
from .reference import (compute_dtype, lora_down, lora_up, relation_weights, row_scale,
                        scaled_cosines, slot_rows_of)
from .validation import check_lora_inputs, no_double_backward, slot_ids

CHUNK_ELEMS = 1 << 21  # largest per-chunk intermediate (elements) of the PyTorch parts (CPU:
CHUNK_ELEMS_GPU = 1 << 27  # cache-sized; on a GPU, where each chunk costs launches: 512 MiB fp32)
_BACKENDS = ("auto", "triton", "torch")


def _launch():
    from .kernels import launch  # lazily: must follow any TRITON_INTERPRET setting
    return launch


def _interpreting():
    from .kernels.launch import interpreting
    return interpreting()


# ---- the low-rank pieces (PyTorch, differentiable) -------------------------------------------

def lowrank_factors(lora_B, rot_down, ct):
    """P [E, r, E, r] = B_e B_f^T and Q [E, r, rg] = B_e rot_down, in the compute dtype (two GEMMs
    over B_flat [E r, out])."""
    E, r, out = lora_B.shape
    Bf = lora_B.reshape(E * r, out)
    return mm_ct(Bf, Bf.t()).view(E, r, E, r), mm_ct(Bf, rot_down).view(E, r, -1)


def factors_backward(dP, dQ, B, rot_down, dB=None):
    """Gradients through P = B B^T and Q = B rot_down, in closed form (GEMMs, B read once each):
    dP [E, r, E, r], dQ [E, r, rg], B [E, r, out], rot_down [out, rg] (compute dtype), dB a
    gradient of B to add to (or None) -> (dB [E, r, out] contiguous, drot_down [out, rg])."""
    E, r, out = B.shape
    # a non-finite entry of B_e may meet only expert e's (zero, when no token uses e) blocks of
    # dP, dQ: zeroed, so 0 * inf cannot reach the other experts or rot_down. The reference's
    # gradient there is what flows through the tokens that use e, carried by dP, dQ themselves
    B = B.nan_to_num(0.0, 0.0, 0.0)
    Bf, dPf, dQf = B.reshape(E * r, out), dP.reshape(E * r, E * r), dQ.reshape(E * r, -1)
    acc = dQf @ rot_down.t() if dB is None else torch.addmm(dB.reshape(E * r, out), dQf,
                                                            rot_down.t())
    return torch.addmm(acc, dPf + dPf.t(), Bf).view(E, r, out), Bf.t() @ dQf


def relation_lowrank(s, ids, P, Q, tau: float, eps: float):
    """SPEC steps 1-3 from low-rank activations: s [t, K, r] -> d [t, K, rg].

    Gram ``G_ij = s_i P[e_i, :, e_j, :] s_j^T`` (= <v_i, v_j>), ``n = max(|v|, eps)``, cosines,
    reference weights rho, ``z_i = s_i Q[e_i]``, ``d = rho z - z`` (d = 0 for a slot without
    others: K = 1, or one active slot). ids < 0: masked slots (d = 0, out of the relation)."""
    K = s.shape[1]
    active = ids >= 0 if ids is not None else None
    if active is not None:  # a masked slot's s is never used
        s = torch.where(active.unsqueeze(-1), s, 0.0)
    m = row_scale(s)  # [t, K]: the Gram matrix of s / m, so no square overflows
    w = s / m.unsqueeze(-1)
    if ids is None:
        G = torch.einsum("tia,iajb,tjb->tij", w, P, w)
        z = torch.einsum("tia,iag->tig", s, Q)
    else:  # the K x K blocks P[e_i, :, e_j, :] gathered by index_select (bitwise repeatable
        # gradients, unlike P[ids, :, ids, :]): K^2 r^2 per token, not E K r^2
        E, r = P.shape[:2]
        e = ids.long().clamp_min(0)
        pairs = (e.unsqueeze(2) * E + e.unsqueeze(1)).reshape(-1)
        P_pairs = P.permute(0, 2, 1, 3).reshape(E * E, r * r)
        Pg = torch.index_select(P_pairs, 0, pairs).view(*e.shape, K, r, r)
        Pg = torch.where((active.unsqueeze(2) & active.unsqueeze(1))[..., None, None], Pg, 0.0)
        G = torch.einsum("tia,tijab,tjb->tij", w, Pg, w)
        z = torch.einsum("tia,tiag->tig", s, slot_rows_of(Q, ids))
    if K == 1:
        return z * 0  # d = 0, as a function of s (zero gradients, and NaN stays NaN as in SPEC)
    rho, has_other = relation_weights(scaled_cosines(G, m, eps), tau, active)
    return torch.baddbmm(z * has_other, rho, z, beta=-1)


def slots_to_experts(v, ids, E):
    """v [t, K, r] -> [t, E, r]: each slot's row added to its expert's row (ids [t, K]).

    A one-hot product: exact and deterministic with repeated ids (no atomics). It would carry a
    non-finite row to every expert through 0 * nan, so non-finite entries are zeroed for the
    product and put back as NaN only where the row's own expert has them (a second one-hot
    product of the non-finite mask, no host sync). A masked slot's row (id < 0) goes nowhere."""
    oh = expert_one_hot(ids, E).to(v.dtype)
    bad = ~torch.isfinite(v)
    out = torch.einsum("tke,tkr->ter", oh, v.masked_fill(bad, 0))
    hit = torch.einsum("tke,tkr->ter", oh, bad.to(v.dtype))
    return out.masked_fill(hit > 0, float("nan"))


def weighted_sum_lowrank(s, g, ids, lora_B):
    """``sum_k g_k s_k B_e`` as one GEMM over the E r low-rank columns: s [t, K, r] -> [t, out]."""
    E, r, out = lora_B.shape
    gs = g.unsqueeze(-1) * s
    if ids is not None:
        return _SlotSum.apply(gs, ids, lora_B.to(s.dtype))
    return gs.reshape(-1, E * r) @ lora_B.to(s.dtype).reshape(E * r, out)


def expert_one_hot(ids, E):
    """ids [t, K] -> [t, K, E] bool, all False for a masked slot (id < 0)."""
    # a comparison, not F.one_hot, whose range check reads values back to the host on CPU
    return ids.unsqueeze(-1) == torch.arange(E, device=ids.device)


# A GEMM over all experts' columns multiplies a row's zeros (experts it does not use) with every
# expert's values: a non-finite entry of one expert's B, or of one row's gradient, would reach
# every row or expert through 0 * inf where the reference's gather touches only the users. So the
# products run with non-finite entries zeroed, and NaN is put back where the gather has them:

def finite_mm(S, B, hot):
    """S [n, E r] @ B [E, r, out] -> [n, out], each row non-finite only where its experts (hot
    [n, E] bool) have a non-finite B entry in that column (one small GEMM puts the NaN back: no
    host sync, no branch)."""
    E, r, out = B.shape
    bad = ~torch.isfinite(B)
    y = S @ B.masked_fill(bad, 0).reshape(E * r, out)
    return y.masked_fill((hot.to(y.dtype) @ bad.any(1).to(y.dtype)) > 0, float("nan"))


def expert_grad(S, dv, hot):
    """dB [E, r, out] = S^T dv for S [n, E r], dv [n, out]: a non-finite dv entry (n, c) reaches
    only column c of the experts of row n (hot [n, E]), in all their r rows."""
    E = hot.shape[1]
    bad = ~torch.isfinite(dv)
    dB = (S.t() @ dv.masked_fill(bad, 0)).view(E, -1, dv.shape[1])
    hit = (hot.t().to(dB.dtype) @ bad.to(dB.dtype)) > 0  # [E, out]
    return dB.masked_fill(hit.unsqueeze(1), float("nan"))


class _SlotSum(torch.autograd.Function):
    """y = sum_k gs_k B_{e_k} over top-k slots as one GEMM over all experts' columns (slots
    added to their experts first), non-finite values kept to the tokens and experts the
    reference's gather gives them. gs [t, K, r], ids [t, K], B [E, r, out] -> y [t, out]."""

    @staticmethod
    def forward(ctx, gs, ids, B):
        E, r, _ = B.shape
        used = expert_one_hot(ids, E).any(1)  # [t, E]
        ctx.save_for_backward(gs, ids, B, used)
        return finite_mm(slots_to_experts(gs, ids, E).reshape(-1, E * r), B, used)

    @staticmethod
    def backward(ctx, dy):
        gs, ids, B, used = ctx.saved_tensors
        E, r, out = B.shape
        dgs = slot_rows((dy @ B.reshape(E * r, out).t()).view(-1, E, r), ids)
        dB = expert_grad(slots_to_experts(gs, ids, E).reshape(-1, E * r), dy, used)
        return dgs.masked_fill((ids < 0).unsqueeze(-1), 0), None, dB


ONE_HOT_MAX = 512  # E * r up to which selected experts' outputs are one GEMM (CPU path)


def expert_outputs(s, ids, lora_B):
    """v = s B_e: s [t, K, r], lora_B [E, r, out] (s's dtype) -> [t, K, out] (0 at a masked slot).
    With ids and E r <= ONE_HOT_MAX: one GEMM over all experts' columns, each slot a row of
    _SlotSum (E times the minimal flops, but one large product instead of a [t, K, r, out]
    gather of B rows: measured faster on CPU); otherwise the gather of the reference (lora_up)."""
    E, r, out = lora_B.shape
    if ids is None or E * r > ONE_HOT_MAX:
        return lora_up(s, lora_B, ids)
    return _SlotSum.apply(s.reshape(-1, 1, r), ids.reshape(-1, 1), lora_B).view(*ids.shape, out)


def stream_torch(s, g, d, ids, lora_B, rot_up, beta):
    """The streaming part in PyTorch, on a chunk of tokens: ``y = sum_k g_k R(d_k U + beta) v_k``
    with ``v = s B_e`` formed for this chunk only. s [t, K, r], d [t, K, rg] -> y [t, out].
    A masked slot (id < 0) adds nothing (its v is 0 and g must be 0: radar_gate_lora)."""
    V = expert_outputs(s, ids, lora_B)
    alpha = d @ rot_up
    if beta is not None:
        alpha = alpha + slot_rows_of(beta, ids)
    if ids is not None:
        V = torch.where((ids >= 0).unsqueeze(-1), V, 0.0)
    return rotate_stretch_sum(V, alpha, g)


# ---- chunked evaluation with recompute ---------------------------------------------------------

def _chunks(T, per_token, device):
    big = device.type == "cuda" or CUDA_GEMMS
    step = max(1, (CHUNK_ELEMS_GPU if big else CHUNK_ELEMS) // max(1, per_token))
    return [(i, min(i + step, T)) for i in range(0, T, step)]


def _per_token_elems(K, r, out, E, rg, ids, rotation, backend):
    """Largest intermediate per token of the PyTorch parts (elements), to size the chunks: on
    the Triton backend only the relation (when it is not a kernel) runs in PyTorch."""
    if not rotation:
        return K * (E if ids is not None else 1) * r
    rel = K * K * r * (r if ids is not None else 1) + K * K * 4 + K * rg
    if backend == "triton":
        return rel
    gathered = r if ids is not None and E * r > ONE_HOT_MAX else 0
    v = K * out * (1 + gathered) + K * E * r  # V (and the gathered B rows, or the one-hot s)
    return max(v, rel)


def _chunked_eval(fn, chunks, tok_args, params, out):
    """out[a:b] = fn(*(t[a:b] for t in tok_args), *params) for each chunk, without autograd."""
    with torch.no_grad():
        for a, b in chunks:
            out[a:b] = fn(*(t[a:b] if t is not None else None for t in tok_args), *params)
    return out


@contextlib.contextmanager
def _autograd_on():
    """Autograd inside a custom op's implementation (which runs below the autograd dispatch
    keys): the backward op recomputes chunks and differentiates them locally, as activation
    checkpointing does. Uses torch._C's dispatch-key TLS (private API, checked on torch 2.13)."""
    with torch._C._PreserveDispatchKeyGuard():
        for key in (torch._C.DispatchKey.AutogradFunctionality,
                    torch._C.DispatchKey.ADInplaceOrView):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        with torch.enable_grad():
            yield


def _chunked_grads(fn, chunks, tok_args, n_diff_tok, params, dy):
    """Backward of ``fn`` evaluated chunk by chunk, recomputing each chunk's forward.

    The first ``n_diff_tok`` of ``tok_args`` get gradients ([T, ...], one chunk at a time);
    ``params`` (None allowed) get gradients summed over chunks in a fixed order."""
    tok_grads = [torch.empty_like(t) for t in tok_args[:n_diff_tok]]
    leaves = [p.detach().requires_grad_(True) if p is not None else None for p in params]
    acc = [torch.zeros_like(p) if p is not None else None for p in leaves]
    live = [p for p in leaves if p is not None]
    with _autograd_on():
        for a, b in chunks:
            toks = [t[a:b].detach().requires_grad_(True) if i < n_diff_tok
                    else (t[a:b] if t is not None else None) for i, t in enumerate(tok_args)]
            y = fn(*toks, *leaves)
            grads = torch.autograd.grad(y, toks[:n_diff_tok] + live, dy[a:b],
                                        materialize_grads=True)
            for tg, gr in zip(tok_grads, grads[:n_diff_tok]):
                tg[a:b] = gr
            it = iter(grads[n_diff_tok:])
            for i, p in enumerate(leaves):
                if p is not None:
                    acc[i] += next(it)
    return tok_grads, acc


# ---- GEMMs (torch: cuBLAS on a GPU) ----------------------------------------------------------------

CUDA_GEMMS = False  # benchmarks/roofline.py: count the GEMMs as CUDA runs them


def mm_ct(a, b):
    """a @ b in the compute dtype with exact products of 16-bit inputs and fp32 accumulation:
    cuBLAS's fp32-output GEMM on CUDA (torch.mm out_dtype), a widened copy elsewhere."""
    ct = compute_dtype(a.dtype)
    if a.dtype == ct:
        return a @ b.to(ct)
    if (a.is_cuda or CUDA_GEMMS) and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=ct)
    return a.to(ct) @ b.to(ct)


def split16(a):
    """fp32 a [M, N] -> [M, 2N] bf16 = [hi | lo], hi + lo = a to 2^-17 relative (bf16 has fp32's
    range): a GEMM with it and a bf16 matrix stacked twice is one 16-bit GEMM of fp32 accuracy."""
    hi = a.to(torch.bfloat16)
    return torch.cat((hi, (a - hi.to(a.dtype)).to(torch.bfloat16)), dim=1)


def _a_cat(lora_A, f=1.0):
    """lora_A [E, in, r] times f ([E, 1, 1] or 1) -> [in, E r] (expert e's r columns at e r),
    in one launch."""
    E, fin, r = lora_A.shape
    return times(lora_A, f.view(-1, 1) if torch.is_tensor(f) else f, perm=(1, 0, 2)).view(
        fin, E * r)


def _down(x, lora_A, ids, scaling, backend, f=1.0):
    """-> (s_all [T, E, r]: every expert's s = scaling x A_e f_e (Triton backend; None
    otherwise), s [T, K, r]: the slots' rows), compute dtype, contiguous."""
    if backend != "triton":
        return None, lora_down(x, times(lora_A, f), ids, scaling).contiguous()
    E, _, r = lora_A.shape
    s_all = (mm_ct(x, _a_cat(lora_A, f)) * scaling).view(-1, E, r)
    if ids is None:
        return s_all, s_all
    return s_all, slot_rows(s_all, ids)


def slot_rows(s_all, ids):
    """s_all [T, E, r] -> the slots' rows [T, K, r] (a masked slot's: expert 0's, not read)."""
    idx = ids.clamp_min(0).unsqueeze(-1).expand(-1, -1, s_all.shape[2])
    return torch.gather(s_all, 1, idx).contiguous()


def _down_backward(ds, x, lora_A, ids, scaling, need_dx, need_dA, f=1.0):
    """Gradients of s = scaling * gather(x A): ds [T, K, r] (or, bf16, already per expert and
    split: [T, 2 E r], relation kernel) -> (dx [T, in], dA [E, in, r]), two GEMMs over all
    experts' columns (slots added to their experts first). bf16: one 16-bit GEMM each, ds split
    into bf16 hi + lo parts (split16); others in the compute dtype. dA is multiplied by f
    (balance_factors, [E, 1, 1])."""
    E, fin, r = lora_A.shape
    if x.dtype != torch.bfloat16:
        return _down_backward_torch(ds, x, lora_A, ids, scaling, need_dx, need_dA, f)
    if ds.dtype != torch.bfloat16:
        dS = slots_to_experts(ds, ids, E) if ids is not None else ds
        ds = split16((dS * scaling).reshape(-1, E * r))
    dx = dA = None
    if need_dx:  # [A_cat^T; A_cat^T] of A f: [2 E r, in]
        twice = times(lora_A.expand(2, -1, -1, -1), f, perm=(0, 1, 3, 2))
        dx = ds @ twice.view(2 * E * r, fin)
    if need_dA:
        dA = mm_ct(x.t(), ds).view(fin, 2, E * r).sum(1)
        dA = times(dA.view(fin, E, r), f, lora_A.dtype, (1, 0, 2))
    return dx, dA


def _relation_kernels(backend, K, E, r):
    """The relation part (d from s and its backward) in the Triton kernels: on the Triton
    backend while P_flat fits one tile (launch.relation_fits: E r <= 128 padded); else PyTorch,
    chunked over tokens."""
    return backend == "triton" and _launch().relation_fits(K, E, r)


def _relation(s, ids, P, Q, tau, eps, chunks):
    """d [T, K, rg] from s (no autograd): relation_lowrank chunk by chunk."""
    T, K, _ = s.shape
    return _chunked_eval(lambda s_, i_: relation_lowrank(s_, i_, P, Q, tau, eps), chunks,
                         (s, ids), (), s.new_empty((T, K, Q.shape[2])))


def _setup(x, lora_A, lora_B, rot_down, ids, scaling, backend, bal, s_all=None):
    """What forward and backward both start from: the balance factor f (bal, or 1) and B / f,
    the compute dtype, s_all and s of A f (down projection, or from the saved s_all), the sizes
    and the token chunks of the PyTorch parts."""
    f = bal if bal is not None else 1.0
    lora_B = times(lora_B, bal, divide=True) if bal is not None else lora_B
    ct = compute_dtype(x.dtype)
    if s_all is None:
        s_all, s = _down(x, lora_A, ids, scaling, backend, f)
    elif backend != "triton":  # the PyTorch path saves the slots' s
        s_all, s = None, s_all
    elif ids is not None:
        s = slot_rows(s_all, ids)
    else:
        s = s_all
    T, K, r = s.shape
    E, _, out = lora_B.shape
    rg = rot_down.shape[1] if rot_down is not None else 0
    chunks = _chunks(T, _per_token_elems(K, r, out, E, rg, ids, rot_down is not None, backend),
                     x.device)
    return f, lora_B, ct, s_all, s, T, K, E, out, rg, chunks


SAVE_LOWRANK_FRACTION = 0.25  # auto: save s, d while they cost <= this share of x's bytes


def save_lowrank(recompute, x, lora_A, K, rg):
    """Whether forward keeps the low-rank activations (s [T, E, r] of every expert on the Triton
    path, [T, K, r] on the PyTorch path) and the context d [T, K, rg] for backward instead of
    recomputing them (the down GEMM again, reading x; the relation part). ``recompute=None``
    (auto) saves them while they cost at most SAVE_LOWRANK_FRACTION of the bytes of x that
    backward keeps anyway (per token (E r + K rg) compute-dtype values vs ``in`` values of x).
    Shapes and dtypes only (not T), so the fake implementation agrees."""
    if recompute is not None:
        return not recompute
    per_token = (lora_A.shape[0] * lora_A.shape[2] + K * rg) * compute_dtype(x.dtype).itemsize
    return per_token <= SAVE_LOWRANK_FRACTION * x.shape[-1] * x.element_size()


def _saved_shapes(save, x, lora_A, K, rg, rotation, backend):
    """Shapes of what forward returns for backward besides y: s, d, P, Q (None: not saved)."""
    if not save:
        return (None,) * 4
    E, _, r = lora_A.shape
    T = x.shape[0]
    return ((T, E, r) if backend == "triton" else (T, K, r), (T, K, rg) if rotation else None,
            (E, r, E, r) if rotation else None, (E, r, rg) if rotation else None)


BIG_B_LOG2 = 40  # max|B_e| above 2^40 is rescaled (balanced): P = B B^T then stays < 2^80 out


def balance_factors(lora_B):
    """f [E, 1, 1] fp32, f_e = 2^k_e, k_e = max(0, floor(log2 max|B_e|) - 40): the op computes
    with A_e f_e and B_e / f_e -- the same products x A_e B_e, exactly (powers of two) -- so
    |B_e| < 2^41. P = B B^T, the only square of B the fused path forms, overflows fp32 near
    |B| ~ 1e19, where the reference (which squares v / max|v|) stays finite. f = 1 for every B
    of 16-bit range, and for a non-finite max (frexp's exponent 0). Five small launches, once
    per forward (backward reuses f). In fp32 also for float64 B (whose P overflows only past
    1e154): Inductor's CPU code for frexp of float64 does not compile (torch 2.13)."""
    B = lora_B.detach()
    B = B.to(torch.float32) if B.dtype == torch.float64 else B
    m = torch.linalg.vector_norm(B, float("inf"), dim=(1, 2), dtype=torch.float32)
    x = torch.frexp(m).exponent  # max|B_e| in [2^(x-1), 2^x)
    return torch.exp2((x - (BIG_B_LOG2 + 1)).clamp_min(0)).view(-1, 1, 1)


def times(t, f, dtype=None, perm=None, divide=False):
    """t.permute(perm) * f (or / f) as a new contiguous tensor of ``dtype`` (default t's): one
    launch, which also does the cast and the permutation."""
    t = t.permute(perm) if perm is not None else t
    out = torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    return (torch.div if divide else torch.mul)(t, f, out=out)


def _forward(x, lora_A, lora_B, g, rot_down, rot_up, beta, ids, bal, scaling, tau, eps,
             backend, save):
    """-> (y [T, out] in x's dtype, s, d, P, Q): what backward may reuse (``save``), else empty
    tensors. bal: balance_factors (None: rotation off); the op runs on A f, B / f (s, P, Q too)."""
    f, lora_B, ct, s_all, s, T, K, E, out, rg, chunks = _setup(x, lora_A, lora_B, rot_down, ids,
                                                               scaling, backend, bal)
    d = P = Q = None
    if rot_down is None:
        y = _chunked_eval(weighted_sum_lowrank, chunks, (s, g.to(ct), ids),
                          (lora_B.to(ct),), s.new_empty((T, out))).to(x.dtype)
    else:
        P, Q = lowrank_factors(lora_B, rot_down, ct)
        if _relation_kernels(backend, K, E, s.shape[2]):
            d = _launch().run("lora_relation", s_all, ids, P, Q, tau, eps, x.dtype)
        else:
            d = _relation(s, ids, P, Q, tau, eps, chunks)
        if backend == "triton":
            y = _launch().run("stream_forward", s_all, g, d, ids, lora_B, rot_up, beta,
                              x.dtype)
        else:
            params = (lora_B.to(ct), rot_up.to(ct), beta.to(ct) if beta is not None else None)
            y = _chunked_eval(stream_torch, chunks, (s, g.to(ct), d, ids), params,
                              s.new_empty((T, out))).to(x.dtype)
    shapes = _saved_shapes(save, x, lora_A, K, rg, rot_down is not None, backend)
    keep = (s_all if backend == "triton" else s, d, P, Q)
    return (y, *(t.reshape(shp).contiguous() if shp is not None else x.new_empty(0)
                 for t, shp in zip(keep, shapes)))


def _backward(dy, x, lora_A, lora_B, g, rot_down, rot_up, beta, ids, bal, scaling, tau, eps,
              backend, need_dx, need_dA, s_saved=None, d=None, P=None, Q=None):
    """-> (dx, dA, dB, dg, drot_down, drot_up, dbeta); s_saved, d, P, Q: forward's, where it
    saved them (else recomputed here)."""
    lora_B0 = lora_B  # gradients of A f, B / f below; of A, B at the end
    f, lora_B, ct, s_all, s, T, K, E, out, rg, chunks = _setup(x, lora_A, lora_B, rot_down, ids,
                                                               scaling, backend, bal, s_saved)
    dyc = dy.to(ct) if backend != "triton" or rot_down is None else None
    dA_rot = dU = dbeta = None
    scaled = False  # ds already scaled (and, bf16, split): the relation kernel did it
    if rot_down is None:
        (ds, dg), (dB,) = _chunked_grads(weighted_sum_lowrank, chunks, (s, g.to(ct), ids), 2,
                                         (lora_B.to(ct),), dyc)
    else:
        if P is None:
            P, Q = lowrank_factors(lora_B, rot_down, ct)
        kernels = _relation_kernels(backend, K, E, s.shape[2])
        if d is None:
            d = (_launch().run("lora_relation", s_all, ids, P, Q, tau, eps, x.dtype) if kernels
                 else _relation(s, ids, P, Q, tau, eps, chunks))
        if backend == "triton":
            ds, dg, dd, dB, dU, dbeta = _launch().run("stream_backward", dy, s_all, g, d, ids,
                                                      lora_B, rot_up, beta)
        else:
            params = (lora_B.to(ct), rot_up.to(ct), beta.to(ct) if beta is not None else None)
            (ds, dg, dd), (dB, dU, dbeta) = _chunked_grads(stream_torch, chunks,
                                                           (s, g.to(ct), d, ids), 3, params, dyc)
        if kernels:  # adds the relation part to ds and scales it (bf16: as split16 operands)
            split = x.new_empty((T, 2 * E * s.shape[2])) if x.dtype == torch.bfloat16 else None
            dP, dQ = _launch().run("lora_relation_backward", s_all, ids, P, Q, dd, ds, tau,
                                   eps, x.dtype, scaling, split)
            ds = split if split is not None else ds
            scaled = True
        else:
            rel = lambda s_, i_, P_, Q_: relation_lowrank(s_, i_, P_, Q_, tau, eps)  # noqa: E731
            (ds_rel,), (dP, dQ) = _chunked_grads(rel, chunks, (s, ids), 1, (P, Q), dd)
            ds = ds + ds_rel
        dB, dA_rot = factors_backward(dP, dQ, lora_B.to(ct), rot_down.to(ct), dB)
    if backend == "triton":
        dx, dA = _down_backward(ds, x, lora_A, ids, 1.0 if scaled else scaling, need_dx, need_dA,
                                f)
    else:
        dx, dA = _down_backward_torch(ds, x, lora_A, ids, scaling, need_dx, need_dA, f)
    dB = times(dB, f, lora_B0.dtype, divide=True)

    def cast(t, like):  # contiguous, as the fake implementation promises
        return t.to(like.dtype).contiguous() if t is not None else x.new_empty(0)
    return (dx if dx is not None else x.new_empty(0), dA if dA is not None else x.new_empty(0),
            dB, cast(dg, g), cast(dA_rot, rot_down if rot_down is not None else x),
            cast(dU, rot_up if rot_up is not None else x),
            cast(dbeta, beta if beta is not None else x))


def _down_backward_torch(ds, x, lora_A, ids, scaling, need_dx, need_dA, f=1.0):
    """_down_backward in the compute dtype (the PyTorch path)."""
    E, fin, r = lora_A.shape
    ct = ds.dtype
    dS = slots_to_experts(ds, ids, E) if ids is not None else ds
    dS = (dS * scaling).reshape(-1, E * r)
    A_cat = _a_cat(lora_A, f).to(ct)
    dx = (dS @ A_cat.t()).to(x.dtype) if need_dx else None
    dA = (times((x.to(ct).t() @ dS).view(fin, E, r), f, lora_A.dtype, (1, 0, 2))
          if need_dA else None)
    return dx, dA


# ---- custom ops (torch.compile) and autograd -------------------------------------------------------

@torch.library.custom_op("radargate::lora_fwd", mutates_args=())
def _lora_fwd_op(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, g: torch.Tensor,
                 rot_down: Optional[torch.Tensor], rot_up: Optional[torch.Tensor],
                 beta: Optional[torch.Tensor], ids: Optional[torch.Tensor],
                 bal: Optional[torch.Tensor], scaling: float, tau: float, eps: float,
                 backend: str, save: bool) -> tuple[
                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, in] ... -> (y [T, out] in the dtype of x, s, d, P, Q): the last four for backward
    (save_lowrank: s [T, E, r] on the Triton path, [T, K, r] else; d [T, K, rg]; P, Q), empty
    when not saved. bal: balance_factors(lora_B) with rotation, else None."""
    return _forward(x, lora_A, lora_B, g, rot_down, rot_up, beta, ids, bal, scaling, tau, eps,
                    backend, save)


@_lora_fwd_op.register_fake
def _lora_fwd_fake(x, lora_A, lora_B, g, rot_down, rot_up, beta, ids, bal, scaling, tau, eps,
                   backend, save):
    ct = compute_dtype(x.dtype)
    rg = rot_down.shape[1] if rot_down is not None else 0
    shapes = _saved_shapes(save, x, lora_A, g.shape[1], rg, rot_down is not None, backend)
    return (x.new_empty((x.shape[0], lora_B.shape[2])),
            *(x.new_empty(shp, dtype=ct) if shp is not None else x.new_empty(0) for shp in shapes))


@torch.library.custom_op("radargate::lora_bwd", mutates_args=())
def _lora_bwd_op(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 g: torch.Tensor, rot_down: Optional[torch.Tensor],
                 rot_up: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                 ids: Optional[torch.Tensor], bal: Optional[torch.Tensor], scaling: float,
                 tau: float, eps: float, backend: str, need_dx: bool, need_dA: bool,
                 s: Optional[torch.Tensor],
                 d: Optional[torch.Tensor], P: Optional[torch.Tensor],
                 Q: Optional[torch.Tensor]) -> tuple[
                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     torch.Tensor, torch.Tensor]:
    """-> (dx, dlora_A, dlora_B, dg, drot_down, drot_up, dbeta); empty where not computed.
    s, d, P, Q: forward's (None: recomputed)."""
    return _backward(dy, x, lora_A, lora_B, g, rot_down, rot_up, beta, ids, bal, scaling, tau,
                     eps, backend, need_dx, need_dA, s, d, P, Q)


@_lora_bwd_op.register_fake
def _lora_bwd_fake(dy, x, lora_A, lora_B, g, rot_down, rot_up, beta, ids, bal, scaling, tau,
                   eps, backend, need_dx, need_dA, s, d, P, Q):
    def like(t, on=True):
        return t.new_empty(t.shape) if t is not None and on else x.new_empty(0)
    return (like(x, need_dx), like(lora_A, need_dA), like(lora_B), like(g), like(rot_down),
            like(rot_up), like(beta))


def _setup_context(ctx, inputs, output):
    x, lora_A, lora_B, g, rot_down, rot_up, beta, ids, bal, scaling, tau, eps, backend, save = \
        inputs
    rg = rot_down.shape[1] if rot_down is not None else 0
    shapes = _saved_shapes(save, x, lora_A, g.shape[1], rg, rot_down is not None, backend)
    kept = [t if shp is not None else None for t, shp in zip(output[1:], shapes)]
    ctx.save_for_backward(x, lora_A, lora_B, g, rot_down, rot_up, beta, ids, bal, *kept)
    ctx.args = (scaling, tau, eps, backend)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero tensors for s, d, P, Q's (absent) gradients


def _backward_fn(ctx, dy, *_):
    no_double_backward("radar_gate_lora")
    if dy is None:  # y's gradient undefined (gradients are not materialized): none flows back
        return (None,) * len(ctx.needs_input_grad)
    x, lora_A, lora_B, g, rot_down, rot_up, beta, ids, bal, s, d, P, Q = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.radargate.lora_bwd(dy, x, lora_A, lora_B, g, rot_down, rot_up, beta, ids,
                                         bal, *ctx.args, need[0], need[1], s, d, P, Q)
    present = (True, True, True, True, rot_down is not None, rot_up is not None, beta is not None)
    out = [gr if (p and n) else None for gr, p, n in zip(grads, present, need[:7])]
    return (*out, None, None, None, None, None, None, None)


torch.library.register_autograd("radargate::lora_fwd", _backward_fn, setup_context=_setup_context)


def _resolve_backend(backend, x, rotation, ranks):
    """Device first, as radar_gate: "auto" is Triton on CUDA tensors within the kernels' limits
    (ranks <= 64, not float64), the PyTorch path otherwise."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    limit = None
    if max(ranks) > _launch().MAX_RANK:
        limit = f"ranks {ranks} exceed the kernels' limit of {_launch().MAX_RANK}"
    elif x.dtype in (torch.float16, torch.float32) and max(ranks) > 32 and min(ranks) > 16:
        limit = (f"ranks (r, rg) = {ranks} in {x.dtype}: its wider dots hold more registers; "
                 f"the kernels take r, rg <= 32, or one of them <= 16 (bf16: up to 64 each)")
    elif x.dtype == torch.float64 and not _interpreting():
        limit = "float64 runs the PyTorch path on CUDA"
    if backend == "triton":
        if x.device.type != "cuda" and not _interpreting():
            raise ValueError(f"backend='triton': expected CUDA tensors (or TRITON_INTERPRET=1), "
                             f"got device {x.device}")
        if limit is not None:
            raise ValueError(f"backend='triton': {limit}; use backend='auto' or 'torch'")
    if backend == "auto":
        backend = "triton" if x.device.type == "cuda" and rotation and limit is None else "torch"
    return backend


def radar_gate_lora(x, lora_A, lora_B, weights, rot_down=None, rot_up=None, angle_bias=None,
                    expert_ids=None, scaling=1.0, dropout_p=0.0, training=True, tau=1.0,
                    eps=1e-6, backend="auto", recompute=None, *, slot_mask=None):
    """RadarGate over K LoRA experts, fused: ``y = sum_k g_k R(alpha_k) (scaling x' A_e B_e)``.

    x [..., in], lora_A [E, in, r], lora_B [E, r, out], weights [..., K],
    rot_down [out, rg] and rot_up [rg, out/2] (both None: weighted sum ``sum_k g_k v_k``),
    angle_bias [E, out/2] or None, expert_ids [..., K] integer < E or None (then K = E),
    slot_mask [..., K] bool or None -> [..., out] in the dtype of x. A slot whose mask is False
    or whose id is negative is masked: out of the relation map and the sum, zero gradients (a
    token without an active slot outputs 0; a weight of 0 does not mask: docs/SPEC.md).
    ``x' = dropout(x, dropout_p, training)``. Same result as ``radar_gate_lora_reference`` (LoRA
    outputs, then radar_gate) without ever forming the [..., K, out] expert outputs, in forward
    or backward. Any r, rg, K and E (the Triton kernels take r, rg <= 64 in bf16, <= 32 or one
    of them <= 16 in fp16 / fp32: beyond, "auto" runs the PyTorch path).
    expert_ids may have any integer dtype; tau in [1e-30, 1e30], eps in [1e-18, 1e18].
    backend: "auto" (the tensors' device decides: Triton kernels on CUDA, the chunked PyTorch
    path elsewhere), "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "torch". First-order
    gradients only (create_graph=True raises).
    recompute: what backward does with the low-rank activations s [..., K, r] and the context
    d [..., K, rg]: True recomputes them (least memory: nothing per (token, slot) is saved),
    False saves them, None (auto, save_lowrank) saves them while they cost at most a quarter of
    x's bytes (K (r + rg) 4 <= in * itemsize / 4 in fp32 compute).
    """
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"recompute: expected None, True or False, got {recompute!r}")
    if not isinstance(training, bool):  # a string such as "false" would be truthy
        raise TypeError(f"training: expected True or False, got {training!r}")
    check_lora_inputs(x, lora_A, lora_B, weights, rot_down, rot_up, angle_bias, expert_ids,
                      scaling, tau, eps, slot_mask=slot_mask)
    which = _resolve_backend(backend, x, rot_down is not None,
                             (lora_A.shape[-1], rot_down.shape[1] if rot_down is not None else 1))
    lead, K = x.shape[:-1], weights.shape[-1]
    if dropout_p:
        x = F.dropout(x, dropout_p, training)
    x2 = x.reshape(-1, x.shape[-1])
    ids = slot_ids(expert_ids, slot_mask, K)  # any int dtype -> int64, -1 at masked slots
    g = weights.reshape(-1, K)
    if ids is not None:  # a masked slot's weight is never used, and gets a zero gradient
        g = torch.where(ids >= 0, g, 0.0)
    rg = rot_down.shape[1] if rot_down is not None else 0
    save = (torch.is_grad_enabled() and save_lowrank(recompute, x2, lora_A, K, rg)
            and any(t is not None and t.requires_grad
                    for t in (x2, lora_A, lora_B, weights, rot_down, rot_up, angle_bias)))
    bal = balance_factors(lora_B) if rot_down is not None else None
    y = torch.ops.radargate.lora_fwd(x2, lora_A, lora_B, g, rot_down, rot_up, angle_bias, ids,
                                     bal, float(scaling), float(tau), float(eps), which,
                                     save)[0]
    return y.reshape(*lead, lora_B.shape[2])
