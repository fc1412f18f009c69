"""The op layer: custom ops around the Triton launchers, the autograd Function, ``radar_gate``.

``radargate::fwd`` and ``radargate::bwd`` are ``torch.library.custom_op``s with fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces through them; ``radargate::fwd``
has ``register_autograd`` (the only autograd wiring; ``opcheck`` tests it). ``radar_gate``
validates, picks the backend from the tensors' device and calls the op.
"""
from __future__ import annotations

from typing import Optional

import torch

from .cpu import radar_gate_cpu
from .reference import compute_dtype, radar_gate_reference
from .validation import check_inputs, no_double_backward, slot_ids

_BACKENDS = ("auto", "triton", "torch")


def _launch():
    # imported lazily: importing triton kernels must follow any TRITON_INTERPRET setting
    from .kernels import launch
    return launch


@torch.library.custom_op("radargate::fwd", mutates_args=())
def _fwd_op(V: torch.Tensor, g: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            beta: Optional[torch.Tensor], ids: Optional[torch.Tensor], tau: float,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor, torch.Tensor]:
    """Fused forward. V [T,K,D] -> (y [T,D], n [T,K], C [T,K,K], rho [T,K,K], z [T,K,r], d [T,K,r])."""
    require_triton_device(V, "radargate::fwd")
    return _launch().run("forward", V, g, A, B, beta, ids, tau, eps)


@_fwd_op.register_fake
def _fwd_fake(V, g, A, B, beta, ids, tau, eps):
    T, K, D = V.shape
    r = A.shape[1]
    sd = compute_dtype(V.dtype)
    return (V.new_empty((T, D)), V.new_empty((T, K), dtype=sd), V.new_empty((T, K, K), dtype=sd),
            V.new_empty((T, K, K), dtype=sd), V.new_empty((T, K, r), dtype=sd),
            V.new_empty((T, K, r), dtype=sd))


