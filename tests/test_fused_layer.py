"""RadarGateLoRALinear's fused path (radar_gate_lora) against its materialized path, and what it
saves for backward (the point of the fused layer)."""
import math

import pytest
import torch
from torch import nn

from radargate_kernels.nn import RadarGateLoRALinear
from radargate_kernels.memory import saved_bytes


def _pair(top_k, rotation, stretch, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    kw = dict(num_experts=5, rank=3, alpha=6, top_k=top_k, gate_rank=2, tau=0.7,
              rotation=rotation, stretch=stretch, dropout=dropout)
    fused = RadarGateLoRALinear(nn.Linear(12, 10), **kw)
    with torch.no_grad():  # leave the start state: non-zero experts and rotation
        fused.lora_B.normal_()
        if rotation:
            fused.gate.rot_up.normal_()
            fused.gate.angle_bias.normal_()
    mat = RadarGateLoRALinear(nn.Linear(12, 10), **kw, fused=False)
    mat.load_state_dict(fused.state_dict())
    return fused, mat


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("rotation, stretch", [(True, True), (False, True), (True, False)],
                         ids=["radargate", "weighted_sum", "no_stretch"])
def test_fused_and_materialized_layers_agree(top_k, rotation, stretch):
    fused, mat = _pair(top_k, rotation, stretch)
    assert fused.fused and not mat.fused
    x = torch.randn(2, 7, 12)
    outs = []
    for layer in (fused, mat):
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        params = [p for p in layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, 10)).sum(), [xx] + params,
                                    allow_unused=True)  # stretch=False, dense: router unused
        outs.append((y.detach(), grads, layer.aux_loss.detach()))
    (y1, g1, a1), (y2, g2, a2) = outs
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a1, a2)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_layer_with_dropout_matches_materialized_under_the_same_seed():
    fused, mat = _pair(2, True, True, dropout=0.3)
    x = torch.randn(9, 12)
    torch.manual_seed(5)
    y1 = fused(x)
    torch.manual_seed(5)
    y2 = mat(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    fused.eval()
    mat.eval()
    torch.testing.assert_close(fused(x), mat(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k, E", [(None, 8), (2, 8), (None, 40)], ids=["E8", "E8top2", "E40"])
def test_fused_layer_saves_at_most_1_3x_one_plain_lora(top_k, E):
    # the shape: T = 2048, in = out = 1024, rank 8, fp32, non-zero lora_B and rot_up;
    # measured on the PyTorch path; the Triton path saves what _saved_shapes says for it (s of
    # every expert and P, Q instead of the slots' s): its total is checked from those shapes
    T, d = 2048, 1024
    torch.manual_seed(0)
    x = torch.randn(T, d, requires_grad=True)  # a layer inside a network: dx is needed
    base = nn.Linear(d, d)
    lora_a, lora_b = nn.Linear(d, 8, bias=False), nn.Linear(8, d, bias=False)
    for p in base.parameters():
        p.requires_grad_(False)
    plain = saved_bytes(lambda: base(x) + 2.0 * lora_b(lora_a(x)))
    layer = RadarGateLoRALinear(base, num_experts=E, rank=8, top_k=top_k)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.rot_up.normal_()
    import radargate_kernels.lora as lora_mod
    orig = lora_mod._resolve_backend
    lora_mod._resolve_backend = lambda b, x, rot, ranks: "torch"
    try:
        fused = saved_bytes(lambda: layer(x))
    finally:
        lora_mod._resolve_backend = orig
    assert plain["total"] > 12 * 2 ** 20  # x, W, and the two small LoRA tensors: 12.1 MiB
    assert fused["total"] <= 1.3 * plain["total"], (fused, plain)
    # the Triton path: the same minus the PyTorch path's low-rank tensors plus its own
    K = top_k or E
    args = (lora_mod.save_lowrank(None, x, layer.lora_A, K, 8), x, layer.lora_A, K, 8, True)
    size = lambda shapes: sum(4 * math.prod(s) for s in shapes if s is not None)  # noqa: E731
    triton_total = (fused["total"] - size(lora_mod._saved_shapes(*args, "torch"))
                    + size(lora_mod._saved_shapes(*args, "triton")))
    assert triton_total <= 1.3 * plain["total"], (triton_total, plain)
    # nothing of size T x K x out (s [T, K, r] and d [T, K, rg] are kept only while small:
    # E = 8 dense and top-2 here, not E = 40: lora.save_lowrank)
    assert fused["largest"] <= T * d * 4


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_empty_batch_works(fused, top_k):
    layer = RadarGateLoRALinear(nn.Linear(8, 6), num_experts=3, rank=2, top_k=top_k, fused=fused)
    x = torch.zeros(2, 0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 6)
    assert layer.aux_loss == 0  # nothing to balance (was NaN: the mean of no probabilities)
    (y.sum() + layer.aux_loss).backward()
    assert x.grad.shape == x.shape


def test_layer_recompute_switch_controls_what_backward_keeps():
    # a small layer where auto keeps s, d (K (r + rg) 4 = 3 * 4 * 4 = 48 bytes per token <= a
    # quarter of x's 64 * 4): recompute=True keeps exactly s [T, K, r], d [T, K, rg] and the
    # small P, Q less; gradients are bitwise the same
    from radargate_kernels.memory import saved_bytes
    torch.manual_seed(0)
    T, d, E, r, rg = 16, 64, 3, 2, 2
    x = torch.randn(T, d, requires_grad=True)
    base = nn.Linear(d, d)
    runs = {}
    for rc in (None, True, False):
        torch.manual_seed(1)
        layer = RadarGateLoRALinear(base, num_experts=E, rank=r, gate_rank=rg, recompute=rc)
        with torch.no_grad():
            layer.lora_B.normal_()
        kept = saved_bytes(lambda: layer(x))["total"]
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), [x, layer.lora_A, layer.lora_B])
        runs[rc] = (kept, grads)
    assert runs[None][0] == runs[False][0]
    P_Q = ((E * r) ** 2 + E * r * rg) * 4
    assert runs[False][0] - runs[True][0] == T * E * (r + rg) * 4 + P_Q
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.equal(a, b)
