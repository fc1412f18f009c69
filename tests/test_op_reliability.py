"""The op's contract at its edges (issue #12): integer id dtypes, tau/eps ranges, devices checked
before values, gradients with retain_graph / create_graph, torch.compile behaviour."""
import pytest
import torch

from radargate_kernels import cpu as cpu_mod
from radargate_kernels import (radar_gate, radar_gate_lora, radar_gate_lora_reference,
                               radar_gate_reference)
from radargate_kernels.validation import EPS_RANGE
from helpers import make_problem
from lora_helpers import make_lora_problem

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
PATHS = ["eager", "triton", "reference"]


def _call(path, p):
    if path == "reference":
        return radar_gate_reference(**p)
    return radar_gate(**p, backend="torch" if path == "eager" else "triton")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_every_integer_id_dtype_indexes_experts(path, dtype):
    # uint8 used to index as a boolean mask on the torch path (a silently wrong result)
    p = make_problem(5, 3, 8, 2, bias=True, ids=True, seed=1)
    want = _call(path, p)
    p["expert_ids"] = p["expert_ids"].to(dtype)
    assert torch.equal(_call(path, p), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_every_integer_id_dtype_on_the_fused_layer(backend, dtype):
    p = make_lora_problem(4, 3, 6, 8, 2, 2, ids=True, bias=True, seed=2)
    want = radar_gate_lora(**p, backend=backend)
    p["expert_ids"] = p["expert_ids"].to(dtype)
    assert torch.equal(radar_gate_lora(**p, backend=backend), want)


@pytest.mark.parametrize("name, value, message", [
    ("eps", EPS_RANGE[0] / 10, "eps: expected a value in"),
    ("eps", EPS_RANGE[1] * 10, "eps: expected a value in"),
    ("eps", 10 ** 400, "eps: expected a finite float, got an integer too large"),
    ("tau", 10 ** 400, "tau: expected a finite float, got an integer too large"),
    ("tau", 1e-40, "tau: expected a value in"),
])
def test_tau_eps_out_of_range_are_clear_errors(name, value, message):
    p = make_problem(3, 2, 4, 2)
    p[name] = value
    with pytest.raises(ValueError, match=message):
        radar_gate(**p)
    lp = make_lora_problem(3, 2, 4, 4, 2, 2)
    lp[name] = value
    with pytest.raises(ValueError, match=message):
        radar_gate_lora(**lp)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("eps", EPS_RANGE)
def test_eps_at_the_ends_of_its_range_is_finite_with_a_zero_expert(path, eps):
    p = make_problem(4, 3, 8, 2, bias=True, ids=True, seed=3)
    p["expert_out"] = p["expert_out"].clone()
    p["expert_out"][1, 2] = 0.0  # n = eps for this expert
    p["eps"] = eps
    leaves = {k: p[k].clone().requires_grad_(True) for k in ("expert_out", "rot_up")}
    y = _call(path, dict(p, **leaves))
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t.grad).all() for t in leaves.values())
    torch.testing.assert_close(y, radar_gate_reference(**p), rtol=1e-5, atol=1e-5)


def test_devices_are_checked_before_id_values():
    p = make_problem(3, 2, 4, 2, bias=True, ids=True)
    p["expert_ids"] = p["expert_ids"].to("meta")
    with pytest.raises(ValueError, match="expert_ids: expected device cpu"):
        radar_gate(**p)
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in
            make_problem(3, 2, 4, 2, bias=True, ids=True).items()}
    assert radar_gate(**meta).shape == (3, 4)  # shapes only: no value is read


