"""Roofline PROJECTION for an H100 SXM from work counted on this machine (no GPU here).

    python -m benchmarks.roofline [--quick] [--out docs/benchmarks/roofline.md]

Counted per launch, then priced with the H100 SXM's published peaks (PEAK below):
- Triton kernels run in the interpreter (TRITON_INTERPRET=1) at the full shape, but only a
  sample of their programs (first, middle, last along each grid axis); counts per program are
  averaged and scaled by the number of programs. Wrapped interpreter ops give: tensor-core MACs
  (tl.dot with fp16/bf16 operands, or tf32: priced at the tf32 rate), FMA-pipe MACs (ieee dots)
  and float instructions (multiplies and adds taken as fused where they pair: max(#mul, #add)), special-function ops (sin/cos where the kernel uses
  the approximations, exp, exp2, log2, sqrt, division; compile_report checks what sin/cos
  became) and libdevice sin/cos (LIBDEVICE_TRIG FMA-pipe instructions each). DRAM bytes: the
  distinct bytes each sampled program loads or stores, per tensor; a launch moves
  min(tensor size, programs x per-program distinct bytes) of each tensor (exact when programs
  either split a tensor or all read all of it; L2 traffic is not modelled).
- torch ops (cuBLAS GEMMs, elementwise, sorts) through a TorchDispatchMode: one launch per op
  that runs a kernel, bytes of its inputs and outputs, GEMM MACs on tensor cores for 16-bit
  operands (FMA pipe for fp32).
A launch's time = its slowest unit + LAUNCH_S. The floor of a pass: the compulsory bytes
(inputs read once, outputs written once), the compulsory GEMM work on tensor cores and the
compulsory K * D/2 sines and cosines per token on the special-function units, priced the same
way, slowest unit + one launch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# H100 SXM, published peaks (NVIDIA H100 Tensor Core GPU datasheet, SXM5 column)
PEAK = dict(dram=3.35e12,            # bytes/s, HBM3
            tc=989e12 / 2,           # MAC/s, dense bf16/fp16 tensor cores
            tc_tf32=494e12 / 2,      # MAC/s, tf32 tensor cores
            fma=67e12 / 2,           # FMA-pipe instructions/s (fp32: 132 SMs x 128 lanes x 1.98 GHz)
            sfu=132 * 16 * 1.98e9)   # special-function results/s (16 per SM per clock)
LAUNCH_S = 3e-6  # seconds per launch ("a few microseconds")
LIBDEVICE_TRIG = 20  # FMA-pipe instructions of libdevice's __nv_sinf / __nv_cosf fast path
UNITS = ("dram", "tc", "fma", "sfu")

# ---- counting Triton launches in the interpreter ----------------------------------------------


class Work:
    """Counters of one launch (or torch op)."""

    def __init__(self, name, kind):
        self.name, self.kind = name, kind
        self.bytes = 0.0
        self.tc = 0.0       # MACs at the bf16 rate
        self.tc_tf32 = 0.0  # MACs at the tf32 rate
        self.fma = 0.0      # FMA-pipe instructions (ieee dot MACs, float elementwise)
        self.sfu = 0.0      # special-function results
        self.launches = 1

    def seconds(self):
        """Per-unit projected seconds."""
        return dict(dram=self.bytes / PEAK["dram"],
                    tc=self.tc / PEAK["tc"] + self.tc_tf32 / PEAK["tc_tf32"],
                    fma=self.fma / PEAK["fma"], sfu=self.sfu / PEAK["sfu"])

    def time(self):
        return max(self.seconds().values()) + self.launches * LAUNCH_S

    def add(self, other):
        for k in ("bytes", "tc", "tc_tf32", "fma", "sfu", "launches"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


class _Program:
    """Counters of one interpreted program."""

    def __init__(self):
        self.ops = defaultdict(float)
        self.addrs = defaultdict(list)  # (tensor index) -> arrays of addresses touched


_STATE = {"prog": None, "fast": False}


def _numel(h):
    return float(np.asarray(h.data).size)


def _install_counters():
    """Wrap the interpreter builder's methods (idempotent)."""
    from triton.runtime import interpreter as I
    B = I.InterpreterBuilder
    if getattr(B, "_radargate_counted", False):
        return
    B._radargate_counted = True

    def wrap(name, fn):
        orig = getattr(B, name)

        def inner(self, *a, **k):
            out = orig(self, *a, **k)
            if _STATE["prog"] is not None:
                fn(_STATE["prog"], a, out)
            return out
        setattr(B, name, inner)

    def dot(p, a, out):
        x, y = a[0], a[1]
        sx, sy = np.asarray(x.data).shape, np.asarray(y.data).shape
        macs = float(np.prod(sx[:-1])) * sy[-1] * sx[-1]
        bits = x.dtype.primitive_bitwidth
        prec = str(a[3]).lower()
        if bits <= 16:
            p.ops["tc"] += macs
        elif bits == 32 and "tf32" in prec:
            p.ops["tc_tf32"] += macs * (3 if "x3" in prec else 1)
        else:
            p.ops["fma"] += macs
    wrap("create_dot", dot)
    for op in ("create_sin", "create_cos"):
        wrap(op, lambda p, a, out: p.ops.__setitem__(
            "sfu" if _STATE["fast"] else "fma",
            p.ops["sfu" if _STATE["fast"] else "fma"]
            + _numel(out) * (1 if _STATE["fast"] else LIBDEVICE_TRIG)))
    for op in ("create_exp", "create_exp2", "create_log2", "create_sqrt", "create_precise_sqrt",
               "create_fdiv", "create_precise_divf", "create_rsqrt"):
        if hasattr(B, op):
            wrap(op, lambda p, a, out: (p.ops.__setitem__("sfu", p.ops["sfu"] + _numel(out)),
                                        p.ops.__setitem__("fma", p.ops["fma"] + 2 * _numel(out))))
    for op, key in (("create_fadd", "add"), ("create_fsub", "add"), ("create_fmul", "mul"),
                    ("create_fma", "fma")):
        wrap(op, lambda p, a, out, key=key: p.ops.__setitem__(key, p.ops[key] + _numel(out)))

    def mem(p, ptrs, mask):
        addr = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            addr = addr[np.asarray(mask.data).reshape(-1).astype(bool)]
        p.addrs[ptrs.get_element_ty().primitive_bitwidth // 8].append(addr.astype(np.uint64))
    wrap("create_masked_load", lambda p, a, out: mem(p, a[0], a[1]))
    wrap("create_load", lambda p, a, out: mem(p, a[0], None))
    wrap("create_masked_store", lambda p, a, out: mem(p, a[0], a[2]))
    wrap("create_store", lambda p, a, out: mem(p, a[0], None))


def _sample(n):
    return sorted({0, n // 2, n - 1})


def count_launch(launch, name):
    """Interpret a sample of the launch's programs -> Work scaled to all its programs."""
    from triton.runtime import interpreter as I
    _install_counters()
    grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    n_prog = math.prod(grid)
    work = Work(name, "triton")
    if n_prog == 0:
        work.launches = 0
        return work
    fn = launch.kernel.fn
    ex = I.GridExecutor(launch.kernel.rewrite() if hasattr(launch.kernel, "rewrite") else fn,
                        launch.kernel.arg_names, grid)
    tensors = [a for a in launch.args if isinstance(a, torch.Tensor)]
    ranges = [(a.data_ptr(), a.data_ptr() + a.untyped_storage().nbytes(), a.numel() *
               a.element_size()) for a in tensors]
    progs = []
    _STATE["fast"] = bool(launch.meta.get("FAST", False))

    kwargs = {k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages",
                                                                  "enable_fp_fusion")}
    import inspect
    argspec = inspect.getfullargspec(ex.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
    args_hst, kwargs_hst = ex._init_args_hst(launch.args, kwargs)
    patch_scope = I._patch_lang(ex.fn)
    try:
        args = inspect.getcallargs(ex.fn, *args_hst, **kwargs_hst)
        args = {k: v if k in ex.constexprs else I._implicit_cvt(v) for k, v in args.items()}
        I.interpreter_builder.set_grid_dim(*grid)
        for x in _sample(grid[0]):
            for y in _sample(grid[1]):
                for z in _sample(grid[2]):
                    I.interpreter_builder.set_grid_idx(x, y, z)
                    _STATE["prog"] = _Program()
                    ex.fn(**args)
                    progs.append(_STATE["prog"])
    finally:
        _STATE["prog"] = None
        patch_scope.restore()
    host_ranges = [(a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()) for a in
                   args_hst if isinstance(a, torch.Tensor)]
    scale = n_prog / len(progs)
    for key in ("tc", "tc_tf32", "fma", "sfu"):
        setattr(work, key, sum(p.ops[key] for p in progs) * scale)
    # float multiplies and adds: fused into one FMA wherever they pair (FP fusion is on), so
    # max(#mul, #add) instructions (an estimate; the interpreter sees them apart)
    work.fma += sum(max(p.ops["mul"], p.ops["add"]) for p in progs) * scale
    # distinct bytes per tensor: per program, then min(tensor size, programs x mean)
    per_tensor = defaultdict(float)
    for p in progs:
        for size, arrs in p.addrs.items():
            addr = np.unique(np.concatenate(arrs))
            for i, (lo, hi) in enumerate(host_ranges):
                n = np.count_nonzero((addr >= lo) & (addr < hi))
                per_tensor[i] += n * size
    for i, total in per_tensor.items():
        work.bytes += min(ranges[i][2], total / len(progs) * n_prog)
    return work


# ---- counting torch ops ------------------------------------------------------------------------

_NO_KERNEL = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand",
              "as_strided", "slice", "select", "unsqueeze", "squeeze", "detach", "alias",
              "empty", "new_empty", "empty_like", "empty_strided", "lift_fresh", "split",
              "unbind", "diagonal", "_reshape_alias", "unflatten", "split_with_sizes", "chunk",
              "narrow", "view_as", "expand_as", "_to_copy_noop", "set_", "resize_", "sym_size",
              "sym_stride", "is_same_size", "contiguous", "result_type", "_local_scalar_dense",
              "item"}
_GEMMS = {"mm", "bmm", "addmm", "baddbmm"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


class TorchCounter(TorchDispatchMode):
    """Records a Work per torch op that runs a kernel on a GPU."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is torch.ops.aten.mm.dtype:  # cuBLAS's 16-bit GEMM with an fp32 result
            a, b, dt = args[0], args[1], args[2]
            out = torch.mm(a.to(dt), b.to(dt))
            w = Work("torch." + name, "torch")
            w.tc = a.shape[0] * a.shape[1] * b.shape[1]
            w.bytes = (a.numel() * a.element_size() + b.numel() * b.element_size()
                       + out.numel() * out.element_size())
            self.sink.append(w)
            return out
        out = func(*args, **kwargs)
        if name in _NO_KERNEL or (name == "_to_copy" and args[0].dtype == out.dtype
                                  and args[0].device == out.device):
            return out
        w = Work("torch." + name, "torch")
        seen = set()
        for t in list(_tensors(args)) + list(_tensors(kwargs.get("out", ()))) + list(_tensors(out)):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                w.bytes += t.numel() * t.element_size()
        outs = list(_tensors(out))
        if name in _GEMMS:
            a, b = [t for t in _tensors(args) if t.dim() >= 2][-2:]
            macs = float(np.prod(a.shape[:-1])) * a.shape[-1] * b.shape[-1]
            if a.dtype in (torch.float16, torch.bfloat16):
                w.tc = macs
            else:
                w.fma = macs
        else:
            w.fma = float(sum(t.numel() for t in outs))
        self.sink.append(w)
        return out


@contextlib.contextmanager
def counting(sink):
    """Count every launch (Triton, sampled in the interpreter) and torch op into ``sink``."""
    from radargate_kernels import lora
    from radargate_kernels.kernels import launch as L
    orig_run, orig_groups, orig_cuda = L.Launch.run, L.token_groups, lora.CUDA_GEMMS

    def run(self):
        sink.append(count_launch(self, self.kernel.fn.__name__))

    def groups(n_blocks, n_chunks, device, per_sm=4):  # as on an H100 (132 SMs)
        return max(1, min(n_blocks, -(-per_sm * 132 // max(1, n_chunks)), 1024))
    L.Launch.run, L.token_groups, lora.CUDA_GEMMS = run, groups, True
    try:
        with TorchCounter(sink):
            yield
    finally:
        L.Launch.run, L.token_groups, lora.CUDA_GEMMS = orig_run, orig_groups, orig_cuda


# ---- the layers --------------------------------------------------------------------------------

def problem(T, d_in, d_out, E, K, r, rg, dtype, topk, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(dtype)
    ids = None
    if topk:
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    return dict(x=rnd(T, d_in), lora_A=rnd(E, d_in, r, scale=d_in ** -0.5),
                lora_B=rnd(E, r, d_out, scale=0.1), g=rnd(T, K).softmax(-1),
                rot_down=rnd(d_out, rg, scale=d_out ** -0.5), rot_up=rnd(rg, d_out // 2,
                                                                          scale=0.1),
                beta=rnd(E, d_out // 2, scale=0.1), ids=ids, dy=rnd(T, d_out))


def fused_layer(p, fwd_sink, bwd_sink):
    from radargate_kernels import lora
    with counting(fwd_sink):
        bal = lora.balance_factors(p["lora_B"])
    args = (p["x"], p["lora_A"], p["lora_B"], p["g"], p["rot_down"], p["rot_up"], p["beta"],
            p["ids"], bal, 1.0, 1.0, 1e-6, "triton")
    with counting(fwd_sink):
        y, s, d, P, Q = lora._forward(*args, True)
    with counting(bwd_sink):
        lora._backward(p["dy"], *args, True, True, s, d, P, Q)


def weighted_sum_layer(p, fwd_sink, bwd_sink):
    """A LoRA-MoE layer with plain weighted-sum gating, as users write it (autograd, cuBLAS):
    s = x A_cat, the K weights scattered over the E experts' rank columns, y = (w s) B_cat."""
    E, d_in, r = p["lora_A"].shape
    T, K = p["g"].shape
    leaves = [p[k].detach().clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B", "g")]
    x, A, B, g = leaves
    with counting(fwd_sink):
        s = x @ A.permute(1, 0, 2).reshape(d_in, E * r)
        w = g if p["ids"] is None else torch.zeros(T, E, dtype=g.dtype).scatter(1, p["ids"], g)
        y = (s.view(T, E, r) * w.unsqueeze(-1)).reshape(T, E * r) @ B.reshape(E * r, -1)
    with counting(bwd_sink):
        y.backward(p["dy"])


def peft_lora(p, fwd_sink, bwd_sink):
    """One PEFT LoRA of rank r (expert 0): y = (x A) B."""
    x = p["x"].detach().clone().requires_grad_(True)
    A = p["lora_A"][0].detach().clone().requires_grad_(True)
    B = p["lora_B"][0].detach().clone().requires_grad_(True)
    with counting(fwd_sink):
        y = (x @ A) @ B
    with counting(bwd_sink):
        y.backward(p["dy"])


def materialized(p, fwd_sink, bwd_sink):
    """Expert outputs formed ([T, K, out], bf16, cuBLAS), then radar_gate's kernels."""
    from radargate_kernels.kernels import launch as L
    E, d_in, r = p["lora_A"].shape
    T, K = p["g"].shape
    x = p["x"].detach().clone().requires_grad_(True)
    A = p["lora_A"].detach().clone().requires_grad_(True)
    B = p["lora_B"].detach().clone().requires_grad_(True)
    with counting(fwd_sink):
        s = (x @ A.permute(1, 0, 2).reshape(d_in, E * r)).view(T, E, r)
        if p["ids"] is not None:
            s = torch.gather(s, 1, p["ids"].unsqueeze(-1).expand(-1, -1, r))
            V = torch.einsum("tkr,tkro->tko", s, B[p["ids"]])
        else:
            V = torch.einsum("tkr,kro->tko", s, B)
        Vd = V.detach()
        out = L.run("forward", Vd, p["g"], p["rot_down"], p["rot_up"], p["beta"], p["ids"], 1.0,
                    1e-6)
    with counting(bwd_sink):
        dV = L.run("backward", p["dy"], Vd, p["g"], p["rot_down"], p["rot_up"], p["beta"],
                   p["ids"], *out[1:], 1.0, 1e-6)[0]
        V.backward(dV)


def floor(T, d_in, d_out, E, K, r, rg, itemsize):
    """The compulsory work of the fused layer, per pass -> (forward Work, backward Work)."""
    params = (E * d_in * r + E * r * d_out + d_out * rg + rg * d_out // 2 + E * d_out // 2)
    trig = 2.0 * T * K * d_out / 2
    fwd, bwd = Work("floor", "floor"), Work("floor", "floor")
    fwd.bytes = (T * d_in + T * d_out + params + T * K) * itemsize
    fwd.tc = T * K * r * (d_in + d_out) + T * K * rg * d_out / 2
    fwd.sfu = trig
    bwd.bytes = (2 * T * d_in + T * d_out + 2 * params + 2 * T * K) * itemsize
    bwd.tc = 3 * T * K * r * (d_in + d_out) + 3 * T * K * rg * d_out / 2 - T * K * r * d_in
    bwd.sfu = trig
    return fwd, bwd


SHAPES = {  # name: (T, in, out, E, K, r, rg, top-k)
    "E8-dense": (8192, 4096, 4096, 8, 8, 16, 16, False),
    "top2-of-8": (8192, 4096, 4096, 8, 2, 16, 16, True),
    "E40-dense": (8192, 4096, 4096, 40, 40, 16, 16, False),
}
QUICK_SHAPES = {"E8-dense-small": (512, 1024, 1024, 8, 8, 16, 16, False)}


def total(works):
    w = Work("total", "total")
    w.launches = 0  # the launches of the works summed, not one more
    for x in works:
        w.add(x)
    w.t = sum(x.time() for x in works)
    return w


def project(name, shape, dtype=torch.bfloat16):
    T, d_in, d_out, E, K, r, rg, topk = shape
    p = problem(T, d_in, d_out, E, K, r, rg, dtype, topk)
    out = {}
    for label, fn in (("fused", fused_layer), ("weighted_sum", weighted_sum_layer),
                      ("peft_lora", peft_lora), ("materialized", materialized)):
        t0 = time.time()
        f, b = [], []
        fn(p, f, b)
        out[label] = dict(fwd=f, bwd=b, seconds=time.time() - t0)
        print(f"  {label}: {len(f)} + {len(b)} launches counted ({time.time() - t0:.0f} s)",
              flush=True)
    fl = floor(T, d_in, d_out, E, K, r, rg, torch.tensor([], dtype=dtype).element_size())
    out["floor"] = dict(fwd=[fl[0]], bwd=[fl[1]])
    return out


def op_paths(T, K, D, r, dtype=torch.float32, seed=0):
    """radar_gate itself (expert outputs given): projected microseconds of its Triton kernels
    and of the PyTorch reference run eagerly (autograd), forward and backward."""
    from radargate_kernels.kernels import launch as L
    from radargate_kernels.reference import radar_gate_reference
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(T, K, D, generator=gen).to(dtype)
    g = torch.randn(T, K, generator=gen).softmax(-1).to(dtype)
    A = (torch.randn(D, r, generator=gen) * D ** -0.5).to(dtype)
    B = (torch.randn(r, D // 2, generator=gen) * r ** -0.5).to(dtype)
    dy = torch.randn(T, D, generator=gen).to(dtype)
    out = {}
    f, b = [], []
    with counting(f):
        y, *state = L.run("forward", V, g, A, B, None, None, 1.0, 1e-6)
    with counting(b):
        L.run("backward", dy, V, g, A, B, None, None, *state, 1.0, 1e-6)
    out["triton_kernels"] = (sum(w.time() for w in f) * 1e6, sum(w.time() for w in b) * 1e6)
    leaves = [t.clone().requires_grad_(True) for t in (V, g, A, B)]
    f, b = [], []
    with counting(f):
        y = radar_gate_reference(*leaves)
    with counting(b):
        y.backward(dy)
    out["pytorch_reference"] = (sum(w.time() for w in f) * 1e6, sum(w.time() for w in b) * 1e6)
    return out


def _us(s):
    return f"{s * 1e6:9.1f}"


def report(name, shape, res):
    lines = [f"### {name}: T={shape[0]}, in={shape[1]}, out={shape[2]}, E={shape[3]}, "
             f"K={shape[4]}, r={shape[5]}, rg={shape[6]}, bf16"
             + (" (top-k ids)" if shape[7] else " (dense)"), "",
             "Fused layer, per launch (PROJECTED H100 SXM microseconds per unit; the launch "
             "takes its slowest unit + 3 us):", "",
             "| pass | launch | DRAM | tensor cores | FMA pipe | SFU | projected |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for pas in ("fwd", "bwd"):
        for w in res["fused"][pas]:
            s = w.seconds()
            lines.append(f"| {pas} | {w.name} | {_us(s['dram'])} | {_us(s['tc'])} | "
                         f"{_us(s['fma'])} | {_us(s['sfu'])} | {_us(w.time())} |")
    lines += ["", "| path | forward | backward | forward + backward | vs floor |",
              "|---|---:|---:|---:|---:|"]
    fl = sum(w.time() for w in res["floor"]["fwd"] + res["floor"]["bwd"])
    summary = {}
    for label in ("floor", "fused", "weighted_sum", "peft_lora", "materialized"):
        f = sum(w.time() for w in res[label]["fwd"])
        b = sum(w.time() for w in res[label]["bwd"])
        summary[label] = dict(fwd_us=f * 1e6, bwd_us=b * 1e6, total_us=(f + b) * 1e6,
                              launches=sum(w.launches for w in res[label]["fwd"] +
                                           res[label]["bwd"]))
        lines.append(f"| {label} | {_us(f)} | {_us(b)} | {_us(f + b)} | {(f + b) / fl:5.2f}x |")
    # per unit totals for the fused layer and the floor
    lines += ["", "Per unit, summed over the launches (microseconds; the floor's as one pass "
              "each):", "", "| path | DRAM | tensor cores | FMA pipe | SFU | launches |",
              "|---|---:|---:|---:|---:|---:|"]
    for label in ("floor", "fused", "weighted_sum", "materialized"):
        tot = total(res[label]["fwd"] + res[label]["bwd"])
        s = tot.seconds()
        lines.append(f"| {label} | {_us(s['dram'])} | {_us(s['tc'])} | {_us(s['fma'])} | "
                     f"{_us(s['sfu'])} | {tot.launches} |")
    return "\n".join(lines) + "\n", summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--op", nargs=4, type=int, metavar=("T", "K", "D", "r"),
                    help="radar_gate alone at this shape (fp32): projected microseconds as JSON")
    args = ap.parse_args(argv)
    if os.environ.setdefault("TRITON_INTERPRET", "1") != "1":  # before the kernels are imported
        print("roofline: counts in the Triton interpreter; unset TRITON_INTERPRET")
        return 2
    if args.op:
        res = op_paths(*args.op)
        text = json.dumps({k: dict(fwd_us=v[0], bwd_us=v[1]) for k, v in res.items()})
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(text)
        return 0
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes}
    md = ["# Roofline projection (H100 SXM, bf16) -- a PROJECTION from counted work, not a "
          "measurement", "", __doc__.split("\n\n", 1)[1].strip(), ""]
    allsum = {}
    for name, shape in shapes.items():
        print(f"{name}: counting ...", flush=True)
        res = project(name, shape)
        text, summary = report(name, shape, res)
        allsum[name] = summary
        print(text, flush=True)
        md.append(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(md))
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(allsum, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
