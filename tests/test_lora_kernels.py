"""The fused layer's down-projection and relation kernels against their PyTorch definitions
(``reference.lora_down`` and its autograd; ``lora.relation_lowrank``), on fresh random inputs,
and what they read (x once, s once). The whole op through these kernels is checked against the
reference composition in test_lora.py. To add a shape: append to DOWN_CASES / RELATION_CASES.
"""
import zlib

import pytest
import torch

from radargate_kernels import lora
from radargate_kernels.kernels import lora_launch as LL
from radargate_kernels.reference import lora_down
from tolerances import assert_matches

DOWN_CASES = [
    # T, E, in, r
    (5, 3, 12, 4),     # odd E, E * r < one column block
    (1, 1, 7, 1),      # one token, one expert, r = 1
    (0, 2, 8, 3),      # T = 0: dA = 0
    (70, 8, 130, 8),   # several token / input blocks, ragged tails (64 + 64 + 2)
    (9, 40, 16, 8),    # E * RP = 320: five column blocks (the paper's 40 experts)
    (6, 5, 9, 17),     # r = 17 padded to 32
    (140, 2, 200, 20),  # E * RP = 64 with RP = 32: the dA kernel writes dx too (64-row blocks)
]
RELATION_CASES = [
    # T, K, E, r, rg, ids
    (1, 1, 1, 3, 2, False),    # K = 1: d = 0
    (5, 3, 3, 5, 7, False),    # odd K, odd ranks
    (7, 2, 8, 8, 8, True),     # top-2 of 8
    (4, 6, 5, 1, 1, True),     # r = 1, K > E (repeated ids)
    (3, 16, 16, 4, 4, False),  # F = 64: the largest tile, two column chunks
    (5, 4, 4, 8, 3, False),    # F = 32: one chunk (s read once)
    (0, 4, 4, 2, 2, False),    # T = 0
    (70, 4, 4, 4, 3, False),   # several programs, partial last block
]


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _down_ref(x, A, scaling, ct, dy):
    xs, As = x.to(ct).detach().requires_grad_(True), A.to(ct).detach().requires_grad_(True)
    s = lora_down(xs, As, None, scaling)
    s.backward(dy.to(ct))
    return s.detach(), xs.grad, As.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", DOWN_CASES, ids=lambda c: "T{}-E{}-in{}-r{}".format(*c))
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)],
                         ids=["dx+dA", "dx", "dA"])
@pytest.mark.parametrize("topk", [None, 3], ids=["dense", "top3"])
def test_down_projection_kernels_match_lora_down_and_its_gradients(case, dtype, need, topk):
    """s, dx and dA; with both gradients, E r <= 64 and r padded > 16 (64-row input blocks) the
    dA kernel also writes dx. Top-k:
    the kernels take the slots' ds [T, K, r] and ids (repeats included) and add each slot to
    its expert's columns themselves."""
    T, E, fin, r = case
    gen = _gen(case, str(dtype), topk)
    # non-contiguous x (every other column of a wider tensor) and lora_A stored [E, r, in]
    x = torch.randn(T, 2 * fin, generator=gen, dtype=torch.float64)[:, ::2].to(dtype)
    A = (torch.randn(E, r, fin, generator=gen, dtype=torch.float64) * fin ** -0.5).to(dtype)
    A = A.transpose(1, 2)
    ids = None if topk is None else torch.randint(0, E, (T, topk), generator=gen)
    ds = torch.randn(T, E if topk is None else topk, r, generator=gen, dtype=torch.float64)
    dS = ds if ids is None else lora.slots_to_experts(ds, ids, E)  # exact in float64
    scaling = 0.75
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    x0, A0 = x.clone(), A.clone()
    s = LL.down_forward(x, A, scaling, ct)
    (dx, dA), launches = LL.plan_down_backward(ds.to(ct).contiguous(), ids, x, A, scaling,
                                               *need)
    for launch in launches:
        launch.run()
    names = [la.kernel.fn.__name__ for la in launches]
    merged = all(need) and E * LL._pow2(r) <= 64 and LL._pow2(r) > 16 and ids is None
    if T and fin:
        assert ("lora_down_dx_kernel" in names) == (need[0] and not merged), names
    assert torch.equal(x, x0) and torch.equal(A, A0)  # inputs never mutated
    s_ref, dx_ref, dA_ref = _down_ref(x, A, scaling, ct, dS)
    s_true, dx_true, dA_true = _down_ref(x, A, scaling, torch.float64, dS)
    assert s.dtype == ct
    assert_matches("s", s, s_ref, s_true, ct)
    if need[0]:
        assert dx.dtype == dtype and dx.shape == x.shape
        assert_matches("dx", dx, dx_ref.to(dtype), dx_true, dtype)
    else:
        assert dx is None
    if need[1]:
        assert dA.dtype == dtype and dA.shape == A.shape
        assert_matches("dA", dA, dA_ref.to(dtype), dA_true, dtype)
    else:
        assert dA is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", RELATION_CASES,
                         ids=lambda c: "T{}-K{}-E{}-r{}-rg{}".format(*c) + ("-ids" if c[5] else ""))
