"""The evidence tools: AOT compile check (separate process, no interpreter) and byte counting."""
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import cost_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_report_quick_compiles_every_kernel_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--quick"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    rows = [l for l in out.splitlines() if l.strip().startswith(("80 ", "90 "))]
    kernels = {"radargate_fwd_kernel", "radargate_bwd_rows_kernel", "radargate_bwd_columns_kernel",
               "lora_fwd_kernel", "lora_bwd_rows_kernel", "lora_bwd_params_kernel",
               "lora_down_fwd_kernel", "lora_down_dx_kernel", "lora_down_da_kernel",
               "lora_factors_kernel", "lora_factors_bwd_kernel", "lora_bwd_rows_packed_kernel",
               "lora_bwd_params_packed_kernel", "radargate_bwd_chain_kernel"}
    for arch in ("80", "90"):
        for dtype in ("float16", "bfloat16", "float32"):
            seen = {l.split()[2] for l in rows if l.split()[:2] == [arch, dtype]}
            # the relation kernels work on s, P and Q in the compute dtype: compiled once (fp32)
            want = kernels | ({"lora_relation_kernel", "lora_relation_bwd_kernel"}
                              if dtype == "float32" else set())
            assert seen == want, (arch, dtype, seen)
    assert all(l.rstrip().endswith("ok") for l in rows), out


@pytest.fixture(scope="module")
def counted():
    # a small shape with the benchmark's K and r, angle_bias and sparse ids on, bf16
    return cost_report.measure(T=32, K=8, D=256, r=8, dtype=torch.bfloat16, bias=True, ids=True)


def test_fused_forward_reads_expert_out_once_when_rows_fit_and_writes_y_once(counted):
    V = 32 * 8 * 256 * 2
    by_arg = counted["fused"]["forward"]["by_arg"]
    assert by_arg["radargate_fwd_kernel.V"] == [V, 0]  # single-pass forward (D/2 = 128, bf16)
    assert by_arg["radargate_fwd_kernel.Y"] == [0, 32 * 256 * 2]
    assert counted["fused"]["forward"]["launches"] == {"radargate_fwd_kernel": 1}
    assert counted["fused"]["backward"]["launches"] == {"radargate_bwd_rows_kernel": 1,
                                                        "radargate_bwd_columns_kernel": 1}


def test_two_pass_forward_reads_expert_out_exactly_twice():
    # rows too wide for one tile (D/2 = 515): the two-pass kernel
    res = cost_report.measure(T=4, K=2, D=1030, r=8, dtype=torch.bfloat16, bias=True, ids=True)
    V = 4 * 2 * 1030 * 2
    assert res["fused"]["forward"]["by_arg"]["radargate_fwd_kernel.V"] == [2 * V, 0]


@pytest.fixture(scope="module")
def issue_11():
    # the issue's counting shape: T = 32, K = 8, D = 512, r = 8, fp16, angle bias (and ids)
    return cost_report.measure(T=32, K=8, D=512, r=8, dtype=torch.float16, bias=True, ids=True)


