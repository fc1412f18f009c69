"""radargate_kernels.nn: modules, injection, state dicts (CPU path and interpreter kernels)."""
import copy
import os
import sys

import pytest
import torch
from torch import nn

from radargate_kernels import radar_gate_reference
from radargate_kernels.nn import (RadarGate, RadarGateLoRALinear, inject_radargate,
                                  load_radargate_state_dict, radargate_state_dict)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from train_multitask import Block  # noqa: E402  (the example's tiny transformer block)


def test_radar_gate_module_starts_as_weighted_sum_and_learns_rotation():
    torch.manual_seed(0)
    gate = RadarGate(10, 3, rank=4)
    V, g = torch.randn(5, 3, 10), torch.softmax(torch.randn(5, 3), -1)
    y = gate(V, g)
    torch.testing.assert_close(y, torch.einsum("tk,tkd->td", g, V), rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    assert gate.rot_up.grad.abs().max() > 0 and gate.angle_bias.grad.abs().max() > 0


def _layer(top_k=None, seed=0):
    torch.manual_seed(seed)
    layer = RadarGateLoRALinear(nn.Linear(12, 10), num_experts=4, rank=3, alpha=6, top_k=top_k,
                                gate_rank=2, tau=0.7)
    with torch.no_grad():  # leave the start state: non-zero experts and rotation
        layer.lora_B.normal_()
        layer.gate.rot_up.normal_()
        layer.gate.angle_bias.normal_()
    return layer


def test_lora_linear_matches_composition_of_reference_parts():
    layer = _layer()
    x = torch.randn(2, 3, 12, requires_grad=True)
    y = layer(x)
    x2 = x.reshape(-1, 12)
    probs = torch.softmax(layer.router(x2), -1)
    V = torch.einsum("ti,eir,ero->teo", x2, layer.lora_A, layer.lora_B) * layer.scaling
    ref = layer.base(x2) + radar_gate_reference(V, probs, layer.gate.rot_down, layer.gate.rot_up,
                                                layer.gate.angle_bias, tau=0.7)
    torch.testing.assert_close(y.reshape(-1, 10), ref, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(y.sum(), [x, layer.lora_A, layer.gate.rot_up])
    g2 = torch.autograd.grad(ref.sum(), [x, layer.lora_A, layer.gate.rot_up])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_top_k_equals_dense_with_unselected_weights_zero_at_identity_rotation():
    # With the identity rotation (the start state) both are sum_{selected} w_i v_i. With a
    # learned rotation they differ by design: the relation map runs over the K slots handed to
    # the op (SPEC), i.e. the selected experts only.
    torch.manual_seed(1)
    sparse = RadarGateLoRALinear(nn.Linear(12, 10), num_experts=5, rank=3, top_k=2)
    with torch.no_grad():
        sparse.lora_B.normal_()
    dense = copy.deepcopy(sparse)
    dense.top_k = None
    x = torch.randn(7, 12)
    w, ids, probs = sparse.route(x)
    full = torch.zeros_like(probs).scatter(1, ids, w)
    dense.route = lambda x2: (full, None, probs)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [None, 2])
def test_rotation_off_is_weighted_sum_gating(top_k):
    # rotation=False: no RotationGate parameters, y = base(x) + sum_i g_i v_i over the routed
    # experts; equal to a RadarGate layer whose rotation is the identity (its start state).
    with_rot = _layer(top_k=top_k)
    no_rot = RadarGateLoRALinear(nn.Linear(12, 10), num_experts=4, rank=3, alpha=6, top_k=top_k,
                                 rotation=False)
    state = {k: v for k, v in with_rot.state_dict().items() if not k.startswith("gate.")}
    no_rot.load_state_dict(state)
    assert no_rot.gate is None and not any(n.startswith("gate.") for n in no_rot.state_dict())
    x = torch.randn(9, 12)
    assert (with_rot(x) - no_rot(x)).abs().max() > 1e-3  # the learned-looking rotation matters
    with torch.no_grad():
        with_rot.gate.rot_up.zero_()
        with_rot.gate.angle_bias.zero_()
    torch.testing.assert_close(no_rot(x), with_rot(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [None, 2])
def test_stretch_off_uses_uniform_weights(top_k):
    layer = _layer(top_k=top_k)
    layer.stretch = False
    x = torch.randn(6, 12)
    w, ids, probs = layer.route(x)
    k = top_k or 4
    torch.testing.assert_close(w, torch.full((6, k), 1.0 / k))
    if top_k:  # selection still follows the router
        assert torch.equal(ids, probs.topk(top_k, -1).indices)
    V = layer.expert_outputs(x, ids)
    ref = layer.base(x) + radar_gate_reference(V, w, layer.gate.rot_down, layer.gate.rot_up,
                                               layer.gate.angle_bias, ids, tau=0.7)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_aux_loss_and_routing_counts():
    layer = _layer(top_k=2)
    x = torch.randn(16, 12)
    layer(x)
    assert layer.routing_counts.sum() == 16 * 2
    assert layer.aux_loss.ndim == 0 and layer.aux_loss >= 0.99  # >= 1, equality when balanced
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().max() > 0


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = Block(d=16, heads=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.enc(x))


def test_inject_train_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyNet().requires_grad_(False)  # adapters-only training, as with PEFT
    head_before = model.head
    names = inject_radargate(model, ["linear1", "linear2"], num_experts=3, rank=4, top_k=2)
    assert names == ["enc.linear1", "enc.linear2"]
    assert model.head is head_before and isinstance(model.enc.linear1, RadarGateLoRALinear)
    base_w = model.enc.linear1.base.weight.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    x, target = torch.randn(8, 5, 16), torch.randn(8, 5, 4)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        aux = sum(m.aux_loss for m in model.modules() if isinstance(m, RadarGateLoRALinear))
        (loss + 1e-3 * aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(model.enc.linear1.base.weight, base_w)  # base stays frozen
    assert model.enc.linear1.gate.rot_up.abs().max() > 0        # the rotation was learned
    sd = radargate_state_dict(model)
    assert sd and not any(".base." in k for k in sd)
    torch.manual_seed(0)
    fresh = TinyNet()  # same base weights (same seed), fresh experts and gates below
    torch.manual_seed(123)
    inject_radargate(fresh, r"enc\.linear[12]", num_experts=3, rank=4, top_k=2)
    assert not torch.equal(model(x), fresh(x))
    load_radargate_state_dict(fresh, sd)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    with pytest.raises(ValueError, match="missing keys"):
        load_radargate_state_dict(fresh, {})


def test_autocast_bfloat16_runs_with_fp32_math_inside():
    layer = _layer()
    x = torch.randn(6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.gate.rot_up.grad is not None and torch.isfinite(layer.gate.rot_up.grad).all()


def test_injected_model_trains_under_torch_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyNet().requires_grad_(False)
    inject_radargate(model, ["linear1", "linear2"], num_experts=3, rank=4)  # dense routing
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    x, target = torch.randn(4, 5, 16), torch.randn(4, 5, 4)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = (compiled(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("rotation", [True, False], ids=["rot", "weighted_sum"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "materialized"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_weight_of_an_unused_expert_changes_nothing(bad, fused, rotation):
    # top-1 routing sends every token to expert 0; expert 3's lora_B holds a non-finite entry.
    # As in the reference (which gathers B per slot), no output and no gradient may see it:
    # the result and every gradient equal those with that entry set to 0 (both paths, which
    # once multiplied every expert's B with every token's zeros: 0 * inf)
    torch.manual_seed(0)
    layer = RadarGateLoRALinear(nn.Linear(8, 8), num_experts=4, rank=2, top_k=1, fused=fused,
                                rotation=rotation)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
        layer.lora_B.normal_()
    x = torch.randn(5, 8)
    x[:, 0] = 1.0
    runs = []
    for value in (bad, 0.0):
        net = copy.deepcopy(layer)
        with torch.no_grad():
            net.lora_B[3, 0, 0] = value
        xr = x.clone().requires_grad_(True)
        y = net(xr)
        y.square().sum().backward()
        params = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        runs.append((y, xr.grad, params))
    (y1, dx1, p1), (y0, dx0, p0) = runs
    assert torch.isfinite(y1).all() and torch.equal(y1, y0) and torch.equal(dx1, dx0)
    assert p1.keys() == p0.keys() and "lora_B" in p1
    for name in p0:
        assert torch.equal(p1[name], p0[name]), name