def test_relation_kernel_matches_relation_lowrank(case, dtype):
    T, K, E, r, rg, ids = case
    gen = _gen(case, str(dtype))
    s = torch.randn(T, K, r, generator=gen, dtype=torch.float64)
    if T > 1:
        s[1, 0] = 0.0       # a zero row: n = eps, its cosines 0
    if T > 2 and K > 1:
        s[2, 1] *= 1e20     # a huge row: the Gram matrix of rows scaled by max|s| stays finite
    s = s.to(dtype)
    e = torch.randint(0, E, (T, K), generator=gen) if ids else None
    B = torch.randn(E, r, 12, generator=gen, dtype=torch.float64).to(dtype)
    A_rot = (torch.randn(12, rg, generator=gen, dtype=torch.float64) * 12 ** -0.5).to(dtype)
    tau = 0.3 + float(torch.rand((), generator=gen))
    assert LL.relation_fits(K, E, r, ids)
    P, Q = lora.lowrank_factors(B, A_rot, dtype)
    d = LL.relation(s, e, P.contiguous(), Q.contiguous(), tau, 1e-6)
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
@pytest.mark.parametrize("case", [c for c in RELATION_CASES if c[1] <= 8],
                         ids=lambda c: "T{}-K{}-E{}-r{}-rg{}".format(*c) + ("-ids" if c[5] else ""))
