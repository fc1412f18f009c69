"""The single-pass forward's token groups: a program runs GROUP consecutive token blocks with the
parameter tiles (A, B and, where it fits, all of angle_bias) loaded once (issue #11's forward
target). Checks the plan (groups cover every block once, the last one partial) and the numbers
(forward and all gradients against the reference; gradients use the saved state the grouped
forward writes), and that an angle_bias tile holding a non-finite value reaches only the rows
of its expert.
"""
import zlib

import pytest
import torch
import triton

from radargate_kernels import radar_gate, radar_gate_reference
from radargate_kernels.kernels import launch as L
from helpers import check_against_reference, make_problem


def _plan(p):
    args = dict(p)
    V = args["expert_out"]
    (_, launches) = L.plan_forward(V, args["weights"], args["rot_down"], args["rot_up"],
                                   args["angle_bias"], args["expert_ids"], args["tau"], 1e-6)
    (launch,) = launches
    return launch


def _group_of(launch):
    return launch.args[launch.kernel.arg_names.index("GROUP")]


# (T, K, D, r, bias, ids): several groups with a partial last one, a single block (group 1),
# K = 1 (16 tokens per block), padded K, the widest tile (16 x 256), angle_bias without ids
CASES = [
    (37, 8, 64, 8, True, True),
    (33, 8, 512, 8, True, True),
    (1, 8, 512, 8, True, True),
    (70, 1, 34, 3, True, False),
    (41, 3, 130, 2, False, True),
    (29, 13, 64, 5, True, True),
    (23, 4, 258, 1, True, False),
]


