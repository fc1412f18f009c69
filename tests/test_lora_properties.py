"""SPEC's properties on the fused RadarGate-LoRA op (both backends), and hypothesis fuzzing of it
against the reference composition (scales, zero experts, equal experts, ids, dtypes)."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radargate_kernels import radar_gate_lora
from lora_helpers import check_lora_against_reference, make_lora_problem

BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero", ["rot_down", "rot_up"])
@pytest.mark.parametrize("ids", [False, True])
def test_zero_projection_is_the_weighted_sum(backend, zero, ids):
    p = make_lora_problem(6, 3, 8, 10, 2, 3, ids=ids, seed=11)
    p[zero] = torch.zeros_like(p[zero])
    y = radar_gate_lora(**p, backend=backend)
    plain = radar_gate_lora(**dict(p, rot_down=None, rot_up=None), backend=backend)
    torch.testing.assert_close(y, plain, rtol=1e-6, atol=1e-6)
    # and the weighted sum is sum_k g_k v_k
    V = torch.einsum("ti,eir,ero->teo", p["x"], p["lora_A"], p["lora_B"]) * p["scaling"]
    if ids:
        V = V[torch.arange(6)[:, None], p["expert_ids"]]
    torch.testing.assert_close(plain, torch.einsum("tk,tko->to", p["weights"], V),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_preserves_each_experts_norm(backend):
    p = make_lora_problem(4, 3, 6, 10, 2, 2, bias=True, seed=2)
    V = torch.einsum("ti,eir,ero->teo", p["x"], p["lora_A"], p["lora_B"]) * p["scaling"]
    for k in range(3):
        p["weights"] = torch.nn.functional.one_hot(torch.full((4,), k), 3).float()
        u = radar_gate_lora(**p, backend=backend)
        torch.testing.assert_close(u.norm(dim=-1), V[:, k].norm(dim=-1), rtol=2e-6, atol=1e-6)
        assert (u - V[:, k]).abs().max() > 1e-2  # and it really rotates


@pytest.mark.parametrize("backend", BACKENDS)
def test_permuting_slots_and_relabelling_experts_keeps_output(backend):
    p = make_lora_problem(5, 4, 6, 10, 3, 2, ids=True, bias=True, seed=4)
    y = radar_gate_lora(**p, backend=backend)
    gen = torch.Generator().manual_seed(0)
    K, E = 4, p["lora_A"].shape[0]
    slots = torch.randperm(K, generator=gen)
    q = dict(p, weights=p["weights"][:, slots], expert_ids=p["expert_ids"][:, slots])
    torch.testing.assert_close(radar_gate_lora(**q, backend=backend), y, rtol=1e-5, atol=1e-5)
    perm = torch.randperm(E, generator=gen)  # new expert e holds old expert perm[e]
    inv = torch.argsort(perm)
    q = dict(p, lora_A=p["lora_A"][perm], lora_B=p["lora_B"][perm],
             angle_bias=p["angle_bias"][perm], expert_ids=inv[p["expert_ids"]])
    torch.testing.assert_close(radar_gate_lora(**q, backend=backend), y, rtol=1e-5, atol=1e-5)


settings.register_profile("lora_ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("lora_long", max_examples=500, deadline=None)
PROFILE = "lora_long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "lora_ci"
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@settings.get_profile(PROFILE)
@given(T=st.integers(0, 6), K=st.integers(1, 5), half_out=st.integers(1, 9),
       r=st.integers(1, 4), rg=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       ids=st.booleans(), bias=st.booleans(), backend=st.sampled_from(BACKENDS),
       scale=st.sampled_from([1.0, 1e-3, 30.0]),
       pattern=st.sampled_from(["random", "zero_expert", "equal_experts"]),
       seed=st.integers(0, 2 ** 16))
def test_fuzz_against_reference(T, K, half_out, r, rg, dtype, ids, bias, backend, scale, pattern,
                                seed):
    p = make_lora_problem(T, K, 5, 2 * half_out, r, rg, dtype=torch.float64, ids=ids, bias=bias,
                          seed=seed)
    p["lora_B"] = p["lora_B"] * scale
    if pattern == "zero_expert":
        p["lora_B"][0] = 0
    if pattern == "equal_experts" and p["lora_B"].shape[0] > 1:
        p["lora_A"][1] = p["lora_A"][0]
        p["lora_B"][1] = p["lora_B"][0]
    p = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in p.items()}
    dy = torch.randn(T, 2 * half_out, generator=torch.Generator().manual_seed(seed),
                     dtype=torch.float64).to(dtype)
    check_lora_against_reference(p, dy, backend=backend)
