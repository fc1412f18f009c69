"""The fused RadarGate-LoRA op (``radar_gate_lora``) against the reference composition
``LoRA expert outputs -> radar_gate_reference``: forward and every gradient, both backends.

Edges: K = 1, odd K, prime out/2, out = 2, T = 0 / 1, r = 1, sparse ids with repeats, angle bias,
rotation off (weighted sum), K = 64 / E = 128 / r = rg = 64 on the Triton path. To add a shape:
append (T, K, in, out, r, rg, ids, bias, rotation) to CASES.
"""
import zlib

import pytest
import torch

from radargate_kernels import radar_gate_lora
from radargate_kernels.lora import balance_factors
from radargate_kernels.reference import radar_gate_lora_reference
from lora_helpers import check_lora_against_reference, lora_run, make_lora_problem

CASES = [
    # T, K, in, out, r, rg, ids, bias, rotation
    (5, 3, 12, 10, 4, 3, False, True, True),     # odd K, prime out/2 = 5
    (1, 1, 7, 6, 2, 2, False, True, True),       # K = 1 (only the bias rotates), one token
    (0, 4, 8, 8, 3, 2, True, True, True),        # T = 0
    (9, 2, 6, 2, 1, 1, True, False, True),       # out = 2 (one pair), r = 1, top-2 style ids
    (37, 8, 16, 34, 8, 8, True, True, True),     # partial token block, prime out/2 = 17
    (17, 5, 10, 70, 3, 5, False, False, True),   # out/2 = 35 > one chunk? (BH = 64: one)
    (6, 4, 9, 12, 5, 3, True, False, False),     # rotation off: weighted sum, sparse
    (7, 3, 9, 11, 2, 0, False, False, False),    # rotation off, odd out
    (5, 2, 8, 260, 4, 4, True, True, True),      # out/2 = 130: several chunks, ragged tail
    (3, 16, 8, 6, 4, 4, False, True, True),      # K = 16, r = 4: the relation kernel's widest tile
    (4, 5, 8, 10, 17, 3, True, True, True),      # E r = 7 x 17: past the relation kernel (PyTorch)
]
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _id(c):
    T, K, fin, out, r, rg, ids, bias, rot = c
    return (f"T{T}-K{K}-in{fin}-out{out}-r{r}-rg{rg}" + ("-ids" if ids else "")
            + ("-bias" if bias else "") + ("" if rot else "-norot"))


