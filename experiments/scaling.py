"""(b) Scaling: held-out quality against the number of LoRA experts E on a multi-task problem.

Problem (fixed by ``seed``): sequences of 8 positions, width 32. The first 8 features of every
position are a one-hot task id (8 tasks) times 2, the other 24 are N(0, 1) inputs r. A frozen,
randomly initialised ``TinyBlock`` is the base model; the target is ``base(x) + r M_task`` with
``M_task = (S + T_task) / sqrt(2)`` ([24, 32], a component S shared by all tasks and one of its
own, entries N(0, 1/24)). 512 training sequences (4096 tokens), a held-out split of 512 more.

Model: LoRA-MoE layers (``RadarGateLoRALinear``, rank 4, alpha 16, linear softmax router) on
``linear1`` and ``linear2`` of the block, E experts each. Gates (the only difference between runs):
- ``radargate``: dense softmax stretch + RotationGate (gate rank 4, angle bias);
- ``softmax``: dense softmax weighted sum (``rotation=False``);
- ``top2``: top-2 routing, renormalised weights, weighted sum (``rotation=False``);
- ``radargate_top2`` (extra): top-2 routing + RotationGate over the two selected experts.
Training: Adam, lr 3e-3, 32 sequences per step, the same batches for every gate, loss = MSE +
0.01 x the Switch load-balancing loss of each layer. Quality: held-out relative error
``|pred - y|^2 / |y - base(x)|^2`` (1 = the frozen base model, 0 = exact).
"""
from __future__ import annotations

import math

import torch

from radargate_kernels.nn import RadarGateLoRALinear, inject_radargate

from .common import cached_run, count_params, relative_mse, train
from .models import TinyBlock

D, SEQ, TASKS = 32, 8, 8
N_TRAIN, N_TEST, BATCH, LR, AUX = 512, 512, 32, 3e-3, 0.01
GATES = {  # name -> RadarGateLoRALinear options
    "radargate": dict(),
    "softmax": dict(rotation=False),
    "top2": dict(top_k=2, rotation=False),
    "radargate_top2": dict(top_k=2),
}
ABLATION = {  # the two ablation variants that are not runs of the scaling sweep
    "rotation_only": dict(stretch=False),
    "neither": dict(stretch=False, rotation=False),
}


class Problem:
    """The frozen base block and the task maps; ``split(name) -> (x, y)``."""

    def __init__(self, seed: int):
        self.seed = seed
        gen = torch.Generator().manual_seed(40_000 + seed)
        torch.manual_seed(50_000 + seed)
        self.base = TinyBlock(D).requires_grad_(False).eval()
        d_in = D - TASKS
        S = torch.randn(d_in, D, generator=gen)
        self.maps = (S + torch.randn(TASKS, d_in, D, generator=gen)) / math.sqrt(2 * d_in)
        self.data = {}
        for name, n in (("train", N_TRAIN), ("test", N_TEST)):
            task = torch.randint(0, TASKS, (n,), generator=gen)
            r = torch.randn(n, SEQ, d_in, generator=gen)
            x = torch.cat([2.0 * torch.nn.functional.one_hot(task, TASKS).float()[:, None]
                           .expand(n, SEQ, TASKS), r], -1)
            with torch.no_grad():
                base = self.base(x)
            y = base + torch.einsum("nsi,nio->nso", r, self.maps[task])
            self.data[name] = (x, y, base)

    def model(self, num_experts: int, seed: int, **gate_options):
        """A copy of the base block with LoRA-MoE layers (parameters initialised from ``seed``)."""
        block = TinyBlock(D)
        block.load_state_dict(self.base.state_dict())
        block.requires_grad_(False)
        torch.manual_seed(seed)
        gate_options = dict(gate_options)
        rank = gate_options.pop("rank", 4)
        inject_radargate(block, ["linear1", "linear2"], num_experts=num_experts, rank=rank,
                         alpha=4 * rank, gate_rank=4, **gate_options)
        return block


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, RadarGateLoRALinear)]


def fit(problem, gate, num_experts, seed, steps, options=None):
    """Train one model (or read the run cache: the row and the trained weights); -> (row dict,
    trained model)."""
    options = GATES[gate] if options is None else options
    key = (f"scaling-{problem.seed}-{gate}-{num_experts}-{seed}-{steps}-"
           + "-".join(f"{k}={v}" for k, v in sorted(options.items())))
    row, state = cached_run(key, lambda: _fit(problem, gate, num_experts, seed, steps, options))
    model = problem.model(num_experts, seed, **options)
    model.load_state_dict(state)
    return row, model.eval()


def _fit(problem, gate, num_experts, seed, steps, options):
    model = problem.model(num_experts, seed, **options)
    x, y, _ = problem.data["train"]
    batches = torch.Generator().manual_seed(60_000 + seed)  # same batches for every gate

    def loss_at(step):
        idx = torch.randint(0, N_TRAIN, (BATCH,), generator=batches)
        loss = (model(x[idx]) - y[idx]).square().mean()
        return loss + AUX * sum(m.aux_loss for m in lora_layers(model))

    losses = train([p for p in model.parameters() if p.requires_grad], loss_at, steps, LR,
                   label=f"(b) E={num_experts} {gate} seed {seed}")
    model.eval()
    with torch.no_grad():
        err = {split: float(relative_mse(model(xs), ys, bs))
               for split, (xs, ys, bs) in problem.data.items()}
    row = dict(experiment="scaling", gate=gate, experts=num_experts, seed=seed, steps=steps,
               params=count_params(model), train_error=err["train"], heldout_error=err["test"],
               final_train_loss=sum(losses[-20:]) / len(losses[-20:]))
    return row, model.state_dict()


def run(settings, gates=tuple(GATES)):
    """-> (rows, {(E, seed): trained dense radargate model}, {seed: problem})."""
    rows, models, problems = [], {}, {}
    for seed in settings.seeds:
        problems[seed] = problem = Problem(seed)
        for E in settings.scaling_experts:
            for gate in gates:
                row, model = fit(problem, gate, E, seed, settings.scaling_steps)
                rows.append(row)
                if gate == "radargate":
                    models[(E, seed)] = model
    return rows, models, problems
