"""A two-minute tour on CPU: the fused Triton kernels (run by the Triton interpreter) against the
PyTorch reference, forward and gradients, then the CPU path timed against plain weighted-sum
gating. Run: python benchmarks/demo.py
"""
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from radargate_kernels import radar_gate, radar_gate_reference  # noqa: E402


REL = 1e-4  # fp32 kernels against the fp32 reference, relative to the output's largest entry


def main():
    torch.manual_seed(0)
    T, K, D, r, E = 16, 8, 64, 8, 12
    V = torch.randn(T, K, D, requires_grad=True)
    g = torch.softmax(torch.randn(T, K), -1).requires_grad_(True)
    A = (torch.randn(D, r) / D ** 0.5).requires_grad_(True)
    B = (torch.randn(r, D // 2) / r ** 0.5).requires_grad_(True)
    beta = (0.1 * torch.randn(E, D // 2)).requires_grad_(True)
    ids = torch.randint(0, E, (T, K))
    leaves = [V, g, A, B, beta]
    print(f"fused Triton kernels (interpreter) vs reference, T={T} K={K} D={D} r={r} E={E}, fp32")
    t0 = time.perf_counter()
    y = radar_gate(V, g, A, B, beta, ids, tau=0.5, backend="triton")
    gk = torch.autograd.grad(y.square().sum(), leaves)
    t1 = time.perf_counter()
    yr = radar_gate_reference(V, g, A, B, beta, ids, tau=0.5)
    gr = torch.autograd.grad(yr.square().sum(), leaves)
    print(f"  (kernel run took {t1 - t0:.2f} s in the interpreter); tolerance: "
          f"{REL:.0e} x max|reference| per output (fp32; the tests' bounds: tests/tolerances.py)")
    failed = 0
    for name, a, b in zip(["y", "dV", "dg", "dA", "dB", "dbeta"], (y, *gk), (yr, *gr)):
        diff, bound = (a - b).abs().max().item(), REL * b.abs().max().item()
        failed += diff > bound
        print(f"  {name:6s} max |diff| = {diff:.2e}  bound {bound:.2e}  "
              f"{'pass' if diff <= bound else 'FAIL'}")
    plain = torch.einsum("tk,tkd->td", g, V)
    print(f"  RadarGate's output differs from the plain weighted sum of the same experts by "
          f"{((y - plain).norm() / plain.norm()).item():.2f} (relative norm)")

    T, K, D, r = 2048, 8, 1024, 8
    V = torch.randn(T, K, D)
    g = torch.softmax(torch.randn(T, K), -1)
    A, B = torch.randn(D, r) / D ** 0.5, torch.randn(r, D // 2) / r ** 0.5
    for name, fn in [("radar_gate (CPU path)", lambda: radar_gate(V, g, A, B, backend="torch")),
                     ("plain weighted sum", lambda: torch.einsum("tk,tkd->td", g, V))]:
        fn()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        print(f"CPU forward, T={T} K={K} D={D} r={r}: {name:22s} "
              f"{(time.perf_counter() - t0) / 3 * 1e3:8.1f} ms (mean of 3)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
