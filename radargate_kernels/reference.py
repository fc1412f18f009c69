"""Pure-PyTorch reference of the RadarGate operator: the one place where the math lives.

A literal transcription of ``docs/SPEC.md`` steps 1-6 (this project's reading of the paper
"Two Is Better Than One: Rotations Scale LoRAs", arXiv 2505.23184). Differentiable by
autograd; all arithmetic runs in float32 or wider (float64 stays float64).

Shapes (after flattening leading dims into T):
    V [T, K, D], g [T, K], A [D, r], B [r, D/2], beta [E, D/2] or None, ids [T, K] or None,
    slot_mask [T, K] bool or None -> y [T, D] in the dtype of V.

Masked slots (docs/SPEC.md, "Masked slots"): a slot whose ``slot_mask`` is False or whose
expert id is negative takes no part: each token is computed as if it had only its active slots
(out of the relation map and the sum, zero gradients; no active slot: y = 0). A weight of
exactly 0 does not mask (the slot still shapes the others' angles).
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype all internal arithmetic runs in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_norm(V: torch.Tensor) -> torch.Tensor:
    """|v| over the last dim, evaluated as m |v / m| (m = max |v|, a constant for autograd: the
    value does not depend on it) so the squares cannot overflow: in fp32 a plain sum of squares
    is inf above |v| ~ 1e19, which would make every cosine 0."""
    m = row_scale(V).unsqueeze(-1)  # zero rows (and NaN rows) stay as they are
    return torch.linalg.vector_norm(V / m, dim=-1) * m.squeeze(-1)


def scaled_cosines(G, m, eps: float):
    """Cosines from the Gram matrix of scaled rows, for the fast paths (cpu.py, lora.py).

    G [t, K, K] = <v_i / m_i, v_j / m_j> with m [t, K] > 0 a per-row scale (a constant for
    autograd) -> C [t, K, K] = <v_i, v_j> / (n_i n_j), n = max(|v|, eps). With m = max |v|, no
    intermediate overflows for any finite v. n_i / m_i = sqrt(max(G_ii, (eps / m_i)^2)), the
    floor kept >= the smallest normal number so a zero row never gives 0/0 (nor 0/0 in sqrt's
    backward: LoRA experts start at zero)."""
    tiny = torch.finfo(G.dtype).tiny
    floor = (eps / m).square().clamp_min(tiny)
    nm = torch.maximum(G.diagonal(dim1=1, dim2=2), floor).sqrt()
    return G / (nm.unsqueeze(2) * nm.unsqueeze(1))


def row_scale(X):
    """max |x| over the last dim, 1 where that is 0 (or NaN): X [..., n] -> [...], no grad."""
    m = X.detach().abs().amax(-1)
    return torch.where(m > 0, m, torch.ones_like(m))


def others(active, K: int, device):
    """Which pairs (i, j) relate: j != i, both slots active (active [T, K] bool or None: all)
    -> [T, K, K] or [K, K] bool."""
    pairs = ~torch.eye(K, dtype=torch.bool, device=device)
    if active is None:
        return pairs
    return pairs & active.unsqueeze(-1) & active.unsqueeze(-2)


def relation_weights(C, tau: float, active=None):
    """SPEC step 2: C [T, K, K] -> (rho [T, K, K], has_other [T or 1, K, 1] bool).

    rho_ij = exp(C_ij/tau) / sum_{k != i} exp(C_ik/tau) over the other active slots, 0 for the
    rest (rho_ii = 0). The row maximum is subtracted first (same value, no overflow for small
    tau). An empty set of others (K = 1, or one active slot) gives rho = 0: such rows' logits are
    set to 0 first, so neither the softmax nor its gradient sees a row of -inf only."""
    rel = others(active, C.shape[-1], C.device)
    has_other = rel.any(-1, keepdim=True)
    logits = torch.where(has_other, (C / tau).masked_fill(~rel, float("-inf")), 0.0)
    return torch.softmax(logits, dim=-1) * rel, has_other


def relation_map(V: torch.Tensor, tau: float, eps: float, active=None):
    """SPEC steps 1-2. V [T, K, D], active [T, K] bool or None -> (n [T, K], C [T, K, K],
    rho [T, K, K]); rho_ij = 0 unless i and j are both active."""
    n = torch.clamp_min(safe_norm(V), eps)  # n_i = max(|v_i|, eps)
    v_hat = V / n.unsqueeze(-1)
    C = v_hat @ v_hat.transpose(-1, -2)  # C_ij = <v^_i, v^_j>
    rho, _ = relation_weights(C, tau, active)
    return n, C, rho


def rotation_angles(V, rho, A, B, beta=None, ids=None, active=None):
    """SPEC steps 3-4. -> alpha [T, K, D/2]."""
    z = V @ A  # z_j = v_j A            [T, K, r]
    # d_i = sum_j rho_ij z_j - z_i where slot i has another (active) slot to relate to; else
    # SPEC's "with K = 1, d = 0" (the equivalent form sum_j rho_ij (z_j - z_i) gives the same)
    has_other = others(active, V.shape[-2], V.device).any(-1, keepdim=True)
    d = rho @ z - z * has_other
    alpha = d @ B  # [T, K, D/2]
    if beta is not None:
        alpha = alpha + slot_rows_of(beta, ids)
    return alpha


def slot_rows_of(W, ids):
    """Each slot's row of a per-expert parameter W [E, ...] -> [1 or T, K, ...]: W itself
    without ids (K == E, slot k is expert k); zeros at a masked slot (id < 0), whose expert's row
    is never used (a non-finite row there must not reach the result)."""
    if ids is None:
        return W.unsqueeze(0)
    rows = select_experts(W, ids.clamp_min(0))  # any integer dtype
    keep = (ids >= 0).reshape(*ids.shape, *(1,) * (W.dim() - 1))
    return torch.where(keep, rows, 0.0)


def active_slots(slot_mask, ids):
    """Active slots [T, K] bool: slot_mask (True: takes part) and ids >= 0; None if neither is
    given (every slot active)."""
    if ids is None:
        return slot_mask
    keep = ids >= 0
    return keep if slot_mask is None else keep & slot_mask


def givens_rotate(V, alpha):
    """SPEC step 5: rotate pairs (p, p + D/2) of V [..., D] by alpha [..., D/2]."""
    h = V.shape[-1] // 2
    v1, v2 = V[..., :h], V[..., h:]
    c, s = torch.cos(alpha), torch.sin(alpha)
    return torch.cat((c * v1 - s * v2, s * v1 + c * v2), dim=-1)


def radar_gate_reference(expert_out, weights, rot_down, rot_up, angle_bias=None,
                         expert_ids=None, tau=1.0, eps=1e-6, backend=None, *, slot_mask=None):
    """Reference RadarGate: ``y = sum_i g_i R(alpha_i) v_i`` over the active slots.

    expert_out [..., K, D], weights [..., K], rot_down [D, r], rot_up [r, D/2],
    angle_bias [E, D/2] or None, expert_ids [..., K] or None (< 0: masked slot), slot_mask
    [..., K] bool or None (False: masked slot) -> [..., D] (dtype of expert_out).
    ``backend`` is accepted (and ignored) so the signature matches ``radar_gate``.
    """
    out_dtype = expert_out.dtype
    ct = compute_dtype(out_dtype)
    lead = expert_out.shape[:-2]
    K, D = expert_out.shape[-2:]
    V = expert_out.reshape(-1, K, D).to(ct)
    g = weights.reshape(-1, K).to(ct)
    ids = None if expert_ids is None else expert_ids.reshape(-1, K)
    active = active_slots(None if slot_mask is None else slot_mask.reshape(-1, K), ids)
    if active is not None:  # masked slots' values and expert rows are never used
        V = torch.where(active.unsqueeze(-1), V, 0.0)
        g = torch.where(active, g, 0.0)
        ids = None if ids is None else torch.where(active, ids, -1)
    beta = None if angle_bias is None else angle_bias.to(ct)
    _, _, rho = relation_map(V, tau, eps, active)
    alpha = rotation_angles(V, rho, rot_down.to(ct), rot_up.to(ct), beta, ids, active)
    U = givens_rotate(V, alpha)
    y = (g.unsqueeze(-1) * U).sum(dim=1)  # SPEC step 6
    return y.to(out_dtype).reshape(*lead, D)


def lora_down(x, lora_A, expert_ids=None, scaling=1.0):
    """Low-rank activations of the LoRA experts in the compute dtype.

    x [T, in], lora_A [E, in, r], expert_ids [T, K] or None -> s [T, K, r] (K = E without ids),
    ``s[t, k] = scaling * x[t] A_{ids[t, k]}``: expert k's output is then ``v = s B_{ids[t, k]}``.
    A masked slot (id < 0) gets s = 0.
    """
    ct = compute_dtype(x.dtype)
    s = torch.einsum("ti,eir->ter", x.to(ct), lora_A.to(ct))
    if expert_ids is not None:
        idx = expert_ids.long().clamp_min(0).unsqueeze(-1).expand(-1, -1, s.shape[-1])
        s = torch.where((expert_ids >= 0).unsqueeze(-1), torch.gather(s, 1, idx), 0.0)
    return s * scaling


def select_experts(W, expert_ids):
    """W [E, ...] -> W[ids] [T, K, ...] (ids >= 0). index_select, whose backward (index_add) was
    bitwise repeatable on CPU where ``W[ids]``'s (index_put with accumulate) was not."""
    rows = torch.index_select(W.reshape(W.shape[0], -1), 0, expert_ids.reshape(-1).long())
    return rows.view(*expert_ids.shape, *W.shape[1:])


