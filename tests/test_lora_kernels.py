"""The fused layer's relation kernels against their PyTorch definition (``lora.relation_lowrank``
and its autograd) on fresh random inputs, and the launch plans' limits. The whole op through
these kernels is checked against the reference composition in test_lora.py.
To add a shape: append to RELATION_CASES.
"""
import zlib

import pytest
import torch

from radargate_kernels import lora
from radargate_kernels.kernels import launch as L
from tolerances import assert_matches

RELATION_CASES = [
    # T, K, E, r, rg, ids
    (1, 1, 1, 3, 2, False),    # K = 1: d = 0
    (5, 3, 3, 5, 7, False),    # odd K, odd ranks
    (7, 2, 8, 8, 8, True),     # top-2 of 8 (F = 128, the widest tile)
    (4, 6, 5, 1, 1, True),     # r = 1, K > E (repeated ids)
    (3, 8, 8, 16, 4, False),   # dense E = 8, r = 16 (the benchmark's), F = 128
    (0, 4, 4, 2, 2, False),    # T = 0
    (70, 4, 4, 4, 3, False),   # several programs, partial last block
    (2, 33, 2, 4, 3, True),    # K > 32: one token per program, 64 rows
]


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _problem(case, dtype, tag):
    T, K, E, r, rg, ids = case
    gen = _gen(case, str(dtype), tag)
    s_all = torch.randn(T, E, r, generator=gen, dtype=torch.float64)
    if T > 1:
        s_all[1] = 0.0        # zero rows: n = eps, their cosines 0
    if T > 2 and r > 1:
        # a huge row: the Gram matrix of rows scaled by a power of two. (Not at r = 1: there a
        # cosine does not depend on |s|, so its exact gradient is 0, and any algorithm's result
        # is rounding noise of size 1e-16 x 1e20 -- the float64 "truth" included.)
        s_all[2, 0] *= 1e20
    s_all = s_all.to(dtype)
    e = torch.randint(0, E, (T, K), generator=gen) if ids else None
    if not ids:
        assert E == K
    B = torch.randn(E, r, 12, generator=gen, dtype=torch.float64).to(dtype)
    A_rot = (torch.randn(12, rg, generator=gen, dtype=torch.float64) * 12 ** -0.5).to(dtype)
    tau = 0.3 + float(torch.rand((), generator=gen))
    s = s_all if e is None else torch.gather(s_all, 1, e.unsqueeze(-1).expand(-1, -1, r))
    return s_all, s.contiguous(), e, B, A_rot, tau, gen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", RELATION_CASES,
                         ids=lambda c: "T{}-K{}-E{}-r{}-rg{}".format(*c) + ("-ids" if c[5] else ""))
def test_relation_kernel_matches_relation_lowrank(case, dtype):
    T, K, E, r, rg, ids = case
    s_all, s, e, B, A_rot, tau, _ = _problem(case, dtype, "fwd")
    assert L.relation_fits(K, E, r)
    P, Q = lora.lowrank_factors(B, A_rot, dtype)
    d = L.run("lora_relation", s_all, e, P, Q, tau, 1e-6, dtype)
    ref = lora.relation_lowrank(s, e, P, Q, tau, 1e-6)
    P64, Q64 = lora.lowrank_factors(B.double(), A_rot.double(), torch.float64)
    truth = lora.relation_lowrank(s.double(), e, P64, Q64, tau, 1e-6)
    assert torch.isfinite(d).all()
    assert_matches("d", d, ref, truth, dtype)


