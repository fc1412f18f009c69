"""pytest-benchmark comparison of the providers in harness.py, forward and forward+backward.

    python -m pytest benchmarks/test_bench.py --benchmark-columns=median,iqr,rounds
Runs on the device present (CPU here, CUDA where available). Not part of the CI test suite
(timings, not correctness); tests/ covers correctness.
"""
import pytest

import harness

SHAPES = [(2048, 8, 1024, 8)]  # (T, K, D, r): the CPU-path target shape of issue #3


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("provider", harness.PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-K{}-D{}-r{}".format(*s))
def test_provider(benchmark, provider, mode, shape):
    T, K, D, r = shape
    xs = harness.make(T, K, D, r, grad=(mode == "forward_backward"))
    run = harness.step(provider, mode, xs)
    run()  # warm-up (and compilation for naive_compile)
    benchmark.extra_info.update(device=harness.device_name(), provider=provider, mode=mode)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
