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
                 check_id_range=True, slot_mask=None):
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
                            f"mixed floating dtypes are not promoted), got {named[name].dtype}: "
                            f"cast it, e.g. {name}.to(expert_out.dtype) (the modules in "
                            f"radargate_kernels.nn do this for you)")
    if K < 1:
        raise ValueError(f"expert_out: expected K >= 1 experts, got shape {_shape(expert_out)}")
    if D < 2 or D % 2:
        raise ValueError(f"expert_out: expected an even feature size D >= 2, got D = {D}")
    h = D // 2
    if _shape(weights) != _shape(expert_out)[:-1]:
        raise ValueError(f"weights: expected shape {_shape(expert_out)[:-1]} (expert_out's "
                         f"shape without D), got {_shape(weights)}")
    r = _check_rotation(rot_down, rot_up, D, "D", "r")
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
    check_positive("tau", tau)
    check_eps(eps)
    _check_slot_mask(slot_mask, weights, named)
    _check_devices(named, "expert_out")
    if expert_ids is not None and check_id_range and angle_bias is not None:
        # without angle_bias the ids select nothing: any value (a negative one masks the slot)
        _check_id_range(expert_ids, E, "E = angle_bias.shape[0]")
    return K, D, r, E


def _check_slot_mask(slot_mask, weights, named):
    """slot_mask: None or a bool tensor of the weights' shape (True: the slot takes part)."""
    if slot_mask is None:
        return
    if not isinstance(slot_mask, torch.Tensor):
        raise TypeError(f"slot_mask: expected a torch.Tensor, got {type(slot_mask).__name__}")
    if slot_mask.dtype != torch.bool:
        raise TypeError(f"slot_mask: expected dtype torch.bool (True: the slot takes part), got "
                        f"{slot_mask.dtype}")
    if _shape(slot_mask) != _shape(weights):
        raise ValueError(f"slot_mask: expected shape {_shape(weights)} (same as weights), got "
                         f"{_shape(slot_mask)}")
    named["slot_mask"] = slot_mask


def _check_rotation(rot_down, rot_up, D: int, dim: str, rank: str) -> int:
    """rot_down [D, rank] and rot_up [rank, D/2] (the names as the op calls them) -> rank."""
    if rot_down.dim() != 2 or rot_down.shape[0] != D or rot_down.shape[1] < 1:
        raise ValueError(f"rot_down: expected shape [{dim}, {rank}] = [{D}, {rank}] with "
                         f"{rank} >= 1, got {_shape(rot_down)}")
    r = rot_down.shape[1]
    if _shape(rot_up) != (r, D // 2):
        raise ValueError(f"rot_up: expected shape [{rank}, {dim}/2] = [{r}, {D // 2}] ({rank} "
                         f"from rot_down), got {_shape(rot_up)}")
    return r


def _check_devices(named, first):
    """Every tensor on the device of the first one (checked before any value is read)."""
    device = named[first].device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of {first}), "
                             f"got {t.device}")


# tau and eps enter the math as 1/tau and eps^2 in float32 (the kernels' scalar arguments and the
# compute dtype of every input dtype but float64): both must stay finite and normal there.
TAU_RANGE = (1e-30, 1e30)
EPS_RANGE = (1e-18, 1e18)


def _finite_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a finite float, got {value!r}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name}: expected a finite float, got an integer too large for a "
                         f"float ({str(value)[:20]}...)") from None
    if not abs(v) < math.inf:  # (math.isfinite takes no symbolic float: torch.compile with
        # dynamic=True passes tau, eps and scaling as SymFloats; a comparison takes them)
        raise ValueError(f"{name}: expected a finite float, got {value!r}")
    return v


def check_eps(eps):
    """eps in EPS_RANGE: ``max(|v|, eps)`` is computed as ``sqrt(max(|v|^2, eps^2))`` in float32."""
    v = check_positive("eps", eps)
    lo, hi = EPS_RANGE
    if not lo <= v <= hi:
        raise ValueError(f"eps: expected a value in [{lo:g}, {hi:g}] (eps^2 must be a normal "
                         f"float32), got {eps!r}")
    return v


def check_positive(name, value):
    """A finite Python number > 0 (tau, eps, scaling); tau also within TAU_RANGE."""
    v = _finite_float(name, value)
    if v <= 0:
        raise ValueError(f"{name}: expected a finite float > 0, got {value!r}")
    if name == "tau" and not TAU_RANGE[0] <= v <= TAU_RANGE[1]:
        raise ValueError(f"tau: expected a value in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}] (1/tau "
                         f"must be a finite float32), got {value!r}")
    return v


def _check_id_range(expert_ids, E, what):
    """Values of expert_ids below E (a negative value is a masked slot). On the device, without
    a host sync, for CUDA tensors and under torch.compile; on the host for CPU tensors in eager
    mode; not for meta (fake) tensors, which hold no values."""
    if not expert_ids.numel() or expert_ids.device.type == "meta":
        return
    msg = f"expert_ids: expected values < {E} ({what}; a negative id masks its slot)"
    if expert_ids.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async((expert_ids < E).all(), msg)
        return
    hi = int(expert_ids.max())
    if hi >= E:
        raise ValueError(f"{msg}, got a maximum of {hi}")



