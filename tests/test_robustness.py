"""Issue #5 hardening: 64-bit offsets, non-finite values, threads, devices."""
import threading

import pytest
import torch
import triton
import triton.language as tl

from radargate_kernels import radar_gate, radar_gate_reference
from radargate_kernels.kernels.tile import block_rows
from helpers import make_problem
from tolerances import assert_matches


@triton.jit
def _offsets_probe(OUT, blk, T, K, h, s_t, s_k, s_d, BT: tl.constexpr, SK: tl.constexpr,
                   BH: tl.constexpr):
    # the kernels' own row helper and offset arithmetic (tile.load_pairs), for token block blk
    tok, slot, valid = block_rows(blk, 0, T, K, BT, SK)
    cols = tl.arange(0, BH)
    row_off = tok * s_t + slot.to(tl.int64) * s_k
    c = cols[None, :].to(tl.int64)
    R: tl.constexpr = BT * SK
    idx = tl.arange(0, R)[:, None] * BH + cols[None, :]
    tl.store(OUT + idx, row_off[:, None] + c * s_d)   # as tile.load_pairs computes them
    tl.store(OUT + R * BH + idx, row_off[:, None] + (c + h) * s_d)


@pytest.mark.parametrize("layout", ["contiguous", "feature_major"])
def test_index_arithmetic_is_64_bit_past_2_pow_31(layout):
    # T * K * D = 2^31 + ... elements: the last token block's offsets exceed int32. Only the
    # index helpers run (no 8 GiB tensor); int32 arithmetic would wrap in the interpreter.
    K, D, KP, BT, BH = 8, 4096, 8, 4, 16
    h = D // 2
    T = (2 ** 32) // (K * D) + 9
    if layout == "contiguous":
        s_t, s_k, s_d = K * D, D, 1
    else:  # [D, T, K] storage viewed as [T, K, D]: the h * s_d term alone exceeds 2^31
        s_t, s_k, s_d = K, 1, T * K
    blk = (T - 1) // BT
    out = torch.empty(2 * BT * KP * BH, dtype=torch.int64)
    _offsets_probe[(1,)](out, blk, T, K, h, s_t, s_k, s_d, BT=BT, SK=KP, BH=BH)
    off1, off2 = out.view(2, BT * KP, BH)
    for a in range(BT * KP):
        tok, slot = blk * BT + a // KP, a % KP
        for c in (0, 5, BH - 1):
            want = tok * s_t + slot * s_k + c * s_d
            assert int(off1[a, c]) == want
            assert int(off2[a, c]) == want + h * s_d
    assert int(off2.max()) >= 2 ** 31


@pytest.mark.parametrize("K", [3, 40], ids=["K3", "K40"])  # K = 40: two slot chunks per token
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["expert_out", "weights"])
def test_non_finite_values_propagate_like_the_reference(bad, where, K):
    p = make_problem(6, K, 10, 2, bias=True, ids=True, seed=4)
    p[where] = p[where].clone()
    p[where][2, 1] = bad  # token 2 only: tokens are independent
    y_k = radar_gate(**p, backend="triton")
    y_r = radar_gate_reference(**p)
    assert torch.equal(torch.isnan(y_k), torch.isnan(y_r))
    assert torch.equal(torch.isinf(y_k), torch.isinf(y_r))
    finite = torch.isfinite(y_r)
    assert not finite[2].all() and finite[[0, 1, 3, 4, 5]].all()
    torch.testing.assert_close(y_k[finite], y_r[finite], rtol=1e-5, atol=1e-5)
    # gradients of the other tokens: no leak through shared tiles -- bitwise those of the same
    # problem with token 2 finite -- and within the tolerance table of the float64 truth
    dy = torch.randn(y_r.shape, generator=torch.Generator().manual_seed(5))
    good = [0, 1, 3, 4, 5]

    def dv(fn, q, **kw):
        V = q["expert_out"].clone().requires_grad_(True)
        return torch.autograd.grad(fn(**dict(q, expert_out=V), **kw), V, dy.to(V.dtype))[0][good]
    dv_k = dv(radar_gate, p, backend="triton")
    assert torch.isfinite(dv_k).all()
    clean = make_problem(6, K, 10, 2, bias=True, ids=True, seed=4)
    assert torch.equal(dv_k, dv(radar_gate, clean, backend="triton"))
    p64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
           for k, v in p.items()}
    assert_matches("dV of the other tokens", dv_k, dv(radar_gate_reference, p),
                   dv(radar_gate_reference, p64), torch.float32)


def test_non_finite_angle_bias_gives_non_finite_only_where_used():
    p = make_problem(4, 2, 6, 2, bias=True, ids=True, seed=2)
    p["angle_bias"] = p["angle_bias"].clone()
    p["angle_bias"][p["expert_ids"][1, 0]] = float("nan")
    y_k = radar_gate(**p, backend="triton")
    y_r = radar_gate_reference(**p)
    assert torch.equal(torch.isnan(y_k), torch.isnan(y_r))
    assert torch.isnan(y_k[1]).any()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_concurrent_calls_from_threads_give_correct_results(backend):
    problems = [make_problem(5, 3, 10, 2, bias=True, ids=True, seed=s) for s in range(6)]
    expected = [radar_gate_reference(**p) for p in problems]
    results, errors = [None] * len(problems), []

    def work(i):
        try:
            for _ in range(2):
                results[i] = radar_gate(**problems[i], backend=backend)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for y, e in zip(results, expected):
        torch.testing.assert_close(y, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("arg", ["weights", "rot_down", "rot_up"])
def test_mixed_devices_are_rejected(arg, backend):
    p = make_problem(3, 2, 6, 2, seed=0)
    p[arg] = p[arg].to("meta")
    with pytest.raises(ValueError, match=f"{arg}: expected device cpu"):
        radar_gate(**p, backend=backend)
