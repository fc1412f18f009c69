"""(d) Contrastive analysis of the learned rotations.

For every trained dense ``radargate`` model of the scaling sweep and each of its LoRA-MoE layers,
on held-out tokens (the first 1024 tokens of the test split):
- similarity of experts i and j: the mean over tokens of cos(v_i, v_j) (the relation map's C_ij);
- change in angular separation: the mean over tokens of angle(u_i, u_j) - angle(v_i, v_j), where
  u = R(alpha) v are the rotated outputs (negative: the rotation turned the pair closer);
- the Pearson and Spearman correlation of the two over the E (E - 1) / 2 pairs.
The claim ("similar experts are turned closer, dissimilar ones apart") predicts a negative
correlation. Control: the same angles handed to the wrong experts (one random permutation of the
experts' angle vectors per draw, the same for all tokens): rotations of the same sizes that were
not learned for these pairs (200 draws; 50 with --quick). p = the fraction of control draws whose correlation is at most the
learned one (one-sided).
"""
from __future__ import annotations

import torch

from radargate_kernels.reference import givens_rotate, relation_map, rotation_angles

from .scaling import lora_layers

TOKENS = 1024


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def spearman(a, b):
    rank = lambda v: torch.argsort(torch.argsort(v)).double()  # noqa: E731 (no ties in practice)
    return pearson(rank(a), rank(b))


def _angles_between(U, norms, eps):
    Uh = U / norms.clamp_min(eps).unsqueeze(-1)
    return torch.arccos((Uh @ Uh.transpose(1, 2)).clamp(-1, 1))


def pair_statistics(V, alpha, eps):
    """V [T, K, D], alpha [T, K, D/2] -> (similarity [P], change in separation [P]) over the
    P = K (K - 1) / 2 pairs i < j."""
    K = V.shape[1]
    norms = torch.linalg.vector_norm(V, dim=-1)  # rotations keep them
    before = _angles_between(V, norms, eps)
    after = _angles_between(givens_rotate(V, alpha), norms, eps)
    cos = torch.cos(before)
    iu = torch.triu_indices(K, K, 1)
    return cos.mean(0)[iu[0], iu[1]], (after - before).mean(0)[iu[0], iu[1]]


def layer_inputs(model, x):
    """Run ``model`` on x; -> {LoRA-MoE layer: its input flattened to [T, in]}."""
    seen = {}

    def keep(mod, args):
        seen[mod] = args[0].reshape(-1, args[0].shape[-1])

    hooks = [m.register_forward_pre_hook(keep) for m in lora_layers(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def analyse(model, x, controls: int, seed: int):
    """-> one row per LoRA-MoE layer of ``model`` (run on held-out sequences x)."""
    rows = []
    inputs = layer_inputs(model, x)
    for name, layer in model.named_modules():
        if layer not in inputs:
            continue
        inp, gate = inputs[layer], layer.gate
        with torch.no_grad():
            V = layer.expert_outputs(inp[:TOKENS], None).double()
            _, _, rho = relation_map(V, gate.tau, gate.eps)
            alpha = rotation_angles(V, rho, gate.rot_down.double(), gate.rot_up.double(),
                                    gate.angle_bias.double())
            sim, delta = pair_statistics(V, alpha, gate.eps)
            gen = torch.Generator().manual_seed(70_000 + seed)
            ctrl = []
            for _ in range(controls):
                perm = torch.randperm(V.shape[1], generator=gen)
                ctrl.append(pearson(sim, pair_statistics(V, alpha[:, perm], gate.eps)[1]))
        ctrl = torch.tensor(ctrl, dtype=torch.float64)
        r = pearson(sim, delta)
        rows.append(dict(experiment="contrastive", layer=name, experts=V.shape[1], seed=seed,
                         tokens=V.shape[0], pairs=sim.numel(), pearson=r,
                         spearman=spearman(sim, delta),
                         control_mean=float(ctrl.mean()),
                         control_p05=float(ctrl.quantile(0.05)),
                         control_p95=float(ctrl.quantile(0.95)),
                         p_value=float((ctrl <= r).double().mean()),
                         mean_abs_angle=float(alpha.abs().mean()),
                         mean_abs_change=float(delta.abs().mean()),
                         _sim=sim, _delta=delta))
    return rows


def run(settings, models, problems):
    rows = []
    for (E, seed), model in sorted(models.items()):
        x = problems[seed].data["test"][0]
        rows.extend(analyse(model, x, settings.contrastive_controls, seed))
    return rows
