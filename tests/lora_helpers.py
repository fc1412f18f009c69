"""Random problems for the fused RadarGate-LoRA op and its checks against the reference."""
import torch

from radargate_kernels.reference import radar_gate_lora_reference

LORA_DIFF = ("x", "lora_A", "lora_B", "weights", "rot_down", "rot_up", "angle_bias")
LORA_PARAMS = ("lora_A", "lora_B", "rot_down", "rot_up", "angle_bias")


def make_lora_problem(T, K, fin, out, r, rg, dtype=torch.float32, ids=False, bias=False,
                      rotation=True, E_extra=2, seed=0, masked=False, E=None):
    """Fresh random inputs of ``radar_gate_lora`` (keyword dict). Scales keep |v| and the angles
    O(1), so every term of the op matters. ``masked``: slot_mask and -1 ids as
    helpers.make_problem; ``E`` overrides the expert count with ids (K + E_extra)."""
    from helpers import masked_slots
    gen = torch.Generator().manual_seed(seed)
    E = (E or K + E_extra) if ids else K

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    prob = dict(
        x=rnd(T, fin), lora_A=rnd(E, fin, r, scale=fin ** -0.5), lora_B=rnd(E, r, out),
        weights=rnd(T, K),
        rot_down=rnd(out, rg, scale=out ** -0.5) if rotation else None,
        rot_up=rnd(rg, out // 2, scale=rg ** -0.5) if rotation else None,
        angle_bias=rnd(E, out // 2) if (bias and rotation) else None,
        expert_ids=torch.randint(0, E, (T, K), generator=gen) if ids else None,
        scaling=0.5 + float(torch.rand((), generator=gen)),
        tau=float(0.3 + 1.7 * torch.rand((), generator=gen, dtype=torch.float64)),
    )
    if masked:
        prob.update(masked_slots(prob["expert_ids"], (T, K), gen))
    return prob


def lora_run(fn, prob, dy, dtype=None, **kw):
    """fn on copies of the problem (cast to dtype if given) -> (y, {name: gradient})."""
    from helpers import run_with_grads
    return run_with_grads(fn, prob, dy, dtype=dtype, diff_args=LORA_DIFF, **kw)


def _factor_rounding_run(prob, dy, gen, rel):
    """The fused algorithm in float64 with its two parameter products P = B B^T and
    Q = B rot_down each perturbed by ``rel`` per element: the rounding those products get in the
    compute precision. The fused op is backward stable with respect to (s, P, Q), not to
    (x, A, B) -- its Gram matrix and z come from P and Q -- and the float64 fused algorithm
    itself agrees with the truth to ~1e-13 (a hypothesis case, T=5 K=5 r=1 ids and bias at
    |B| ~ 30, had dweights 5.7x the input-perturbation noise; P and Q accumulated in float64
    brought it to the reference's own error), so this is the noise of its rounding, not of a
    defect."""
    import radargate_kernels.lora as L
    from radargate_kernels import radar_gate_lora
    orig = L.lowrank_factors

    def noisy(B, A, ct):
        return tuple(t * (1 + rel * torch.randn(t.shape, generator=gen, dtype=t.dtype))
                     for t in orig(B, A, ct))
    L.lowrank_factors = noisy
    try:
        return lora_run(radar_gate_lora, prob, dy.double(), dtype=torch.float64, backend="torch")
    finally:
        L.lowrank_factors = orig


def check_lora_against_reference(prob, dy, fn=None, **kw):
    """radar_gate_lora (forward and every gradient) vs the reference composition, with the
    per-dtype tolerance table (tolerances.py), as for the op: the rounding noise is the largest
    error of an ensemble -- the reference in the input dtype, and four float64 references on
    inputs perturbed by one unit roundoff of the compute precision (what any backward-stable
    algorithm may return), plus four float64 runs of the fused algorithm with its parameter
    products rounded (``_factor_rounding_run``) -- and the reference in float64 is the truth; parameter gradients are
    compared at the scale of their per-token summands (sums over tokens). ``fn`` replaces
    radar_gate_lora (benchmarks/gpu_check.py passes one that runs it on another device)."""
    from radargate_kernels import radar_gate_lora
    from helpers import FP32_UNIT_ROUNDOFF, param_grad_abs_scale, perturbed
    from tolerances import assert_matches
    dtype = prob["x"].dtype
    y, grads = lora_run(fn or radar_gate_lora, prob, dy, **kw)
    runs = [lora_run(radar_gate_lora_reference, prob, dy)]
    gen = torch.Generator().manual_seed(prob["x"].shape[0] * 7919 + 1)
    rel = 2.0 ** -53 if dtype == torch.float64 else FP32_UNIT_ROUNDOFF
    for _ in range(4):
        runs.append(lora_run(radar_gate_lora_reference, perturbed(prob, gen, rel), dy.double()))
    if prob.get("rot_down") is not None and prob["x"].shape[0]:
        for _ in range(4):
            runs.append(_factor_rounding_run(prob, dy, gen, rel))
    y_r = [r[0] for r in runs]
    y_t, g_t = lora_run(radar_gate_lora_reference, prob, dy, dtype=torch.float64)
    assert y.dtype == dtype and y.shape == y_t.shape
    assert_matches("y", y, y_r, y_t, dtype)
    assert set(grads) == set(g_t)
    scales = param_grad_abs_scale(radar_gate_lora_reference, prob, dy,
                                  ("x", "weights", "expert_ids", "slot_mask"), LORA_PARAMS)
    for name in g_t:
        assert grads[name].dtype == dtype, name
        sc = scales.get(name)
        assert_matches(f"d{name}", grads[name], [r[1][name] for r in runs], g_t[name], dtype,
                       scale=sc)