def _id(c):
    T, K, D, r, bias, ids = c
    return f"T{T}-K{K}-D{D}-r{r}" + ("-bias" if bias else "") + ("-ids" if ids else "")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_grouped_single_pass_forward_matches_reference(case, dtype):
    T, K, D, r, bias, ids = case
    seed = zlib.crc32(repr(("groups", case, str(dtype))).encode())
    prob = make_problem(T, K, D, r, dtype=dtype, bias=bias, ids=ids, seed=seed)
    launch = _plan(prob)
    cfg = L.pick_config(K, D // 2, r, prob["angle_bias"].shape[0] if bias else K, bias, 2)
    assert cfg.ONE_PASS and launch.meta["ONE_PASS"]
    n_blocks = triton.cdiv(T, cfg.BT_FORWARD)
    group, (programs,) = _group_of(launch), launch.grid
    # every block in exactly one program: programs * group >= blocks > (programs - 1) * group
    assert programs * group >= n_blocks > (programs - 1) * group
    if n_blocks > 1:
        assert group > 1
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(dtype)
    check_against_reference(radar_gate, prob, dy, seed, backend="triton")


def test_group_rule_bounds_parameter_reads_against_expert_out():
    # the rule: blocks are added until A, B (and the angle_bias tile) are at most 1/PARAM_SHARE
    # of the expert_out a program reads, MAX_GROUP at most, then spread evenly over the programs
    for (T, K, D, r, E) in [(32, 8, 512, 8, 16), (4096, 8, 512, 8, 16), (64, 1, 64, 1, 1),
                            (300, 3, 130, 8, 5), (2, 8, 512, 8, 16)]:
        cfg = L.pick_config(K, D // 2, r, E, True, 2)
        g = L.forward_group(cfg, T, K, D, r, E, True)
        n_blocks = triton.cdiv(T, cfg.BT_FORWARD)
        assert 1 <= g <= min(L.MAX_GROUP, n_blocks)
        programs = triton.cdiv(n_blocks, g)
        assert programs * g - n_blocks < programs  # evenly spread: no program idles a block
    # by hand at issue #11's shape (fp16, E = 16): A 4096 + B 2048 + angle_bias tile 16 x 256
    # = 10240 elements per program, a block of 2 tokens reads 2 x 8 x 512 = 8192 of
    # expert_out: 8 x 10240 / 8192 -> 10 blocks, 16 blocks -> 2 programs of 8
    cfg = L.pick_config(8, 256, 8, 16, True, 2)
    assert L.beta_tile_forward(cfg, True) and cfg.BT_FORWARD == 2
    assert L.forward_group(cfg, 32, 8, 512, 8, 16, True) == 8
    assert L.forward_group(cfg, 2, 8, 512, 8, 16, True) == 1  # a single block
    # K = 1, r = 1, D = 64: 64 + 32 + 32 = 128 elements against 16 x 64 per block: no grouping
    cfg = L.pick_config(1, 32, 1, 1, True, 2)
    assert L.forward_group(cfg, 64, 1, 64, 1, 1, True) == 1
    # the two-pass and WIDE plans run one block per program
    assert L.forward_group(L.pick_config(8, 2048, 8, 16, True), 64, 8, 4096, 8, 16, True) == 1
    assert L.forward_group(L.pick_config(40, 128, 8, 80, True), 64, 40, 256, 8, 80, True) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("used", [True, False], ids=["used", "unused"])
def test_non_finite_angle_bias_tile_reaches_only_its_experts_rows(bad, used):
    # the one-hot selection from the tile would carry 0 * inf to every row: with a non-finite
    # value in the tile the rows are gathered from memory instead
    T, K, D, r = 24, 2, 64, 2
    p = make_problem(T, K, D, r, dtype=torch.float16, bias=True, ids=True, E_extra=4, seed=7)
    E = p["angle_bias"].shape[0]
    p["expert_ids"] = p["expert_ids"] % (E - 1)  # expert E - 1 fills no slot
    e = int(p["expert_ids"][0, 0]) if used else E - 1
    clean = dict(p)
    p["angle_bias"] = p["angle_bias"].clone()
    p["angle_bias"][e, 3] = bad
    launch = _plan(p)
    assert launch.meta["BETA_TILE"] and _group_of(launch) > 1
    y_k = radar_gate(**p, backend="triton")
    y_r = radar_gate_reference(**p)
    assert torch.equal(torch.isnan(y_k), torch.isnan(y_r))
    hit = (p["expert_ids"] == e).any(1)
    assert hit.any() == used and not hit.all()
    assert torch.isfinite(y_k[~hit]).all()
    if used:
        assert torch.isnan(y_k[hit]).any(1).all()
    # the other tokens' values are those of the same call without the bad value (bit for bit:
    # a one-hot product and a gather select the same values)
    torch.testing.assert_close(y_k[~hit], radar_gate(**clean, backend="triton")[~hit], rtol=0,
                               atol=0)


def test_feature_strided_expert_out_takes_the_two_pass_forward():
    # the single-pass tile needs contiguous features (vector loads); a feature-strided view of
    # the same values runs two passes and gives the same result
    p = make_problem(9, 4, 64, 3, dtype=torch.float16, bias=True, ids=True, seed=11)
    strided = p["expert_out"].transpose(1, 2).contiguous().transpose(1, 2)  # [T, K, D], D stride K
    assert strided.stride(2) != 1 and torch.equal(strided, p["expert_out"])
    assert _plan(p).meta["ONE_PASS"]
    q = dict(p, expert_out=strided)
    assert not _plan(q).meta["ONE_PASS"]
    dy = torch.randn(9, 64, generator=torch.Generator().manual_seed(12),
                     dtype=torch.float64).to(torch.float16)
    check_against_reference(radar_gate, q, dy, 11, backend="triton")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_expert_out_stays_in_its_token_across_a_group(bad):
    # token 5 of a 2-token block inside a group of blocks: every other token's output is the
    # one of the same call without the bad value, bit for bit
    p = make_problem(20, 8, 64, 4, dtype=torch.float16, bias=True, ids=True, seed=13)
    assert _group_of(_plan(p)) > 1
    y_clean = radar_gate(**p, backend="triton")
    q = dict(p, expert_out=p["expert_out"].clone())
    q["expert_out"][5, 2, 7] = bad
    y = radar_gate(**q, backend="triton")
    assert not torch.isfinite(y[5]).all()
    others = [t for t in range(20) if t != 5]
    torch.testing.assert_close(y[others], y_clean[others], rtol=0, atol=0)
    assert torch.equal(torch.isnan(y), torch.isnan(radar_gate_reference(**q)))
