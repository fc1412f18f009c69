"""Host side of the fused-layer kernels (lora_stream.py): block sizes, strides, launches.

Shapes: s [T, K, r] and d [T, K, rg] (compute dtype, contiguous), g [T, K], ids [T, K] or None,
lora_B [E, r, out], rot_up [rg, h] (h = out/2), angle_bias [E, h] or None.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .launch import Launch, _acc, _pow2
from .lora_stream import lora_bwd_params_kernel, lora_bwd_rows_kernel, lora_fwd_kernel


@dataclass(frozen=True)
class LoraConfig:
    BT: int        # tokens per program (forward, backward rows)
    BH_FWD: int    # feature pairs per program (forward)
    BH: int        # feature pairs per chunk (backward rows)
    BH_PARAMS: int  # feature pairs per program (parameter kernel)
    BR: int        # expert-sorted rows per step (parameter kernel)
    RP: int        # LoRA rank padded (>= 16 for tl.dot)
    RGP: int       # RotationGate rank padded
    WARPS_FWD: int
    WARPS_ROWS: int
    WARPS_PARAMS: int


def pick_lora_config(r: int, rg: int, h: int) -> LoraConfig:
    """Block sizes: K and E are loops / grid axes, so only r, rg and h shape the tiles. The
    parameter kernel holds three [rank, BH] accumulators and the B_e, rot_up chunks: its chunk
    shrinks as the padded rank grows (64 / 32 / 16 pairs at rank 16 / 32 / 64). Row-kernel
    chunks of 64 pairs spilled 16-32 bytes (fp16, sm_80); 32 gives 0 spills while both padded
    ranks are 16, and 16 above (the dense path holds s [BT, RP], two B_k tiles [RP, BH] and the
    rot_up chunk [RGP, BH]: 32 pairs spilled 16-40 bytes at RP = 32/64 or RGP = 64, sm_80/sm_90)
    (compile report, --family lora)."""
    RP, RGP = max(16, _pow2(r)), max(16, _pow2(rg))
    cap = max(16, _pow2(h))
    bh_params = {16: 64, 32: 32, 64: 16}[max(RP, RGP)]
    bh_rows = 32 if max(RP, RGP) == 16 else 16
    return LoraConfig(BT=16, BH_FWD=min(64, cap), BH=min(bh_rows, cap),
                      BH_PARAMS=min(bh_params, cap), BR=16, RP=RP, RGP=RGP, WARPS_FWD=8,
                      WARPS_ROWS=8, WARPS_PARAMS=8)


def _prep(s, ids, lora_B, rot_up, angle_bias):
    T, K, r = s.shape
    E, _, out = lora_B.shape
    h, rg = out // 2, rot_up.shape[0]
    cfg = pick_lora_config(r, rg, h)
    ids_t = ids if ids is not None else s
    beta_t = angle_bias if angle_bias is not None else s
    s_ids = ids.stride() if ids is not None else (0, 0)
    s_beta = angle_bias.stride() if angle_bias is not None else (0, 0)
    meta = dict(HAS_BETA=angle_bias is not None, ACC=_acc(s.dtype), RGP=cfg.RGP, maxnreg=255)
    return T, K, r, E, out, h, rg, cfg, ids_t, beta_t, s_ids, s_beta, meta


def plan_stream_forward(s, g, d, ids, lora_B, rot_up, angle_bias, out_dtype):
    """-> (y [T, out] in out_dtype, [Launch])."""
    T, K, r, E, out, h, rg, cfg, ids_t, beta_t, s_ids, s_beta, meta = _prep(
        s, ids, lora_B, rot_up, angle_bias)
    y = torch.empty((T, out), dtype=out_dtype, device=s.device)
    launches = []
    if T > 0:
        launches.append(Launch(lora_fwd_kernel, (triton.cdiv(h, cfg.BH_FWD), triton.cdiv(T, cfg.BT)), (
            s, g, d, ids_t, lora_B, rot_up, beta_t, y, T, K, h, r, rg, E,
            *g.stride(), *s_ids, *lora_B.stride(), *rot_up.stride(), *s_beta, *y.stride()),
            dict(meta, BT=cfg.BT, BH=cfg.BH_FWD, RP=cfg.RP, HAS_IDS=ids is not None,
                 num_warps=cfg.WARPS_FWD)))
    return y, launches


def expert_order(ids, T, K, E, device):
    """(token, slot) rows sorted by expert (stable, on the device: no host sync) and the offsets
    of each expert's segment [E + 1]. Out-of-range ids are sorted past the last expert."""
    flat = (ids.reshape(-1).long() if ids is not None
            else torch.arange(K, device=device).repeat(T))
    key = torch.where((flat >= 0) & (flat < E), flat, E)
    order = torch.argsort(key, stable=True)
    offs = torch.zeros(E + 1, dtype=torch.int64, device=device)
    offs[1:] = torch.cumsum(torch.bincount(key, minlength=E + 1)[:E], 0)
    return order, offs