def test_relation_backward_kernel_matches_autograd_of_relation_lowrank(case, dtype, groups,
                                                                      monkeypatch):
    """With "many", every token block is its own program (partials of dP, dQ summed on the
    host); with "one", a single program (its partial is the result)."""
    T, K, E, r, rg, ids = case
    monkeypatch.setattr(LL, "param_groups", lambda n_blocks, n_chunks, device: (
        n_blocks if groups == "many" else 1))
    gen = _gen(case, str(dtype), "bwd")
    s = torch.randn(T, K, r, generator=gen, dtype=torch.float64)
    if T > 1:
        s[1, 0] = 0.0
    s = s.to(dtype)
    e = torch.randint(0, E, (T, K), generator=gen) if ids else None
    B = torch.randn(E, r, 12, generator=gen, dtype=torch.float64).to(dtype)
    A_rot = (torch.randn(12, rg, generator=gen, dtype=torch.float64) * 12 ** -0.5).to(dtype)
    dd = torch.randn(T, K, rg, generator=gen, dtype=torch.float64).to(dtype)
    ds0 = torch.randn(T, K, r, generator=gen, dtype=torch.float64).to(dtype)  # streaming part
    tau = 0.3 + float(torch.rand((), generator=gen))
    assert LL.relation_backward_fits(K, E, r, ids)
    P, Q = lora.lowrank_factors(B, A_rot, dtype)
    ds = ds0.clone()
    s0 = s.clone()
    (PP, *_), _ = LL.plan_relation_backward(s, e, P.contiguous(), Q.contiguous(), dd, ds.clone(),
                                            tau, 1e-6)
    n_blocks = -(-T // max(1, LL.RELATION_ROWS_BWD // LL._pow2(K)))
    assert PP.shape[0] == (max(1, n_blocks) if groups == "many" else 1)
    dP, dQ, bad = LL.relation_backward(s, e, P.contiguous(), Q.contiguous(), dd, ds, tau, 1e-6)
    assert not bad.any()  # every input finite
    assert torch.equal(s, s0)
    refs = _relation_grads(s, e, P, Q, tau, dd)
    P64, Q64 = lora.lowrank_factors(B.double(), A_rot.double(), torch.float64)
    truths = _relation_grads(s.double(), e, P64, Q64, tau, dd.double())
    for name, got, ref, truth, base in (("ds", ds, refs[0], truths[0], ds0),
                                        ("dP", dP, refs[1], truths[1], None),
                                        ("dQ", dQ, refs[2], truths[2], None)):
        if base is not None:  # ds held the streaming part on entry: the kernel adds to it
            ref, truth = base + ref, base.double() + truth
        assert_matches(name, got, ref, truth, dtype)


def test_relation_kernel_limit_and_fallback():
    # F = (E, or K) padded x r padded <= 64 and K <= 32 (its R x R tiles): the register budget
    assert LL.relation_fits(8, 8, 8, False) and not LL.relation_fits(9, 9, 8, False)
    assert LL.relation_fits(2, 4, 16, True) and not LL.relation_fits(2, 5, 16, True)
    assert LL.relation_fits(32, 64, 1, True) and not LL.relation_fits(33, 2, 1, True)
    assert not LL.relation_fits(40, 40, 8, False)  # the paper's 40 experts: PyTorch part
    # the backward kernel holds more tiles: K <= 8 (else autograd through relation_lowrank)
    assert LL.relation_backward_fits(8, 8, 8, False) and not LL.relation_backward_fits(
        9, 2, 1, True)


@pytest.mark.parametrize("K, E", [(4, 4), (4, 8)], ids=["one-chunk", "two-chunks"])
def test_down_and_relation_kernels_read_their_inputs_once(K, E):
    from benchmarks.cost_report import count_triton
    # E * r = 32: one column block of the GEMM and one column chunk of the relation kernel;
    # E * r = 64 (top-4 of 8): two chunks of P_flat (forward), four (backward), s read once
    T, fin, r, rg = 40, 96, 8, 8
    ids = None if K == E else torch.randint(0, E, (T, K), generator=_gen("ids"))
    assert LL.relation_s_in_registers(False, K, E * r, rg)
    assert LL.relation_s_in_registers(True, K, E * r, rg)
    gen = _gen("bytes")
    x = torch.randn(T, fin, generator=gen).to(torch.bfloat16)
    A = torch.randn(E, fin, r, generator=gen).to(torch.bfloat16)
    B = torch.randn(E, r, 16, generator=gen)
    P, Q = lora.lowrank_factors(B, torch.randn(16, rg, generator=gen), torch.float32)
    with count_triton() as kc:
        s_all = LL.down_forward(x, A, 1.0, torch.float32)
    s = s_all if ids is None else torch.gather(s_all, 1, ids[..., None].expand(-1, -1, r))
    with count_triton() as kr:
        d = LL.relation(s.contiguous(), ids, P.contiguous(), Q.contiguous(), 1.0, 1e-6)
        LL.relation_backward(s.contiguous(), ids, P.contiguous(), Q.contiguous(),
                             torch.randn_like(d), torch.zeros_like(s), 1.0, 1e-6)
    sb = T * K * r * 4
    assert kc.by_arg[("lora_down_fwd_kernel", "X")] == [T * fin * 2, 0]
    assert kc.by_arg[("lora_down_fwd_kernel", "S")] == [0, T * E * r * 4]
    assert kr.by_arg[("lora_relation_kernel", "S")] == [sb, 0]
    assert kr.by_arg[("lora_relation_kernel", "DD")] == [0, T * K * rg * 4]
    assert kr.by_arg[("lora_relation_bwd_kernel", "S")] == [sb, 0]
    assert kr.by_arg[("lora_relation_bwd_kernel", "DS")] == [sb, sb]  # += the relation part


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("E, r, out, rg", [(1, 1, 2, 1), (3, 5, 70, 7), (8, 8, 130, 8),
                                           (2, 32, 64, 64)])
def test_factor_kernels_match_lowrank_factors_and_their_gradients(E, r, out, rg, dtype):
    gen = _gen(E, r, out, rg, str(dtype), "factors")
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    # lora_B stored [E, out, r] (non-contiguous view), rot_down contiguous
    B = torch.randn(E, out, r, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
    A_rot = (torch.randn(out, rg, generator=gen, dtype=torch.float64) * out ** -0.5).to(dtype)
    dP = torch.randn(E, r, E, r, generator=gen, dtype=torch.float64).to(ct)
    dQ = torch.randn(E, r, rg, generator=gen, dtype=torch.float64).to(ct)
    P, Q = LL.factors(B, A_rot, ct)
    bad = torch.zeros(LL.relation_columns(E, E, r, True), dtype=torch.int32)
    dB, dA = LL.factors_backward(dP, dQ, bad, B, A_rot, ct)
    P_ref, Q_ref = lora.lowrank_factors(B, A_rot, ct)
    dB_ref, dA_ref = lora.factors_backward(dP, dQ, B.to(ct), A_rot.to(ct))
    P64, Q64 = lora.lowrank_factors(B.double(), A_rot.double(), torch.float64)
    dB64, dA64 = lora.factors_backward(dP.double(), dQ.double(), B.double(), A_rot.double())
    for name, got, ref, truth in (("P", P, P_ref, P64), ("Q", Q, Q_ref, Q64),
                                  ("dB", dB, dB_ref, dB64), ("drot_down", dA, dA_ref, dA64)):
        assert got.shape == truth.shape and got.is_contiguous()
        assert_matches(name, got, ref, truth, ct)


PARAMS_CASES = [
    # T, K, E, out, r, rg, ids, angle_bias
    (5, 3, 3, 70, 5, 7, False, True),    # odd K and ranks; 35 pairs: two chunks, ragged tail
    (7, 2, 8, 16, 8, 8, True, True),     # top-2 of 8: F = 64, the widest tile
    (4, 6, 5, 2, 1, 1, True, False),     # r = 1, D = 2, K > E (repeated ids), no angle bias
    (1, 1, 1, 4, 3, 2, False, True),     # one token, K = 1
    (0, 4, 4, 8, 2, 2, False, True),     # T = 0: only the relation part
    (3, 16, 16, 12, 4, 4, False, True),  # K = 16: one token per program
    (5, 8, 8, 40, 8, 8, False, True),    # dense F = 64: all 8 experts in one program, per slot
    (3, 2, 2, 20, 32, 3, False, False),  # dense r = 32: per slot, half the F in each slot
]


def _params_problem(case, dtype, gen):
    """Inputs of the parameter gradients: s, d (compute dtype), g, dy, lora_B (non-contiguous),
    rot_up, angle_bias (dtype) and the relation part's dP, dQ, rot_down."""
    T, K, E, out, r, rg, ids, has_beta = case
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    h = out // 2

    def rnd(*shape, scale=1.0, to=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(to)
    p = dict(s=rnd(T, K, r, to=ct), d=rnd(T, K, rg, to=ct), g=rnd(T, K),
             ids=torch.randint(0, E, (T, K), generator=gen) if ids else None,
             B=rnd(E, out, r).transpose(1, 2), U=rnd(rg, h), beta=rnd(E, h) if has_beta else None,
             dy=rnd(T, out), dP=rnd(E, r, E, r, to=ct), dQ=rnd(E, r, rg, to=ct),
             A_rot=rnd(out, rg, scale=out ** -0.5))
    if T > 1:
        p["s"][1, 0] = 0.0  # a zero row
    return p, ct


def _params_grads(p, ct):
    """(dB, drot_up, dangle_bias, drot_down) in ct: autograd through lora.stream_torch plus
    lora.factors_backward (the relation part)."""
    leaves = [t.detach().to(ct).requires_grad_(True) if t is not None else None
              for t in (p["B"], p["U"], p["beta"])]
    y = lora.stream_torch(p["s"].to(ct), p["g"].to(ct), p["d"].to(ct), p["ids"], *leaves)
    live = [t for t in leaves if t is not None]
    grads = list(torch.autograd.grad(y, live, p["dy"].to(ct), materialize_grads=True))
    dB_rel, dA_rot = lora.factors_backward(p["dP"].to(ct), p["dQ"].to(ct), p["B"].to(ct),
                                           p["A_rot"].to(ct))
    grads[0] = grads[0] + dB_rel
    return grads[0], grads[1], grads[2] if p["beta"] is not None else None, dA_rot


def _params_abs_scale(p):
    """max of sum_t |token t's contribution| per gradient (tolerances.py: sums over tokens)."""
    zero = dict(p, dP=torch.zeros_like(p["dP"]), dQ=torch.zeros_like(p["dQ"]))
    acc = [g.abs() if g is not None else None for g in _params_grads(
        dict(p, s=p["s"][:0], d=p["d"][:0], g=p["g"][:0], dy=p["dy"][:0],
             ids=p["ids"][:0] if p["ids"] is not None else None), torch.float64)]
    for t in range(p["s"].shape[0]):
        sub = dict(zero, s=p["s"][t:t + 1], d=p["d"][t:t + 1], g=p["g"][t:t + 1],
                   dy=p["dy"][t:t + 1], ids=p["ids"][t:t + 1] if p["ids"] is not None else None)
        acc = [a + g.abs() if a is not None else None
               for a, g in zip(acc, _params_grads(sub, torch.float64))]
    return [float(a.max()) if a is not None and a.numel() else None for a in acc]


@pytest.mark.parametrize("groups", ["one", "many"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", PARAMS_CASES, ids=lambda c: "T{}-K{}-E{}-D{}-r{}-rg{}".format(
    *c) + ("-ids" if c[6] else "") + ("" if c[7] else "-nobias"))
def test_packed_parameter_kernel_matches_autograd_of_stream_torch(case, dtype, groups,
                                                                 monkeypatch):
    """lora_bwd_params_packed_kernel: dB (streaming + relation part), drot_up, dangle_bias and
    drot_down against autograd through the PyTorch streaming part and factors_backward; with
    "many", every token block is its own group (partials summed on the host)."""
    T, K, E, out, r, rg, ids, _ = case
    assert LL.packed_params_fits(K, E, r, ids)
    if groups == "many":
        monkeypatch.setattr(LL, "PACKED_GROUP_TOKENS", 1)
        monkeypatch.setattr(LL, "param_groups", lambda n_blocks, n_chunks, device: n_blocks)
    gen = _gen(case, str(dtype), "params")
    p, ct = _params_problem(case, dtype, gen)
    before = {k: v.clone() for k, v in p.items() if v is not None}
    bad = torch.zeros(LL.relation_columns(K, E, r, ids), dtype=torch.int32)
    got = LL.params_backward_packed(p["dy"], p["s"], p["g"], p["d"], p["ids"], p["B"], p["U"],
                                    p["beta"], p["dP"], p["dQ"], bad, p["A_rot"])
    (pB, *_), _ = LL.plan_params_backward_packed(
        p["dy"], p["s"], p["g"], p["d"], p["ids"], p["B"], p["U"], p["beta"], p["dP"], p["dQ"],
        bad, p["A_rot"])
    n_blocks = -(-T // max(1, LL.PACKED_ROWS // LL._pow2(K)))
    assert pB.shape[0] == (max(1, n_blocks) if groups == "many" else 1)
    assert all(torch.equal(v, p[k]) for k, v in before.items())  # inputs not mutated
    refs = _params_grads(p, ct)
    truths = _params_grads({k: (v.double() if torch.is_tensor(v) and v.is_floating_point()
                                else v) for k, v in p.items()}, torch.float64)
    scales = _params_abs_scale({k: (v.double() if torch.is_tensor(v) and v.is_floating_point()
                                    else v) for k, v in p.items()})
    for name, g_, ref, truth, scale in zip(("dB", "drot_up", "dangle_bias", "drot_down"), got,
                                           refs, truths, scales):
        if truth is None:
            assert g_ is None, name
            continue
        assert g_.dtype == ct and g_.shape == truth.shape, name
        assert_matches(name, g_, ref, truth, ct, scale=scale)


@pytest.mark.parametrize("ids", [False, True], ids=["dense", "topk"])
def test_forward_kernel_reads_s_and_d_once_per_program_of_two_chunks(ids):
    from benchmarks.cost_report import count_triton
    # out / 2 = 600 pairs: chunks of 256, two per program -> 2 column programs (the second
    # one's first chunk runs past the end and its second lies beyond it: masked); s and d read
    # once per program, y once; 20 tokens: blocks of 8, the last one partial
    T, K, E, r, rg, out = 20, 3, 5, 5, 3, 1200
    gen = _gen("fwd-bytes", ids)
    s = torch.randn(T, K, r, generator=gen)
    d = torch.randn(T, K, rg, generator=gen)
    g = torch.randn(T, K, generator=gen).to(torch.bfloat16)
    e = torch.randint(0, E, (T, K), generator=gen) if ids else None
    B = torch.randn(E if ids else K, r, out, generator=gen).to(torch.bfloat16)
    U = torch.randn(rg, out // 2, generator=gen).to(torch.bfloat16)
    beta = torch.randn(E if ids else K, out // 2, generator=gen).to(torch.bfloat16)
    cfg = LL.pick_lora_config(r, rg, out // 2)
    assert cfg.BH_FWD == 256 and cfg.BT_FWD == 8
    with count_triton() as kc:
        y = LL.stream_forward(s, g, d, e, B, U, beta, torch.bfloat16)
    assert kc.launches["lora_fwd_kernel"] == 1
    assert kc.by_arg[("lora_fwd_kernel", "S")] == [2 * T * K * r * 4, 0]
    assert kc.by_arg[("lora_fwd_kernel", "D")] == [2 * T * K * rg * 4, 0]
    assert kc.by_arg[("lora_fwd_kernel", "Y")] == [0, T * out * 2]
    ref = lora.stream_torch(s, g.float(), d, e, B.float(), U.float(), beta.float())
    truth = lora.stream_torch(s.double(), g.double(), d.double(), e, B.double(), U.double(),
                              beta.double())
    assert_matches("y", y, ref.to(torch.bfloat16), truth, torch.bfloat16)
