"""RadarGate in PEFT's X-LoRA: one call swaps X-LoRA's weighted sum of adapter outputs for RadarGate.

    model = peft.get_peft_model(base, peft.XLoraConfig(...))   # X-LoRA as usual
    use_radargate(model, rank=8)                               # every X-LoRA Linear now gates by RadarGate
    ...train: the router (X-LoRA's classifier) and the gates...
    torch.save(xlora_gate_state_dict(model), ...)              # the gates (X-LoRA saves its classifier)
    load_xlora_gate_state_dict(fresh_model_after_use_radargate, sd)   # checked, all or nothing

X-LoRA scales the input of adapter e by the router's weight w_e; for a linear adapter (dropout
aside) that is w_e times the adapter's output v_e = B_e A_e x * scaling_e * global_scaling_weight,
so a layer's X-LoRA output is ``base(x) + sum_e w_e v_e``. Here it is ``base(x) + radar_gate(V, w)``
with a trainable ``RadarGate`` per layer, registered as the layer's ``radargate`` submodule (the
optimizer, ``state_dict`` and ``load_state_dict`` see it). A gate starts as plain weighted-sum
gating (``rot_up = 0``, ``angle_bias = 0``), so the swap changes nothing until it trains.
X-LoRA's top-k (``top_k_lora``) keeps only the k selected slots: they go to ``radar_gate`` with
their expert ids, so an unselected adapter is neither in the sum nor in the relation map.
Dropout: each adapter's own dropout is applied to x, as X-LoRA does (before the adapter, not to
the router-weighted input: the same in expectation)."""
from __future__ import annotations

import torch
from torch import nn

from ..adapters import lora_variant
from ..nn import RadarGate


def _xlora_layers(model: nn.Module):
    from peft.tuners.xlora.layer import XLoraLinearLayer
    for name, module in model.named_modules():
        layer = getattr(module.forward, "__self__", None)
        if isinstance(layer, XLoraLinearLayer):
            yield name, module, layer


def use_radargate(model: nn.Module, rank: int = 8, tau: float = 1.0, angle_bias: bool = True,
                  eps: float = 1e-6) -> list:
    """Swap the mixing of every X-LoRA Linear layer of ``model`` (a PEFT X-LoRA model) for
    RadarGate. Returns the names of the swapped layers. Raises if there is none, or if a layer
    was already swapped. The gates are fp32 (cast to the activations' dtype in the op)."""
    found = list(_xlora_layers(model))
    if not found:
        if any(isinstance(getattr(m, "radargate", None), RadarGate) for m in model.modules()):
            raise ValueError("model: its X-LoRA layers already use RadarGate")
        raise ValueError("model: expected a PEFT X-LoRA model (no X-LoRA Linear layer found; "
                         "Embedding and Conv2d X-LoRA layers are not supported)")
    for _, module, layer in found:
        n = len(module.lora_A)
        gate = RadarGate(module.out_features, n, rank=rank, tau=tau, angle_bias=angle_bias,
                         eps=eps).to(module.lora_A[next(iter(module.lora_A))].weight.device)
        module.add_module("radargate", gate)
        module.forward = _RadarGateForward(layer, module)
    return [name for name, _, _ in found]


class _RadarGateForward:
    """The swapped ``forward(x, *args, scalings=None, **kwargs)`` of one X-LoRA Linear."""

    def __init__(self, layer, module):
        self.layer, self.module = layer, module

    def __call__(self, x, *args, scalings=None, **kwargs):
        layer, target = self.layer, self.module
        dtype = x.dtype
        slots = [(i, a) for i, a in enumerate(target.active_adapters) if a in target.lora_A]
        if layer.adapters_disabled or target.merged or scalings is None or not slots:
            return layer.forward(x, *args, scalings=scalings, **kwargs)
        for _, a in slots:  # what X-LoRA's own mixing refuses or weights differently
            if target.use_dora.get(a):
                raise ValueError(f"X-LoRA adapter {a!r} uses DoRA: not supported (nor by X-LoRA)")
            if lora_variant(target, a) is not None:
                raise ValueError(f"X-LoRA adapter {a!r} uses the LoRA variant "
                                 f"{type(lora_variant(target, a)).__name__}: not supported")
            if target.lora_B[a].bias is not None:
                raise ValueError(f"X-LoRA adapter {a!r} has a LoRA bias: not supported")
        result = target.base_layer(x, *args, **kwargs)
        w = layer.get_maybe_topk_scalings(scalings)  # [batch, seq, n], zeros off the top k
        outs = []
        for _, a in slots:
            xa = x.to(target.lora_A[a].weight.dtype)
            outs.append(target.lora_B[a](target.lora_A[a](target.lora_dropout[a](xa)))
                        * (target.scaling[a] * layer.config.global_scaling_weight))
        V = torch.stack(outs, dim=-2)  # [batch, seq, n, out]
        w = w[..., [i for i, _ in slots]].to(V.dtype)
        ids = None
        k = layer.config.top_k_lora
        if k is not None and k < V.shape[-2]:
            # the slots X-LoRA kept: its own top-k of the raw scalings (the processed w has zeros
            # off the top k, which a top-k of w would pick over negative raw logits)
            raw = scalings[:, :, layer.layer_number, :][..., [i for i, _ in slots]]
            ids = torch.topk(raw, k, dim=-1).indices
            V = torch.gather(V, -2, ids.unsqueeze(-1).expand(*ids.shape, V.shape[-1]))
            w = torch.gather(w, -1, ids)
        y = target.radargate(V, w, ids)
        return (result + y.to(result.dtype)).to(dtype)


def xlora_gate_state_dict(model: nn.Module) -> dict:
    """The RadarGate parameters of a model after ``use_radargate`` ({state_dict key: tensor});
    load them back with ``load_xlora_gate_state_dict``."""
    return {k: v.detach() for k, v in model.state_dict().items() if ".radargate." in k}


def load_xlora_gate_state_dict(model: nn.Module, state_dict: dict):
    """Load gates (and any other keys of the model, e.g. X-LoRA's classifier) into a model after
    ``use_radargate``: every gate key must be present, and every key, shape and dtype is checked
    before anything is written (``load_radargate_state_dict``)."""
    from ..adapters import load_radargate_state_dict
    missing = sorted(set(xlora_gate_state_dict(model)) - set(state_dict))
    if missing:
        raise ValueError(f"state_dict: missing gate keys {missing[:5]} ({len(missing)} missing; "
                         f"nothing was loaded)")
    return load_radargate_state_dict(model, state_dict)
