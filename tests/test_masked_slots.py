"""Masked slots (issue #26; docs/SPEC.md, "Masked slots"): ``slot_mask`` False or a negative
expert id takes a slot out of the relation map and the sum, with zero gradients.

- the reference against its definition: each token computed on its active slots alone;
- every path (Triton kernels in the interpreter, the CPU path; radar_gate and radar_gate_lora)
  against the reference under the tolerance table, on shapes that hit the kernels' edges;
- a masked slot's values are never used (NaN there changes nothing), negative ids are the same
  as a False mask, and a weight of 0 is not a mask.
To add a shape: append it to OP_CASES as (T, K, D, r, bias, ids) or LORA_CASES.
"""
import zlib

import pytest
import torch

from radargate_kernels import RadarGate, radar_gate, radar_gate_lora, radar_gate_reference
from radargate_kernels.reference import radar_gate_lora_reference
from helpers import check_against_reference, make_problem, run_with_grads
from lora_helpers import check_lora_against_reference, make_lora_problem

OP_CASES = [
    (6, 1, 6, 2, True, True),      # K = 1: a masked token outputs 0, bias-only rotation
    (37, 3, 10, 3, True, False),   # odd K, dense with bias: masks only
    (37, 3, 10, 3, False, True),   # ids without bias: only their sign matters
    (9, 5, 6, 1, True, True),      # ids with bias, -1 ids and a mask, r = 1
    (4, 13, 6, 2, False, False),   # K = 13 padded to 16: two tokens per relation program
    (3, 20, 10, 3, True, True),    # K = 20: the column kernel's M v over two slot chunks
    (2, 40, 6, 3, True, False),    # K = 40 > 32: a token's relation in 64 rows
    (1, 2, 2, 1, False, True),     # a single token, D = 2
    (0, 3, 4, 2, True, True),      # T = 0
]


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _id(c):
    return "T{}-K{}-D{}-r{}".format(*c[:4]) + ("-bias" if c[4] else "") + ("-ids" if c[5] else "")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", OP_CASES, ids=_id)
def test_radar_gate_masked_matches_reference(case, dtype, backend):
    T, K, D, r, bias, ids = case
    seed = _seed(case, str(dtype), backend)
    prob = make_problem(T, K, D, r, dtype=dtype, bias=bias, ids=ids, seed=seed, masked=True)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(dtype)
    check_against_reference(radar_gate, prob, dy, seed, backend=backend)


def _active(prob):
    act = prob["slot_mask"].clone()
    if prob["expert_ids"] is not None:
        act &= prob["expert_ids"] >= 0
    return act


@pytest.mark.parametrize("case", [(24, 2, 6, 2, True, True), (24, 3, 10, 3, True, False),
                                  (24, 3, 6, 2, True, True), (24, 4, 8, 3, False, True)], ids=_id)
