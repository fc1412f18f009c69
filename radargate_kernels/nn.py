"""nn.Modules on top of ``radar_gate`` for LoRA-MoE code.

- ``RadarGate``: owns the RotationGate parameters;
  ``forward(expert_out, weights, expert_ids=None, slot_mask=None)``.
- ``RadarGateLoRALinear``: a frozen ``nn.Linear`` plus E LoRA experts, a StretchGate router
  (softmax with temperature, optional top-k with renormalisation) and a ``RadarGate``.

Config, injection, saving and loading (PEFT-style) live in ``adapters.py``; its names are
re-exported here for code written against earlier versions.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .lora import expert_one_hot, expert_outputs, radar_gate_lora
from .ops import radar_gate
from .validation import check_positive


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


def _recomputing() -> bool:
    """True while autograd runs a backward pass, i.e. when a forward runs inside one: activation
    checkpointing's recomputation (or a forward called from a backward hook). False while
    torch.compile traces (a graph cannot ask)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _check_switch(name, value):
    if not isinstance(value, bool):  # "no" and "false" are truthy: never guess
        raise TypeError(f"{name}: expected True or False, got {value!r}")


class RadarGate(nn.Module):
    """RadarGate over K expert outputs of width ``dim``.

    Parameters: ``rot_down [dim, rank]``, ``rot_up [rank, dim/2]``, ``angle_bias [E, dim/2]``.
    Initialised as plain weighted-sum gating: ``rot_up = 0`` and ``angle_bias = 0`` give every
    angle 0 (the identity rotation), while ``rot_down`` is small and random so ``rot_up`` receives
    a non-zero gradient from the first step and the rotation is learned.

    forward(expert_out [..., K, dim], weights [..., K], expert_ids [..., K] | None,
    slot_mask [..., K] bool | None) -> [..., dim]; a slot whose mask is False or whose id is
    negative takes no part (radar_gate). The parameters are cast to the dtype of ``expert_out``
    (autocast-friendly); the op itself computes in fp32.
    """

    def __init__(self, dim: int, num_experts: int, rank: int = 8, tau: float = 1.0,
                 angle_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even feature size >= 2, got {dim!r}")
        _check_count("num_experts", num_experts)
        _check_count("rank", rank)
        check_positive("tau", tau)
        check_positive("eps", eps)
        _check_switch("angle_bias", angle_bias)
        self.dim, self.num_experts, self.rank, self.tau, self.eps = dim, num_experts, rank, tau, eps
        self.rot_down = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))
        self.rot_up = nn.Parameter(torch.zeros(rank, dim // 2))
        self.angle_bias = nn.Parameter(torch.zeros(num_experts, dim // 2)) if angle_bias else None

    def forward(self, expert_out, weights, expert_ids=None, slot_mask=None):
        dt = expert_out.dtype
        beta = self.angle_bias.to(dt) if self.angle_bias is not None else None
        return radar_gate(expert_out, weights.to(dt), self.rot_down.to(dt), self.rot_up.to(dt),
                          beta, expert_ids, tau=self.tau, eps=self.eps, slot_mask=slot_mask)

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
    outputs ``[T, K, out]`` (forward or backward) and saves x, the router weights and ids for
    backward (and the low-rank s, d while they cost at most a quarter of x; ``recompute=True``
    never keeps them, ``False`` always: radar_gate_lora's argument): about the memory of one
    LoRA, for any number of experts. ``fused=False`` keeps
    the materialized path (expert outputs, then ``radar_gate``); both give the same result.
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int = 8, alpha: float = 16,
                 dropout: float = 0.0, top_k: Optional[int] = None,
                 router_temperature: float = 1.0, gate_rank: int = 8, tau: float = 1.0,
                 freeze_experts: bool = False, rotation: bool = True, stretch: bool = True,
                 fused: bool = True, adapter_dtype: torch.dtype = torch.float32,
                 recompute: Optional[bool] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        _check_count("num_experts", num_experts)
        _check_count("rank", rank)
        _check_count("gate_rank", gate_rank)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k <= num_experts):
            raise ValueError(f"top_k: expected None or an integer 1 <= top_k <= num_experts = "
                             f"{num_experts}, got {top_k!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not math.isfinite(alpha):
            raise ValueError(f"alpha: expected a finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        check_positive("router_temperature", router_temperature)
        check_positive("tau", tau)
        if not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
            raise TypeError(f"adapter_dtype: expected a floating torch.dtype, got {adapter_dtype!r}")
        if recompute is not None and not isinstance(recompute, bool):
            raise TypeError(f"recompute: expected None, True or False, got {recompute!r}")
        for name, value in (("freeze_experts", freeze_experts), ("rotation", rotation),
                            ("stretch", stretch), ("fused", fused)):
            _check_switch(name, value)
        if rotation and base.out_features % 2:
            raise ValueError(f"base: RadarGate rotates pairs of features and needs an even "
                             f"out_features, got {base.out_features} (or pass rotation=False)")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        fin, fout = base.in_features, base.out_features
        self.num_experts, self.rank, self.top_k = num_experts, rank, top_k
        self.scaling = alpha / rank
        self.router_temperature = router_temperature
        self.rotation, self.stretch, self.fused = rotation, stretch, fused
        self.recompute = recompute
        # added parameters in adapter_dtype (fp32 by default, as PEFT), whatever the base's dtype
        # (bf16, or an integer dtype of a quantized base); the forward computes in x's dtype
        dev, dt = base.weight.device, adapter_dtype
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

    def __getstate__(self):
        # aux_loss holds the last forward's graph: not part of the module's state (deepcopy,
        # pickling); the next forward sets it again
        return dict(self.__dict__, aux_loss=None)

    def reset_stats(self):
        self.routing_counts.zero_()

    def route(self, x2):
        """x2 [T, in] -> (weights [T, K], expert_ids [T, K] or None, probs [T, E])."""
        logits = F.linear(x2, self.router.weight.to(x2.dtype)).float() / self.router_temperature
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
        """x2 [T, in] -> expert outputs [T, K, out] (all experts, or the selected ``ids``).

        Top-k without a host sync or a loop over experts: the down projection of all experts is
        one GEMM (``[T, E r]``, small), each slot gathers its expert's r columns, and the up
        projection is one GEMM ``[T k, E r] @ [E r, out]`` (lora.expert_outputs: a non-finite B
        of an expert stays with the tokens that select it). Memory: the k outputs per token,
        never E; compute: E times the minimal up projection (rank-r GEMMs, small next to the
        base layer). The fused path (default) needs neither.
        """
        h = self.dropout(x2)
        A = self.lora_A.to(h.dtype)
        B = self.lora_B.to(h.dtype)
        xa = torch.einsum("ti,eir->ter", h, A)
        if ids is None:
            return torch.einsum("ter,ero->teo", xa, B) * self.scaling
        s = torch.gather(xa, 1, ids.clamp_min(0).unsqueeze(-1).expand(-1, -1, xa.shape[2]))
        return expert_outputs(s, ids, B) * self.scaling

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        weights, ids, probs = self.route(x2)
        if self.fused:
            y = self._fused(x2, weights, ids)
        else:
            y = self._materialized(x2, weights, ids)
        # load balancing (Switch Transformer): E * sum_e (routed fraction) * (mean probability)
        # (one-hot sums, not bincount: no host sync, and it compiles with fullgraph)
        routed = ids.reshape(-1) if ids is not None else probs.argmax(-1)
        counts = expert_one_hot(routed, self.num_experts).sum(0)
        no_grad_training = (self.training and not torch.is_grad_enabled()
                            and self.router.weight.requires_grad)
        # a training forward without autograd (gradient checkpointing with use_reentrant=True
        # runs forward so): the router's probabilities again, with autograd, so that aux_loss
        # still trains the router
        with torch.enable_grad() if no_grad_training else contextlib.nullcontext():
            if no_grad_training:
                probs = self.route(x2.detach())[2]
            if routed.numel():
                frac = counts.float() / routed.numel()
                aux = self.num_experts * (frac * probs.mean(0)).sum()
            else:  # empty batch: nothing to balance
                aux = probs.sum() * 0.0
        if not _recomputing():  # activation checkpointing re-runs forward in backward (the
            # same ops: it checks what is saved); the first run's statistics stand (counted
            # once; its aux_loss is the one in the loss). Not under torch.compile, where the
            # check is traced away: a compiled layer inside checkpointing counts twice
            self.aux_loss = aux
            with torch.no_grad():
                self.routing_counts += counts
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
                               training=self.training, recompute=self.recompute, **kw)

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
    def bias(self):  # as .weight: the base layer's
        return self.base.bias

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features


_MOVED_TO_ADAPTERS = ("from_peft_adapters", "inject_radargate", "load_radargate_state_dict",
                      "radargate_state_dict")


def __getattr__(name):
    """PEFT-style management moved to adapters.py; its old names still import from here
    (lazily: adapters.py imports this module)."""
    if name in _MOVED_TO_ADAPTERS:
        from . import adapters
        return getattr(adapters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