def test_issue_11_forward_shape_reads_expert_out_once_and_parameters_once_per_program(issue_11):
    from radargate_kernels.kernels.launch import forward_group, pick_config
    T, K, D, r, E = 32, 8, 512, 8, 16
    h = D // 2
    fwd, mn = issue_11["fused"]["forward"], issue_11["minimum"]["forward"]
    by_arg = fwd["by_arg"]
    assert by_arg["radargate_fwd_kernel.V"] == [T * K * D * 2, 0]
    assert by_arg["radargate_fwd_kernel.Y"] == [0, T * D * 2]
    # a program runs a group of token blocks and loads A, B and all E rows of angle_bias once
    cfg = pick_config(K, h, r, E, True, 2)
    blocks = -(-T // cfg.BT_FORWARD)
    programs = -(-blocks // forward_group(cfg, T, K, D, r, E, True))
    assert (blocks, programs) == (16, 2)
    assert by_arg["radargate_fwd_kernel.A"] == [programs * D * r * 2, 0]
    assert by_arg["radargate_fwd_kernel.B"] == [programs * r * h * 2, 0]
    assert by_arg["radargate_fwd_kernel.BETA"] == [programs * E * h * 2, 0]
    # the issue's target, <= 1.3x the minimum on all requested bytes: measured 1.18x
    # (2026-11-29; 2.09x with one token block per program), 1.12x on the DRAM model
    assert fwd["bytes"] <= 1.3 * mn
    assert fwd["dram_model_bytes"] <= 1.2 * mn


def test_issue_11_backward_reads_expert_out_and_dy_twice_and_angle_bias_per_tile(issue_11):
    from radargate_kernels.kernels.launch import param_groups, pick_config
    T, K, D, r, E = 32, 8, 512, 8, 16
    h = D // 2
    bwd, mn = issue_11["fused"]["backward"], issue_11["minimum"]["backward"]
    by_arg = bwd["by_arg"]
    for kern in ("radargate_bwd_rows_kernel", "radargate_bwd_columns_kernel"):
        assert by_arg[f"{kern}.V"] == [T * K * D * 2, 0], kern  # once per kernel
        assert by_arg[f"{kern}.DY"] == [T * D * 2, 0], kern    # once per token, not per slot
    assert by_arg["radargate_bwd_columns_kernel.DV"] == [0, T * K * D * 2]
    cfg = pick_config(K, h, r, E, True, 2)
    # angle_bias: the row kernel reads all E rows of a chunk once per token block (E = 16 <
    # 32 rows), the column kernel once per program (hoisted out of its token loop)
    n_blocks = -(-T // cfg.BT)
    assert by_arg["radargate_bwd_rows_kernel.BETA"] == [n_blocks * E * h * 2, 0]
    n_chunks = -(-h // cfg.BH_COLS)
    groups = param_groups(-(-T // cfg.BT_COLS), n_chunks, torch.device("cpu"))
    assert by_arg["radargate_bwd_columns_kernel.BETA"] == [groups * E * h * 2, 0]
    # measured 2.14x requested (was 3.25x with expert_out read three times), 2.00x DRAM model
    assert bwd["bytes"] <= 2.2 * mn
    assert bwd["dram_model_bytes"] <= 2.05 * mn


def test_k40_counting_case_runs_the_wide_plan_with_its_counted_reads():
    # issue #11's counting case at the paper's 40 experts: K = 40 > 32 runs the WIDE plan (one
    # 64-row token per program, the K x K products over slot blocks from memory)
    from radargate_kernels.kernels.launch import pick_config
    T, K, D, r = 8, 40, 256, 8
    res = cost_report.measure(T=T, K=K, D=D, r=r, dtype=torch.float16, bias=True, ids=True)
    E, h = res["shape"]["E"], D // 2
    cfg = pick_config(K, h, r, E, True, 2)
    assert cfg.WIDE and cfg.KP == 64
    V, state_kk = T * K * D * 2, T * K * K * 4
    fwd, bwd, mn = res["fused"]["forward"], res["fused"]["backward"], res["minimum"]
    assert fwd["launches"] == {"radargate_fwd_kernel": 2}
    by = fwd["by_arg"]
    assert by["radargate_fwd_kernel.V"] == [2 * V, 0]              # once per stage
    assert by["radargate_fwd_kernel.Y"] == [0, T * D * 2]
    assert by["radargate_fwd_kernel.RHO"] == [state_kk, state_kk]  # stage 2 reads it back once
    assert bwd["launches"] == {"radargate_bwd_rows_kernel": 1, "radargate_bwd_chain_kernel": 1,
                               "radargate_bwd_columns_kernel": 2}
    by = bwd["by_arg"]
    assert by["radargate_bwd_rows_kernel.V"] == [V, 0]
    assert by["radargate_bwd_columns_kernel.V"] == [2 * V, 0]      # dV launch, parameter launch
    assert by["radargate_bwd_columns_kernel.DV"] == [0, V]
    assert by["radargate_bwd_rows_kernel.DY"] == [T * D * 2, 0]    # once per token
    # the chain kernel reads rho twice (drho's softmax and rho^T grad_d), writes M once; the dV
    # launch reads M once per feature chunk of BH_DV pairs
    assert by["radargate_bwd_chain_kernel.RHO"] == [2 * state_kk, 0]
    assert by["radargate_bwd_chain_kernel.M"] == [0, state_kk]
    assert by["radargate_bwd_columns_kernel.M"] == [-(-h // cfg.BH_DV) * state_kk, 0]
    # measured 2026-11-29: forward 3.37x, backward 4.74x the minimum on all requests (K x K
    # state of 40 x 40 per token against rows of only 256 features; 2.63x and 3.99x at D = 1024)
    assert fwd["bytes"] <= 3.4 * mn["forward"]
    assert bwd["bytes"] <= 4.8 * mn["backward"]


def test_byte_targets_of_issue_3(counted):
    mn = counted["minimum"]
    fused, naive = counted["fused"], counted["naive"]
    # targets on the DRAM model (A, B, angle_bias re-reads are L2 hits; see cost_report)
    assert fused["forward"]["dram_model_bytes"] <= 2.2 * mn["forward"]
    assert fused["backward"]["dram_model_bytes"] <= 3.0 * mn["backward"]
    # and the naive eager path is far above, as measured at the benchmark shape
    assert naive["forward"]["bytes"] >= 10 * mn["forward"]
    assert naive["backward"]["bytes"] >= 10 * mn["backward"]


def test_saved_for_backward_is_inputs_plus_small_per_token_state(counted):
    T, K, D, r, E = 32, 8, 256, 8, 16
    inputs = (T * K * D + T * K + D * r + r * D // 2 + E * D // 2) * 2 + T * K * 8
    state = (T * K + 2 * T * K * K + 2 * T * K * r) * 4  # n, C, rho, z, d in fp32
    assert counted["fused"]["saved_bytes"] == inputs + state
    assert counted["fused"]["saved_bytes"] <= T * K * D * 2 + 16 * T * K * max(K, r) + inputs
    assert counted["naive"]["saved_bytes"] > 3 * counted["fused"]["saved_bytes"]


def test_gpu_check_skips_cleanly_without_cuda(capsys, tmp_path):
    from benchmarks import gpu_check
    if torch.cuda.is_available():
        # justified: this test is about machines WITHOUT a GPU; on a CUDA machine the lane does
        # not skip but runs its checks (the next test covers those checks on CPU)
        pytest.skip("a CUDA device is present: the lane runs for real there")
    assert gpu_check.main(["--out", str(tmp_path / "r.md")]) == 0
    assert "gpu_check: skipped -- no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "r.md").exists()


def test_gpu_check_lane_runs_its_checks_in_the_interpreter(tmp_path):
    from benchmarks import gpu_check
    out = tmp_path / "r.md"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Kernels vs reference: 7 / 7 passed" in text and "All passed." in text


@pytest.mark.parametrize("ids", [False, True])
def test_fused_layer_kernels_load_b_once_per_slot_and_dy_once_per_token(ids):
    # benchmarks/lora_cost.py's counter on a small shape (one column program, two token
    # blocks): without ids every row of slot k has expert k, so the forward loads one [r, out]
    # tile of B_k per slot and program; with ids each (token, slot) row gathers its B_e. The packed backward row
    # kernel (all slots of a token in one program) loads B_cat [E r, out] once per program and
    # reads dy once per token, not once per slot
    from benchmarks import lora_cost
    from radargate_kernels.kernels import lora_launch as LL
    T, K, d, r = 16, 3, 32, 4
    E = 4 if ids else K  # dense: one slot per expert
    res = lora_cost.measure(T=T, K=K, E=E, d=d, r=r, rg=4, dtype=torch.bfloat16, ids=ids)
    fwd, bwd = res["fused_forward"]["by_arg"], res["fused_backward"]["by_arg"]
    one_tile = K * r * d * 2  # r x out bf16 per slot
    blocks = -(-T // LL.pick_lora_config(r, 4, d // 2).BT_FWD)  # token blocks of the forward
    assert blocks > 1 and LL.pick_lora_config(r, 4, d // 2).BH_FWD >= d // 2  # one column block
    want = T * one_tile if ids else blocks * one_tile  # once per slot and program
    assert fwd["lora_fwd_kernel.LB"] == [want, 0]
    assert LL.rows_packed_fits(K, E, r, ids)
    programs = -(-T // max(1, LL.PACKED_ROWS // 4))  # K = 3 padded to 4 rows per token
    assert bwd["lora_bwd_rows_packed_kernel.LB"] == [programs * E * r * d * 2, 0]
    assert bwd["lora_bwd_rows_packed_kernel.DY"] == [T * d * 2, 0]
    # the packed parameter kernel: dy once per token and expert group (one group here), s and
    # d once per column program (one here); the expert-sorted kernel (dy per slot) not launched
    assert LL.packed_params_fits(K, E, r, ids) and "lora_bwd_params_kernel" not in res[
        "fused_backward"]["launches"]
    n_eg = LL.relation_columns(K, E, r, ids) // max(LL.PACKED_PARAMS_FG, r)
    assert n_eg == 1 and LL.packed_params_blocks(r, 4, d // 2)[0] >= d // 2
    assert bwd["lora_bwd_params_packed_kernel.DY"] == [T * d * 2, 0]
    assert bwd["lora_bwd_params_packed_kernel.S"] == [T * K * r * 4, 0]
    assert bwd["lora_bwd_params_packed_kernel.D"] == [T * K * 4 * 4, 0]
    assert fwd["lora_fwd_kernel.Y"] == [0, T * d * 2]


def test_dense_parameter_kernel_reads_dy_once_per_token_at_the_widest_tile():
    # dense K = 8, r = 8: F = 64 expert columns. Slot k is expert k, so the packed parameter
    # kernel reduces dB slot by slot and one program holds all 8 experts: dy once per token
    # and column (groups of 16 expert columns read it 4 times), s and d once per column
    # program, and one drot_up partial (no expert groups to sum on the host)
    from benchmarks import lora_cost
    from radargate_kernels.kernels import lora_launch as LL
    T, K, d, r, rg = 4, 8, 32, 8, 4
    assert LL.packed_params_fits(K, K, r, False) and LL.relation_columns(K, K, r, False) == 64
    res = lora_cost.measure(T=T, K=K, E=K, d=d, r=r, rg=rg, dtype=torch.bfloat16, ids=False)
    bwd = res["fused_backward"]["by_arg"]
    assert LL.packed_params_blocks(r, rg, d // 2)[0] >= d // 2  # one column program
    assert bwd["lora_bwd_params_packed_kernel.DY"] == [T * d * 2, 0]
    assert bwd["lora_bwd_params_packed_kernel.S"] == [T * K * r * 4, 0]
    assert bwd["lora_bwd_params_packed_kernel.D"] == [T * K * rg * 4, 0]
    assert bwd["lora_bwd_params_packed_kernel.PU"] == [0, rg * (d // 2) * 4]
    # and no zero fills on the host: every kernel output is stored whole, and autograd does
    # not materialize gradients of the saved s, d, P, Q
    aten = res["fused_backward"]["aten_op_bytes"]
    assert not {"zeros", "zeros_like", "fill_", "zero_"} & set(aten), aten
