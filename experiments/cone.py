"""(a) Fitting beyond the cone: targets that are rotated combinations of the expert outputs.

Problem (all fixed by ``seed``): x ~ N(0, I_16); K = 8 frozen low-rank experts
v_i = x A_i B_i (A_i [16, 4], B_i [4, 32]); a teacher router g* = softmax(x U*), and teacher angles
theta*_i(x) = s * (c_i + x P_i / 4) per Givens pair, c_i ~ U(-pi, pi), P_i ~ N(0, 1): the target is
y = sum_i g*_i R(theta*_i(x)) v_i. s = 0 puts y inside the cone (a weighted sum of the experts);
s > 0 turns the experts by angles that depend on the input, a family RadarGate does not contain
exactly (its angles come from the relation map of the expert outputs plus a static bias).

Gates, all trained with the same optimiser, steps and batches, all on the same frozen experts:
- weighted_sum: linear router softmax(x W) -> sum_i g_i v_i (inside the cone);
- mlp_gate: an MLP router (16 -> H -> 8, GELU) with H chosen so its size matches RadarGate's;
  still a weighted sum, so inside the cone;
- radargate: the same linear router as weighted_sum, plus a RadarGate (rank 4, angle bias);
- rotation_only (for the ablation): uniform weights 1/K plus a RadarGate;
- radargate_static (control): RadarGate with rot_up frozen at 0, so every angle is its expert's
  static angle_bias (angles that do not depend on the relation map).
Controls (a'), at s = 1: the static-angles control on this teacher, and all four gates on a
teacher that turns the experts by the same angles in random planes (a random orthogonal basis Q:
u = Q R(theta) Q^T v), not in the (p, p + D/2) planes RadarGate rotates in; and the three gates
of (a) again with twice the steps (the 2x-budget check of its verdict).
The span bound: per token, the least-squares signed combination of the K expert outputs; no gate
whose output is a linear combination of the experts (any weights) can have a lower error.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from radargate_kernels.nn import RadarGate
from radargate_kernels.reference import givens_rotate

from .common import cached_run, count_params, relative_mse, train

D_IN, D, K, EXPERT_RANK, GATE_RANK = 16, 32, 8, 4, 4
PLANES = ("givens", "random")
BATCH, EVAL_TOKENS, LR = 256, 4096, 1e-2


class Problem:
    """Frozen experts and a teacher; ``sample(n, gen) -> (x [n, 16], V [n, K, D], y [n, D])``."""

    def __init__(self, strength: float, seed: int, planes: str = "givens"):
        if planes not in PLANES:
            raise ValueError(f"planes: expected one of {PLANES}, got {planes!r}")
        gen = torch.Generator().manual_seed(10_000 + seed)
        self.strength, self.planes = strength, planes
        self.A = torch.randn(K, D_IN, EXPERT_RANK, generator=gen) / math.sqrt(D_IN)
        self.B = torch.randn(K, EXPERT_RANK, D, generator=gen) / math.sqrt(EXPERT_RANK)
        self.U = torch.randn(D_IN, K, generator=gen) / math.sqrt(D_IN) * 2.0
        self.c = (torch.rand(K, D // 2, generator=gen) * 2 - 1) * math.pi
        self.P = torch.randn(K, D_IN, D // 2, generator=gen)
        # drawn last, so the "givens" problem is the one of every earlier run
        self.Q = torch.linalg.qr(torch.randn(D, D, generator=gen)).Q  # random orthogonal basis

    def experts(self, x):
        return torch.einsum("ni,kir,krd->nkd", x, self.A, self.B)

    def teacher_weights(self, x):
        return torch.softmax(x @ self.U, -1)

    def teacher_angles(self, x):
        return self.strength * (self.c + torch.einsum("ni,kih->nkh", x, self.P) / math.sqrt(D_IN))

    def sample(self, n, gen):
        x = torch.randn(n, D_IN, generator=gen)
        V = self.experts(x)
        if self.planes == "givens":  # RadarGate's own planes (p, p + D/2)
            U = givens_rotate(V, self.teacher_angles(x))
        else:  # the same angles in random planes: rotate the coordinates in the basis Q
            U = givens_rotate(V @ self.Q, self.teacher_angles(x)) @ self.Q.t()
        y = torch.einsum("nk,nkd->nd", self.teacher_weights(x), U)
        return x, V, y


def span_bound(V, y):
    """Relative error of the best per-token signed combination of the expert outputs."""
    coef = torch.linalg.lstsq(V.transpose(1, 2).double(), y.double().unsqueeze(-1)).solution
    pred = (V.transpose(1, 2).double() @ coef).squeeze(-1)
    return float(relative_mse(pred, y.double()))


class WeightedSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D_IN, K, bias=False)

    def forward(self, x, V):
        return torch.einsum("nk,nkd->nd", torch.softmax(self.router(x), -1), V)


class MLPGate(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.router = nn.Sequential(nn.Linear(D_IN, hidden), nn.GELU(), nn.Linear(hidden, K))

    def forward(self, x, V):
        return torch.einsum("nk,nkd->nd", torch.softmax(self.router(x), -1), V)


class RadarHead(nn.Module):
    """Linear softmax router (or uniform weights) + RadarGate over the K expert outputs."""

    def __init__(self, stretch=True, static_only=False):
        super().__init__()
        self.router = nn.Linear(D_IN, K, bias=False) if stretch else None
        self.gate = RadarGate(D, K, rank=GATE_RANK)
        if static_only:  # rot_up stays 0: every angle is the static angle_bias of its expert
            self.gate.rot_up.requires_grad_(False)
            self.gate.rot_down.requires_grad_(False)

    def forward(self, x, V):
        if self.router is None:
            g = V.new_full(V.shape[:2], 1.0 / K)
        else:
            g = torch.softmax(self.router(x), -1)
        return self.gate(V, g)


def matched_mlp_hidden() -> int:
    """Smallest MLP width whose parameter count reaches RadarGate's (router + gate)."""
    target = count_params(RadarHead())
    return next(h for h in range(1, 10_000) if count_params(MLPGate(h)) >= target)


