"""Scale-out: RadarGate-LoRA layers under DistributedDataParallel and FSDP2 (``fully_shard``;
gloo, 2 CPU processes) give the same gradients as one process on the same global batch."""
import gc
import os
import socket
import time

import pytest
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


def _worker(rank, world, port, out_path, mode):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = None
    try:
        x, y = batch()
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(build())
            g = grads_of(model, x[shard], y[shard])
            g = {n.removeprefix("module."): v for n, v in g.items()}
        else:  # FSDP2: each layer sharded on its own, then the root; gradients are DTensors
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            model = build()
            mesh = init_device_mesh("cpu", (world,))
            for m in model.modules():
                if isinstance(m, RadarGateLoRALinear):
                    fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
            g = {n: v.full_tensor() for n, v in grads_of(model, x[shard], y[shard]).items()}
        if rank == 0:
            torch.save(g, out_path)
        dist.barrier()  # no collective in flight when the group goes away
    finally:
        # Drop the model (DDP's Reducer holds the process group) BEFORE destroying the group:
        # otherwise the group's last reference goes when the worker returns, inside the
        # Reducer's dealloc with the GIL held, and ProcessGroupGloo's destructor joins a gloo
        # thread that waits for the GIL -- a teardown deadlock seen once in CI (py-spy: main
        # thread in ~ProcessGroupGloo via Reducer dealloc, gloo runLoop in gil_scoped_acquire).
        del model
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_gradients_equal_single_process_gradients(tmp_path, mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.pt")
    ctx = mp.spawn(_worker, args=(2, port, out, mode), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):  # a hung worker fails the test instead of stalling CI
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{mode}: the 2 workers did not finish within 300 s")
    dist_grads = torch.load(out)
    single = grads_of(build(), *batch())
    assert set(dist_grads) == set(single) and len(single) >= 8
    for n in single:
        torch.testing.assert_close(dist_grads[n], single[n], rtol=1e-5, atol=1e-6)
