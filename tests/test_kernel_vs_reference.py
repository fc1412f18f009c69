"""Fused Triton kernels (interpreter) against the PyTorch reference: forward and all gradients.

The grid covers every value of K, D, r and T of issue #2 and each edge: K = 1 (no relation),
odd K, K = 13 (padded to 16, packs 2 tokens per program), D = 2 (one pair), prime D/2 (D = 6,
10, 130), r = 1, T = 0 / 1 (single token) / 37 (partial last token block). r, T, angle_bias and
expert_ids rotate over the 25 (K, D) pairs so that each value meets several K and D.
To add a shape: append it to EXTRA_CASES as (T, K, D, r, bias, ids).
"""
import itertools
import zlib

import pytest
import torch

from radargate_kernels import radar_gate, radar_gate_reference
from helpers import check_against_reference, make_problem, run_with_grads

KS = (1, 2, 3, 8, 13)
DS = (2, 6, 10, 64, 130)
RS = (1, 3, 8)
TS = (0, 1, 5, 37)


def _grid():
    cases = []
    for i, (K, D) in enumerate(itertools.product(KS, DS)):
        T = TS[i % 4]
        r = RS[(i // 4) % 3]
        bias = bool((i // 2) % 2)
        ids = bool(i % 3 == 1) or (i % 5 == 0)
        cases.append((T, K, D, r, bias, ids))
    return cases


EXTRA_CASES = [
    (37, 8, 64, 8, True, True),     # all features on at a mid size
    (5, 3, 10, 3, True, False),     # bias without ids (E == K)
    (3, 1, 6, 3, True, True),       # K = 1: only angle_bias rotates
    (9, 5, 258, 2, False, True),    # D/2 = 129: ragged last chunk
    (3, 2, 1030, 2, True, True),    # D/2 = 515: many chunks
    (2, 13, 600, 3, True, False),   # K = 13 padded to 16
    (3, 4, 34, 32, True, True),     # r = 32 (RP = 32), the kernels' limit
    (2, 16, 6, 17, False, False),   # r = 17 at K = 16 (RP = 32), the column kernel's 16-row tile
    (3, 32, 66, 4, True, False),    # K = 32: one 32-row token per tile
    (2, 17, 6, 17, True, True),     # K = 17: two 16-slot chunks in the column kernel
    (1, 19, 2, 20, False, True),    #   also at D = 2 (D/2 == 1)
    # K > 32: a token's slots in two 32-slot chunks (M v over both), its relation in 64 rows;
    # odd K = 33 and 40 (the paper's expert count), K = 64 at the top, r <= 32 there
    (2, 40, 34, 8, True, True),
    (1, 64, 6, 3, False, False),
    (2, 33, 2, 17, True, False),    #   D = 2
    (3, 64, 130, 32, True, True),   #   r = 32, prime D/2
    (2, 17, 10, 32, True, True),    #   K = 17 with r = 32
]
CASES = _grid() + EXTRA_CASES
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _id(c):
    T, K, D, r, bias, ids = c
    return f"T{T}-K{K}-D{D}-r{r}" + ("-bias" if bias else "") + ("-ids" if ids else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_and_gradients_match_reference(case, dtype):
    T, K, D, r, bias, ids = case
    seed = zlib.crc32(repr((case, str(dtype))).encode())  # fresh per case, same every run
    prob = make_problem(T, K, D, r, dtype=dtype, bias=bias, ids=ids, seed=seed)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(dtype)

    check_against_reference(radar_gate, prob, dy, seed, backend="triton")


@pytest.mark.parametrize("lead", [(2, 3), (1, 1, 4), (0, 5)], ids=str)
def test_leading_dims_are_flattened_and_restored(lead):
    prob = make_problem(None, 3, 10, 2, bias=True, ids=True, lead=lead, seed=7)
    y_k = radar_gate(**prob, backend="triton")
    y_r = radar_gate_reference(**prob)
    assert y_k.shape == (*lead, 10)
    torch.testing.assert_close(y_k, y_r, rtol=1e-5, atol=1e-5)


def test_non_contiguous_and_strided_inputs_match_contiguous_copies():
    gen = torch.Generator().manual_seed(11)
    T, K, D, r, E = 7, 5, 10, 3, 6
    V = torch.randn(K, T, D + 4, generator=gen).transpose(0, 1)[..., 2:2 + D]  # permuted + sliced
    g = torch.randn(1, K, generator=gen).expand(T, K)                          # stride 0 on T
    A = torch.randn(r, D, generator=gen).t()                                   # transposed storage
    B = torch.randn(r, D, generator=gen)[:, ::2]                               # column stride 2
    beta = torch.randn(D // 2, E, generator=gen).t()
    ids = torch.randint(0, E, (K, T), generator=gen).t()
    assert not any(x.is_contiguous() for x in (V, g, A, B, beta, ids))
    dy = torch.randn(T, D, generator=gen)
    args = dict(expert_out=V, weights=g, rot_down=A, rot_up=B, angle_bias=beta, expert_ids=ids,
                tau=0.8)
    contig = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    y_s, g_s = run_with_grads(radar_gate, args, dy, backend="triton")
    y_c, g_c = run_with_grads(radar_gate, contig, dy, backend="triton")
    torch.testing.assert_close(y_s, y_c, rtol=1e-6, atol=1e-6)
    for name in g_c:
        torch.testing.assert_close(g_s[name], g_c[name], rtol=1e-6, atol=1e-6)
    y_r = radar_gate_reference(**contig)
    torch.testing.assert_close(y_s, y_r, rtol=1e-5, atol=1e-5)
