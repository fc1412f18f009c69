"""Device-independent cost counting: bytes moved, launches, bytes saved for backward.

    python -m benchmarks.cost_report [--T 256 --K 8 --D 4096 --r 8 --dtype bfloat16]
                                            [--no-bias] [--no-ids] [--E 16] [--json out.json]

Fused path: every ``tl.load``/``tl.store`` of the Triton kernels is counted by instrumenting the
interpreter (only lanes whose mask is on count), kernel launches by the interpreter's grid calls,
plus the aten ops the op layer runs outside the kernels (the final reduction of the partials).
Naive path: the PyTorch reference in eager mode; a ``TorchDispatchMode`` sums each aten op's input
and output tensor bytes (view ops move nothing and are not counted). Saved for backward: the unique
tensors packed by ``torch.autograd.graph.saved_tensors_hooks``. Minimum: every input read once and
every output written once.

The GPU projection divides counted bytes by a stated HBM bandwidth; it is a PROJECTION, not a
measurement (no GPU on the machines this was written on).
"""
from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Counting runs the kernels in the Triton interpreter, which must be chosen before triton
# decorates them: the command line sets TRITON_INTERPRET=1 in main(); a caller that imports this
# module (tests, benchmarks/lora_cost.py) sets it itself first. Importing sets nothing.

# H100 SXM5 (80 GB HBM3): 3.35 TB/s, NVIDIA H100 Tensor Core GPU datasheet.
H100_SXM_BW = 3.35e12


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# Kernel arguments shared by every program (parameters, a few MB at most): on a GPU their
# re-reads by each program are L2 hits, so the DRAM model counts them once per launch.
# parameters (and the fused layer's parameter products P_flat = PF, Q_flat = QF and their
# host-summed gradients DPF, DQF: E r x E r at most 16 KiB), shared by all programs of a launch:
# LB, U, LA (lora_A), AR (rot_down), PF, QF, DPF, DQF are the fused-layer kernels' names
SHARED_PARAMS = ("A", "B", "BETA", "LB", "U", "LA", "AR", "PF", "QF", "DPF", "DQF")


class _Counter:
    def __init__(self):
        self.kernel_bytes = {}     # kernel name -> [loaded, stored]
        self.by_arg = {}           # (kernel, arg name) -> [loaded, stored]
        self.arg_size = {}         # (kernel, arg name) -> bytes of that tensor
        self.launches = {}         # kernel name -> count
        self.current = None
        self.ranges = []           # (start, end, arg name) of the current launch's tensors

    def arg_of(self, ptrs, mask):
        hit = ptrs.data[mask.data]
        if hit.size == 0:
            return None
        addr = int(hit.flat[0])
        for start, end, name in self.ranges:
            if start <= addr < end:
                return name
        return "?"

    def add(self, ptrs, mask, nbytes, which):
        self.kernel_bytes.setdefault(self.current, [0, 0])[which] += nbytes
        name = self.arg_of(ptrs, mask)
        if name is not None:
            self.by_arg.setdefault((self.current, name), [0, 0])[which] += nbytes

    def dram_model(self, kernel):
        """Bytes with SHARED_PARAMS counted once per launch (L2-resident), others as requested."""
        total = 0
        for (k, name), (ld, st) in self.by_arg.items():
            if k != kernel:
                continue
            if name in SHARED_PARAMS:
                ld = min(ld, self.arg_size[(k, name)] * self.launches[k])
            total += ld + st
        return total


_COUNTER = None


