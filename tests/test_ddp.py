"""Scale-out: RadarGate-LoRA layers under DistributedDataParallel (gloo, 2 CPU processes) give the
same gradients as one process on the same global batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from radargate_kernels.nn import RadarGateLoRALinear, inject_radargate


def build(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).requires_grad_(False)
    inject_radargate(model, ["0", "2"], num_experts=3, rank=2, top_k=2)
    with torch.no_grad():  # leave the start state so every parameter gets a gradient
        for m in model.modules():
            if isinstance(m, RadarGateLoRALinear):
                m.lora_B.normal_(std=0.1)
                m.gate.rot_up.normal_(std=0.1)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)


def grads_of(model, x, y):
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(build())
        x, y = batch()
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        g = grads_of(model, x[shard], y[shard])
        if rank == 0:
            torch.save({n.removeprefix("module."): v for n, v in g.items()}, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_gradients(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp_grads.pt")
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    ddp = torch.load(out)
    single = grads_of(build(), *batch())
    assert set(ddp) == set(single) and len(single) >= 8
    for n in single:
        torch.testing.assert_close(ddp[n], single[n], rtol=1e-5, atol=1e-6)
