"""Bad input gets a clear error naming the argument, on every backend; inputs are never mutated."""
import pytest
import torch

from radargate_kernels import radar_gate
from helpers import make_problem

BACKENDS = ["torch", "triton"]


def _p(**over):
    p = make_problem(3, 4, 10, 2, bias=True, ids=True, seed=0)
    p.update(over)
    return p


CASES = [
    # (overrides, exception, words the message must contain)
    (dict(expert_out=torch.randn(3, 4, 9)), ValueError, ["expert_out", "even"]),
    (dict(expert_out=torch.randn(10)), ValueError, ["expert_out", "[..., K, D]"]),
    (dict(rot_down=torch.randn(12, 2)), ValueError, ["rot_down", "[10, r]"]),
    (dict(rot_up=torch.randn(3, 5)), ValueError, ["rot_up", "[2, 5]"]),
    (dict(weights=torch.randn(3, 5)), ValueError, ["weights", "(3, 4)"]),
    (dict(expert_ids=torch.zeros(3, 4)), TypeError, ["expert_ids", "integer"]),
    (dict(expert_ids=torch.zeros(3, 3, dtype=torch.long)), ValueError, ["expert_ids", "shape"]),
    (dict(expert_ids=torch.full((3, 4), 6)), ValueError, ["expert_ids", "< 6", "maximum of 6"]),
    (dict(slot_mask=torch.ones(3, 4)), TypeError, ["slot_mask", "torch.bool"]),
    (dict(slot_mask=torch.ones(4, 3, dtype=torch.bool)), ValueError, ["slot_mask", "(3, 4)"]),
    (dict(expert_ids=None), ValueError, ["angle_bias", "expert_ids"]),
    (dict(angle_bias=torch.randn(6, 4)), ValueError, ["angle_bias", "[E, 5]"]),
    (dict(tau=0.0), ValueError, ["tau", "> 0"]),
    (dict(tau=float("nan")), ValueError, ["tau", "finite"]),
    (dict(tau=float("inf")), ValueError, ["tau", "finite"]),
    (dict(weights=torch.randn(3, 4, dtype=torch.float64)), TypeError, ["weights", "float32"]),
    (dict(rot_down=torch.randn(10, 2).half()), TypeError, ["rot_down", "float32"]),
    (dict(expert_out=torch.randint(0, 3, (3, 4, 10))), TypeError, ["expert_out", "dtype"]),
    (dict(weights=[1.0, 2.0]), TypeError, ["weights", "torch.Tensor"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over,exc,words", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_raises_clear_error(over, exc, words, backend):
    with pytest.raises(exc) as info:
        radar_gate(**_p(**over), backend=backend)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps"):
        radar_gate(**_p(), eps=eps)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        radar_gate(**_p(), backend="cuda")


def test_triton_backend_rejects_shapes_beyond_kernel_limits_and_auto_falls_back():
    p = make_problem(2, 3, 10, 33, seed=0)  # rank 33 > MAX_OP_RANK = 32
    with pytest.raises(ValueError, match="rank r = 33"):
        radar_gate(**p, backend="triton")
    y = radar_gate(**p, backend="auto")  # documented fallback: the reference
    torch.testing.assert_close(y, radar_gate(**p, backend="torch"))


def test_more_than_64_slots_fall_back_on_auto_and_raise_on_triton():
    p = make_problem(1, 65, 6, 2, seed=0)  # K = 65 > MAX_K = 64
    with pytest.raises(ValueError, match="K = 65 experts per token exceeds"):
        radar_gate(**p, backend="triton")
    y = radar_gate(**p, backend="auto")
    torch.testing.assert_close(y, radar_gate(**p, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_mutated(backend):
    p = _p()
    tensors = {k: v for k, v in p.items() if isinstance(v, torch.Tensor)}
    before = {k: v.clone() for k, v in tensors.items()}
    leaves = {k: v.requires_grad_(True) for k, v in tensors.items() if v.is_floating_point()}
    y = radar_gate(**p, backend=backend)
    y.backward(torch.randn_like(y))
    for k, v in tensors.items():
        assert torch.equal(v.detach(), before[k]), k
