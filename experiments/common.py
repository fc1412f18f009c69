"""Shared pieces: run settings, seeding, the training loop, the metric, plotting setup."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

# The PyTorch path without inductor (the default since 2026-12-05; set so an environment that opts
# in with RADARGATE_CPU_PATH=compile does not pay a ~30 s compile per model shape here, measured).
os.environ.setdefault("RADARGATE_CPU_PATH", "eager")


def cpu_pytorch_path():
    """Entry points call this: every model here is on the CPU, and TRITON_INTERPRET=1 (set for
    kernel tests) would route the op through the Triton interpreter, ~100x slower."""
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from radargate_kernels.progress import Progress  # noqa: E402


@dataclass(frozen=True)
class Settings:
    """One budget for every gate in an experiment (steps, batch, learning rate, seeds)."""
    quick: bool
    seeds: tuple
    cone_steps: int
    cone_strengths: tuple
    scaling_steps: int
    scaling_experts: tuple
    ablation_experts: int
    contrastive_controls: int


FULL = Settings(quick=False, seeds=(0, 1, 2, 3, 4), cone_steps=400, cone_strengths=(0.0, 0.25, 0.5, 1.0),
                scaling_steps=400, scaling_experts=(5, 10, 20, 40), ablation_experts=10,
                contrastive_controls=200)
QUICK = Settings(quick=True, seeds=(0,), cone_steps=60, cone_strengths=(0.0, 1.0),
                 scaling_steps=40, scaling_experts=(5, 40), ablation_experts=5,
                 contrastive_controls=50)


_RUN_CACHE = {"dir": None}


def set_run_cache(path):
    """Cache every run's result under ``path`` (None: off), so an interrupted suite resumes
    where it stopped (``python -m experiments.run`` sets it to OUT/cache/synthetic)."""
    _RUN_CACHE["dir"] = path


def cached_run(key: str, fn):
    """``fn()`` (a result torch.save can store: rows, state dicts), or its cached copy."""
    d = _RUN_CACHE["dir"]
    if d is None:
        return fn()
    path = os.path.join(d, re.sub(r"[^A-Za-z0-9_.=+-]", "_", key) + ".pt")
    if os.path.exists(path):
        return torch.load(path)
    out = fn()
    os.makedirs(d, exist_ok=True)
    torch.save(out, path + ".tmp")
    os.replace(path + ".tmp", path)  # a run stopped while saving leaves no half file
    return out


BOOTSTRAP = 10000  # resamples of the paired bootstrap


def paired_bootstrap(diffs, n=BOOTSTRAP, seed=0):
    """Mean of paired differences and its 95% percentile bootstrap interval over the units
    (seeds, or (target, seed) pairs) -> (mean, low, high)."""
    d = torch.tensor(list(diffs), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(d), (n, len(d)), generator=gen)
    means = d[idx].mean(1).sort().values
    return d.mean().item(), means[int(0.025 * n)].item(), means[int(0.975 * n) - 1].item()


def cluster_bootstrap(diffs_by_cluster, n=BOOTSTRAP, seed=0):
    """Mean of paired differences and its 95% two-stage bootstrap interval: clusters (targets)
    drawn with replacement, then within each drawn cluster its units (seeds) with replacement.
    diffs_by_cluster: {cluster: [differences]}, the same count in every cluster -> (mean, low,
    high)."""
    rows = [list(v) for v in diffs_by_cluster.values()]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError("cluster_bootstrap: every cluster needs the same number of units")
    d = torch.tensor(rows, dtype=torch.float64)  # [C, S]
    C, S = d.shape
    gen = torch.Generator().manual_seed(seed)
    ci = torch.randint(C, (n, C), generator=gen)
    si = torch.randint(S, (n, C, S), generator=gen)
    means = d[ci.unsqueeze(-1), si].mean((1, 2)).sort().values
    return d.mean().item(), means[int(0.025 * n)].item(), means[int(0.975 * n) - 1].item()


def relative_mse(pred: torch.Tensor, target: torch.Tensor, baseline=None) -> torch.Tensor:
    """mean |pred - target|^2 / mean |target - baseline|^2 (baseline 0 if None): 1 = no better
    than predicting the baseline, 0 = exact."""
    ref = target if baseline is None else target - baseline
    return (pred - target).square().mean() / ref.square().mean()


def train(params, loss_at_step, steps: int, lr: float, label: str = "") -> list:
    """Adam on ``params``; ``loss_at_step(step)`` returns the loss of that step's batch.
    Returns the per-step losses. Prints a one-line progress bar to stderr (a terminal), or one
    line per run (a file)."""
    opt = torch.optim.Adam(list(params), lr=lr)
    losses = []
    bar = Progress(steps, f"  {label:44s}", stream=sys.stderr) if label else None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_at_step(step)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None and (step % 10 == 9 or step == steps - 1):
            bar.update(step + 1, f"loss {losses[-1]:.4f}")
    return losses


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def pyplot():
    """matplotlib with a file-only backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