def check_lora_inputs(x, lora_A, lora_B, weights, rot_down, rot_up, angle_bias, expert_ids,
                      scaling, tau, eps, check_id_range=True, slot_mask=None):
    """Validate the arguments of ``radar_gate_lora``; returns (E, fin, r, fout, K, rg)."""
    named = {"x": x, "lora_A": lora_A, "lora_B": lora_B, "weights": weights}
    for name, t in (("rot_down", rot_down), ("rot_up", rot_up), ("angle_bias", angle_bias),
                    ("expert_ids", expert_ids)):
        if t is not None:
            named[name] = t
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    for name in ("lora_A", "lora_B", "weights", "rot_down", "rot_up", "angle_bias"):
        if name in named and named[name].dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x; mixed floating "
                            f"dtypes are not promoted), got {named[name].dtype}: cast it, e.g. "
                            f"{name}.to(x.dtype) (RadarGateLoRALinear does this for you)")
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [..., in], got {_shape(x)}")
    if lora_A.dim() != 3 or min(lora_A.shape) < 1:
        raise ValueError(f"lora_A: expected shape [E, in, r] with E, r >= 1, got {_shape(lora_A)}")
    E, fin, r = lora_A.shape
    if fin != x.shape[-1]:
        raise ValueError(f"lora_A: expected in = {x.shape[-1]} (x's last dim) in shape "
                         f"[E, in, r], got {_shape(lora_A)}")
    if lora_B.dim() != 3 or lora_B.shape[:2] != (E, r) or lora_B.shape[2] < 1:
        raise ValueError(f"lora_B: expected shape [E, r, out] = [{E}, {r}, out] (E, r from "
                         f"lora_A), got {_shape(lora_B)}")
    fout = lora_B.shape[2]
    if weights.dim() < 1 or _shape(weights)[:-1] != _shape(x)[:-1]:
        raise ValueError(f"weights: expected shape [..., K] with x's leading dims "
                         f"{_shape(x)[:-1]}, got {_shape(weights)}")
    K = weights.shape[-1]
    if K < 1:
        raise ValueError(f"weights: expected K >= 1 slots, got shape {_shape(weights)}")
    if expert_ids is None:
        if K != E:
            raise ValueError(f"weights: has K = {K} slots but lora_A has E = {E} experts; "
                             f"pass expert_ids when K != E")
    else:
        if expert_ids.dtype not in INT_DTYPES:
            raise TypeError(f"expert_ids: expected an integer dtype, got {expert_ids.dtype}")
        if _shape(expert_ids) != _shape(weights):
            raise ValueError(f"expert_ids: expected shape {_shape(weights)} (same as weights), "
                             f"got {_shape(expert_ids)}")
    rg = 0
    if (rot_down is None) != (rot_up is None):
        raise ValueError("rot_down, rot_up: expected both (RadarGate) or neither (weighted sum)")
    if rot_down is not None:
        if fout % 2:
            raise ValueError(f"lora_B: expected an even output size for the rotation, got "
                             f"out = {fout}")
        rg = _check_rotation(rot_down, rot_up, fout, "out", "rg")
    if angle_bias is not None:
        if rot_down is None:
            raise ValueError("angle_bias: given without rot_down/rot_up (no rotation)")
        if _shape(angle_bias) != (E, fout // 2):
            raise ValueError(f"angle_bias: expected shape [E, out/2] = [{E}, {fout // 2}], "
                             f"got {_shape(angle_bias)}")
    _finite_float("scaling", scaling)
    check_positive("tau", tau)
    check_eps(eps)
    _check_slot_mask(slot_mask, weights, named)
    _check_devices(named, "x")
    if expert_ids is not None and check_id_range:
        _check_id_range(expert_ids, E, "E = lora_A.shape[0]")
    return E, fin, r, fout, K, rg


def slot_ids(expert_ids, slot_mask, K: int):
    """The one form the implementations take masks in: ids [T, K] int64 with -1 at every masked
    slot (slot_mask False or a negative id), or None when neither is given. Without expert_ids
    the ids are the slot numbers (slot k is expert k). Shapes [..., K] are flattened to [T, K]."""
    if slot_mask is None:
        return None if expert_ids is None else expert_ids.reshape(-1, K).long()
    mask = slot_mask.reshape(-1, K)
    if expert_ids is None:
        ids = torch.arange(K, device=mask.device).expand(mask.shape[0], K)
    else:
        ids = expert_ids.reshape(-1, K).long()
    return torch.where(mask, ids, -1)


def no_double_backward(what):
    """Called at the start of a custom backward: with ``create_graph=True`` grad mode is on
    there, and the gradients returned would silently lack their own graph. Raise instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what}: double backward (create_graph=True) is not supported by this "
                           f"path; use the reference (radargate_kernels.reference) for "
                           f"higher-order gradients")
