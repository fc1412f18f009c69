"""The evidence tools: the roofline counter (on a kernel whose work is known) and its projection,
and the GPU lane's behaviour without a GPU. The ahead-of-time compile report has its own command
and CI step (``python -m benchmarks.compile_report --quick``), not part of this suite."""
import pytest
import torch
import triton
import triton.language as tl

from benchmarks import roofline
from radargate_kernels.kernels.launch import Launch
from radargate_kernels.kernels.tile import cos_sin


@triton.jit
def _known_work(X, W, Y, n, FAST: tl.constexpr, BM: tl.constexpr):
    # one [BM, 32] tile of X per program, a dot with W [32, 16] (tensor cores: 16-bit operands),
    # sin and cos of every element, one store of [BM, 16]
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.arange(0, 32)
    x = tl.load(X + rows[:, None] * 32 + c[None, :], mask=(rows < n)[:, None], other=0.0)
    w = tl.load(W + c[:, None] * 16 + tl.arange(0, 16)[None, :])
    y = tl.dot(x, w, out_dtype=tl.float32)
    cs, sn = cos_sin(y, FAST)
    tl.store(Y + rows[:, None] * 16 + tl.arange(0, 16)[None, :], cs + sn,
             mask=(rows < n)[:, None])


@pytest.mark.parametrize("fast", [True, False])
def test_roofline_counts_bytes_dots_and_trigonometry_of_a_known_kernel(fast):
    n, BM = 100, 16
    X = torch.randn(n, 32, dtype=torch.bfloat16)
    W = torch.randn(32, 16, dtype=torch.bfloat16)
    Y = torch.empty(n, 16)
    launch = Launch(_known_work, (triton.cdiv(n, BM),), (X, W, Y, n), dict(FAST=fast, BM=BM))
    w = roofline.count_launch(launch, "known")
    programs = triton.cdiv(n, BM)  # 7, the last one partial (masked rows move nothing)
    # X and Y once (each program its rows), W once per launch (all programs read all of it):
    # the sampled programs (first, middle, last) average 4 full and 1 partial...
    per_prog_x = [min(BM, n - p * BM) * 32 * 2 for p in (0, programs // 2, programs - 1)]
    assert w.bytes == pytest.approx(sum(per_prog_x) / 3 * programs + 32 * 16 * 2
                                    + sum(min(BM, n - p * BM) * 16 * 4 for p in
                                          (0, programs // 2, programs - 1)) / 3 * programs)
    assert w.tc == programs * BM * 32 * 16 and w.tc_tf32 == 0  # masked rows still multiply
    trig = programs * BM * 16 * 2
    if fast:  # sin.approx / cos.approx: one special-function op each
        assert w.sfu == trig
    else:  # libdevice: FMA-pipe instructions
        assert w.sfu == 0 and w.fma >= trig * roofline.LIBDEVICE_TRIG
    assert w.launches == 1
    s = w.seconds()
    assert w.time() == pytest.approx(max(s.values()) + roofline.LAUNCH_S)


def test_roofline_projection_of_a_small_fused_layer_sees_every_unit():
    # a small shape, dense and top-2: the fused layer's kernels and GEMMs are all counted, the
    # projection is above the floor, and the streaming kernels hit the special-function units
    for topk, K in ((False, 4), (True, 2)):
        res = roofline.project("small", (64, 128, 256, 4, K, 16, 16, topk))
        names = {w.name for w in res["fused"]["fwd"]}
        assert {"stream_fwd_kernel", "lora_relation_fwd_kernel"} <= names
        assert {"stream_bwd_rows_kernel", "stream_bwd_cols_kernel",
                "lora_relation_bwd_kernel"} <= {w.name for w in res["fused"]["bwd"]}
        stream = [w for w in res["fused"]["fwd"] if w.name == "stream_fwd_kernel"][0]
        assert stream.sfu == 64 * K * 128 * 2  # K D/2 sines and cosines per token
        fl = sum(w.time() for w in res["floor"]["fwd"] + res["floor"]["bwd"])
        for label in ("fused", "weighted_sum", "peft_lora", "materialized"):
            assert sum(w.time() for w in res[label]["fwd"] + res[label]["bwd"]) > fl * 0.5
        assert sum(w.time() for w in res["fused"]["fwd"]) > sum(w.time()
                                                              for w in res["floor"]["fwd"])
        text, _ = roofline.report("small", (64, 128, 256, 4, K, 16, 16, topk), res)
        assert "PROJECTED" in text


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