def test_reference_is_each_token_on_its_active_slots(case):
    """The definition: the masked reference equals, token by token, the unmasked reference on
    the token's active slots only (no active slot: y = 0); gradients likewise, 0 at masked."""
    T, K, D, r, bias, ids = case
    prob = make_problem(T, K, D, r, dtype=torch.float64, bias=bias, ids=ids,
                        seed=_seed("def", case), masked=True)
    act = _active(prob)
    counts = act.sum(1)
    assert (counts == 0).any() and (counts == 1).any(), "need tokens with 0 and 1 active slots"
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, grads = run_with_grads(radar_gate_reference, prob, dy)
    param_sum = {k: torch.zeros_like(grads[k]) for k in ("rot_down", "rot_up", "angle_bias")
                 if k in grads}
    for t in range(T):
        a = act[t]
        sub = dict(prob, expert_out=prob["expert_out"][t:t + 1, a],
                   weights=prob["weights"][t:t + 1, a], slot_mask=None)
        if prob["expert_ids"] is not None:
            sub["expert_ids"] = prob["expert_ids"][t:t + 1, a]
        elif bias:  # slot k is expert k: keep each active slot's own bias row
            sub["expert_ids"] = torch.nonzero(a).reshape(1, -1)
        if not a.any():
            assert (y[t] == 0).all()
            assert (grads["expert_out"][t] == 0).all() and (grads["weights"][t] == 0).all()
            continue
        y_t, g_t = run_with_grads(radar_gate_reference, sub, dy[t:t + 1])
        for k in param_sum:
            param_sum[k] += g_t[k]
        torch.testing.assert_close(y[t], y_t[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads["expert_out"][t, a], g_t["expert_out"][0])
        torch.testing.assert_close(grads["weights"][t, a], g_t["weights"][0])
        assert (grads["expert_out"][t, ~a] == 0).all() and (grads["weights"][t, ~a] == 0).all()
    for k, total in param_sum.items():  # parameter gradients: the sum over the tokens' subsets
        torch.testing.assert_close(grads[k], total, rtol=1e-10, atol=1e-12)


def _nan_in_masked(prob):
    """The problem with NaN in every masked slot's expert_out and weight."""
    act = _active(prob)
    bad = dict(prob)
    bad["expert_out"] = prob["expert_out"].masked_fill(~act.unsqueeze(-1), float("nan"))
    bad["weights"] = prob["weights"].masked_fill(~act, float("nan"))
    return bad


@pytest.mark.parametrize("fn,kw", [(radar_gate, {"backend": "triton"}),
                                   (radar_gate, {"backend": "torch"}),
                                   (radar_gate_reference, {})],
                         ids=["triton", "torch", "reference"])
@pytest.mark.parametrize("case", [(9, 3, 10, 3, True, True), (3, 20, 6, 2, True, False)], ids=_id)
def test_masked_values_are_never_read(fn, kw, case):
    prob = make_problem(*case[:4], dtype=torch.float32, bias=case[4], ids=case[5],
                        seed=_seed("nan", case), masked=True)
    act = _active(prob)
    dy = torch.randn(case[0], case[2], generator=torch.Generator().manual_seed(5))
    y, grads = run_with_grads(fn, prob, dy, **kw)
    y_bad, grads_bad = run_with_grads(fn, _nan_in_masked(prob), dy, **kw)
    assert torch.isfinite(y_bad).all()
    torch.testing.assert_close(y_bad, y, rtol=0, atol=0)
    for name, g in grads_bad.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, grads[name], rtol=0, atol=0)
    assert grads_bad["expert_out"][~act].abs().max() == 0
    assert grads_bad["weights"][~act].abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_negative_ids_are_masked_slots(backend):
    """MixLoRA's top-p marks unused slots with id -1 (and weight 0): the same as slot_mask False,
    whatever valid id the masked slot would carry."""
    prob = make_problem(7, 4, 10, 3, dtype=torch.float64, bias=True, ids=True, seed=11)
    neg = torch.rand(7, 4, generator=torch.Generator().manual_seed(2)) < 0.4
    with_ids = radar_gate(**dict(prob, expert_ids=prob["expert_ids"].masked_fill(neg, -1)),
                          backend=backend)
    # the reference reads the mask form on its own code path (no -1 ids there)
    with_mask = radar_gate_reference(**prob, slot_mask=~neg)
    torch.testing.assert_close(with_ids, with_mask, rtol=1e-12, atol=1e-12)


def test_a_zero_weight_is_not_a_mask():
    """Documented: weight 0 keeps the slot in the relation map (it turns the others)."""
    prob = make_problem(5, 3, 10, 3, dtype=torch.float64, seed=4)
    w0 = prob["weights"].clone()
    w0[:, 0] = 0
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[:, 0] = False
    y_zero = radar_gate(**dict(prob, weights=w0))
    y_mask = radar_gate(**prob, slot_mask=mask)
    assert (y_zero - y_mask).abs().max() > 1e-3