def _problem(case, dtype, seed_extra=""):
    T, K, fin, out, r, rg, ids, bias, rot = case
    seed = zlib.crc32(repr((case, str(dtype), seed_extra)).encode())
    prob = make_lora_problem(T, K, fin, out, r, rg, dtype=dtype, ids=ids, bias=bias,
                             rotation=rot, seed=seed)
    dy = torch.randn(T, out, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(dtype)
    return prob, dy


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_and_gradients_match_reference_composition(case, dtype, backend):
    prob, dy = _problem(case, dtype)
    check_lora_against_reference(prob, dy, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("ids", [False, True])
def test_gradcheck_float64(backend, ids):
    prob = make_lora_problem(3, 3, 4, 6, 2, 2, dtype=torch.float64, ids=ids, bias=True, seed=5)
    names = [n for n in ("x", "lora_A", "lora_B", "weights", "rot_down", "rot_up", "angle_bias")]
    leaves = [prob[n].clone().requires_grad_(True) for n in names]
    rest = {k: v for k, v in prob.items() if k not in names}

    def f(*xs):
        return radar_gate_lora(**dict(zip(names, xs)), **rest, backend=backend)

    # the Triton path in fast mode (v^T J u for random u, v: any wrong Jacobian entry shows,
    # almost surely), as PyTorch's OpInfo tests do: the full Jacobian took 300 s interpreted
    assert torch.autograd.gradcheck(f, leaves, fast_mode=backend == "triton")


@pytest.mark.parametrize("ids", [False, True], ids=["dense", "topk"])
def test_large_k_e_and_ranks_on_the_triton_path(ids):
    # K = 64 slots (dense: E = 64; top-k: 64 of E = 72 experts), r = rg = 64 in bf16 (fp32:
    # r = 64 with rg = 16, the widest pair its wider dots compile without spills). (E = 128 took
    # 100 s here, mostly the reference ensemble's P = B B^T of 128^2 64^2 values; the kernels'
    # expert loops are the same at 72.)
    K = 64
    for dtype, rg in ((torch.bfloat16, 64), (torch.float32, 16)):
        prob = make_lora_problem(2, K, 5, 4, 64, rg, dtype=dtype, ids=ids, bias=True,
                                 E_extra=8, seed=3)
        assert prob["lora_A"].shape[0] == (72 if ids else 64)
        dy = torch.randn(2, 4, generator=torch.Generator().manual_seed(4)).to(dtype)
        check_lora_against_reference(prob, dy, backend="triton")


def test_ranks_beyond_the_kernels_run_the_pytorch_path_on_auto_and_raise_on_triton():
    from radargate_kernels.lora import _resolve_backend
    x = torch.zeros(2, 4)
    for dtype, ranks in ((torch.float32, (64, 64)), (torch.float16, (64, 32)),
                         (torch.bfloat16, (65, 8))):
        with pytest.raises(ValueError, match="ranks"):
            _resolve_backend("triton", x.to(dtype), True, ranks)
        assert _resolve_backend("auto", x.to(dtype), True, ranks) == "torch"
    assert _resolve_backend("triton", x.to(torch.bfloat16), True, (64, 64)) == "triton"


@pytest.mark.parametrize("ranks", [(65, 8), (8, 72), (128, 96)])
def test_ranks_beyond_the_kernels_match_the_reference(ranks):
    """Issue #26: r, rg > 64 are accepted and run (the PyTorch path on "auto")."""
    r, rg = ranks
    prob = make_lora_problem(5, 3, 8, 6, r, rg, dtype=torch.float64, ids=True, bias=True,
                             seed=r + rg)
    dy = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    check_lora_against_reference(prob, dy, backend="auto")
    with pytest.raises(ValueError, match="ranks"):
        radar_gate_lora(**prob, backend="triton")


def test_more_than_64_slots_on_the_triton_path():
    # K is a loop in the streaming kernels and a batch dimension of the relation map: no limit
    prob = make_lora_problem(2, 65, 4, 4, 2, 2, ids=True, bias=True, E_extra=3, seed=3)
    dy = torch.randn(2, 4, generator=torch.Generator().manual_seed(4))
    check_lora_against_reference(prob, dy, backend="triton")


def test_repeated_ids_within_a_token_are_separate_slots():
    prob = make_lora_problem(4, 3, 6, 8, 2, 2, ids=True, bias=True, seed=9)
    prob["expert_ids"] = torch.tensor([[1, 1, 1], [0, 2, 0], [4, 4, 3], [2, 2, 2]])
    dy = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    for backend in ("triton", "torch"):
        check_lora_against_reference(prob, dy, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_inputs_and_leading_dims(backend):
    gen = torch.Generator().manual_seed(2)
    E, fin, r, out, rg = 3, 6, 2, 8, 3
    x = torch.randn(2, fin + 3, 4, generator=gen).transpose(1, 2)[..., 1:1 + fin]  # [2, 4, fin]
    A = torch.randn(fin, E, r, generator=gen).permute(1, 0, 2)
    B = torch.randn(E, out, r, generator=gen).transpose(1, 2)
    g = torch.randn(1, 1, E, generator=gen).expand(2, 4, E)
    Ad = torch.randn(rg, out, generator=gen).t() * 0.3
    U = torch.randn(rg, out, generator=gen)[:, ::2]
    beta = torch.randn(out // 2, E, generator=gen).t()
    args = dict(x=x, lora_A=A, lora_B=B, weights=g, rot_down=Ad, rot_up=U, angle_bias=beta,
                tau=0.7, scaling=0.5)
    assert not any(v.is_contiguous() for v in args.values() if isinstance(v, torch.Tensor))
    contig = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    dy = torch.randn(2, 4, out, generator=gen)
    y_s, g_s = lora_run(radar_gate_lora, args, dy, backend=backend)
    y_r, g_r = lora_run(radar_gate_lora_reference, contig, dy)
    assert y_s.shape == (2, 4, out)
    torch.testing.assert_close(y_s, y_r, rtol=1e-5, atol=1e-5)
    for n in g_r:
        torch.testing.assert_close(g_s[n], g_r[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradients_are_bitwise_deterministic_and_inputs_unchanged(backend):
    # (determinism checked on the PyTorch path, whose CPU kernels run threaded; the Triton
    # kernels in the serial interpreter could not fail it: benchmarks/gpu_check.py on a GPU)
    prob, dy = _problem(CASES[4], torch.float32, "det")
    before = {k: v.clone() for k, v in prob.items() if isinstance(v, torch.Tensor)}
    y1, g1 = lora_run(radar_gate_lora, prob, dy, backend=backend)
    if backend == "torch":
        y2, g2 = lora_run(radar_gate_lora, prob, dy, backend=backend)
        assert torch.equal(y1, y2)
        for n in g1:
            assert torch.equal(g1[n], g2[n]), n
    for k, v in before.items():
        assert torch.equal(prob[k], v), f"{k} was modified"


def test_dropout_is_applied_to_x_before_the_experts():
    prob = make_lora_problem(6, 3, 8, 8, 2, 2, seed=4)
    torch.manual_seed(0)
    y = radar_gate_lora(**prob, dropout_p=0.5, training=True, backend="torch")
    torch.manual_seed(0)
    x_drop = torch.nn.functional.dropout(prob["x"], 0.5, True)
    y_r = radar_gate_lora_reference(**dict(prob, x=x_drop))
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    y_eval = radar_gate_lora(**prob, dropout_p=0.5, training=False, backend="torch")
    torch.testing.assert_close(y_eval, radar_gate_lora_reference(**prob), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_torch_compile_fullgraph_and_opcheck(backend):
    prob = make_lora_problem(5, 3, 6, 8, 2, 2, ids=True, bias=True, seed=8)
    dy = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    f = torch.compile(radar_gate_lora, fullgraph=True, backend="aot_eager")
    y_c, g_c = lora_run(f, prob, dy, backend=backend)
    y_e, g_e = lora_run(radar_gate_lora, prob, dy, backend=backend)
    torch.testing.assert_close(y_c, y_e)
    for n in g_e:
        torch.testing.assert_close(g_c[n], g_e[n])
    p = {k: (v.requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
             else v) for k, v in prob.items()}
    torch.library.opcheck(torch.ops.radargate.lora_fwd, (
        p["x"], p["lora_A"], p["lora_B"], p["weights"], p["rot_down"], p["rot_up"],
        p["angle_bias"], p["expert_ids"], balance_factors(p["lora_B"]), p["scaling"], p["tau"],
        1e-6, backend, True))


@pytest.mark.parametrize("over, exc, words", [
    (dict(lora_A=torch.zeros(3, 5, 2)), ValueError, ["lora_A", "in = 6"]),
    (dict(lora_B=torch.zeros(3, 3, 8)), ValueError, ["lora_B", "[3, 2, out]"]),
    (dict(weights=torch.zeros(4, 3)), ValueError, ["weights", "leading"]),
    (dict(weights=torch.zeros(5, 2)), ValueError, ["weights", "K = 2", "E = 3"]),
    (dict(expert_ids=torch.zeros(5, 2, dtype=torch.long)), ValueError, ["expert_ids", "shape"]),
    (dict(expert_ids=torch.full((5, 3), 3)), ValueError, ["expert_ids", "< 3", "maximum of 3"]),
    (dict(expert_ids=torch.zeros(5, 3)), TypeError, ["expert_ids", "integer"]),
    (dict(rot_down=torch.zeros(8, 0), rot_up=torch.zeros(0, 4)), ValueError,
     ["rot_down", "rg >= 1"]),
    (dict(rot_up=None), ValueError, ["rot_down, rot_up"]),
    (dict(rot_up=torch.zeros(2, 3)), ValueError, ["rot_up", "[2, 4]"]),
    (dict(angle_bias=torch.zeros(2, 4)), ValueError, ["angle_bias", "[3, 4]"]),
    (dict(lora_B=torch.zeros(3, 2, 8, dtype=torch.float64)), TypeError, ["lora_B", "float32"]),
    (dict(x=torch.zeros(5, 6, dtype=torch.int32)), TypeError, ["x", "dtype"]),
    (dict(tau=0.0), ValueError, ["tau"]),
    (dict(scaling=float("nan")), ValueError, ["scaling"]),
    (dict(backend="cuda"), ValueError, ["backend"]),
    (dict(recompute="yes"), TypeError, ["recompute", "None, True or False"]),
    (dict(training="false", dropout_p=0.0), TypeError, ["training", "True or False"]),
])
def test_bad_input_raises_clear_error(over, exc, words):
    prob = make_lora_problem(5, 3, 6, 8, 2, 2, bias=True, seed=1)
    prob.update(over)
    with pytest.raises(exc) as info:
        radar_gate_lora(**prob)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_odd_out_with_rotation_is_rejected():
    prob = make_lora_problem(2, 2, 4, 7, 2, 2, rotation=False, seed=1)
    prob.update(rot_down=torch.zeros(7, 2), rot_up=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="lora_B: expected an even output size"):
        radar_gate_lora(**prob)


@pytest.mark.parametrize("one_hot_max", [0, 10 ** 9], ids=["gather", "one-hot"])
def test_torch_path_expert_outputs_by_gather_and_by_one_hot_gemm(one_hot_max, monkeypatch):
    """The chunked PyTorch path forms a chunk's top-k expert outputs either by gathering B rows
    (E r > ONE_HOT_MAX) or as one GEMM over all experts' columns: both against the reference."""
    import radargate_kernels.lora as L
    monkeypatch.setattr(L, "ONE_HOT_MAX", one_hot_max)
    prob = make_lora_problem(7, 3, 10, 12, 4, 3, ids=True, bias=True, E_extra=9, seed=21)
    dy = torch.randn(7, 12, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    check_lora_against_reference(prob, dy.float(), backend="torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("ids", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_stays_in_its_token(bad, ids, backend):
    # tokens share tiles in every kernel (packed rows, Gram tiles, GEMM blocks): a non-finite
    # x of token 2 must leave the other tokens' outputs and input gradients as the reference's
    prob = make_lora_problem(6, 3, 8, 10, 4, 3, ids=ids, bias=True, seed=21)
    prob["x"] = prob["x"].clone()
    prob["x"][2, 1] = bad
    x_k = prob["x"].clone().requires_grad_(True)
    x_r = prob["x"].clone().requires_grad_(True)
    y_k = radar_gate_lora(**dict(prob, x=x_k), backend=backend)
    y_r = radar_gate_lora_reference(**dict(prob, x=x_r))
    good = [0, 1, 3, 4, 5]
    assert not torch.isfinite(y_k[2]).all() and not torch.isfinite(y_r[2]).all()
    assert torch.isfinite(y_k[good]).all()
    torch.testing.assert_close(y_k[good], y_r[good], rtol=1e-5, atol=1e-5)
    dy = torch.randn(y_r.shape, generator=torch.Generator().manual_seed(3))
    (dx_k,) = torch.autograd.grad(y_k, x_k, dy)
    (dx_r,) = torch.autograd.grad(y_r, x_r, dy)
    assert torch.isfinite(dx_k[good]).all()
    torch.testing.assert_close(dx_k[good], dx_r[good], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("ids", [True, False], ids=["topk", "dense"])
@pytest.mark.parametrize("where", ["dy", "x"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_token_reaches_only_the_experts_it_uses(bad, where, ids, backend):
    # top-3 of 9 experts: token 2's non-finite dy (or x) must make exactly the reference's
    # gradients non-finite (the experts it selected, and the sums over all tokens), nothing
    # else: the kernels reduce all slots of a tile in one dot, where 0 * nan would leak. Dense
    # (4 experts, r = 4: the parameter kernel's per-slot reduction): every expert is used, so
    # the pattern is the reference's over all of them
    prob = make_lora_problem(6, 3 if ids else 4, 8, 10, 4, 3, ids=ids, bias=True, E_extra=6,
                             seed=23)
    dy = torch.randn(6, 10, generator=torch.Generator().manual_seed(4))
    if where == "dy":
        dy[2, 7] = bad
    else:
        prob["x"] = prob["x"].clone()
        prob["x"][2, 1] = bad
    _, g_k = lora_run(lambda **kw: radar_gate_lora(**kw, backend=backend), prob, dy)
    _, g_r = lora_run(radar_gate_lora_reference, prob, dy)
    if ids:
        unused = sorted(set(range(9)) - set(prob["expert_ids"][2].tolist()))
        assert unused and torch.isfinite(g_r["lora_B"][unused]).all()
    bad = []
    for name, ref in g_r.items():
        got = g_k[name]
        fin = torch.isfinite(ref)
        if not torch.equal(torch.isfinite(got), fin):
            bad.append((name, int((~torch.isfinite(got)).sum()), int((~fin).sum()), fin.numel()))
            continue
        torch.testing.assert_close(got[fin], ref[fin], rtol=1e-4, atol=1e-5, msg=name)
    assert not bad, bad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("rotation", [True, False], ids=["rot", "weighted_sum"])
@pytest.mark.parametrize("param, used, bad", [
    ("lora_B", True, float("nan")), ("lora_B", False, float("inf")),
    ("lora_A", True, -float("inf")), ("lora_A", False, float("nan"))],
    ids=["B-used", "B-unused", "A-used", "A-unused"])
def test_non_finite_expert_weight_reaches_only_what_the_reference_gives_it(param, used, bad,
                                                                           rotation, backend):
    # one non-finite entry in one expert's A or B, top-2 of 8: the output and every gradient
    # are non-finite exactly where the reference's are, and equal to it elsewhere. The
    # reference gathers B per slot, so an expert no token uses leaves y and dx finite; the fused
    # path's GEMMs over all experts' columns (P = B B^T, the weighted sum, the one-hot products
    # and their gradients) would spread it through 0 * inf. (The reference forms x A for every
    # expert, so a non-finite A reaches every token's dx there, and here.) float64: the
    # tolerance table's 1e-10 relative bound, where rounding cannot blur the comparison
    prob = make_lora_problem(6, 2, 8, 10, 4, 3, dtype=torch.float64, ids=True, bias=rotation,
                             rotation=rotation, E_extra=6, seed=29)
    E = prob["lora_B"].shape[0]
    users = prob["expert_ids"]
    e = int(users[0, 0]) if used else min(set(range(E)) - set(users.flatten().tolist()))
    prob[param] = prob[param].clone()
    prob[param][(e, 1, 3) if param == "lora_B" else (e, 2, 1)] = bad
    dy = torch.randn(6, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y_k, g_k = lora_run(lambda **kw: radar_gate_lora(**kw, backend=backend), prob, dy)
    y_r, g_r = lora_run(radar_gate_lora_reference, prob, dy)
    if param == "lora_B" and not used:
        assert torch.isfinite(y_r).all() and torch.isfinite(g_r["x"]).all()
    mismatch = []
    for name, got, ref in [("y", y_k, y_r)] + [(n, g_k[n], g_r[n]) for n in g_r]:
        fin = torch.isfinite(ref)
        if not torch.equal(torch.isfinite(got), fin):
            mismatch.append((name, int((~torch.isfinite(got)).sum()), int((~fin).sum())))
        elif fin.any():
            torch.testing.assert_close(got[fin], ref[fin], rtol=0,
                                       atol=1e-10 * float(ref[fin].abs().max()), msg=name)
    assert not mismatch, mismatch


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("ids", [True, False], ids=["topk", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_lora_B_gives_the_scaled_result_exactly(dtype, ids, backend):
    # |B| ~ 1e19 (2^63) with rot_down scaled by 2^-63, so the angles are those of the unscaled
    # problem: the reference stays finite (it squares v / max|v|), but P = B B^T overflowed fp32.
    # The op rescales A_e, B_e by powers of two (lora.balance_factors), so its result is exactly 2^63
    # times that of the unscaled problem, and every gradient exactly its power of two -- except
    # drot_down, 2^126 times an O(1..100) value, at the edge of fp32's range
    prob = make_lora_problem(6, 2, 8, 10, 4, 3, dtype=dtype, ids=ids, bias=True, seed=31)
    big = dict(prob, lora_B=prob["lora_B"] * 2.0 ** 63, rot_down=prob["rot_down"] * 2.0 ** -63)
    dy = torch.randn(6, 10, generator=torch.Generator().manual_seed(5)).to(dtype)
    y1, g1 = lora_run(radar_gate_lora, prob, dy, backend=backend)
    y2, g2 = lora_run(radar_gate_lora, big, dy, backend=backend)
    assert torch.isfinite(radar_gate_lora_reference(**big)).all() and torch.isfinite(y2).all()
    assert torch.equal(y2, y1 * 2.0 ** 63)
    power = dict(x=63, lora_A=63, lora_B=0, weights=63, rot_up=63, angle_bias=63)
    for name, k in power.items():
        assert torch.equal(g2[name], g1[name] * 2.0 ** k), name


SAVE_CASES = [CASES[0], CASES[3], CASES[4], CASES[6], CASES[7], CASES[9], CASES[10]]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", SAVE_CASES, ids=_id)
def test_saved_and_recomputed_low_rank_activations_give_identical_results(case, backend):
    # recompute=False keeps s, d (and P, Q) from forward; recompute=True recomputes them in
    # backward with the same code: every output and gradient is bitwise the same
    prob, dy = _problem(case, torch.float32, "save")
    y1, g1 = lora_run(radar_gate_lora, prob, dy, backend=backend, recompute=True)
    y2, g2 = lora_run(radar_gate_lora, prob, dy, backend=backend, recompute=False)
    assert torch.equal(y1, y2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_saved_low_rank_activations_match_reference(dtype, backend):
    prob, dy = _problem(CASES[4], dtype, "saved")
    check_lora_against_reference(prob, dy, backend=backend, recompute=False)


@pytest.mark.parametrize("ids, rotation", [(False, True), (True, True), (True, False)],
                         ids=["dense", "topk", "norot"])
def test_recompute_decides_what_is_saved_for_backward(ids, rotation):
    from radargate_kernels.memory import saved_bytes
    T, K, fin, out, r, rg = 32, 3, 128, 16, 4, 2
    prob = make_lora_problem(T, K, fin, out, r, rg, ids=ids, bias=True, rotation=rotation,
                             seed=11)
    leaves = {k: (v.requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                  else v) for k, v in prob.items()}
    kept = {rc: saved_bytes(lambda: radar_gate_lora(**leaves, backend="torch", recompute=rc))
            for rc in (True, False, None)}
    E = prob["lora_A"].shape[0]
    rgs = rg if rotation else 0
    extra = T * K * (r + rgs) * 4 + ((E * r) ** 2 + E * r * rg) * 4 * rotation  # s, d, P, Q
    assert kept[False]["total"] - kept[True]["total"] == extra
    # auto: K (r + rg) 4 = 72 bytes (or 48) per token <= a quarter of x's 512: saved
    assert kept[None]["total"] == kept[False]["total"]
    with torch.no_grad():  # nothing to differentiate: nothing kept, whatever recompute says
        y = radar_gate_lora(**prob, backend="torch", recompute=False)
    assert y.grad_fn is None


def test_auto_recompute_threshold_is_a_quarter_of_x():
    from radargate_kernels.lora import save_lowrank
    A = torch.zeros(2, 64, 8)  # E, in, r
    x32, x16 = torch.zeros(1, 64), torch.zeros(1, 64, dtype=torch.bfloat16)
    # fp32 compute: (E r + K rg) 4 bytes per token (s of every expert, d) vs in * itemsize / 4
    assert save_lowrank(None, x32, A, 1, 0)        # 64 <= 64
    assert save_lowrank(None, x32, A, 5, 0)        # 64 <= 64: K does not count without rg
    assert not save_lowrank(None, x32, A, 2, 1)    # 72 > 64
    assert not save_lowrank(None, x16, A, 1, 0)    # 64 > 32 (bf16 x, fp32 s)
    assert save_lowrank(False, x16, A, 64, 64) and not save_lowrank(True, x32, A, 1, 0)