def plan_rows_backward(dy, s, g, d, ids, lora_B, rot_up, angle_bias):
    """-> ((ds [T, K, r], dg [T, K], dd [T, K, rg]), [Launch]), in the compute dtype of s."""
    T, K, r, E, out, h, rg, cfg, ids_t, beta_t, s_ids, s_beta, meta = _prep(
        s, ids, lora_B, rot_up, angle_bias)
    ct = s.dtype
    ds = torch.empty((T, K, r), dtype=ct, device=s.device)
    dg = torch.empty((T, K), dtype=ct, device=s.device)
    dd = torch.empty((T, K, rg), dtype=ct, device=s.device)
    launches = []
    if T > 0:
        launches.append(Launch(lora_bwd_rows_kernel, (triton.cdiv(T, cfg.BT),), (
            s, g, d, ids_t, lora_B, rot_up, beta_t, dy, ds, dg, dd, T, K, h, r, rg, E,
            *g.stride(), *s_ids, *lora_B.stride(), *rot_up.stride(), *s_beta, *dy.stride()),
            dict(meta, BT=cfg.BT, BH=cfg.BH, RP=cfg.RP, HAS_IDS=ids is not None,
                 num_warps=cfg.WARPS_ROWS)))
    return (ds, dg, dd), launches


def plan_params_backward(dy, s, g, d, ids, lora_B, rot_up, angle_bias, dB):
    """-> ((dB, pU [E, rg, h], dbeta [E, h] or None), [Launch]). ``dB`` [E, r, out] (contiguous,
    compute dtype) holds the gradient's relation part on entry; the kernel adds the streaming
    part in place (each program owns its [r, chunk] of one expert: no atomics). pU are the
    per-expert partials of drot_up."""
    T, K, r, E, out, h, rg, cfg, ids_t, beta_t, s_ids, s_beta, meta = _prep(
        s, ids, lora_B, rot_up, angle_bias)
    ct = s.dtype
    pU = torch.empty((E, rg, h), dtype=ct, device=s.device)  # every element is written
    dbeta = torch.empty((E, h), dtype=ct, device=s.device) if angle_bias is not None else None
    order, offs = expert_order(ids, T, K, E, s.device)
    launch = Launch(lora_bwd_params_kernel, (triton.cdiv(h, cfg.BH_PARAMS), E), (
        s, g, d, order, offs, lora_B, rot_up, beta_t, dy, dB,
        dbeta if dbeta is not None else dB, pU, K, h, r, rg,
        *g.stride(), *lora_B.stride(), *rot_up.stride(), *s_beta, *dy.stride()),
        dict(meta, BH=cfg.BH_PARAMS, BR=cfg.BR, RP=cfg.RP, num_warps=cfg.WARPS_PARAMS))
    return (dB, pU, dbeta), [launch]


def stream_forward(s, g, d, ids, lora_B, rot_up, angle_bias, out_dtype):
    y, launches = plan_stream_forward(s, g, d, ids, lora_B, rot_up, angle_bias, out_dtype)
    for launch in launches:
        launch.run()
    return y


def stream_backward_rows(dy, s, g, d, ids, lora_B, rot_up, angle_bias):
    """-> (ds, dg, dd): the per-(token, slot) gradients, in the compute dtype of s."""
    out, launches = plan_rows_backward(dy, s, g, d, ids, lora_B, rot_up, angle_bias)
    for launch in launches:
        launch.run()
    return out


def stream_backward_params(dy, s, g, d, ids, lora_B, rot_up, angle_bias, dB):
    """-> (dB, drot_up, dbeta or None); dB is updated in place (see plan_params_backward)."""
    (dB, pU, dbeta), launches = plan_params_backward(dy, s, g, d, ids, lora_B, rot_up,
                                                     angle_bias, dB)
    for launch in launches:
        launch.run()
    return dB, pU.sum(0), dbeta