LORA_CASES = [  # (T, K, fin, out, r, rg, ids, bias, rotation, E)
    (9, 3, 8, 6, 2, 3, True, True, True, None),
    (9, 4, 8, 6, 3, 2, False, True, True, None),     # dense: the mask turns it into ids
    (6, 1, 8, 6, 2, 3, True, False, True, None),     # K = 1
    (7, 3, 8, 10, 3, 2, True, True, True, 9),        # E r > 128 lanes: the relation in PyTorch
    (9, 3, 8, 6, 2, 0, True, False, False, None),    # weighted sum: the mask in the one GEMM
    (9, 3, 8, 6, 2, 0, False, False, False, None),
    (0, 2, 8, 6, 2, 3, True, True, True, None),      # T = 0
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_radar_gate_lora_masked_matches_reference(case, dtype, backend):
    T, K, fin, out, r, rg, ids, bias, rotation, E = case
    seed = _seed("lora", case, str(dtype), backend)
    prob = make_lora_problem(T, K, fin, out, r, max(rg, 1), dtype=dtype, ids=ids, bias=bias,
                             rotation=rotation, seed=seed, masked=True, E=E)
    dy = torch.randn(T, out, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(dtype)
    check_lora_against_reference(prob, dy, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_radar_gate_lora_masked_values_never_read(backend):
    prob = make_lora_problem(8, 3, 8, 6, 2, 3, ids=True, bias=True, seed=21, masked=True)
    act = prob["slot_mask"] & (prob["expert_ids"] >= 0)
    y = radar_gate_lora(**prob, backend=backend)
    bad = dict(prob, weights=prob["weights"].masked_fill(~act, float("nan")),
               expert_ids=prob["expert_ids"].masked_fill(~prob["slot_mask"], -5))
    w = bad["weights"].clone().requires_grad_(True)
    y_bad = radar_gate_lora(**dict(bad, weights=w), backend=backend)
    torch.testing.assert_close(y_bad, y, rtol=0, atol=0)
    y_bad.sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad[~act].abs().max() == 0


def test_lora_reference_without_active_slot_is_zero():
    prob = make_lora_problem(4, 3, 8, 6, 2, 3, dtype=torch.float64, ids=True, seed=3)
    none = torch.zeros(4, 3, dtype=torch.bool)
    y = radar_gate_lora_reference(**prob, slot_mask=none)
    assert y.abs().max() == 0


def test_radar_gate_module_takes_slot_mask():
    torch.manual_seed(0)
    gate = RadarGate(10, 4, rank=3)
    with torch.no_grad():
        gate.rot_up.normal_()
    V, w = torch.randn(6, 4, 10), torch.softmax(torch.randn(6, 4), -1)
    mask = torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) > 0.4
    y = gate(V, w, slot_mask=mask)
    y_ref = radar_gate_reference(V, w, gate.rot_down, gate.rot_up, gate.angle_bias,
                                 slot_mask=mask)
    torch.testing.assert_close(y, y_ref)
    assert (gate(V, w) - y).abs().max() > 1e-3  # the mask is not ignored


@pytest.mark.parametrize("bad,err,match", [
    (lambda p: p["weights"] > 0, None, None),                       # the valid form
    (lambda p: (p["weights"] > 0).float(), TypeError, "slot_mask: expected dtype torch.bool"),
    (lambda p: (p["weights"] > 0)[:, :2], ValueError, "slot_mask: expected shape"),
    (lambda p: (p["weights"] > 0).to("meta"), ValueError, "slot_mask: expected device cpu"),
    (lambda p: [True, False], TypeError, "slot_mask: expected a torch.Tensor"),
])
def test_slot_mask_validation(bad, err, match):
    prob = make_problem(4, 3, 6, 2, seed=1)
    lprob = make_lora_problem(4, 3, 8, 6, 2, 3, seed=1)
    for fn, p in ((radar_gate, prob), (radar_gate_lora, lprob)):
        if err is None:
            fn(**p, slot_mask=bad(p))
        else:
            with pytest.raises(err, match=match):
                fn(**p, slot_mask=bad(p))


def test_expert_ids_above_range_still_rejected():
    prob = make_problem(4, 3, 6, 2, bias=True, ids=True, seed=1)
    E = prob["angle_bias"].shape[0]
    with pytest.raises(ValueError, match=f"expert_ids: expected values < {E}"):
        radar_gate(**dict(prob, expert_ids=prob["expert_ids"].masked_fill(
            torch.eye(4, 3, dtype=torch.bool), E)))
    radar_gate(**dict(prob, expert_ids=prob["expert_ids"].masked_fill(
        torch.eye(4, 3, dtype=torch.bool), -1)))  # negative: a masked slot, accepted


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_small_tau_softmax_ignores_masked_columns(backend):
    """At tau = 1e-3 with the active slots' cosines near -1, a masked slot (cosine 0 with every
    row, as its v counts as 0) must not set the softmax's maximum: exp(-1 / tau) is 0 in fp32,
    so a maximum taken over it would zero the active slots' reference weights."""
    gen = torch.Generator().manual_seed(9)
    v = torch.randn(1, 1, 8, generator=gen, dtype=torch.float64)
    V = torch.cat((v, -v + 0.01 * torch.randn(1, 1, 8, generator=gen, dtype=torch.float64),
                   torch.randn(1, 1, 8, generator=gen, dtype=torch.float64)), dim=1)
    V = V.expand(4, 3, 8).contiguous()
    prob = dict(expert_out=V, weights=torch.ones(4, 3, dtype=torch.float64),
                rot_down=torch.randn(8, 2, generator=gen, dtype=torch.float64),
                rot_up=torch.randn(2, 4, generator=gen, dtype=torch.float64), tau=1e-3,
                slot_mask=torch.tensor([True, True, False]).expand(4, 3))
    torch.testing.assert_close(radar_gate(**prob, backend=backend),
                               radar_gate_reference(**prob), rtol=1e-10, atol=1e-10)


PATHS = [(radar_gate, {"backend": "triton"}), (radar_gate, {"backend": "torch"}),
         (radar_gate_reference, {})]


@pytest.mark.parametrize("form", ["mask", "negative_ids"])
@pytest.mark.parametrize("fn,kw", PATHS, ids=["triton", "torch", "reference"])
def test_parameter_rows_only_masked_slots_name_are_never_used(fn, kw, form):
    """angle_bias of an expert that only masked slots name (or, with -1 ids, expert 0, which no
    slot names) is inf: the result and every gradient stay those of a finite row there."""
    prob = make_problem(8, 3, 10, 3, bias=True, ids=True, E_extra=3, seed=31)  # E = 6
    ids = prob["expert_ids"] % 5 + 1  # experts 1..5 only
    mask = torch.rand(8, 3, generator=torch.Generator().manual_seed(4)) > 0.4
    if form == "mask":
        ids = torch.where(mask, ids, 0)  # expert 0 named by masked slots only
        prob = dict(prob, expert_ids=ids, slot_mask=mask)
    else:
        prob = dict(prob, expert_ids=torch.where(mask, ids, -1))
    dy = torch.randn(8, 10, generator=torch.Generator().manual_seed(5))
    y, grads = run_with_grads(fn, prob, dy, **kw)
    beta = prob["angle_bias"].clone()
    beta[0] = float("inf")
    y_bad, grads_bad = run_with_grads(fn, dict(prob, angle_bias=beta), dy, **kw)
    torch.testing.assert_close(y_bad, y, rtol=0, atol=0)
    for name, g in grads_bad.items():
        torch.testing.assert_close(g, grads[name], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lora_rows_only_masked_slots_name_are_never_used(backend):
    """angle_bias of expert 0, named only by masked slots, is inf: the result and every
    gradient but that row's own stay as with a finite row. (Non-finite lora_A / lora_B of an
    expert no active slot uses reach every token through the all-experts GEMMs, masked or
    not, as in the reference for lora_A: issue #26's separate "non-finite parameters" item.)"""
    prob = make_lora_problem(8, 3, 8, 6, 2, 3, ids=True, bias=True, seed=41)
    E = prob["lora_A"].shape[0]
    mask = torch.rand(8, 3, generator=torch.Generator().manual_seed(6)) > 0.4
    ids = torch.where(mask, prob["expert_ids"] % (E - 1) + 1, 0)
    prob = dict(prob, expert_ids=ids, slot_mask=mask)
    dy = torch.randn(8, 6, generator=torch.Generator().manual_seed(7))
    from lora_helpers import lora_run
    y, grads = lora_run(radar_gate_lora, prob, dy, backend=backend)
    bad = dict(prob)
    bad["angle_bias"] = bad["angle_bias"].clone()
    bad["angle_bias"][0] = float("inf")
    y_bad, grads_bad = lora_run(radar_gate_lora, bad, dy, backend=backend)
    torch.testing.assert_close(y_bad, y, rtol=0, atol=0)
    for name, g in grads_bad.items():
        torch.testing.assert_close(g, grads[name], rtol=0, atol=0, msg=name)


def test_radar_gate_function_takes_ids_without_angle_bias():
    """RadarGateFunction.apply (the kernels' autograd Function) with ids >= K and no angle_bias:
    the ids pick nothing, so they must not mask (nor index) anything; a negative one masks."""
    from radargate_kernels import RadarGateFunction
    prob = make_problem(6, 2, 10, 3, dtype=torch.float64, ids=True, E_extra=6, seed=51)
    ids = prob["expert_ids"].clone()
    ids[0, 0] = 7
    ids[1, 1] = -1
    y = RadarGateFunction.apply(prob["expert_out"], prob["weights"], prob["rot_down"],
                                prob["rot_up"], None, ids, prob["tau"], 1e-6)
    y_ref = radar_gate_reference(prob["expert_out"], prob["weights"], prob["rot_down"],
                                 prob["rot_up"], None, ids, prob["tau"])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
