"""Train a tiny transformer with RadarGate-LoRA layers, and the same with plain softmax gating,
on a small multi-task problem; print both losses. CPU, about a minute.

    python examples/train_multitask.py [--steps 150]

Task: sequences of random vectors; a task id (one of 4) is written into the first feature of every
position; the target is a task-specific random rotation-and-scale of the input. A frozen random
transformer block is adapted with 4 LoRA experts per MLP linear; the only difference between the
two runs is the gate: RadarGate (rotation + stretch) vs plain weighted sum (``rotation=False``).
The experiment suite (``python -m experiments.run``) tests the paper's claims properly.
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from experiments.models import TinyBlock as Block  # noqa: E402  (also imported by the tests)
from radargate_kernels.nn import inject_radargate  # noqa: E402
from radargate_kernels.progress import Progress  # noqa: E402

D, TASKS, SEQ = 32, 4, 8


def make_data(n, gen):
    maps = torch.linalg.qr(torch.randn(TASKS, D, D, generator=gen))[0] * 1.5
    task = torch.randint(0, TASKS, (n,), generator=gen)
    x = torch.randn(n, SEQ, D, generator=gen)
    x[..., 0] = task[:, None].float()
    y = torch.einsum("nsd,nde->nse", x, maps[task])
    return x, y


def build(rotation: bool):
    torch.manual_seed(0)
    model = Block().requires_grad_(False)
    # rotation=False: plain softmax weighted-sum gating (no RotationGate)
    inject_radargate(model, ["linear1", "linear2"], num_experts=TASKS, rank=4, gate_rank=4,
                     rotation=rotation)
    return model


def train(name, model, data, steps, lr=3e-3):
    x, y = data
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, bar = [], Progress(steps, f"{name:16s}")
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update(step, f"loss {loss.item():.4f}")
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    data = make_data(2048, torch.Generator().manual_seed(0))
    res = {}
    for name, rot in (("radargate", True), ("softmax gating", False)):
        losses = train(name, build(rot), data, args.steps)
        res[name] = sum(losses[-10:]) / 10
    for name, v in res.items():
        print(f"{name:16s} final training loss (mean of last 10 steps): {v:.4f}")
    print(f"ratio softmax / radargate: {res['softmax gating'] / res['radargate']:.2f} "
          "(one seed, one task family: an illustration, not a claim)")


if __name__ == "__main__":
    main()
