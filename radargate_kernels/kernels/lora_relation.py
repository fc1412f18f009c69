"""Triton kernel of the fused layer's relation map (SPEC steps 1-3) from low-rank activations.

One token per program; its K slots are the rows of the tiles (K padded to KP >= 16 for tl.dot).
From ``s [T, K, r]`` and the per-expert products ``P [E, r, E, r] = B_e B_f^T`` and
``Q [E, r, rg] = B_e rot_down`` (small, L2-resident):
``G_ij = s_i P[e_i, :, e_j, :] s_j^T`` (= <v_i, v_j>), ``n = max(|v|, eps)``, cosines,
reference weights rho (softmax over j != i), ``z_i = s_i Q[e_i]``, ``d = rho z - z`` -> D [T, K, rg].
Nothing of size ``out`` is touched. Same math as ``lora.relation_lowrank`` (the PyTorch version,
which the backward differentiates).
"""
import triton
import triton.language as tl


@triton.jit
def lora_relation_kernel(
    S, IDS, P, Q, D,
    K, r, rg, E,
    s_it, s_ik,
    tau_inv, eps,
    KP: tl.constexpr, RGP: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, KP)
    gg = tl.arange(0, RGP)
    slot = kk < K
    if HAS_IDS:
        e = tl.load(IDS + t * s_it + kk * s_ik, mask=slot, other=0).to(tl.int32)
    else:
        e = kk
    ok = slot & (e >= 0) & (e < E)  # an out-of-range id (unchecked under compile) contributes 0
    e = tl.where(ok, e, 0).to(tl.int64)
    row = t * K + kk
    same = ok[:, None] & ok[None, :]
    G = tl.zeros((KP, KP), dtype=ACC)
    z = tl.zeros((KP, RGP), dtype=ACC)
    rE = r * E
    for a in range(0, r):
        sa = tl.load(S + row * r + a, mask=ok, other=0.0).to(ACC)
        Wa = tl.zeros((KP, KP), dtype=ACC)  # sum_b P[e_i, a, e_j, b] s_jb
        for b in range(0, r):
            sb = tl.load(S + row * r + b, mask=ok, other=0.0).to(ACC)
            Pab = tl.load(P + (e[:, None] * r + a) * rE + e[None, :] * r + b, mask=same,
                          other=0.0).to(ACC)
            Wa += Pab * sb[None, :]
        G += sa[:, None] * Wa
        Qa = tl.load(Q + (e[:, None] * r + a) * rg + gg[None, :],
                     mask=ok[:, None] & (gg[None, :] < rg), other=0.0).to(ACC)
        z += sa[:, None] * Qa
    diag = kk[:, None] == kk[None, :]
    n2 = tl.sum(tl.where(diag, G, 0.0), axis=1)
    n = tl.sqrt(tl.maximum(n2, eps * eps))
    n_col = tl.sqrt(tl.maximum(tl.sum(tl.where(diag, G, 0.0), axis=0), eps * eps))
    C = G / (n[:, None] * n_col[None, :])
    off = same & (kk[:, None] != kk[None, :])
    logits = tl.where(off, C * tau_inv, -float("inf"))
    mx = tl.max(logits, axis=1)
    mx = tl.where(mx == -float("inf"), 0.0, mx)
    ex = tl.where(off, tl.exp(logits - mx[:, None]), 0.0)
    den = tl.sum(ex, axis=1)
    rho = ex / tl.where(den > 0, den, 1.0)[:, None]
    d = tl.dot(rho, z, input_precision="ieee", out_dtype=ACC) - z
    d = tl.where(K > 1, d, 0.0 * z)  # SPEC: d = 0 when K = 1 (NaN in z stays NaN, as in torch)
    tl.store(D + row[:, None] * rg + gg[None, :], d, mask=slot[:, None] & (gg[None, :] < rg))