@torch.library.custom_op("radargate::bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, V: torch.Tensor, g: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            beta: Optional[torch.Tensor], ids: Optional[torch.Tensor], n: torch.Tensor,
            C: torch.Tensor, rho: torch.Tensor, z: torch.Tensor, d: torch.Tensor, tau: float,
            eps: float, need_dA: bool, need_dB: bool, need_dbeta: bool) -> tuple[
                torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward -> (dV, dg, dA, dB, dbeta); dbeta is empty when beta is None; a parameter
    gradient whose need_* flag is off is zeros and not computed (no partial buffer, no
    reduction; the column kernel then writes dV only)."""
    return _launch().run("backward", dy, V, g, A, B, beta, ids, n, C, rho, z, d, tau, eps,
                         (need_dA, need_dB, need_dbeta))


@_bwd_op.register_fake
def _bwd_fake(dy, V, g, A, B, beta, ids, n, C, rho, z, d, tau, eps, need_dA, need_dB,
              need_dbeta):
    # gradients are always contiguous, whatever the strides of the inputs (as the real op)
    dbeta = beta.new_empty(beta.shape) if beta is not None else V.new_empty(0)
    return (V.new_empty(V.shape), g.new_empty(g.shape), A.new_empty(A.shape),
            B.new_empty(B.shape), dbeta)


def _fwd_setup_context(ctx, inputs, output):
    V, g, A, B, beta, ids, tau, eps = inputs
    _, n, C, rho, z, d = output
    ctx.save_for_backward(V, g, A, B, beta, ids, n, C, rho, z, d)
    ctx.tau, ctx.eps = tau, eps


def _fwd_backward(ctx, dy, *_state_grads):
    no_double_backward("radar_gate (Triton path)")
    V, g, A, B, beta, ids, n, C, rho, z, d = ctx.saved_tensors
    need = ctx.needs_input_grad
    dV, dg, dA, dB, dbeta = torch.ops.radargate.bwd(
        dy.contiguous(), V, g, A, B, beta, ids, n, C, rho, z, d, ctx.tau, ctx.eps,
        bool(need[2]), bool(need[3]), bool(beta is not None and need[4]))
    grads = (dV, dg, dA, dB, dbeta if beta is not None else None)
    return (*(gr if n_ else None for gr, n_ in zip(grads, need[:5])), None, None, None)


# the one autograd wiring of the Triton path (radar_gate, RadarGateFunction and torch.compile
# all go through it)
torch.library.register_autograd("radargate::fwd", _fwd_backward, setup_context=_fwd_setup_context)


class RadarGateFunction:
    """Triton path of RadarGate on flattened inputs (kept for code that calls it directly;
    ``radar_gate`` is the API). Differentiable through the custom op's registered autograd.

    apply(V [T,K,D], g [T,K], A [D,r], B [r,D/2], beta [E,D/2] | None, ids [T,K] | None, tau, eps)
    -> y [T, D]; ids: integers < E = beta.shape[0] (any without beta), negative: a masked slot.
    Saves the inputs and O(T K^2 + T K r) state for backward. Needs CUDA tensors
    (or TRITON_INTERPRET=1); arguments are not validated here (``radar_gate`` does that).
    """

    @staticmethod
    def apply(V, g, A, B, beta, ids, tau, eps):
        require_triton_device(V, "RadarGateFunction.apply")
        ids = None if ids is None else op_ids(ids.long(), beta)
        return torch.ops.radargate.fwd(V, g, A, B, beta, ids, float(tau), float(eps))[0]


def op_ids(ids, beta):
    """ids [T, K] int64 (-1: masked) as the kernels and paths take them: rows of beta, or
    without beta (where the ids pick nothing, SPEC step 4) the slot numbers, -1 kept."""
    if beta is not None:
        return ids
    return torch.where(ids >= 0, torch.arange(ids.shape[1], device=ids.device), -1)


def require_triton_device(t: torch.Tensor, what: str):
    """The Triton kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1."""
    if t.device.type != "cuda" and not _launch().interpreting():
        raise RuntimeError(f"{what}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 "
                           f"set before import, for the interpreter), got device {t.device}; use "
                           f"radar_gate(..., backend='torch') or 'auto' on this device")


def _resolve_backend(backend: str, V: torch.Tensor, K: int, r: int, E: int, has_beta: bool) -> str:
    """Device first: "auto" runs the Triton kernels on CUDA tensors (within their limits) and the
    PyTorch path on any other device -- also when TRITON_INTERPRET=1 is set, which only makes
    backend="triton" usable on CPU (tests, byte counting)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    limit = _launch().kernel_limits_ok(K, r, E, has_beta)
    if limit is None and V.dtype == torch.float64 and not _launch().interpreting():
        limit = "float64 runs the PyTorch path on CUDA (the kernels' compile report covers fp16, " \
                "bf16 and fp32)"
    if backend == "auto":
        return "triton" if V.device.type == "cuda" and limit is None else "torch"
    if limit is not None:
        raise ValueError(f"backend='triton': {limit}; use backend='auto' or 'torch'")
    if V.device.type != "cuda" and not _launch().interpreting():
        raise ValueError("backend='triton': expected CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got device {V.device}")
    return "triton"


def radar_gate(expert_out, weights, rot_down, rot_up, angle_bias=None, expert_ids=None,
               tau=1.0, eps=1e-6, backend="auto", *, slot_mask=None):
    """RadarGate: ``y = sum_i g_i R(alpha_i) v_i`` (docs/SPEC.md).

    expert_out [..., K, D], weights [..., K], rot_down [D, r], rot_up [r, D/2],
    angle_bias [E, D/2] or None, expert_ids [..., K] (any integer dtype, values < E; negative:
    an empty slot) or None, slot_mask [..., K] bool or None -> [..., D] in the dtype of
    expert_out. tau in [1e-30, 1e30], eps in [1e-18, 1e18].

    Masked slots (slot_mask False, or a negative expert id) take no part at all: out of the
    relation map and the sum, zero gradients, their values never used; a token without an
    active slot outputs 0. A weight of 0 does not mask (docs/SPEC.md, "Masked slots").

    backend: "auto" (the tensors' device decides: Triton kernels on CUDA, or under
    TRITON_INTERPRET=1; PyTorch otherwise), "triton" or "torch". The PyTorch path on CPU tensors
    is the cache-blocked eager implementation (cpu.py; without autograd and with
    RADARGATE_CPU_PATH=compile, the reference compiled by inductor, ~15 s on first use per
    dtype/signature); under torch.compile and on other devices it is the reference itself.
    First-order gradients on every path; create_graph=True raises except on the reference.
    """
    compiling = torch.compiler.is_compiling()
    K, D, r, E = check_inputs(expert_out, weights, rot_down, rot_up, angle_bias, expert_ids,
                              tau, eps, slot_mask=slot_mask)
    which = _resolve_backend(backend, expert_out, K, r, E, angle_bias is not None)
    lead = expert_out.shape[:-2]
    V = expert_out.reshape(-1, K, D)
    g = weights.reshape(-1, K)
    # one form on every path: int64 ids, -1 at masked slots (every integer dtype means indices:
    # a uint8 tensor must not index as a mask)
    ids = slot_ids(expert_ids, slot_mask, K)
    if ids is not None:
        ids = op_ids(ids, angle_bias)
    if which == "torch":
        if compiling or V.device.type != "cpu":
            # under torch.compile (inductor fuses it) and on devices without Triton kernels
            y = radar_gate_reference(V, g, rot_down, rot_up, angle_bias, ids, tau, eps)
        else:
            y = radar_gate_cpu(V, g, rot_down, rot_up, angle_bias, ids, tau, eps)
    else:
        y = torch.ops.radargate.fwd(V, g, rot_down, rot_up, angle_bias, ids, float(tau),
                                    float(eps))[0]
    return y.reshape(*lead, D)
