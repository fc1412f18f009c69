"""nn.Modules on top of ``radar_gate`` for LoRA-MoE code.

- ``RadarGate``: owns the RotationGate parameters; ``forward(expert_out, weights, expert_ids)``.
- ``RadarGateLoRALinear``: a frozen ``nn.Linear`` plus E LoRA experts, a StretchGate router
  (softmax with temperature, optional top-k with renormalisation) and a ``RadarGate``.
- ``inject_radargate``, ``radargate_state_dict``, ``load_radargate_state_dict``.
- ``from_peft_adapters``: N trained PEFT LoRA adapters as frozen experts gated by RadarGate.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .lora import radar_gate_lora
from .ops import radar_gate


class RadarGate(nn.Module):
    """RadarGate over K expert outputs of width ``dim``.

    Parameters: ``rot_down [dim, rank]``, ``rot_up [rank, dim/2]``, ``angle_bias [E, dim/2]``.
    Initialised as plain weighted-sum gating: ``rot_up = 0`` and ``angle_bias = 0`` give every
    angle 0 (the identity rotation), while ``rot_down`` is small and random so ``rot_up`` receives
    a non-zero gradient from the first step and the rotation is learned.

    forward(expert_out [..., K, dim], weights [..., K], expert_ids [..., K] | None) -> [..., dim].
    The parameters are cast to the dtype of ``expert_out`` (autocast-friendly); the op itself
    computes in fp32.
    """

    def __init__(self, dim: int, num_experts: int, rank: int = 8, tau: float = 1.0,
                 angle_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim: expected an even feature size, got {dim}")
        self.dim, self.num_experts, self.rank, self.tau, self.eps = dim, num_experts, rank, tau, eps
        self.rot_down = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))
        self.rot_up = nn.Parameter(torch.zeros(rank, dim // 2))
        self.angle_bias = nn.Parameter(torch.zeros(num_experts, dim // 2)) if angle_bias else None

    def forward(self, expert_out, weights, expert_ids=None):
        dt = expert_out.dtype
        beta = self.angle_bias.to(dt) if self.angle_bias is not None else None
        return radar_gate(expert_out, weights.to(dt), self.rot_down.to(dt), self.rot_up.to(dt),
                          beta, expert_ids, tau=self.tau, eps=self.eps)

    def extra_repr(self):
        return (f"dim={self.dim}, num_experts={self.num_experts}, rank={self.rank}, "
                f"tau={self.tau}, angle_bias={self.angle_bias is not None}")


class RadarGateLoRALinear(nn.Module):
    """``base(x) + RadarGate(expert outputs, router weights)`` with E LoRA experts.

    Expert i's output is ``(alpha / rank) * dropout(x) A_i B_i`` (A_i [in, rank] Kaiming-uniform,
    B_i [rank, out] zero, as in LoRA). The router is a linear map of ``x``: softmax of
    ``logits / router_temperature``; with ``top_k`` only the k best experts are kept, their
    weights renormalised, and only their outputs are computed (grouped by expert, one matmul per
    expert, never a loop over tokens) and handed to the op with ``expert_ids``.

    After each forward: ``aux_loss`` (Switch/Mixtral load-balancing loss, E * sum_e f_e P_e, f_e
    the fraction of routed slots going to e, P_e the mean router probability) and
    ``routing_counts`` (slots routed to each expert, summed since ``reset_stats()``).

    Ablation switches (the paper's ablation, and the baselines RadarGate is compared with):
    ``rotation=False`` drops the RotationGate (no ``gate`` parameters): plain softmax / top-k
    weighted-sum gating, ``sum_i g_i v_i``; ``stretch=False`` replaces the router's weights by
    uniform ones, ``1/K`` over the (selected) experts (top-k selection still uses the router).

    ``fused=True`` (default): the layer calls ``radar_gate_lora``, which never forms the expert
    outputs ``[T, K, out]`` (forward or backward) and saves only x, the router weights and ids
    for backward: about the memory of one LoRA, for any number of experts. ``fused=False`` keeps
    the materialized path (expert outputs, then ``radar_gate``); both give the same result.
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int = 8, alpha: float = 16,
                 dropout: float = 0.0, top_k: Optional[int] = None,
                 router_temperature: float = 1.0, gate_rank: int = 8, tau: float = 1.0,
                 freeze_experts: bool = False, rotation: bool = True, stretch: bool = True,
                 fused: bool = True):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= num_experts = {num_experts}, "
                             f"got {top_k}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        fin, fout = base.in_features, base.out_features
        self.num_experts, self.rank, self.top_k = num_experts, rank, top_k
        self.scaling = alpha / rank
        self.router_temperature = router_temperature
        self.rotation, self.stretch, self.fused = rotation, stretch, fused
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(num_experts, fin, rank, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, fout, device=dev, dtype=dt))
        bound = 1 / math.sqrt(fin)
        nn.init.uniform_(self.lora_A, -bound, bound)
        self.lora_A.requires_grad_(not freeze_experts)
        self.lora_B.requires_grad_(not freeze_experts)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = nn.Linear(fin, num_experts, bias=False, device=dev, dtype=dt)
        self.gate = (RadarGate(fout, num_experts, rank=gate_rank, tau=tau).to(dev, dt)
                     if rotation else None)
        self.aux_loss = None
        self.register_buffer("routing_counts", torch.zeros(num_experts, dtype=torch.long),
                             persistent=False)

    def reset_stats(self):
        self.routing_counts.zero_()

    def route(self, x2):
        """x2 [T, in] -> (weights [T, K], expert_ids [T, K] or None, probs [T, E])."""
        logits = self.router(x2).float() / self.router_temperature
        probs = torch.softmax(logits, dim=-1)
        if self.top_k is None:
            w, ids = probs, None
        else:
            w, ids = probs.topk(self.top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
        if not self.stretch:
            w = torch.full_like(w, 1.0 / w.shape[-1])
        return w, ids, probs

    def extra_repr(self):
        return (f"num_experts={self.num_experts}, rank={self.rank}, top_k={self.top_k}, "
                f"rotation={self.rotation}, stretch={self.stretch}, fused={self.fused}")

    def expert_outputs(self, x2, ids):
        """x2 [T, in] -> expert outputs [T, K, out] (all experts, or the selected ``ids``)."""
        h = self.dropout(x2)
        A = self.lora_A.to(h.dtype)
        B = self.lora_B.to(h.dtype)
        if ids is None:
            xa = torch.einsum("ti,eir->ter", h, A)
            return torch.einsum("ter,ero->teo", xa, B) * self.scaling
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = h.repeat_interleave(k, dim=0)[order]          # one row per (token, slot), by expert
        out = h.new_empty(T * k, B.shape[-1])
        start = 0
        for e, n in enumerate(counts):                       # one matmul per expert
            if n:
                out[start:start + n] = (rows[start:start + n] @ A[e]) @ B[e]
            start += n
        V = torch.empty_like(out)
        V[order] = out
        return V.view(T, k, B.shape[-1]) * self.scaling

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        weights, ids, probs = self.route(x2)
        if self.fused:
            y = self._fused(x2, weights, ids)
        else:
            y = self._materialized(x2, weights, ids)
        # load balancing (Switch Transformer): E * sum_e (routed fraction) * (mean probability)
        routed = ids.reshape(-1) if ids is not None else probs.argmax(-1)
        frac = torch.bincount(routed, minlength=self.num_experts).float() / max(routed.numel(), 1)
        self.aux_loss = self.num_experts * (frac * probs.mean(0)).sum()
        with torch.no_grad():
            self.routing_counts += torch.bincount(routed, minlength=self.num_experts)
        out = self.base(x)  # under autocast: the autocast dtype
        return out + y.reshape(*lead, self.out_features).to(out.dtype)

    def _fused(self, x2, weights, ids):
        """radar_gate_lora: no [T, K, out] tensor in forward or backward."""
        dt = x2.dtype
        gate = self.gate
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        rot = (gate.rot_down.to(dt), gate.rot_up.to(dt),
               gate.angle_bias.to(dt) if gate.angle_bias is not None else None) \
            if gate is not None else (None, None, None)
        kw = dict(tau=gate.tau, eps=gate.eps) if gate is not None else {}
        return radar_gate_lora(x2, self.lora_A.to(dt), self.lora_B.to(dt), weights.to(dt), *rot,
                               expert_ids=ids, scaling=self.scaling, dropout_p=p,
                               training=self.training, **kw)

    def _materialized(self, x2, weights, ids):
        """Expert outputs [T, K, out], then radar_gate (or the weighted sum)."""
        V = self.expert_outputs(x2, ids)
        if self.gate is not None:
            y = self.gate(V, weights.to(V.dtype), ids)
        else:  # weighted-sum gating: what the op gives at zero angles (SPEC), without the op
            y = torch.einsum("...k,...kd->...d", weights.to(V.dtype), V)
        return y

    @property
    def weight(self):  # code that reads layer.weight (e.g. for its dtype) keeps working
        return self.base.weight

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_radargate(model: nn.Module, target_modules: Union[str, Iterable[str]],
                     **layer_kwargs) -> list:
    """Replace every ``nn.Linear`` whose qualified name matches ``target_modules`` (a regex
    matched against the full name, or names / name suffixes) by a ``RadarGateLoRALinear``
    wrapping it. Returns the replaced names."""
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name and _matches(name, target_modules):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, RadarGateLoRALinear(module, **layer_kwargs))
            replaced.append(name)
    return replaced