@pytest.mark.parametrize("path", ["eager", "triton"])
def test_retain_graph_and_create_graph(path):
    p = make_problem(4, 3, 8, 2, bias=True, ids=True, seed=4)
    V = p["expert_out"].clone().requires_grad_(True)
    y = _call(path, dict(p, expert_out=V))
    y.sum().backward(retain_graph=True)  # task loss, then a second loss on the same graph
    first = V.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(V.grad, 2 * first)
    y = _call(path, dict(p, expert_out=V))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), V, create_graph=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_layer_retain_graph_and_create_graph(backend):
    p = make_lora_problem(4, 3, 6, 8, 2, 2, ids=True, bias=True, seed=5)
    x = p["x"].clone().requires_grad_(True)
    y = radar_gate_lora(**dict(p, x=x), backend=backend)
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)
    y = radar_gate_lora(**dict(p, x=x), backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_opt_in_cpu_path_gradients_and_the_compiled_forward_stays_compiled(monkeypatch):
    """The CPU path with RADARGATE_CPU_PATH=compile: with autograd it is the eager path
    (retain_graph works, create_graph is a clear error); a forward without autograd runs the
    compiled reference,
    which a bad input does not turn off, and shapes / tau values do not exhaust dynamo's
    recompile limit (which would silently fall back to eager code)."""
    monkeypatch.setenv("RADARGATE_CPU_PATH", "compile")
    monkeypatch.setattr(cpu_mod, "_FAILED", [])
    p = make_problem(6, 3, 8, 2, bias=True, ids=True, seed=6)
    V = p["expert_out"].clone().requires_grad_(True)
    y = radar_gate(**dict(p, expert_out=V), backend="torch")
    torch.testing.assert_close(y, radar_gate_reference(**p), rtol=1e-5, atol=1e-5)
    y.sum().backward(retain_graph=True)
    first = V.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(V.grad, 2 * first)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(radar_gate(**dict(p, expert_out=V), backend="torch").sum(), V,
                            create_graph=True)
    calls = []
    real = cpu_mod._compiled

    def counting(*args):
        calls.append(args[0].__name__)
        return real(*args)
    monkeypatch.setattr(cpu_mod, "_compiled", counting)
    u8 = dict(p, expert_ids=p["expert_ids"].to(torch.uint8))
    out = radar_gate(**u8, backend="torch")
    assert calls and torch.equal(out, radar_gate(**p, backend="torch"))
    torch.testing.assert_close(out, radar_gate_reference(**p), rtol=1e-5, atol=1e-5)

    def broken_input(*args):
        def run(*a):
            raise IndexError("a bad input inside the compiled code")
        return run
    monkeypatch.setattr(cpu_mod, "_compiled", broken_input)
    with pytest.raises(IndexError):
        radar_gate(**p, backend="torch")
    assert cpu_mod._FAILED == []  # not a compiler failure: the compiled path stays on
    monkeypatch.setattr(cpu_mod, "_compiled", counting)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for i, T in enumerate([1, 2, 3, 5, 8, 13, 21, 34, 55, 89]):
            q = make_problem(T, 3, 8, 2, bias=True, ids=True, seed=T)
            q["tau"] = 0.5 + i / 10
            out = radar_gate(**q, backend="torch")
            torch.testing.assert_close(out, radar_gate_reference(**q), rtol=1e-5, atol=1e-5)
    assert len(calls) == 12


def test_compiler_failure_falls_back_once_with_a_warning(monkeypatch):
    monkeypatch.setenv("RADARGATE_CPU_PATH", "compile")
    monkeypatch.setattr(cpu_mod, "_FAILED", [])

    def broken(*args, **kwargs):
        raise OSError("no C++ compiler")
    monkeypatch.setattr(cpu_mod, "_compiled", broken)
    p = make_problem(4, 3, 8, 2, seed=7)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        y = radar_gate(**p, backend="torch")
    torch.testing.assert_close(y, radar_gate_reference(**p), rtol=1e-5, atol=1e-5)
    assert len(cpu_mod._FAILED) == 1


@pytest.mark.parametrize("bad", [5, 9])
def test_out_of_range_ids_under_torch_compile_raise(bad):
    """ids >= E raise on the device under torch.compile (negative ids are masked slots)."""
    torch._dynamo.reset()
    p = make_problem(4, 3, 8, 2, bias=True, ids=True, E_extra=2, seed=8)  # E = 5
    p["expert_ids"] = p["expert_ids"].clone()
    p["expert_ids"][2, 1] = bad
    fn = torch.compile(lambda q: radar_gate(**q, backend="torch"), fullgraph=True)
    with pytest.raises(RuntimeError, match=r"expert_ids: expected values < 5"):
        fn(p)
    lp = make_lora_problem(4, 3, 6, 8, 2, 2, ids=True, bias=True, seed=9)
    E = lp["lora_A"].shape[0]
    lp["expert_ids"] = lp["expert_ids"].clone()
    lp["expert_ids"][1, 0] = E + bad - 5
    fl = torch.compile(lambda q: radar_gate_lora(**q, backend="torch"), fullgraph=True)
    with pytest.raises(RuntimeError, match=rf"expert_ids: expected values < {E}"):
        fl(lp)


def test_masked_slots_under_torch_compile():
    """slot_mask and negative ids trace with fullgraph=True and give the eager result."""
    torch._dynamo.reset()
    p = make_problem(6, 3, 8, 2, bias=True, ids=True, seed=12, masked=True)
    fn = torch.compile(lambda q: radar_gate(**q, backend="torch"), fullgraph=True)
    torch.testing.assert_close(fn(p), radar_gate_reference(**p), rtol=1e-5, atol=1e-5)
    lp = make_lora_problem(6, 3, 6, 8, 2, 2, ids=True, bias=True, seed=13, masked=True)
    fl = torch.compile(lambda q: radar_gate_lora(**q, backend="torch"), fullgraph=True)
    torch.testing.assert_close(fl(lp), radar_gate_lora_reference(**lp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_large_magnitudes_stay_finite_and_accurate(path, scale):
    """|v| ~ 1e20..1e30 in fp32: |v|^2 overflows, so every path squares scaled rows. At
    rot_up = 0 the result is exactly the weighted sum; with angles O(1) it matches the float64
    truth; gradients stay finite."""
    p = make_problem(5, 3, 8, 2, seed=11)
    p["expert_out"] = p["expert_out"] * scale
    p["rot_up"] = torch.zeros_like(p["rot_up"])
    terms = p["weights"].double().unsqueeze(-1) * p["expert_out"].double()
    want, size = terms.sum(1), terms.abs().sum(1).max()
    # fp32 rounding of a K = 3 term sum: a few units of 2^-24 of the summands' size
    assert (_call(path, p).double() - want).abs().max() <= 8 * 2.0 ** -24 * size
    p["rot_up"] = make_problem(5, 3, 8, 2, seed=12)["rot_up"] / scale  # angles O(1)
    # (not rot_up: its exact gradient, sum d^T dalpha ~ |v|^2 ~ 1e40, is beyond fp32 itself)
    leaves = {k: p[k].clone().requires_grad_(True) for k in ("expert_out", "weights", "rot_down")}
    y = _call(path, dict(p, **leaves))
    truth = radar_gate_reference(**{k: (v.double() if isinstance(v, torch.Tensor)
                                        and v.is_floating_point() else v) for k, v in p.items()})
    assert (y.double() - truth).abs().max() <= 1e-5 * truth.abs().max()
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves.values())


@pytest.mark.parametrize("path", PATHS)
def test_subnormal_rows_stay_finite_and_accurate(path):
    """Issue #26: fp32 rows of subnormal values (|v| ~ 1e-40) gave NaN on the Triton path (the
    rows' scale was not a normal number). Every output element is a few fp32 products and sums
    rounded to the subnormal grid (units of 2^-149): within 8 such units of the float64 truth
    (measured 1.1); gradients finite."""
    p = make_problem(5, 3, 8, 2, seed=3)
    leaves = {"expert_out": (p["expert_out"] * 1e-40).requires_grad_(True)}
    y = _call(path, dict(p, **leaves))
    truth = radar_gate_reference(**{k: (v.double() if isinstance(v, torch.Tensor)
                                        and v.is_floating_point() else v)
                                    for k, v in dict(p, **leaves).items()})
    assert torch.isfinite(y).all() and truth.abs().max() > 1e4 * 2.0 ** -149
    assert (y.double() - truth).abs().max() <= 8 * 2.0 ** -149
    y.sum().backward()
    assert torch.isfinite(leaves["expert_out"].grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_magnitudes_on_the_fused_layer(backend):
    p = make_lora_problem(4, 3, 6, 8, 2, 2, ids=True, bias=True, seed=13)
    p["x"] = p["x"] * 1e20
    p["rot_up"] = p["rot_up"] / 1e20
    y = radar_gate_lora(**p, backend=backend)
    truth = radar_gate_lora_reference(**{k: (v.double() if isinstance(v, torch.Tensor)
                                             and v.is_floating_point() else v)
                                          for k, v in p.items()})
    assert torch.isfinite(y).all()
    assert (y.double() - truth).abs().max() <= 1e-5 * truth.abs().max()


# ops that make the host wait for the device on CUDA (a value or an output size read back)
_SYNCING_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "_unique2",
                "unique_dim", "unique_consecutive", "bincount", "repeat_interleave", "equal"}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("op", ["radar_gate", "radar_gate_lora"])
def test_no_host_sync_in_forward_or_backward(monkeypatch, op, backend):
    """Issue #26: no op that syncs with the host on CUDA (it would stall the stream and break
    CUDA-graph capture), in forward or backward, top-k with masked slots: every op dispatched
    on CPU is checked, through the public call and (a dispatch mode does not see inside a
    custom op) through the custom ops' implementations called directly. The id range check is
    left out: for CPU tensors it is a host check by design, for CUDA tensors
    torch._assert_async."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import radargate_kernels.lora as L
    import radargate_kernels.validation as V
    from radargate_kernels.kernels import launch

    class NoSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func._schema.name.split("::")[-1] not in _SYNCING_OPS, f"host sync: {func}"
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(V, "_check_id_range", lambda *a, **k: None)
    if op == "radar_gate":
        p = make_problem(20, 3, 8, 2, bias=True, ids=True, seed=1, masked=True)
        fn = radar_gate
    else:
        p = make_lora_problem(20, 3, 8, 6, 2, 3, ids=True, bias=True, seed=1, masked=True)
        fn = radar_gate_lora
    for v in p.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v.requires_grad_(True)
    with NoSync():
        fn(**p, backend=backend).sum().backward()
    with torch.no_grad(), NoSync():
        ids = V.slot_ids(p["expert_ids"], p["slot_mask"], 3)
        if op == "radar_gate" and backend == "triton":
            args = (p["expert_out"], p["weights"], p["rot_down"], p["rot_up"], p["angle_bias"],
                    ids)
            y, *state = launch.run("forward", *args, p["tau"], 1e-6)
            launch.run("backward", torch.ones_like(y), *args, *state, p["tau"], 1e-6)
        elif op == "radar_gate_lora":
            g = torch.where(ids >= 0, p["weights"], 0.0)
            args = (p["x"], p["lora_A"], p["lora_B"], g, p["rot_down"], p["rot_up"],
                    p["angle_bias"], ids, L.balance_factors(p["lora_B"]), p["scaling"], p["tau"],
                    1e-6, backend)
            y, *saved = L._forward(*args, True)
            L._backward(torch.ones_like(y), *args, True, True, *saved)
            L._backward(torch.ones_like(y), *args, True, True)  # recomputing s, d, P, Q
