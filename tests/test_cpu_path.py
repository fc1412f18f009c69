"""The CPU paths (radargate_kernels/cpu.py) against the reference, same tolerance table as the
kernels: the cache-blocked eager path over many shapes, the inductor-compiled opt-in on a few, and what the default runs."""
import pytest
import torch

from radargate_kernels import radar_gate_reference
from radargate_kernels import radar_gate
from radargate_kernels.cpu import radar_gate_cpu_eager
from helpers import check_against_reference, make_problem, run_with_grads

CASES = [
    # (T, K, D, r, bias, ids, chunk)
    (0, 3, 6, 2, True, True, 4),       # no tokens
    (1, 1, 2, 1, False, False, 4),     # single token, K = 1, D = 2
    (3, 1, 10, 3, True, True, 2),      # K = 1: only the bias rotates
    (37, 8, 64, 8, True, True, 16),    # ragged last chunk
    (20, 13, 130, 3, False, True, 7),  # odd K, prime D/2, chunk not dividing T
    (9, 5, 10, 2, True, False, 128),   # one chunk, bias without ids
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-K{}-D{}-r{}-chunk{}".format(*c[:4], c[6]))
def test_cpu_path_matches_reference(case, dtype):
    T, K, D, r, bias, ids, chunk = case
    p = make_problem(T, K, D, r, dtype=dtype, bias=bias, ids=ids, seed=T + K + D)
    gen = torch.Generator().manual_seed(T + D)
    dy = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype)

    def cpu(expert_out, weights, rot_down, rot_up, angle_bias, expert_ids, tau):
        return radar_gate_cpu_eager(expert_out, weights, rot_down, rot_up, angle_bias, expert_ids,
                                    tau, 1e-6, chunk=chunk)

    check_against_reference(cpu, p, dy, T + D)


@pytest.mark.parametrize("case", [(37, 8, 64, 8, True, True), (5, 1, 10, 3, True, False)],
                         ids=["T37-K8-bias-ids", "T5-K1-bias"])
def test_compiled_cpu_path_of_radar_gate_matches_reference(case, monkeypatch):
    monkeypatch.setenv("RADARGATE_CPU_PATH", "compile")
    T, K, D, r, bias, ids = case
    p = make_problem(T, K, D, r, bias=bias, ids=ids, seed=5)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    check_against_reference(radar_gate, p, dy, 1, backend="torch")  # autograd: eager path
    with torch.no_grad():  # no autograd: the compiled reference
        y = radar_gate(**p, backend="torch")
    torch.testing.assert_close(y, radar_gate_reference(**p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["eager", "triton"])
def test_all_zero_experts_give_zero_output_and_finite_gradients(path):
    # LoRA experts start with B = 0: every expert output is exactly zero on the first step
    p = make_problem(6, 3, 10, 2, bias=True, ids=True, seed=3)
    p["expert_out"] = torch.zeros_like(p["expert_out"])
    p["expert_out"][0, 1] = torch.randn(10)  # and one token with a single non-zero expert
    dy = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    if path == "eager":
        fn = lambda **kw: radar_gate_cpu_eager(*[kw[k] for k in (  # noqa: E731
            "expert_out", "weights", "rot_down", "rot_up", "angle_bias", "expert_ids")],
            kw["tau"], 1e-6)
    else:
        fn = lambda **kw: radar_gate(**kw, backend="triton")  # noqa: E731
    y, g = run_with_grads(fn, p, dy)
    y_r, g_r = run_with_grads(radar_gate_reference, p, dy)
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-6)
    for name in g_r:
        assert torch.isfinite(g[name]).all(), name
        torch.testing.assert_close(g[name], g_r[name], rtol=1e-4, atol=1e-4)


def test_default_cpu_path_never_compiles_and_chunks_by_elements(monkeypatch):
    """Issue #26: a forward without autograd no longer compiles unless asked
    (RADARGATE_CPU_PATH=compile), and small K D run in one chunk (a chunk holds at least
    CHUNK_ELEMS elements of V, and at least CHUNK tokens)."""
    import radargate_kernels.cpu as cpu
    from radargate_kernels import radar_gate
    monkeypatch.delenv("RADARGATE_CPU_PATH", raising=False)

    def no_compile(*a, **k):
        raise AssertionError("the default CPU path compiled")
    monkeypatch.setattr(cpu, "_compiled", no_compile)
    calls = []
    orig = cpu._chunk_forward
    monkeypatch.setattr(cpu, "_chunk_forward", lambda V, *a, **k: calls.append(V.shape[0])
                        or orig(V, *a, **k))
    p = make_problem(512, 2, 64, 4, seed=1)
    with torch.no_grad():
        y = radar_gate(**p, backend="torch")
    assert calls == [512]
    torch.testing.assert_close(y, radar_gate_reference(**p), rtol=1e-5, atol=1e-5)
    calls.clear()
    p = make_problem(300, 8, 1024, 2, seed=2)
    with torch.no_grad():
        radar_gate(**p, backend="torch")
    assert calls == [128, 128, 44]
