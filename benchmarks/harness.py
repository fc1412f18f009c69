"""Providers and timing shared by the pytest-benchmark tests and the sweep script.

Providers (all compute the same thing except ``weighted_sum``):
  radargate     radar_gate on the device present: fused Triton kernels on CUDA, its CPU path
                (the cache-blocked eager path; RADARGATE_CPU_PATH=compile: the
                inductor-compiled reference without autograd) on CPU
  cpu_eager     (CPU only) the cache-blocked eager CPU path called directly
  naive         the PyTorch reference in eager mode (what LoRA-MoE code writes today)
  naive_compile torch.compile of the reference (dynamic shapes, compiled once)
  weighted_sum  plain weighted-sum gating, einsum("tk,tkd->td"): the cost floor, no rotation
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from radargate_kernels import radar_gate, radar_gate_reference  # noqa: E402

PROVIDERS = ("radargate", "naive", "naive_compile", "weighted_sum")
if not torch.cuda.is_available():
    PROVIDERS = PROVIDERS + ("cpu_eager",)
MODES = ("forward", "forward_backward")
_COMPILED = {}


def device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make(T, K, D, r=8, dtype=torch.float32, dev=None, grad=False, seed=0):
    dev = dev or device()
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(T, K, D, generator=gen).to(dev, dtype)
    g = torch.softmax(torch.randn(T, K, generator=gen), -1).to(dev, dtype)
    A = (torch.randn(D, r, generator=gen) / D ** 0.5).to(dev, dtype)
    B = (torch.randn(r, D // 2, generator=gen) / r ** 0.5).to(dev, dtype)
    beta = (0.1 * torch.randn(K, D // 2, generator=gen)).to(dev, dtype)
    xs = [V, g, A, B, beta]
    if grad:
        xs = [x.requires_grad_(True) for x in xs]
    return xs


def provider_fn(name):
    if name == "radargate":
        backend = "auto" if device().type == "cuda" else "torch"
        return lambda V, g, A, B, beta: radar_gate(V, g, A, B, beta, tau=0.5, backend=backend)
    if name == "cpu_eager":
        from radargate_kernels.cpu import radar_gate_cpu_eager
        return lambda V, g, A, B, beta: radar_gate_cpu_eager(V, g, A, B, beta, None, 0.5, 1e-6)
    if name == "naive":
        return lambda V, g, A, B, beta: radar_gate_reference(V, g, A, B, beta, tau=0.5)
    if name == "naive_compile":
        if "naive" not in _COMPILED:
            _COMPILED["naive"] = torch.compile(radar_gate_reference, dynamic=True)
        f = _COMPILED["naive"]
        return lambda V, g, A, B, beta: f(V, g, A, B, beta, tau=0.5)
    if name == "weighted_sum":
        return lambda V, g, A, B, beta: torch.einsum("tk,tkd->td", g, V)
    raise ValueError(name)


def step(name, mode, xs):
    """A zero-argument callable running one forward (or forward + backward)."""
    fn = provider_fn(name)
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(*xs)
        return run
    dy = torch.randn(xs[0].shape[0], xs[0].shape[2], device=xs[0].device, dtype=xs[0].dtype)

    def run_bwd():
        for x in xs:
            x.grad = None
        fn(*xs).backward(dy)
    return run_bwd


def times_ms(run, reps=5, warmup=1):
    """Every repetition's wall time in ms (CUDA: triton.testing.do_bench's median, once)."""
    if device().type == "cuda":
        import triton.testing
        return [triton.testing.do_bench(run, return_mode="median")]
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def device_name():
    d = device()
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
