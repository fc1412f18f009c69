"""Measuring what a forward saves for backward (``torch.autograd.graph.saved_tensors_hooks``).

    saved_bytes(fn) -> {"total": bytes, "params": bytes, "activations": bytes, "largest": bytes,
                        "count": n}

Each tensor packed for backward is counted once per storage (views of one tensor share it), with
its storage's full size; tensors sharing storage with one of ``params`` count as ``params``.
"""
from __future__ import annotations

import gc

import torch


def saved_bytes(fn, params=None) -> dict:
    """Run ``fn()`` (a forward) and sum the unique storages it saves for backward. ``params``:
    the model's parameters (an iterable of tensors), reported separately."""
    seen = {}
    param_ptrs = {p.untyped_storage().data_ptr() for p in (params or [])}

    def pack(t):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen and st.nbytes() > 0:
            seen[key] = (st.nbytes(), key[0] in param_ptrs)
        return t

    gc.collect()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    total = sum(n for n, _ in seen.values())
    par = sum(n for n, p in seen.values() if p)
    return {"total": total, "params": par, "activations": total - par,
            "largest": max((n for n, _ in seen.values()), default=0), "count": len(seen)}