@contextmanager
def count_triton():
    """Count bytes loaded/stored per kernel and launches while the interpreter runs."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("cost_report counts bytes in the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before radargate_kernels' kernels are imported")
    import triton.runtime.interpreter as interp
    global _COUNTER
    c = _Counter()
    b_load = interp.InterpreterBuilder.create_masked_load
    b_store = interp.InterpreterBuilder.create_masked_store
    g_call = interp.GridExecutor.__call__

    b_init = interp.GridExecutor._init_args_hst

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        ret = b_load(self, ptrs, mask, other, cache_policy, is_volatile)
        c.add(ptrs, mask, int(mask.data.sum()) * ret.data.dtype.itemsize, 0)
        return ret

    def masked_store(self, ptrs, value, mask, cache_policy):
        c.add(ptrs, mask, int(mask.data.sum()) * value.data.dtype.itemsize, 1)
        return b_store(self, ptrs, value, mask, cache_policy)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = b_init(self, args_dev, kwargs)
        c.ranges = []
        for name, a in zip(self.arg_names, args_hst):
            if isinstance(a, torch.Tensor) and (c.current, name) not in c.arg_size:
                c.arg_size[(c.current, name)] = _nbytes(a)
            if isinstance(a, torch.Tensor) and a.numel():
                start = a.data_ptr()
                c.ranges.append((start, start + _nbytes(a), name))
        return args_hst, kwargs_hst

    def grid_call(self, *args, **kwargs):
        name = self.fn.__name__
        prev, c.current = c.current, name
        c.launches[name] = c.launches.get(name, 0) + 1
        try:
            return g_call(self, *args, **kwargs)
        finally:
            c.current = prev

    interp.InterpreterBuilder.create_masked_load = masked_load
    interp.InterpreterBuilder.create_masked_store = masked_store
    interp.GridExecutor.__call__ = grid_call
    interp.GridExecutor._init_args_hst = init_args
    _COUNTER = c
    try:
        yield c
    finally:
        interp.InterpreterBuilder.create_masked_load = b_load
        interp.InterpreterBuilder.create_masked_store = b_store
        interp.GridExecutor.__call__ = g_call
        interp.GridExecutor._init_args_hst = b_init
        _COUNTER = None


class AtenBytes(TorchDispatchMode):
    """Sum input+output bytes of every non-view aten op. The fused custom ops are entered (so the
    torch ops inside them, e.g. the reduction of partials, are seen) but not counted themselves:
    their kernels are counted by ``count_triton``."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0
        self.op_names = {}
        self.op_bytes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "radargate":
            from radargate_kernels.kernels import launch
            with self:
                if func.__name__.startswith("fwd"):
                    return launch.forward(*args, **kwargs)
                # radargate::bwd(..., tau, eps, need_dA, need_dB, need_dbeta)
                return launch.backward(*args[:14], tuple(args[14:17]))
        out = func(*args, **kwargs)
        if _COUNTER is not None and _COUNTER.current is not None:
            return out  # the interpreter's own copies of kernel arguments, not the op's work
        if func.is_view or func.__name__.split(".")[0] in ("empty", "empty_strided", "empty_like",
                                                            "detach", "alias", "lift_fresh",
                                                            "_to_copy_noop"):
            return out
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        flat_out = torch.utils._pytree.tree_leaves(out)
        nb = sum(_nbytes(t) for t in flat_in) + sum(_nbytes(t) for t in flat_out)
        self.bytes += nb
        self.ops += 1
        name = func.__name__.split(".")[0]
        self.op_names[name] = self.op_names.get(name, 0) + 1
        self.op_bytes[name] = self.op_bytes.get(name, 0) + nb
        return out