def lora_up(s, lora_B, expert_ids=None):
    """Expert outputs from low-rank activations: s [T, K, r], lora_B [E, r, out] -> V [T, K, out]
    (0 at a masked slot, id < 0)."""
    B = lora_B.to(s.dtype)
    if expert_ids is None:
        return torch.einsum("tkr,kro->tko", s, B)
    return torch.einsum("tkr,tkro->tko", s, slot_rows_of(B, expert_ids))


def radar_gate_lora_reference(x, lora_A, lora_B, weights, rot_down=None, rot_up=None,
                              angle_bias=None, expert_ids=None, scaling=1.0, tau=1.0, eps=1e-6,
                              *, slot_mask=None):
    """The fused RadarGate-LoRA layer's contract: LoRA expert outputs, then ``radar_gate_reference``.

    x [..., in], lora_A [E, in, r], lora_B [E, r, out], weights [..., K],
    rot_down [out, rg] / rot_up [rg, out/2] (both None: plain weighted sum ``sum_k g_k v_k``),
    angle_bias [E, out/2] or None, expert_ids [..., K] or None (< 0: masked slot), slot_mask
    [..., K] bool or None (False: masked slot) -> [..., out] in the dtype of x.
    Expert k of token t outputs ``v = scaling * x A_e B_e`` (e = ids[t, k], or k), computed in
    the compute dtype (no rounding of v to the input dtype). Dropout, if any, is applied to x
    before this function.
    """
    lead = x.shape[:-1]
    K = weights.shape[-1]
    ct = compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    ids = None if expert_ids is None else expert_ids.reshape(-1, K)
    mask = None if slot_mask is None else slot_mask.reshape(-1, K)
    if ids is not None and mask is not None:  # a masked slot's expert is never used
        ids = torch.where(mask, ids, -1)
    g = weights.reshape(-1, K).to(ct)
    V = lora_up(lora_down(x2, lora_A, ids, scaling), lora_B, ids)
    if rot_down is None:
        active = active_slots(mask, ids)
        if active is not None:
            V = torch.where(active.unsqueeze(-1), V, 0.0)
            g = torch.where(active, g, 0.0)
        y = (g.unsqueeze(-1) * V).sum(1)
    else:
        beta = None if angle_bias is None else angle_bias.to(ct)
        y = radar_gate_reference(V, g, rot_down.to(ct), rot_up.to(ct), beta, ids, tau, eps,
                                 slot_mask=mask)
    return y.to(x.dtype).reshape(*lead, lora_B.shape[2])