def make_gate(name):
    if name == "weighted_sum":
        return WeightedSum()
    if name == "mlp_gate":
        return MLPGate(matched_mlp_hidden())
    if name == "radargate":
        return RadarHead()
    if name == "rotation_only":
        return RadarHead(stretch=False)
    if name == "radargate_static":
        return RadarHead(static_only=True)
    raise ValueError(f"name: unknown gate {name!r}")


GATES = ("weighted_sum", "mlp_gate", "radargate")


def fit(name, strength, seed, steps, planes="givens"):
    """Train one gate (or read the run cache); -> dict with the final relative loss on fresh
    samples, params, losses."""
    return cached_run(f"cone-{name}-{strength}-{seed}-{steps}-{planes}",
                      lambda: _fit(name, strength, seed, steps, planes))


def _fit(name, strength, seed, steps, planes):
    prob = Problem(strength, seed, planes)
    x_ev, V_ev, y_ev = prob.sample(EVAL_TOKENS, torch.Generator().manual_seed(20_000 + seed))
    torch.manual_seed(seed)
    gate = make_gate(name)
    data_gen = torch.Generator().manual_seed(30_000 + seed)  # same batches for every gate

    def loss_at(step):
        x, V, y = prob.sample(BATCH, data_gen)
        return relative_mse(gate(x, V), y)

    losses = train(gate.parameters(), loss_at, steps, LR,
                   label=f"(a) s={strength} {name} seed {seed}")
    with torch.no_grad():
        final = float(relative_mse(gate(x_ev, V_ev), y_ev))
    return dict(experiment="cone", gate=name, strength=strength, seed=seed, steps=steps,
                planes=planes,
                params=count_params(gate), final_loss=final,
                train_loss_last20=sum(losses[-20:]) / len(losses[-20:]),
                span_bound=span_bound(V_ev, y_ev))


CONTROL_STRENGTH = 1.0
CONTROL_GATES = ("weighted_sum", "mlp_gate", "radargate", "radargate_static")


def run_controls(settings, cone_rows):
    """(a') controls at s = 1: the static-angles-only RadarGate on both teachers, and every gate
    on the random-plane teacher (the Givens-plane runs of the other gates are those of (a))."""
    rows = []
    for planes in PLANES:
        for seed in settings.seeds:
            for name in CONTROL_GATES:
                src = [r for r in cone_rows if r["gate"] == name and r["seed"] == seed
                       and r["strength"] == CONTROL_STRENGTH and planes == "givens"]
                row = src[0] if src else fit(name, CONTROL_STRENGTH, seed, settings.cone_steps,
                                             planes)
                rows.append(dict(row, experiment="cone_controls", planes=planes, budget=1))
    for seed in settings.seeds:  # the 2x-steps check of (a)'s positive verdict, at s = 1
        for name in GATES:
            row = fit(name, CONTROL_STRENGTH, seed, 2 * settings.cone_steps)
            rows.append(dict(row, experiment="cone_controls", planes="givens", budget=2))
    return rows


def run(settings, gates=GATES, strengths=None):
    rows = []
    for s in strengths if strengths is not None else settings.cone_strengths:
        for seed in settings.seeds:
            for name in gates:
                rows.append(fit(name, s, seed, settings.cone_steps))
    return rows
