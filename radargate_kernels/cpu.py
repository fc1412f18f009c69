"""CPU path of ``radar_gate`` (CPU tensors, no Triton).

By default (and always with autograd) it runs the cache-blocked eager path below. A forward
without autograd runs the reference compiled by inductor only when asked
(``RADARGATE_CPU_PATH=compile``; compiled on first use per dtype/signature, logged once).
Measured (BENCHMARKS.md section 5, sweep of 2026-12-05, T = 512): the compiled forward runs at
0.9-1.7x the eager speed (-0.1 to 10 ms a call), while its first call costs 6.6-15 s: it pays
after about a thousand calls at K >= 8 with D = 1024, 3,000-19,000 at smaller K or D, never at
K = 1; the number of calls decides, not a size, so it is not the default (issue #26). After a
broken compiler toolchain it falls back to eager with one warning.

The cache-blocked eager path below: the same math as the reference, reorganised for a CPU.

Differences from the literal reference (same result up to fp32 rounding, tested against it):
cosines from the Gram matrix of the rows scaled by their max |v| (no overflow) instead of
materialising ``V / n``; the stretch weights
folded into cos/sin (``[T, K, D/2]``) instead of scaling the rotated ``[T, K, D]``; no ``cat`` of
rotated halves; tokens processed in chunks of ``CHUNK`` so each chunk's working set stays in cache.
Backward recomputes each chunk's forward under autograd (checkpointing per chunk), so nothing of
size T x K x D is saved besides the inputs. Measured figures: BENCHMARKS.md.
"""
from __future__ import annotations

import logging
import os
import types
import warnings

import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import CppCompileError, InductorError

from .reference import (compute_dtype, radar_gate_reference, relation_weights, row_scale,
                        scaled_cosines, slot_rows_of)
from .validation import no_double_backward

CHUNK = 128  # tokens per chunk: best of {16, 32, 64, 128, 256, 512, all} in BENCHMARKS.md
# (K = 8, D = 1024): a chunk of at least that many elements, so small K D run in few chunks
# (T = 512, K = 2, D = 64: 14.4 ms forward + backward in 4 chunks, 8.0 ms in one; issue #26)
CHUNK_ELEMS = CHUNK * 8 * 1024


def _chunk_forward(V, g, A, B, beta, ids, tau: float, eps: float, out=None):
    """V [t, K, D] (compute dtype), ids [t, K] or None (-1: a masked slot) ... -> y [t, D].
    Differentiable by autograd when ``out`` is None; with ``out`` (forward, no autograd) it
    works in place and writes into ``out``."""
    K, D = V.shape[-2:]
    h = D // 2
    active = ids >= 0 if ids is not None else None
    if active is not None:  # masked slots' values are never used (not even a NaN)
        V = torch.where(active.unsqueeze(-1), V, 0.0)
        g = torch.where(active, g, 0.0)
    if K > 1:
        m = row_scale(V)                                              # [t, K], no grad
        W = V / m.unsqueeze(-1)                                       # rows scaled: no overflow
        C = scaled_cosines(torch.bmm(W, W.transpose(1, 2)), m, eps)
        rho, has_other = relation_weights(C, tau, active)
        z = V @ A
        d = torch.baddbmm(z * has_other, rho, z, beta=-1)             # rho z - z (0: no others)
        alpha = d @ B
    else:  # K = 1: d = 0, only the angle bias rotates
        alpha = V.new_zeros(V.shape[0], 1, h)
    if beta is not None:
        alpha = alpha + slot_rows_of(beta, ids)
    return rotate_stretch_sum(V, alpha, g, out)


def rotate_stretch_sum(V, alpha, g, out=None):
    """SPEC steps 5-6: V [t, K, D], alpha [t, K, D/2], g [t, K] -> y [t, D]; the stretch weights
    are folded into cos/sin ([t, K, D/2]) and no rotated [t, K, D] tensor is formed. With ``out``
    (no autograd) it works in place and writes into ``out``."""
    h = V.shape[-1] // 2
    gw = g.unsqueeze(-1)
    v1, v2 = V[..., :h], V[..., h:]
    if out is not None:
        gc = torch.cos(alpha).mul_(gw)
        gs = torch.sin(alpha).mul_(gw)
        torch.sum((v1 * gc).addcmul_(v2, gs, value=-1), 1, out=out[:, :h])
        torch.sum((v1 * gs).addcmul_(v2, gc), 1, out=out[:, h:])
        return out
    gc = torch.cos(alpha) * gw
    gs = torch.sin(alpha) * gw
    y1 = torch.addcmul(v1 * gc, v2, gs, value=-1).sum(1)
    y2 = torch.addcmul(v1 * gs, v2, gc).sum(1)
    return torch.cat((y1, y2), dim=-1)


def _chunks(T, chunk):
    return [(i, min(i + chunk, T)) for i in range(0, T, chunk)]