@contextmanager
def saved_bytes():
    """Bytes of unique tensors saved for backward inside the block -> dict(value=...)."""
    seen, acc = set(), {"value": 0}

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            acc["value"] += _nbytes(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield acc


def make_inputs(T, K, D, r, dtype, bias=True, ids=True, E=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E = E or (K if not ids else 2 * K)
    f = dict(dtype=dtype)
    args = dict(
        expert_out=torch.randn(T, K, D, generator=gen).to(**f),
        weights=torch.softmax(torch.randn(T, K, generator=gen), -1).to(**f),
        rot_down=(torch.randn(D, r, generator=gen) / D ** 0.5).to(**f),
        rot_up=(torch.randn(r, D // 2, generator=gen) / r ** 0.5).to(**f),
        angle_bias=(0.1 * torch.randn(E, D // 2, generator=gen)).to(**f) if bias else None,
        expert_ids=torch.randint(0, E, (T, K), generator=gen) if ids else None,
    )
    return args


def minimum_bytes(args, y):
    ins = sum(_nbytes(v) for v in args.values())
    fwd = ins + _nbytes(y)
    grads = sum(_nbytes(v) for k, v in args.items() if k != "expert_ids" and v is not None)
    bwd = ins + _nbytes(y) + grads  # read inputs and dy once, write every gradient once
    return fwd, bwd


def measure(T=2048, K=8, D=4096, r=8, dtype=torch.bfloat16, bias=True, ids=True, E=None):
    """Count both paths at one shape; returns a dict of figures."""
    from radargate_kernels import radar_gate, radar_gate_reference
    base = make_inputs(T, K, D, r, dtype, bias, ids, E)
    res = {"shape": dict(T=T, K=K, D=D, r=r, E=(base["angle_bias"].shape[0] if bias else None),
                         dtype=str(dtype).split(".")[-1], bias=bias, ids=ids)}

    def leaves():
        a = {k: (v.clone().requires_grad_(True) if v is not None and v.is_floating_point() else v)
             for k, v in base.items()}
        return a

    def figures(kc, ab):
        requested = sum(ld + st for ld, st in kc.kernel_bytes.values())
        dram = sum(kc.dram_model(k) for k in kc.launches)
        by_arg = {f"{k}.{a}": v for (k, a), v in sorted(kc.by_arg.items())}
        return dict(bytes=requested + ab.bytes, dram_model_bytes=dram + ab.bytes,
                    kernel_bytes=dict(kc.kernel_bytes), by_arg=by_arg,
                    launches=dict(kc.launches), aten_ops=ab.ops, aten_bytes=ab.bytes,
                    aten_op_names=dict(ab.op_names))

    for name, fn in (("fused", lambda a: radar_gate(**a, tau=0.7, backend="triton")),
                     ("naive", lambda a: radar_gate_reference(**a, tau=0.7))):
        a = leaves()
        with count_triton() as kc, AtenBytes() as ab, saved_bytes() as sv:
            y = fn(a)
        fwd = figures(kc, ab)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        with count_triton() as kc, AtenBytes() as ab:
            y.backward(dy)
        res[name] = dict(forward=fwd, backward=figures(kc, ab), saved_bytes=sv["value"])
    fmin, bmin = minimum_bytes(base, y)
    res["minimum"] = dict(forward=fmin, backward=bmin)
    res["expert_out_bytes"] = _nbytes(base["expert_out"])
    return res


def _mb(x):
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if x >= div:
            return f"{x / div:8.2f} {unit}"
    return f"{x:8.0f} B  "


def report(res):
    s = res["shape"]
    lines = [f"shape T={s['T']} K={s['K']} D={s['D']} r={s['r']} E={s['E']} dtype={s['dtype']} "
             f"angle_bias={s['bias']} expert_ids={s['ids']}"]
    mn = res["minimum"]
    for mode in ("forward", "backward"):
        lines.append(f"\n{mode}: minimum (inputs read once, outputs written once) {_mb(mn[mode])}")
        for path in ("fused", "naive"):
            m = res[path][mode]
            launches = sum(m["launches"].values())
            what = (f"{launches} kernel launch(es) + {m['aten_ops']} aten op(s) "
                    f"{sorted(m['aten_op_names'])}" if path == "fused"
                    else f"{m['aten_ops']} aten ops")
            lines.append(f"  {path:6s} {_mb(m['bytes'])}  = {m['bytes'] / mn[mode]:5.2f}x minimum;"
                         f" {what}")
            if path == "fused":
                lines.append(f"         DRAM model (A, B, angle_bias once per launch): "
                             f"{_mb(m['dram_model_bytes'])} = "
                             f"{m['dram_model_bytes'] / mn[mode]:5.2f}x minimum")
                for k, (ld, st) in m["by_arg"].items():
                    if ld + st >= 0.01 * m["bytes"]:
                        lines.append(f"           {k:38s} loaded {_mb(ld)}  stored {_mb(st)}")
    v = res["expert_out_bytes"]
    for path in ("fused", "naive"):
        sb = res[path]["saved_bytes"]
        lines.append(f"saved for backward, {path:6s}: {_mb(sb)} = {sb / v:4.2f}x |expert_out|")
    lines.append(f"\nGPU PROJECTION (not a measurement): bytes / {H100_SXM_BW / 1e12:.2f} TB/s "
                 "(H100 SXM5 HBM3, NVIDIA datasheet), assuming a purely memory-bound op at full "
                 "bandwidth")
    for mode in ("forward", "backward"):
        f, n = res["fused"][mode]["dram_model_bytes"], res["naive"][mode]["bytes"]
        lines.append(f"  {mode:8s}: fused {f / H100_SXM_BW * 1e6:9.1f} us   naive "
                     f"{n / H100_SXM_BW * 1e6:9.1f} us   (projected speed-up {n / f:4.1f}x)")
    return "\n".join(lines)


def emit(text, res, json_path=None):
    """Print a report and, when asked, write its figures as JSON (shared by the report tools)."""
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)


def main(argv=None):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the op's first use imports the kernels
    ap = argparse.ArgumentParser(description="count bytes, launches and saved tensors")
    ap.add_argument("--T", type=int, default=256,
                    help="tokens (the interpreter counts every lane: T=256 takes ~4 min)")
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--D", type=int, default=4096)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--E", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--no-bias", action="store_true")
    ap.add_argument("--no-ids", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args(argv)
    res = measure(a.T, a.K, a.D, a.r, getattr(torch, a.dtype), not a.no_bias, not a.no_ids, a.E)
    emit(report(res), res, a.json)


if __name__ == "__main__":
    main()
