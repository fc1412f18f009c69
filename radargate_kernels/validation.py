"""Argument checking shared by every backend of ``radar_gate``.

Every rejection names the argument and says what was expected. Rule for dtypes: all floating
inputs (expert_out, weights, rot_down, rot_up, angle_bias) must share one dtype out of
float16, bfloat16, float32, float64 -- like ``torch.matmul``, nothing is promoted silently
(the ``radargate_kernels.nn`` modules cast their parameters to the input dtype).
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _shape(t):
    return tuple(t.shape)


def check_inputs(expert_out, weights, rot_down, rot_up, angle_bias, expert_ids, tau, eps,
                 check_id_range=True):
    """Validate the arguments of ``radar_gate``; returns (K, D, r, E)."""
    named = {"expert_out": expert_out, "weights": weights, "rot_down": rot_down,
             "rot_up": rot_up}
    if angle_bias is not None:
        named["angle_bias"] = angle_bias
    if expert_ids is not None:
        named["expert_ids"] = expert_ids
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if expert_out.dim() < 2:
        raise ValueError(f"expert_out: expected shape [..., K, D], got {_shape(expert_out)}")
    K, D = expert_out.shape[-2:]
    if expert_out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"expert_out: expected dtype float16, bfloat16, float32 or float64, "
                        f"got {expert_out.dtype}")
    for name in ("weights", "rot_down", "rot_up", "angle_bias"):
        if name in named and named[name].dtype != expert_out.dtype:
            raise TypeError(f"{name}: expected dtype {expert_out.dtype} (the dtype of expert_out; "
                            f"mixed floating dtypes are not promoted), got {named[name].dtype}")
    if K < 1:
        raise ValueError(f"expert_out: expected K >= 1 experts, got shape {_shape(expert_out)}")
    if D < 2 or D % 2:
        raise ValueError(f"expert_out: expected an even feature size D >= 2, got D = {D}")
    h = D // 2
    if _shape(weights) != _shape(expert_out)[:-1]:
        raise ValueError(f"weights: expected shape {_shape(expert_out)[:-1]} (expert_out's "
                         f"shape without D), got {_shape(weights)}")
    if rot_down.dim() != 2 or rot_down.shape[0] != D or rot_down.shape[1] < 1:
        raise ValueError(f"rot_down: expected shape [D, r] = [{D}, r] with r >= 1, "
                         f"got {_shape(rot_down)}")
    r = rot_down.shape[1]
    if _shape(rot_up) != (r, h):
        raise ValueError(f"rot_up: expected shape [r, D/2] = [{r}, {h}] (r from rot_down), "
                         f"got {_shape(rot_up)}")
    E = K
    if expert_ids is not None:
        if expert_ids.dtype not in INT_DTYPES:
            raise TypeError(f"expert_ids: expected an integer dtype, got {expert_ids.dtype}")
        if _shape(expert_ids) != _shape(weights):
            raise ValueError(f"expert_ids: expected shape {_shape(weights)} (same as weights), "
                             f"got {_shape(expert_ids)}")
    if angle_bias is not None:
        if angle_bias.dim() != 2 or angle_bias.shape[1] != h or angle_bias.shape[0] < 1:
            raise ValueError(f"angle_bias: expected shape [E, D/2] = [E, {h}], "
                             f"got {_shape(angle_bias)}")
        E = angle_bias.shape[0]
        if expert_ids is None and E != K:
            raise ValueError(f"angle_bias: has E = {E} experts but expert_out has K = {K} "
                             f"slots; pass expert_ids when E != K")
        if expert_ids is not None and check_id_range and expert_ids.numel():
            if expert_ids.device.type == "cuda":
                # no host sync on the GPU path: the check runs on the device and fails the
                # stream with this message (checked on the host for CPU tensors)
                torch._assert_async(((expert_ids >= 0) & (expert_ids < E)).all(),
                                    f"expert_ids: expected values in [0, {E}) "
                                    f"(E = angle_bias.shape[0])")
                lo, hi = 0, 0
            else:
                lo, hi = int(expert_ids.min()), int(expert_ids.max())
            if lo < 0 or hi >= E:
                raise ValueError(f"expert_ids: expected values in [0, {E}) (E = angle_bias.shape[0]),"
                                 f" got range [{lo}, {hi}]")
    elif expert_ids is not None and check_id_range and expert_ids.numel():
        if expert_ids.device.type == "cuda":
            torch._assert_async((expert_ids >= 0).all(), "expert_ids: expected non-negative values")
        elif int(expert_ids.min()) < 0:
            raise ValueError(f"expert_ids: expected non-negative values, got min "
                             f"{int(expert_ids.min())}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) \
            or tau <= 0:
        raise ValueError(f"tau: expected a finite float > 0, got {tau!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps <= 0:
        raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")
    device = expert_out.device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of expert_out), "
                             f"got {t.device}")
    return K, D, r, E
