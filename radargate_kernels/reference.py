"""Pure-PyTorch reference of the RadarGate operator: the one place where the math lives.

A literal transcription of ``docs/SPEC.md`` steps 1-6 (this project's reading of the paper
"Two Is Better Than One: Rotations Scale LoRAs", arXiv 2505.23184). Differentiable by
autograd; all arithmetic runs in float32 or wider (float64 stays float64).

Shapes (after flattening leading dims into T):
    V [T, K, D], g [T, K], A [D, r], B [r, D/2], beta [E, D/2] or None, ids [T, K] or None
    -> y [T, D] in the dtype of V.
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


def relation_map(V: torch.Tensor, tau: float, eps: float):
    """SPEC steps 1-2. V [T, K, D] -> (n [T, K], C [T, K, K], rho [T, K, K])."""
    n = torch.clamp_min(safe_norm(V), eps)  # n_i = max(|v_i|, eps)
    v_hat = V / n.unsqueeze(-1)
    C = v_hat @ v_hat.transpose(-1, -2)  # C_ij = <v^_i, v^_j>
    K = V.shape[-2]
    self_mask = torch.eye(K, dtype=torch.bool, device=V.device)
    # rho_ij = exp(C_ij/tau) / sum_{k != i} exp(C_ik/tau), rho_ii = 0. The row maximum is
    # subtracted first (same value, no overflow for small tau); K = 1 leaves an empty set: rho = 0.
    logits = (C / tau).masked_fill(self_mask, float("-inf"))
    if K == 1:
        rho = torch.zeros_like(C)
    else:
        rho = torch.softmax(logits, dim=-1)
    return n, C, rho


def rotation_angles(V, rho, A, B, beta=None, ids=None):
    """SPEC steps 3-4. -> alpha [T, K, D/2]."""
    z = V @ A  # z_j = v_j A            [T, K, r]
    if V.shape[-2] > 1:
        d = rho @ z - z  # d_i = sum_j rho_ij z_j - z_i
    else:
        # SPEC: "with K = 1, d = 0". The literal formula would give -z (rho = 0); SPEC's K = 1
        # rule wins, as does the equivalent form sum_j rho_ij (z_j - z_i). rho @ z is 0 here.
        d = rho @ z
    alpha = d @ B  # [T, K, D/2]
    if beta is not None:
        if ids is None:
            alpha = alpha + beta.unsqueeze(0)  # K == E, slot k is expert k
        else:
            alpha = alpha + select_experts(beta, ids)  # any integer dtype indexes
    return alpha


def givens_rotate(V, alpha):
    """SPEC step 5: rotate pairs (p, p + D/2) of V [..., D] by alpha [..., D/2]."""
    h = V.shape[-1] // 2
    v1, v2 = V[..., :h], V[..., h:]
    c, s = torch.cos(alpha), torch.sin(alpha)
    return torch.cat((c * v1 - s * v2, s * v1 + c * v2), dim=-1)


def radar_gate_reference(expert_out, weights, rot_down, rot_up, angle_bias=None,
                         expert_ids=None, tau=1.0, eps=1e-6, backend=None):
    """Reference RadarGate: ``y = sum_i g_i R(alpha_i) v_i``.

    expert_out [..., K, D], weights [..., K], rot_down [D, r], rot_up [r, D/2],
    angle_bias [E, D/2] or None, expert_ids [..., K] or None -> [..., D] (dtype of expert_out).
    ``backend`` is accepted (and ignored) so the signature matches ``radar_gate``.
    """
    out_dtype = expert_out.dtype
    ct = compute_dtype(out_dtype)
    lead = expert_out.shape[:-2]
    K, D = expert_out.shape[-2:]
    V = expert_out.reshape(-1, K, D).to(ct)
    g = weights.reshape(-1, K).to(ct)
    ids = None if expert_ids is None else expert_ids.reshape(-1, K)
    beta = None if angle_bias is None else angle_bias.to(ct)
    _, _, rho = relation_map(V, tau, eps)
    alpha = rotation_angles(V, rho, rot_down.to(ct), rot_up.to(ct), beta, ids)
    U = givens_rotate(V, alpha)
    y = (g.unsqueeze(-1) * U).sum(dim=1)  # SPEC step 6
    return y.to(out_dtype).reshape(*lead, D)


def lora_down(x, lora_A, expert_ids=None, scaling=1.0):
    """Low-rank activations of the LoRA experts in the compute dtype.

    x [T, in], lora_A [E, in, r], expert_ids [T, K] or None -> s [T, K, r] (K = E without ids),
    ``s[t, k] = scaling * x[t] A_{ids[t, k]}``: expert k's output is then ``v = s B_{ids[t, k]}``.
    """
    ct = compute_dtype(x.dtype)
    s = torch.einsum("ti,eir->ter", x.to(ct), lora_A.to(ct))
    if expert_ids is not None:
        s = torch.gather(s, 1, expert_ids.long().unsqueeze(-1).expand(-1, -1, s.shape[-1]))
    return s * scaling


def select_experts(W, expert_ids):
    """W [E, ...] -> W[ids] [T, K, ...]. index_select, whose backward (index_add) was bitwise
    repeatable on CPU where ``W[ids]``'s (index_put with accumulate) was not."""
    rows = torch.index_select(W.reshape(W.shape[0], -1), 0, expert_ids.reshape(-1).long())
    return rows.view(*expert_ids.shape, *W.shape[1:])


def lora_up(s, lora_B, expert_ids=None):
    """Expert outputs from low-rank activations: s [T, K, r], lora_B [E, r, out] -> V [T, K, out]."""
    B = lora_B.to(s.dtype)
    if expert_ids is None:
        return torch.einsum("tkr,kro->tko", s, B)
    return torch.einsum("tkr,tkro->tko", s, select_experts(B, expert_ids))


def radar_gate_lora_reference(x, lora_A, lora_B, weights, rot_down=None, rot_up=None,
                              angle_bias=None, expert_ids=None, scaling=1.0, tau=1.0, eps=1e-6):
    """The fused RadarGate-LoRA layer's contract: LoRA expert outputs, then ``radar_gate_reference``.

    x [..., in], lora_A [E, in, r], lora_B [E, r, out], weights [..., K],
    rot_down [out, rg] / rot_up [rg, out/2] (both None: plain weighted sum ``sum_k g_k v_k``),
    angle_bias [E, out/2] or None, expert_ids [..., K] or None -> [..., out] in the dtype of x.
    Expert k of token t outputs ``v = scaling * x A_e B_e`` (e = ids[t, k], or k), computed in
    the compute dtype (no rounding of v to the input dtype). Dropout, if any, is applied to x
    before this function.
    """
    lead = x.shape[:-1]
    K = weights.shape[-1]
    ct = compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    ids = None if expert_ids is None else expert_ids.reshape(-1, K)
    g = weights.reshape(-1, K).to(ct)
    V = lora_up(lora_down(x2, lora_A, ids, scaling), lora_B, ids)
    if rot_down is None:
        y = (g.unsqueeze(-1) * V).sum(1)
    else:
        beta = None if angle_bias is None else angle_bias.to(ct)
        y = radar_gate_reference(V, g, rot_down.to(ct), rot_up.to(ct), beta, ids, tau, eps)
    return y.to(x.dtype).reshape(*lead, lora_B.shape[2])
