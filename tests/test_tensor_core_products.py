"""common.dot_tf32x2: the row kernel's tensor-core products for fp16/bf16 inputs.

A computed fp32 tile is split into two parts whose values are exact in tf32 (10 explicit
mantissa bits) and each part is multiplied with a tile whose values are exact in tf32; the
products of tf32 values are exact in fp32, so the interpreter computes what a GPU's tf32 MMA
does, up to the order of fp32 sums. These tests check the split and the product's error bound
on fresh random inputs.
"""
import pytest
import torch
import triton
import triton.language as tl

from radargate_kernels.kernels.common import dot_tf32x2, tf32_parts


@triton.jit
def _parts_kernel(X, HI, LO, N: tl.constexpr):
    i = tl.arange(0, N)
    hi, lo = tf32_parts(tl.load(X + i))
    tl.store(HI + i, hi)
    tl.store(LO + i, lo)


@triton.jit
def _dot_kernel(Am, Bm, O, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    m = tl.arange(0, M)
    k = tl.arange(0, K)
    n = tl.arange(0, N)
    a = tl.load(Am + m[:, None] * K + k[None, :])
    b = tl.load(Bm + k[:, None] * N + n[None, :])
    tl.store(O + m[:, None] * N + n[None, :], dot_tf32x2(a, b, tl.float32))


def _low_bits(x):
    return x.view(torch.int32) & 0x1FFF  # the 13 mantissa bits tf32 does not have


def test_tf32_parts_are_exact_in_tf32_and_sum_to_x_within_2_pow_minus_20():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1024, generator=gen) * torch.exp(4 * torch.randn(1024, generator=gen))
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _parts_kernel[(1,)](x, hi, lo, 1024)
    assert torch.all(_low_bits(hi) == 0) and torch.all(_low_bits(lo) == 0)
    err = (hi.double() + lo.double() - x.double()).abs()
    assert torch.all(err <= 2.0 ** -20 * x.double().abs())
    assert (lo != 0).any()  # the low part carries information (not a trivial split)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dot_tf32x2_with_a_16_bit_operand_is_accurate_to_fp32_scale(dtype):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(16, 256, generator=gen)            # computed fp32 operand
    b = torch.randn(256, 16, generator=gen).to(dtype).float()  # exact in tf32
    assert torch.all(_low_bits(b) == 0)
    out = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, out, 16, 256, 16)
    exact = a.double() @ b.double()
    bound = (a.double().abs() @ b.double().abs()) * (2.0 ** -20 + 256 * 2.0 ** -24)
    assert torch.all((out.double() - exact).abs() <= bound)
    # and it is far closer than one tf32 product of the unsplit operand would be
    one = _round_tf32(a).double() @ b.double()
    assert (out.double() - exact).abs().max() < 0.1 * (one - exact).abs().max()


def _round_tf32(x):
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)