class _ChunkedCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, V, g, A, B, beta, ids, tau, eps, chunk):
        ct = compute_dtype(V.dtype)
        T, K, D = V.shape
        y = V.new_empty((T, D), dtype=ct)
        Ac, Bc = A.to(ct), B.to(ct)
        bc = beta.to(ct) if beta is not None else None
        for s, e in _chunks(T, chunk):
            idc = ids[s:e] if ids is not None else None
            _chunk_forward(V[s:e].to(ct), g[s:e].to(ct), Ac, Bc, bc, idc, tau, eps, out=y[s:e])
        y = y.to(V.dtype)
        ctx.save_for_backward(V, g, A, B, beta, ids)
        ctx.tau, ctx.eps, ctx.chunk = tau, eps, chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        no_double_backward("radar_gate (eager CPU path)")
        V, g, A, B, beta, ids = ctx.saved_tensors
        ct = compute_dtype(V.dtype)
        dV, dg = torch.empty_like(V), torch.empty_like(g)
        dA = torch.zeros(A.shape, dtype=ct)
        dB = torch.zeros(B.shape, dtype=ct)
        dbeta = torch.zeros(beta.shape, dtype=ct) if beta is not None else None
        with torch.enable_grad():
            Ac = A.detach().to(ct).requires_grad_(True)
            Bc = B.detach().to(ct).requires_grad_(True)
            bc = beta.detach().to(ct).requires_grad_(True) if beta is not None else None
            for s, e in _chunks(V.shape[0], ctx.chunk):
                Vc = V[s:e].detach().to(ct).requires_grad_(True)
                gc = g[s:e].detach().to(ct).requires_grad_(True)
                idc = ids[s:e] if ids is not None else None
                y = _chunk_forward(Vc, gc, Ac, Bc, bc, idc, ctx.tau, ctx.eps)
                leaves = [Vc, gc, Ac, Bc] + ([bc] if bc is not None else [])
                grads = torch.autograd.grad(y, leaves, dy[s:e].to(ct), materialize_grads=True)
                dV[s:e], dg[s:e] = grads[0], grads[1]
                dA += grads[2]
                dB += grads[3]
                if bc is not None:
                    dbeta += grads[4]
        return (dV, dg, dA.to(A.dtype), dB.to(B.dtype),
                dbeta.to(beta.dtype) if beta is not None else None, None, None, None, None)


# ---- the compiled reference (RADARGATE_CPU_PATH=compile, without autograd) ------------------------
#
# Measured (BENCHMARKS.md section 3, T = 2048, K = 8, D = 1024): for forward + backward the
# cache-blocked eager path above (281 ms) was as fast as the compiled reference with autograd
# (302 ms) and faster than a compiled forward + compiled vjp (386 ms), and it saves only the inputs,
# keeps backward(retain_graph=True) working (inductor's donated buffers break it) and raises on
# double backward. So autograd goes to the eager path; a forward without autograd runs the
# compiled reference when asked (RADARGATE_CPU_PATH=compile; the default is eager since
# 2026-12-05, see the module docstring). One compiled function per static signature (dtype, angle bias or not,
# ids or not), each with its own code object, so dynamo's per-code recompile limit (8) is never
# shared; tau and eps go in as 0-d tensors (floats would be specialised: one recompile per value)
# and shapes are dynamic. Threads: dynamo's caches are process-wide; results of concurrent first
# calls are correct but not guaranteed bitwise equal to a single-threaded run.

_COMPILED = {}
_LOG = logging.getLogger("radargate_kernels")
# what a broken compiler toolchain raises (no C++ compiler, unsupported platform); anything else
# (bad input) is raised to the caller and leaves the compiled path on
_COMPILER_ERRORS = (BackendCompilerFailed, InductorError, CppCompileError, OSError)
_FAILED = []  # the compiler failure that turned the compiled path off, if any


def _forward_fn(V, g, A, B, beta, ids, tau, eps):
    return radar_gate_reference(V, g, A, B, beta, ids, tau, eps)


def _compiled(fn, V, beta, ids):
    key = (fn.__name__, V.dtype, beta is not None, ids is not None)
    if key not in _COMPILED:
        if not _COMPILED:
            _LOG.warning("radargate_kernels: compiling the CPU path with torch.compile (first "
                         "forward without autograd of each dtype/signature, ~15 s; "
                         "RADARGATE_CPU_PATH=compile asked for it)")
        code = fn.__code__.replace(co_name=f"radar_gate_cpu{fn.__name__}_{len(_COMPILED)}")
        _COMPILED[key] = torch.compile(types.FunctionType(code, fn.__globals__), dynamic=True)
    return _COMPILED[key]


def radar_gate_cpu_eager(V, g, A, B, beta, ids, tau: float, eps: float, chunk=None):
    """Cache-blocked eager path. V [T, K, D], g [T, K], ids [T, K] or None -> y [T, D].
    chunk: tokens per chunk (default: CHUNK_ELEMS elements of V, at least CHUNK tokens)."""
    if chunk is None:
        chunk = max(CHUNK, CHUNK_ELEMS // max(1, V.shape[-2] * V.shape[-1]))
    return _ChunkedCPU.apply(V, g, A, B, beta, ids, float(tau), float(eps), int(chunk))


def radar_gate_cpu(V, g, A, B, beta, ids, tau: float, eps: float):
    """CPU path: V [T, K, D], g [T, K], ids [T, K] or None -> y [T, D] (dtype of V): the
    cache-blocked eager path; without autograd and with RADARGATE_CPU_PATH=compile, the compiled
    reference."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (V, g, A, B, beta))
    if not needs_grad and os.environ.get("RADARGATE_CPU_PATH", "eager") == "compile" \
            and not _FAILED:
        ct = compute_dtype(V.dtype)
        try:
            return _compiled(_forward_fn, V, beta, ids)(
                V, g, A, B, beta, ids, torch.tensor(float(tau), dtype=ct),
                torch.tensor(float(eps), dtype=ct))
        except _COMPILER_ERRORS as exc:
            _FAILED.append(exc)
            warnings.warn(f"radargate_kernels: torch.compile of the CPU path failed ({exc!r:.200}); "
                          "using the eager cache-blocked path from now on", RuntimeWarning)
    return radar_gate_cpu_eager(V, g, A, B, beta, ids, tau, eps)