def radargate_state_dict(model: nn.Module) -> dict:
    """Only the parameters added by injection (experts, routers, gates), not the base weights."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, RadarGateLoRALinear):
            prefix = f"{name}." if name else ""
            for k, v in module.state_dict().items():
                if not k.startswith("base."):
                    out[prefix + k] = v
    return out


def load_radargate_state_dict(model: nn.Module, state_dict: dict):
    """Load what ``radargate_state_dict`` saved; every added parameter must be present."""
    expected = set(radargate_state_dict(model))
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise ValueError(f"state_dict: missing keys {sorted(missing)[:5]}, unexpected keys "
                         f"{sorted(unexpected)[:5]}")
    model.load_state_dict(state_dict, strict=False)


def _read_peft_adapter(adapter_dir):
    """-> (config dict, {module name: (A [in, r], B [r, out] scaled by alpha / r)})."""
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - safetensors ships with transformers/peft
        raise ImportError("from_peft_adapters needs the 'safetensors' package") from exc
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter_dirs: {adapter_dir} has no adapter_model.safetensors")
    sd = load_file(path)
    r = int(cfg["r"])
    scale = float(cfg.get("lora_alpha", r)) / r
    if cfg.get("use_rslora"):
        scale = float(cfg.get("lora_alpha", r)) / math.sqrt(r)
    mods = {}
    for key, A in sd.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        B = sd[key.replace(".lora_A.", ".lora_B.")]
        for prefix in ("base_model.model.",):
            if name.startswith(prefix):
                name = name[len(prefix):]
        mods[name] = (A.t().contiguous(), (B.t() * scale).contiguous())  # [in, r], [r, out]
    return cfg, mods


def from_peft_adapters(model: nn.Module, adapter_dirs, target_modules=None, **layer_kwargs):
    """Load N PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors`` in each
    of ``adapter_dirs``) into ``model`` as N frozen experts per adapted ``nn.Linear``, gated by a
    trainable router and RadarGate (the paper's setting: compose pretrained LoRAs, train only the
    gate). ``target_modules`` defaults to the modules the adapters adapt. Each adapter's
    ``lora_alpha / r`` is folded into its B; ranks may differ (zero-padded to the largest).
    Returns the replaced module names."""
    adapters = [_read_peft_adapter(d) for d in adapter_dirs]
    if not adapters:
        raise ValueError("adapter_dirs: expected at least one adapter directory")
    names = sorted(set().union(*(set(m) for _, m in adapters)))
    if target_modules is not None:
        names = [n for n in names if _matches(n, target_modules if isinstance(target_modules, str)
                                                 else list(target_modules))]
    rank = max(A.shape[1] for _, m in adapters for A, _ in m.values())
    layer_kwargs = dict(layer_kwargs, num_experts=len(adapters), rank=rank, alpha=rank,
                        freeze_experts=True)
    replaced = inject_radargate(model, [n for n in names], **layer_kwargs)
    for name in replaced:
        layer = model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            for e, (_, mods) in enumerate(adapters):
                if name in mods:  # an adapter that does not adapt this module adds nothing
                    A, B = mods[name]
                    layer.lora_A[e, :, :A.shape[1]] = A.to(layer.lora_A.dtype)
                    layer.lora_B[e, :B.shape[0], :] = B.to(layer.lora_B.dtype)
    return replaced
