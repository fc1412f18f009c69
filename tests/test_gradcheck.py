"""torch.autograd.gradcheck in float64, full mode (fast_mode=False), through the Triton path
(RadarGateFunction: hand-written backward kernels) and through the reference (autograd)."""
import pytest
import torch

from radargate_kernels import radar_gate, radar_gate_reference
from helpers import make_problem

SHAPES = [
    # (T, K, D, r, bias, ids, zero_expert)  -- edge exercised
    (2, 3, 6, 2, True, False, False),    # odd K, prime D/2, bias without ids
    (2, 1, 4, 2, True, True, False),     # K = 1: only the angle bias rotates
    (3, 2, 2, 1, False, False, False),   # D = 2 (one pair), r = 1
    (2, 4, 6, 3, True, True, True),      # an all-zero expert vector (eps floor), sparse ids
    (1, 5, 10, 2, False, True, False),   # single token, K not a power of two
    (1, 33, 2, 2, True, True, True),     # K > 32: the WIDE launch plan, with a zero expert
]


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-K{}-D{}-r{}".format(*s[:4])
                         + ("-bias" if s[4] else "") + ("-ids" if s[5] else "")
                         + ("-zero" if s[6] else ""))
def test_gradcheck_full_mode_float64(shape, impl):
    T, K, D, r, bias, ids, zero = shape
    p = make_problem(T, K, D, r, dtype=torch.float64, bias=bias, ids=ids, seed=T * 100 + K * 10 + D)
    V = p["expert_out"]
    if zero:
        V[0, 1].zero_()
    # With a zero vector v_hat = v / eps: eps must sit far above gradcheck's 1e-6 perturbation
    # (max(|v|, eps) has a kink at |v| = eps) and be large enough that the function's curvature
    # ~1/eps^3 keeps central differences accurate (eps = 1e-3 gave a 3e-5 truncation error in
    # the reference's own gradcheck). All other expert norms here are > 0.1.
    eps = 0.1 if zero else 1e-6
    names = ["expert_out", "weights", "rot_down", "rot_up"] + (["angle_bias"] if bias else [])
    leaves = [p[n].clone().requires_grad_(True) for n in names]
    fn = radar_gate_reference if impl == "reference" else radar_gate

    def f(*xs):
        kw = dict(zip(names, xs))
        extra = {} if impl == "reference" else {"backend": "triton"}
        return fn(**kw, expert_ids=p["expert_ids"], tau=p["tau"], eps=eps, **extra)

    assert torch.autograd.gradcheck(f, leaves, fast_mode=False, atol=1e-7, rtol=1e-6)
