"""The kernels' sine and cosine for fp16/bf16 inputs: a range reduction to [-pi, pi] in Triton
arithmetic, then the special-function units' approximations (sin.approx / cos.approx on a GPU;
benchmarks/compile_report.py checks the PTX has them). The interpreter runs the accurate
functions on the same reduced argument, so here (1) the range reduction is checked against
float64 on angles up to 1e4, and (2) the documented error of the approximations (absolute,
below 2^-21 on [-pi, pi]: CUDA programming guide, __sinf / __cosf) is injected into every sine
and cosine, adversarially signed, and the op still meets the tolerance table."""
import zlib

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from radargate_kernels import radar_gate, radar_gate_lora
from radargate_kernels.kernels.tile import cos_sin
from helpers import check_against_reference, make_problem
from lora_helpers import check_lora_against_reference, make_lora_problem

SFU_ABS_ERROR = 2.0 ** -21


@triton.jit
def _cos_sin_probe(A, C, S, n, FAST: tl.constexpr):
    i = tl.arange(0, 1024)
    a = tl.load(A + i, mask=i < n, other=0.0)
    c, s = cos_sin(a, FAST)
    tl.store(C + i, c, mask=i < n)
    tl.store(S + i, s, mask=i < n)


def test_range_reduction_keeps_cos_and_sin_accurate_up_to_1e4():
    gen = torch.Generator().manual_seed(1)
    a = torch.cat([torch.linspace(-10, 10, 500), (torch.rand(524, generator=gen) - 0.5) * 2e4])
    c, s = torch.empty_like(a), torch.empty_like(a)
    _cos_sin_probe[(1,)](a, c, s, a.numel(), FAST=True)
    a64 = a.double()
    # float32 angle -> reduced argument: the error grows with |a| (k ulps of 2 pi's low part)
    tol = 4e-7 + 2e-10 * a64.abs()
    assert ((c.double() - torch.cos(a64)).abs() <= tol).all()
    assert ((s.double() - torch.sin(a64)).abs() <= tol).all()


@pytest.fixture
def sfu_error(monkeypatch):
    """Every sin/cos the interpreter evaluates is off by SFU_ABS_ERROR, with a sign that varies
    per element (deterministically), as a worst case of the approximations."""
    from triton.runtime import interpreter as interp
    B = interp.InterpreterBuilder

    def perturbed(orig):
        def fn(self, arg):
            out = orig(self, arg)
            x = np.asarray(out.data)
            sign = np.where((np.arange(x.size).reshape(x.shape) * 2654435761) % 7 < 3, -1.0, 1.0)
            return interp.TensorHandle((x + SFU_ABS_ERROR * sign).astype(x.dtype), out.dtype)
        return fn
    monkeypatch.setattr(B, "create_sin", perturbed(B.create_sin))
    monkeypatch.setattr(B, "create_cos", perturbed(B.create_cos))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [(9, 3, 64, 4, True, True), (5, 8, 130, 8, False, False)],
                         ids=["T9-K3-D64", "T5-K8-D130"])
def test_radar_gate_meets_the_tolerance_with_the_approximations_error(case, dtype, sfu_error):
    T, K, D, r, bias, ids = case
    seed = zlib.crc32(repr((case, str(dtype), "sfu")).encode())
    prob = make_problem(T, K, D, r, dtype=dtype, bias=bias, ids=ids, seed=seed)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(dtype)
    check_against_reference(radar_gate, prob, dy, seed, backend="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_layer_meets_the_tolerance_with_the_approximations_error(dtype, sfu_error):
    prob = make_lora_problem(7, 3, 8, 66, 4, 3, dtype=dtype, ids=True, bias=True, seed=11)
    dy = torch.randn(7, 66, generator=torch.Generator().manual_seed(12),
                     dtype=torch.float64).to(dtype)
    check_lora_against_reference(prob, dy, backend="triton")
