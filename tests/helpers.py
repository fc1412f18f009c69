"""Random problem generator shared by the tests (fresh random inputs per case, seeded)."""
import torch


def make_problem(T, K, D, r, dtype=torch.float32, bias=False, ids=False, E_extra=2, seed=0,
                 lead=None, masked=False):
    """Random inputs for radar_gate. Scales keep angles O(1) so every term matters.

    Returns a dict of keyword arguments (expert_out, weights, rot_down, rot_up, angle_bias,
    expert_ids, tau, and with ``masked`` slot_mask: about a third of the slots False and, with
    ids, about one in six ids -1). ``lead`` replaces (T,) as the leading shape when given.
    """
    gen = torch.Generator().manual_seed(seed)
    lead = (T,) if lead is None else tuple(lead)
    E = K + E_extra if ids else K

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    out = dict(
        expert_out=rnd(*lead, K, D),
        weights=rnd(*lead, K),
        rot_down=rnd(D, r, scale=D ** -0.5),
        rot_up=rnd(r, D // 2, scale=r ** -0.5),
        angle_bias=rnd(E, D // 2) if bias else None,
        expert_ids=torch.randint(0, E, (*lead, K), generator=gen) if ids else None,
        tau=float(0.3 + 1.7 * torch.rand((), generator=gen, dtype=torch.float64)),
    )
    if masked:
        out.update(masked_slots(out["expert_ids"], (*lead, K), gen))
    return out


def masked_slots(expert_ids, shape, gen):
    """Random masks for a problem: {"slot_mask": bool [shape], "expert_ids": with -1 at some
    slots (None stays None)}."""
    out = {"slot_mask": torch.rand(shape, generator=gen) > 0.35}
    if expert_ids is not None:
        out["expert_ids"] = torch.where(torch.rand(shape, generator=gen) < 0.17, -1, expert_ids)
    return out


TOKEN_ARGS = ("expert_out", "weights", "expert_ids", "slot_mask")  # indexed [T, K, ...]


DIFF_ARGS = ("expert_out", "weights", "rot_down", "rot_up", "angle_bias")


def run_with_grads(fn, problem, dy, dtype=None, diff_args=DIFF_ARGS, **kw):
    """Call fn on copies of the problem (cast to ``dtype`` if given) and return (y, grads dict)."""
    args = {}
    for name, v in problem.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().clone()
            if dtype is not None:
                v = v.to(dtype)
            v.requires_grad_(True)
        args[name] = v
    y = fn(**args, **kw)
    leaves = [n for n in diff_args if args.get(n) is not None]
    grads = torch.autograd.grad(y, [args[n] for n in leaves], dy.to(y.dtype),
                                materialize_grads=True)
    return y.detach(), dict(zip(leaves, grads))


PARAM_GRADS = ("rot_down", "rot_up", "angle_bias")


def param_grad_abs_scale(fn, problem, dy, tokens=TOKEN_ARGS, params=PARAM_GRADS):
    """max over elements of sum_t |contribution of token t to d(param)|, float64, per parameter
    (each token's parameter gradient from one vmapped torch.func.grad: tokens are independent)."""
    from torch.func import grad, vmap
    p = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
         for k, v in problem.items()}
    if p[tokens[0]].shape[0] == 0:
        return {}
    par = {k: p[k] for k in params if p.get(k) is not None}
    tok = {k: p[k] for k in tokens if p.get(k) is not None}
    rest = {k: v for k, v in p.items() if k not in par and k not in tok}

    def loss(par, tok, dy1):
        return (fn(**par, **{k: v[None] for k, v in tok.items()}, **rest) * dy1).sum()
    per_token = vmap(grad(loss), in_dims=(None, 0, 0))(par, tok, dy.double())
    return {k: float(v.abs().sum(0).max()) for k, v in per_token.items()}


def _variant(problem, dy, kind, gen):
    """An equivalent problem whose float32 evaluation sums in another order, and the map that
    takes its outputs (y, grads) back to the original layout."""
    p = dict(problem)
    V = p["expert_out"]
    T, K, D = V.shape
    h = D // 2
    if kind == "tokens":
        perm = torch.randperm(T, generator=gen)
        inv = torch.argsort(perm)
        for k in TOKEN_ARGS:
            if p.get(k) is not None:
                p[k] = p[k][perm]
        back = {"y": lambda x: x[inv], "expert_out": lambda x: x[inv], "weights": lambda x: x[inv]}
        return p, dy[perm], back
    if kind == "slots":
        perm = torch.randperm(K, generator=gen)
        inv = torch.argsort(perm)
        if p["angle_bias"] is not None and p["expert_ids"] is None:
            p["expert_ids"] = torch.arange(K).expand(T, K)
        for k in TOKEN_ARGS:
            if p.get(k) is not None:
                p[k] = p[k][:, perm]
        back = {"expert_out": lambda x: x[:, inv], "weights": lambda x: x[:, inv]}
        return p, dy, back
    # kind == "pairs": permute the Givens pairs (p, p + h) consistently everywhere
    perm = torch.randperm(h, generator=gen)
    full = torch.cat((perm, perm + h))
    inv, inv_full = torch.argsort(perm), torch.argsort(full)
    p["expert_out"] = V[..., full]
    p["rot_down"] = p["rot_down"][full]
    p["rot_up"] = p["rot_up"][:, perm]
    if p["angle_bias"] is not None:
        p["angle_bias"] = p["angle_bias"][:, perm]
    back = {"y": lambda x: x[..., inv_full], "expert_out": lambda x: x[..., inv_full],
            "rot_down": lambda x: x[inv_full], "rot_up": lambda x: x[:, inv],
            "angle_bias": lambda x: x[:, inv]}
    return p, dy[..., full], back


FP32_UNIT_ROUNDOFF = 2.0 ** -24


def perturbed(problem, gen, rel=FP32_UNIT_ROUNDOFF):
    """The problem in float64 with every float input multiplied by (1 + rel * N(0, 1))."""
    out = {}
    for k, v in problem.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.double()
            v = v * (1 + rel * torch.randn(v.shape, generator=gen, dtype=torch.float64))
        out[k] = v
    return out


def reference_runs(fn, problem, dy, seed=0):
    """Equal exact values with independent rounding, whose spread measures the rounding noise of
    the problem: the reference in the problem's dtype on the original layout and on three
    reorderings (tokens, slots, Givens pairs), mapped back, plus four float64 evaluations on
    inputs perturbed by one unit roundoff of the compute precision (fp32; fp64 for fp64 inputs)
    -- what any backward-stable algorithm may return. A list of (y, grads)."""
    gen = torch.Generator().manual_seed(seed)
    runs = [run_with_grads(fn, problem, dy)]
    if problem["expert_out"].shape[0] == 0:
        return runs
    # backward-stability samples at the compute precision: fp32 for fp16/bf16/fp32 inputs, fp64
    # for fp64 (there they matter only where the exact result is 0 by cancellation)
    rel = 2.0 ** -53 if problem["expert_out"].dtype == torch.float64 else FP32_UNIT_ROUNDOFF
    for _ in range(4):
        runs.append(run_with_grads(fn, perturbed(problem, gen, rel), dy.double()))
    for kind in ("tokens", "slots", "pairs"):
        p, d, back = _variant(problem, dy, kind, gen)
        y, grads = run_with_grads(fn, p, d)
        ident = lambda x: x  # noqa: E731
        runs.append((back.get("y", ident)(y),
                     {k: back.get(k, ident)(v) for k, v in grads.items()}))
    return runs


def check_against_reference(fn, problem, dy, seed=0, **kw):
    """Run ``fn`` (forward + all gradients) and assert it matches the reference under the
    per-dtype tolerance table (tolerances.py), noise measured by ``reference_runs``."""
    from radargate_kernels import radar_gate_reference
    from tolerances import assert_matches
    dtype = problem["expert_out"].dtype
    y, grads = run_with_grads(fn, problem, dy, **kw)
    runs = reference_runs(radar_gate_reference, problem, dy, seed)
    y_t, g_t = run_with_grads(radar_gate_reference, problem, dy, dtype=torch.float64)
    assert y.dtype == dtype and y.shape == y_t.shape
    assert_matches("y", y, [r[0] for r in runs], y_t, dtype)
    assert set(grads) == set(g_t)
    sums = param_grad_abs_scale(radar_gate_reference, problem, dy)
    for name in g_t:
        assert grads[name].dtype == dtype, name
        assert_matches(f"d{name}", grads[name], [r[1][name] for r in runs], g_t[name], dtype,
                       scale=sums.get(name))
