"""Expert-major (sparse dispatch) LoRA-MoE code -> radar_gate's [T, K, D] slot layout.

MixLoRA-style code loops over experts and runs each on the tokens routed to it::

    expert_mask = F.one_hot(selected_experts, E).permute(2, 1, 0)   # [E, K, T]
    for e in range(E):
        idx, top_x = torch.where(expert_mask[e])                     # slots k, tokens t
        rows = expert[e](x[top_x]) * routing_weights[top_x, idx, None]
        out.index_add_(0, top_x, rows)                               # the weighted sum

With RadarGate the rows are collected unweighted and put at their (token, slot) places, then
gated: ``V = slots_from_expert_major(rows_per_expert, selected_experts)`` and
``radar_gate(V, routing_weights, A, B, angle_bias, expert_ids=selected_experts)``.
"""
from __future__ import annotations

import torch


def slots_from_expert_major(rows_per_expert, selected_experts: torch.Tensor) -> torch.Tensor:
    """rows_per_expert[e]: expert e's outputs [n_e, D] for its (token, slot) pairs in the order
    ``torch.where(selected_experts.T == e)`` gives them (slot-major, then token: MixLoRA's
    ``torch.where(expert_mask[e])``); selected_experts [T, K] -> V [T, K, D] with
    V[t, k] = the row of expert selected_experts[t, k] for token t. Each (t, k) is written once
    (no atomics). An expert with no tokens has an empty [0, D] tensor. A slot with a negative id
    (left empty by a top-p router or a capacity limit) stays zero: radar_gate masks it."""
    if selected_experts.dim() != 2:
        raise ValueError(f"selected_experts: expected [T, K], got shape "
                         f"{tuple(selected_experts.shape)}")
    T, K = selected_experts.shape
    rows = list(rows_per_expert)
    like = next((r for r in rows if r.numel()), rows[0] if rows else selected_experts.float())
    D = like.shape[-1]
    V = like.new_zeros((T, K, D))
    filled = 0
    for e, r in enumerate(rows):
        k_idx, t_idx = torch.where(selected_experts.t() == e)
        if r.shape != (k_idx.numel(), D):
            raise ValueError(f"rows_per_expert[{e}]: expected shape ({k_idx.numel()}, {D}) (one "
                             f"row per slot routed to expert {e}), got {tuple(r.shape)}")
        V[t_idx, k_idx] = r
        filled += k_idx.numel()
    missing = T * K - int((selected_experts < 0).sum()) - filled
    if missing:
        raise ValueError(f"selected_experts: {missing} slots name an expert outside "
                         f"[0, {len(rows)}) (negative ids are empty slots)")
    return V
