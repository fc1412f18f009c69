"""Bytes moved by the fused RadarGate-LoRA op, counted in the Triton interpreter, vs the minimum
and vs the materialized pipeline (LoRA expert matmuls + radar_gate).

    python benchmarks/lora_cost.py [--T 64 --K 8 --E 8 --d 1024 --r 8 --rg 8 --dtype bfloat16]
                                   [--ids] [--json out.json]

Counted as in benchmarks.cost_report: every tl.load / tl.store of the kernels (masked-off
lanes excluded) and every aten op's input + output bytes outside the kernels (casts, the
parameter products P = B B^T and Q = B rot_down, the relation map where PyTorch computes it, the
host-side gathers, sorts and sums). Three views of the kernel bytes:
  requested      every request, no cache;
  DRAM model     parameters (lora_A, lora_B, rot_up, angle_bias and the products P, Q: shared
                 by all programs, L2-resident on a GPU) once per launch, the rest as requested;
  unique         each address once per launch (a perfect cache): the floor a cache could reach.
Minima: "from s" = the issue's floor (read s, weights, ids once, write y once, parameters once);
"full op" adds the down projection (read x and lora_A once) to it. All per call, in bytes.
The materialized pipeline is counted the same way: the layer's expert matmuls (aten) and
radar_gate's fused kernels (interpreter).
"""
from __future__ import annotations

import argparse
import os
import sys
import types

if __name__ == "__main__":
    # run as a script: the kernels are counted in the interpreter, which triton must see before
    # it is first imported (its settings are read then). Importing this module (tests,
    # measure()) changes no environment: the caller sets it, or count_triton says so.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from radargate_kernels import lora as lora_mod  # noqa: E402
from radargate_kernels import radar_gate  # noqa: E402
from benchmarks.cost_report import AtenBytes, _nbytes, count_triton, emit  # noqa: E402
from radargate_kernels.nn import RadarGateLoRALinear  # noqa: E402


