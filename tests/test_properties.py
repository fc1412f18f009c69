"""SPEC's properties, checked on the kernel path (Triton interpreter)."""
import pytest
import torch

from radargate_kernels import radar_gate
from helpers import make_problem


@pytest.mark.parametrize("zero", ["rot_down", "rot_up"])
@pytest.mark.parametrize("K,D", [(1, 2), (3, 10), (8, 64)])
def test_zero_projection_is_plain_weighted_sum(zero, K, D):
    p = make_problem(5, K, D, 3, seed=K + D)
    p[zero] = torch.zeros_like(p[zero])
    y = radar_gate(**p, backend="triton")
    plain = torch.einsum("tk,tkd->td", p["weights"], p["expert_out"])
    torch.testing.assert_close(y, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("K,D,ids", [(1, 6, True), (3, 10, False), (8, 64, True), (13, 130, False)])
def test_rotation_preserves_each_experts_norm(K, D, ids):
    # one-hot weights select u_k; its norm must equal |v_k|
    p = make_problem(4, K, D, 3, bias=True, ids=ids, seed=K)
    V = p["expert_out"]
    for k in range(K):
        p["weights"] = torch.nn.functional.one_hot(torch.full((4,), k), K).float()
        u = radar_gate(**p, backend="triton")
        torch.testing.assert_close(u.norm(dim=-1), V[:, k].norm(dim=-1), rtol=2e-6, atol=1e-6)
        # and the rotation really rotates (not the identity)
        assert (u - V[:, k]).abs().max() > 1e-2


@pytest.mark.parametrize("K,D,ids", [(2, 6, False), (5, 10, True), (8, 64, True), (13, 130, False)])
def test_permuting_slots_with_weights_and_ids_keeps_output(K, D, ids):
    p = make_problem(6, K, D, 4, bias=True, ids=ids, seed=3 * K)
    if not ids:  # slot k is expert k: permuting slots needs explicit ids to keep the bias
        p["expert_ids"] = torch.arange(K).expand(6, K).clone()
    y = radar_gate(**p, backend="triton")
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(K))
    q = dict(p, expert_out=p["expert_out"][:, perm], weights=p["weights"][:, perm],
             expert_ids=p["expert_ids"][:, perm])
    y_perm = radar_gate(**q, backend="triton")
    torch.testing.assert_close(y_perm, y, rtol=1e-5, atol=1e-5)