def _relation_grads(s, e, P, Q, tau, dd):
    leaves = [t.detach().clone().requires_grad_(True) for t in (s, P, Q)]
    d = lora.relation_lowrank(leaves[0], e, leaves[1], leaves[2], tau, 1e-6)
    return torch.autograd.grad(d, leaves, dd, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("groups", ["one", "many"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", RELATION_CASES,
                         ids=lambda c: "T{}-K{}-E{}-r{}-rg{}".format(*c) + ("-ids" if c[5] else ""))
def test_relation_backward_kernel_matches_autograd_of_relation_lowrank(case, dtype, groups,
                                                                      monkeypatch):
    """With "many", every token block is its own program (partials of dP, dQ summed on the
    host); with "one", a single program."""
    T, K, E, r, rg, ids = case
    monkeypatch.setattr(L, "token_groups", lambda n_blocks, n_chunks, device, per_sm=4: (
        max(1, n_blocks) if groups == "many" else 1))
    s_all, s, e, B, A_rot, tau, gen = _problem(case, dtype, "bwd")
    dd = torch.randn(T, K, rg, generator=gen, dtype=torch.float64).to(dtype)
    ds0 = torch.randn(T, K, r, generator=gen, dtype=torch.float64).to(dtype)  # streaming part
    P, Q = lora.lowrank_factors(B, A_rot, dtype)
    ds, s0 = ds0.clone(), s_all.clone()
    dP, dQ = L.run("lora_relation_backward", s_all, e, P, Q, dd, ds, tau, 1e-6, dtype)
    assert torch.equal(s_all, s0)
    refs = _relation_grads(s, e, P, Q, tau, dd)
    P64, Q64 = lora.lowrank_factors(B.double(), A_rot.double(), torch.float64)
    truths = _relation_grads(s.double(), e, P64, Q64, tau, dd.double())
    # dP, dQ enter the op only through (dP + dP^T) B and dQ rot_down^T (lora.factors_backward):
    # compare the symmetric part of dP, the kernel's and autograd's differ in the other part
    sym = lambda x: x + x.permute(2, 3, 0, 1)  # noqa: E731
    for name, got, ref, truth, base in (("ds", ds, refs[0], truths[0], ds0),
                                        ("dP + dP^T", sym(dP), sym(refs[1]), sym(truths[1]), None),
                                        ("dQ", dQ, refs[2], truths[2], None)):
        if base is not None:  # ds held the streaming part on entry: the kernel adds to it
            ref, truth = base + ref, base.double() + truth
        assert_matches(name, got, ref, truth, dtype)


def test_relation_kernels_take_e_r_up_to_128_and_k_up_to_64():
    assert L.relation_fits(8, 8, 16) and L.relation_fits(2, 8, 16) and L.relation_fits(64, 2, 8)
    assert not L.relation_fits(40, 40, 16)  # the paper's 40 experts: the PyTorch part
    assert not L.relation_fits(8, 9, 16) and not L.relation_fits(65, 2, 8)


@pytest.mark.parametrize("ids", [False, True], ids=["dense", "top_k"])
def test_large_angles_keep_the_bf16_accuracy(ids):
    # angles of tens of radians: d = rho z - z (the relation kernel) sets them, so its products
    # need fp32's accuracy (in plain tf32, y missed the reference by ~0.1 max|y| in bf16)
    from lora_helpers import check_lora_against_reference, make_lora_problem
    prob = make_lora_problem(9, 4, 16, 64, 8, 8, dtype=torch.bfloat16, ids=ids, seed=23)
    prob["rot_up"] = prob["rot_up"] * 30
    dy = torch.randn(9, 64, generator=torch.Generator().manual_seed(24)).to(torch.bfloat16)
    check_lora_against_reference(prob, dy, backend="triton")


def _meta_plans(T, K, D, r, E, ids, lora_layer):
    """Every launch the launcher plans at T tokens, on meta tensors (nothing runs)."""
    dt = torch.bfloat16
    meta = dict(device="meta")
    idx = torch.zeros((T, K), dtype=torch.int64, **meta) if ids else None
    g = torch.empty((T, K), dtype=dt, **meta)
    if not lora_layer:
        V = torch.empty((T, K, D), dtype=dt, **meta)
        A, B = torch.empty((D, r), dtype=dt, **meta), torch.empty((r, D // 2), dtype=dt, **meta)
        beta = torch.empty((E, D // 2), dtype=dt, **meta) if ids else None
        fwd, (y, n, C, rho, z, d) = L.plan_forward(V, g, A, B, beta, idx, 1.0, 1e-6)
        return fwd + L.plan_backward(y, V, g, A, B, beta, idx, n, C, rho, z, d, 1.0, 1e-6)[0]
    Ex = E if ids else K
    s_all = torch.empty((T, Ex, r), **meta)
    d = torch.empty((T, K, r), **meta)
    LB = torch.empty((Ex, r, D), dtype=dt, **meta)
    U = torch.empty((r, D // 2), dtype=dt, **meta)
    P, Q = torch.empty((Ex, r, Ex, r), **meta), torch.empty((Ex, r, r), **meta)
    out = L.plan_stream_forward(s_all, g, d, idx, LB, U, None, dt)[0]
    out += L.plan_stream_backward(torch.empty((T, D), dtype=dt, **meta), s_all, g, d, idx, LB,
                                  U, None)[0]
    out += L.plan_lora_relation(s_all, idx, P, Q, 1.0, 1e-6, dt)[0]
    out += L.plan_lora_relation_backward(s_all, idx, P, Q, d, d, 1.0, 1e-6, dt)[0]
    return out


@pytest.mark.parametrize("lora_layer", [False, True], ids=["radar_gate", "fused_layer"])
@pytest.mark.parametrize("T", [2 ** 20, 2 ** 31 - 1])
def test_planned_grids_stay_within_cuda_limits_up_to_2_pow_31_tokens(T, lora_layer):
    # grid axis 0 may reach 2^31 - 1, axes 1 and 2 at most 65535 (CUDA); planned, not run
    for K, E, ids in ((8, 8, False), (2, 8, True), (64, 64, False)):
        if lora_layer and not L.relation_fits(K, E, 8):
            continue
        for launch in _meta_plans(T, K, 256, 8, E, ids, lora_layer):
            assert launch.grid[0] < 2 ** 31, (launch.kernel.fn.__name__, launch.grid)
            assert all(g <= 65535 for g in launch.grid[1:]), (launch.kernel.fn.__name__,
                                                             launch.grid)
            assert all(g >= 1 for g in launch.grid)
