"""Random problem generator shared by the tests (fresh random inputs per case, seeded)."""
import torch


def make_problem(T, K, D, r, dtype=torch.float32, bias=False, ids=False, E_extra=2, seed=0,
                 lead=None):
    """Random inputs for radar_gate. Scales keep angles O(1) so every term matters.

    Returns a dict of keyword arguments (expert_out, weights, rot_down, rot_up, angle_bias,
    expert_ids, tau). ``lead`` replaces (T,) as the leading shape when given.
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
    return out


DIFF_ARGS = ("expert_out", "weights", "rot_down", "rot_up", "angle_bias")


def run_with_grads(fn, problem, dy, dtype=None, **kw):
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
    leaves = [n for n in DIFF_ARGS if args.get(n) is not None]
    grads = torch.autograd.grad(y, [args[n] for n in leaves], dy.to(y.dtype),
                                materialize_grads=True)
    return y.detach(), dict(zip(leaves, grads))