class LoraAtenBytes(AtenBytes):
    """AtenBytes that also enters the fused layer's custom ops (their kernels are counted by
    count_triton, the PyTorch work inside them by this mode)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "radargate" and func.__name__.startswith("lora_"):
            impl = lora_mod._forward if func.__name__.startswith("lora_fwd") else lora_mod._backward
            with self:
                return impl(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _unique_counter():
    """Patch the counter so it also records the distinct addresses each kernel touches."""
    import triton.runtime.interpreter as interp
    seen = {}
    ld, st = interp.InterpreterBuilder.create_masked_load, interp.InterpreterBuilder.create_masked_store

    def note(ptrs, mask, itemsize):
        import numpy as np
        from benchmarks import cost_report
        k = cost_report._COUNTER.current if cost_report._COUNTER else None
        addrs = np.unique(ptrs.data[mask.data])
        s = seen.setdefault(k, [set(), 0])
        before = len(s[0])
        s[0].update(addrs.tolist())
        s[1] += (len(s[0]) - before) * itemsize

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        ret = ld(self, ptrs, mask, other, cache_policy, is_volatile)
        note(ptrs, mask, ret.data.dtype.itemsize)
        return ret

    def masked_store(self, ptrs, value, mask, cache_policy):
        note(ptrs, mask, value.data.dtype.itemsize)
        return st(self, ptrs, value, mask, cache_policy)

    def restore():
        interp.InterpreterBuilder.create_masked_load = ld
        interp.InterpreterBuilder.create_masked_store = st

    interp.InterpreterBuilder.create_masked_load = masked_load
    interp.InterpreterBuilder.create_masked_store = masked_store
    return seen, restore


def make_inputs(T, K, E, d, r, rg, dtype, ids, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    return dict(x=rnd(T, d), lora_A=rnd(E, d, r, scale=d ** -0.5), lora_B=rnd(E, r, d),
                weights=torch.softmax(torch.randn(T, K, generator=gen), -1).to(dtype),
                rot_down=rnd(d, rg, scale=d ** -0.5), rot_up=rnd(rg, d // 2, scale=rg ** -0.5),
                angle_bias=rnd(E, d // 2, scale=0.1),
                expert_ids=torch.randint(0, E, (T, K), generator=gen) if ids else None)


def _count(fn, backward_of=None):
    seen, restore = _unique_counter()
    try:
        with count_triton() as kc, LoraAtenBytes() as ab:
            out = fn()
            if backward_of is not None:
                out.backward(backward_of)
    finally:
        restore()
    req = sum(a + b for a, b in kc.kernel_bytes.values())
    dram = sum(kc.dram_model(k) for k in kc.launches)
    uniq = sum(v[1] for v in seen.values())
    per_kernel = {k: dict(requested=sum(kc.kernel_bytes.get(k, (0, 0))),
                          dram_model=kc.dram_model(k), unique=seen.get(k, (None, 0))[1])
                  for k in kc.launches}
    return out, dict(requested=req + ab.bytes, dram_model=dram + ab.bytes, unique=uniq + ab.bytes,
                     per_kernel=per_kernel,
                     kernels=req, aten=ab.bytes, aten_ops=ab.ops, launches=dict(kc.launches),
                     by_arg={f"{k}.{a}": v for (k, a), v in sorted(kc.by_arg.items())},
                     aten_op_names=dict(ab.op_names), aten_op_bytes=dict(ab.op_bytes))


def measure(T=64, K=8, E=8, d=1024, r=8, rg=8, dtype=torch.bfloat16, ids=False):
    inp = make_inputs(T, K, E, d, r, rg, dtype, ids)
    tau = 0.7

    def leaves():
        return {k: (v.clone().requires_grad_(True) if v is not None and v.is_floating_point()
                    else v) for k, v in inp.items()}
    dy = torch.randn(T, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    res = {"shape": dict(T=T, K=K, E=E, d=d, r=r, rg=rg, dtype=str(dtype).split(".")[-1],
                         ids=ids, angle_bias=True)}
    a = leaves()
    y, res["fused_forward"] = _count(lambda: lora_mod.radar_gate_lora(**a, tau=tau,
                                                                       backend="triton"))
    a = leaves()
    _, res["fused_backward"] = _count(
        lambda: lora_mod.radar_gate_lora(**a, tau=tau, backend="triton"), backward_of=dy)
    res["fused_backward"] = {k: (v - res["fused_forward"][k] if k in ("requested", "dram_model",
                                                                      "unique", "kernels", "aten")
                                 else v) for k, v in res["fused_backward"].items()}
    fwd_k, bwd_k = res["fused_forward"]["per_kernel"], res["fused_backward"]["per_kernel"]
    res["fused_backward"]["per_kernel"] = {  # the backward's own launches only
        k: {view: n - fwd_k.get(k, {}).get(view, 0) for view, n in v.items()}
        for k, v in bwd_k.items() if res["fused_backward"]["launches"][k]
        > res["fused_forward"]["launches"].get(k, 0)}
    for mode in ("fused_forward", "fused_backward"):  # the "from s" numerator
        f = res[mode]
        f["without_down"] = {view: f[view] - sum(v[view] for k, v in f["per_kernel"].items()
                                                 if k.startswith("lora_down_"))
                             for view in ("requested", "dram_model", "unique")}

    def materialized(a):
        # what RadarGateLoRALinear(fused=False) runs: expert outputs in the input dtype (dense:
        # two einsums; top-k: rows grouped by expert, one matmul pair per expert), then radar_gate
        ids_ = a["expert_ids"]
        if ids_ is None:
            V = torch.einsum("ter,ero->teo", torch.einsum("ti,eir->ter", a["x"], a["lora_A"]),
                             a["lora_B"])
        else:
            stub = types.SimpleNamespace(dropout=torch.nn.Identity(), lora_A=a["lora_A"],
                                         lora_B=a["lora_B"], num_experts=E, scaling=1.0)
            V = RadarGateLoRALinear.expert_outputs(stub, a["x"], ids_)
        return radar_gate(V, a["weights"], a["rot_down"], a["rot_up"], a["angle_bias"], ids_,
                          tau=tau, backend="triton")
    a = leaves()
    _, res["materialized_forward"] = _count(lambda: materialized(a))
    a = leaves()
    _, mb = _count(lambda: materialized(a), backward_of=dy)
    res["materialized_backward"] = {k: (v - res["materialized_forward"][k]
                                        if isinstance(v, (int, float)) else v)
                                    for k, v in mb.items() if k in ("requested", "dram_model",
                                                                    "unique", "kernels", "aten")}
    params = sum(_nbytes(inp[k]) for k in ("lora_B", "rot_down", "rot_up", "angle_bias"))
    s_bytes = T * K * r * 4  # fp32 activations
    small = _nbytes(inp["weights"]) + (_nbytes(inp["expert_ids"]) if ids else 0)
    y_bytes = _nbytes(y)
    down = _nbytes(inp["x"]) + _nbytes(inp["lora_A"])
    f_min = s_bytes + small + y_bytes + params
    # backward floor: read dy, s, weights, ids and parameters once; write ds, dweights and the
    # parameter gradients once (from s); the full op adds x, lora_A read and dx, dlora_A written
    grads = params + _nbytes(inp["weights"]) + s_bytes
    b_min = y_bytes + s_bytes + small + params + grads
    res["minimum"] = dict(forward_from_s=f_min, forward_full=f_min + down,
                          backward_from_s=b_min, backward_full=b_min + 2 * down)
    return res


def report(res):
    s = res["shape"]
    mn = res["minimum"]
    out = [f"shape T={s['T']} K={s['K']} E={s['E']} in=out={s['d']} r={s['r']} rg={s['rg']} "
           f"{s['dtype']} ids={s['ids']} angle_bias=on"]
    for mode in ("forward", "backward"):
        f, m = res[f"fused_{mode}"], res[f"materialized_{mode}"]
        out.append(f"\n{mode}: minimum from s {mn[mode + '_from_s'] / 1024:.0f} KiB, full op "
                   f"{mn[mode + '_full'] / 1024:.0f} KiB")
        for view in ("requested", "dram_model", "unique"):
            out.append(f"  {view:10s} fused {f[view] / 1024:9.0f} KiB = "
                       f"{f[view] / mn[mode + '_full']:5.2f}x full-op minimum "
                       f"({f[view] / mn[mode + '_from_s']:5.2f}x from-s minimum); materialized "
                       f"{m[view] / 1024:9.0f} KiB = {m[view] / f[view]:5.2f}x fused")
        wd = f["without_down"]
        out.append("  without the down projection's kernels (the from-s floor's scope): "
                   + ", ".join(f"{view} {wd[view] / 1024:.0f} KiB = "
                               f"{wd[view] / mn[mode + '_from_s']:.2f}x"
                               for view in ("requested", "dram_model", "unique")))
        out.append(f"  fused: kernels {f['kernels'] / 1024:.0f} KiB, aten {f['aten'] / 1024:.0f} "
                   f"KiB in {f['aten_ops']} ops, launches {f['launches']}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--E", type=int, default=8)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--rg", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--ids", action="store_true", help="top-K of E experts (sparse ids)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = measure(a.T, a.K, a.E, a.d, a.r, a.rg, getattr(torch, a.dtype), a.ids)
    emit(report(res), res, a.json)


if __name__ == "__main__":
    main()
