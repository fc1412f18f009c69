"""(e) Composing frozen task LoRAs on a pretrained encoder, for a held-out task (the paper's
headline claim), on real text.

Experts: for each of 25 binary tasks derived from BBC News topics (``realdata_data``), two LoRA
experts (rank 4, alpha 8, seeds 0 and 1) are trained on the last block's FFN down projection of
all-MiniLM-L6-v2, each with its own linear head (Adam, lr 3e-3, steps of 32 articles; the
number of steps is in the budget line). Only A and B are kept.

Generalization: for a target task (five topic-vs-topic tasks, ``TARGET_PAIRS``), both of its
own experts are removed from the pool (48 experts remain; tasks sharing a topic with the target stay: that is
what a pool of skills offers a new task). The experts are frozen; a gate and a new head are
trained on 8 articles per class (Adam, full-batch steps), the learning rate of each gate
picked from the grid by accuracy on 32 validation articles per class, and test
accuracy is measured on every test article of the target's two topics. Gates (all computed with
``radar_gate_lora``; the router reads the adapted layer's input, per token):
- ``head_only``: no experts (a linear probe of the frozen encoder);
- ``uniform``: average of all experts (rule-based, no router);
- ``softmax``: softmax router, weighted sum;
- ``top2``: softmax router, two experts per token, renormalized;
- ``mlp``: an MLP router (GELU, width chosen so it has at least RadarGate's parameters);
- ``radargate``: softmax router + RotationGate (relation-driven angles + static angle_bias);
- ``radargate_static``: static angles only (angle_bias; the relation part fixed at 0);
- ``radargate_nostatic``: relation-driven angles only (no angle_bias).

Scaling: pools of 5, 10, 20 and 40 experts, drawn at random (per seed) from the target's 48-expert pool,
softmax vs RadarGate, same protocol; the 40-expert pool runs the fused layer's K = 40 path.

Verdict rules (fixed before the first full run, ``RULES``): paired differences of test accuracy
over (target, seed) units, 95% bootstrap interval (10,000 resamples); minimum effect 1 accuracy
point. Every positive verdict is re-checked with twice the gate-training steps. Changed by
issue #28: the interval is the cluster bootstrap (targets drawn as clusters, their seeds
nested), not the bootstrap over units as if independent (first report).
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from radargate_kernels import radar_gate_lora
from radargate_kernels.progress import Progress

from . import realdata_data as data
from .common import BOOTSTRAP, cluster_bootstrap, paired_bootstrap  # noqa: F401 (docstring)

RANK, ALPHA, GATE_RANK = 4, 8.0, 8
EXPERT_SEEDS = (0, 1)
LRS = (3e-3, 1e-2, 3e-2)
K_SHOT, VAL_PER_CLASS = 8, 32
MIN_EFFECT = 1.0          # accuracy points
GATES = ("head_only", "uniform", "softmax", "top2", "mlp", "radargate", "radargate_static",
         "radargate_nostatic")
POOL_SIZES = (5, 10, 20, 40)
CONTRAST_TOKENS = 256
# targets: topic-vs-topic tasks, each topic in two of the first five (fixed before any run)
TARGET_PAIRS = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 4), (0, 2), (1, 3), (2, 4), (0, 3), (1, 4))


@dataclass(frozen=True)
class RealSettings:
    quick: bool
    per_topic: object      # articles per topic (None: all 2,225)
    expert_tasks: object   # None: all 25 tasks
    expert_steps: int
    gate_steps: int
    targets: int           # how many of the ten topic-vs-topic tasks are targets
    seeds: tuple
    lrs: tuple
    pool_sizes: tuple
    scaling_targets: int
    controls: int          # permutation draws of the contrastive control


FULL = RealSettings(quick=False, per_topic=None, expert_tasks=None, expert_steps=150,
                    gate_steps=40, targets=5, seeds=(0, 1, 2, 3, 4), lrs=LRS,
                    pool_sizes=POOL_SIZES, scaling_targets=2, controls=200)
QUICK = RealSettings(quick=True, per_topic=60, expert_tasks=8, expert_steps=20, gate_steps=8,
                     targets=1, seeds=(0,), lrs=(1e-2,), pool_sizes=(5,), scaling_targets=1,
                     controls=20)

RULES = {
    "verdict": f"For a comparison A vs B: the mean paired difference (A - B, accuracy points) "
               f"and its 95% bootstrap interval (cluster bootstrap since issue #28: targets "
               f"resampled as clusters, seeds nested; at first over (target, seed) units as if "
               f"independent). Supported: mean >= "
               f"{MIN_EFFECT:g} and the interval above 0. Contradicted: mean <= -{MIN_EFFECT:g} "
               f"and the interval below 0. No effect of {MIN_EFFECT:g} point or more: the "
               f"interval inside (-{MIN_EFFECT:g}, {MIN_EFFECT:g}). Otherwise inconclusive. Fewer "
               f"than {5} units: no verdict (too few units). A "
               f"supported verdict is re-run with twice the gate-training steps and reported as "
               f"holding or not at 2x budget.",
}
RULES["contrastive"] = (
    "Contrastive with real semantics: a (target, seed) unit is contrastive if, over the pairs of "
    "experts of its trained RadarGate, the Pearson r between task overlap and the change in "
    "angular separation is negative with permutation-control p < 0.05. More than half of the "
    "units contrastive: supported; at least a quarter: partly supported; fewer: not supported.")
CONTRASTIVE_CLAIM = ("The learned rotations are contrastive: experts of overlapping tasks are "
                     "turned closer, others apart")
COMPARISONS = [  # (claim, A, B): fixed with the rules
    ("RadarGate beats softmax gating on a held-out task", "radargate", "softmax"),
    ("RadarGate beats a parameter-matched MLP gate", "radargate", "mlp"),
    ("RadarGate beats top-2 gating", "radargate", "top2"),
    ("RadarGate beats the uniform average of experts", "radargate", "uniform"),
    ("The relation-driven angles add to static angles", "radargate", "radargate_static"),
    ("Static angles add to relation-driven angles", "radargate", "radargate_nostatic"),
    ("Composing the experts beats a linear probe (softmax vs head only)", "softmax", "head_only"),
]


# ---- the model on top of the cached features ----------------------------------------------------

def pooled_logits(feats, idx, delta_fn, head):
    """LayerNorm(z0 + delta(u)) -> masked mean over tokens -> head, for the articles ``idx``."""
    u, z0, mask = feats.u[idx], feats.z0[idx], feats.mask[idx]
    n, L, _ = u.shape
    z = z0
    if delta_fn is not None:
        z = z0 + delta_fn(u.reshape(n * L, -1)).view(n, L, -1)
    h = feats.norm(z)
    m = mask.unsqueeze(-1).to(h.dtype)
    return head((h * m).sum(1) / m.sum(1))


class Expert(nn.Module):
    """One LoRA on the adapted layer: delta = (alpha / r) u A B."""

    def __init__(self, fin, fout, gen):
        super().__init__()
        bound = 1 / math.sqrt(fin)
        self.A = nn.Parameter((torch.rand(fin, RANK, generator=gen) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(RANK, fout))

    def forward(self, u2):
        return (u2 @ self.A @ self.B) * (ALPHA / RANK)


class Gate(nn.Module):
    """A gate over frozen experts A [E, in, r], B [E, r, out]: u2 [T, in] -> delta [T, out]."""

    def __init__(self, kind, A, B, gen):
        super().__init__()
        E, fin, _ = A.shape
        fout = B.shape[2]
        self.kind = kind
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.router = None
        if kind in ("softmax", "top2", "signed", "radargate", "radargate_static",
                    "radargate_nostatic"):
            self.router = nn.Linear(fin, E, bias=False)
            nn.init.zeros_(self.router.weight)  # uniform weights at the start
        elif kind == "mlp":
            h = matched_mlp_hidden(E, fin, fout)
            self.router = nn.Sequential(nn.Linear(fin, h), nn.GELU(), nn.Linear(h, E))
            nn.init.zeros_(self.router[2].weight)
            nn.init.zeros_(self.router[2].bias)
        self.rot_down = self.rot_up = self.angle_bias = None
        if kind.startswith("radargate"):
            self.rot_down = nn.Parameter(torch.randn(fout, GATE_RANK, generator=gen)
                                         / math.sqrt(fout))
            self.rot_up = nn.Parameter(torch.zeros(GATE_RANK, fout // 2))
            if kind != "radargate_nostatic":
                self.angle_bias = nn.Parameter(torch.zeros(E, fout // 2))
            if kind == "radargate_static":  # the relation part stays 0: d U with U = 0
                self.rot_down.requires_grad_(False)
                self.rot_up.requires_grad_(False)

    def forward(self, u2):
        E = self.A.shape[0]
        ids = None
        if self.kind == "uniform":
            w = u2.new_full((u2.shape[0], E), 1.0 / E)
        elif self.kind == "signed":  # 1/E + linear(u): any signed weights, no rotation
            w = 1.0 / E + self.router(u2)
        else:
            w = torch.softmax(self.router(u2), -1)
            if self.kind == "top2":
                w, ids = w.topk(2, dim=-1)
                w = w / w.sum(-1, keepdim=True)
        return radar_gate_lora(u2, self.A, self.B, w, self.rot_down, self.rot_up,
                               self.angle_bias, ids, scaling=ALPHA / RANK)


def radargate_params(E, fin, fout):
    return fin * E + fout * GATE_RANK + GATE_RANK * fout // 2 + E * fout // 2


def matched_mlp_hidden(E, fin, fout):
    """Smallest MLP router width whose parameters reach RadarGate's (router + RotationGate)."""
    return math.ceil((radargate_params(E, fin, fout) - E) / (fin + 1 + E))


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


# ---- experts ------------------------------------------------------------------------------------

def _balanced(idx, labels, per_class, gen):
    """per_class random articles of each class among ``idx``."""
    out = []
    for c in (0, 1):
        pool = idx[labels[idx] == c]
        out.append(pool[torch.randperm(len(pool), generator=gen)[:per_class]])
    return torch.cat(out)


def accuracy(feats, idx, labels, delta_fn, head):
    with torch.no_grad():
        pred = pooled_logits(feats, idx, delta_fn, head).argmax(-1)
    return 100.0 * (pred == labels[idx]).float().mean().item()


def train_expert(feats, split, task, seed, steps):
    """-> (A [in, r], B [r, out], test accuracy %)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    inside, y = task.select(feats.labels)
    tr = split["train"][inside[split["train"]]]
    te = split["test"][inside[split["test"]]]
    fin, fout = feats.base.in_features, feats.base.out_features
    torch.manual_seed(seed)
    exp, head = Expert(fin, fout, gen), nn.Linear(fout, 2)
    opt = torch.optim.Adam(list(exp.parameters()) + list(head.parameters()), lr=3e-3)
    for _ in range(steps):
        b = tr[torch.randint(len(tr), (32,), generator=gen)]
        loss = F.cross_entropy(pooled_logits(feats, b, exp, head), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return exp.A.detach().clone(), exp.B.detach().clone(), accuracy(feats, te, y, exp, head)


# ---- gate runs ----------------------------------------------------------------------------------

def fit_gate(feats, split, task, pool, kind, seed, lr, steps, k_shot=K_SHOT, batch=None,
             log_every=0):
    """Train one gate + head on the target's few-shot set (``k_shot`` articles per class; steps
    of ``batch`` random shots, None: all) -> (gate or None, head, losses, (labels, validation
    ids, test ids)). losses: the last step's batch loss, or with ``log_every`` the loss on all
    shots every that many steps."""
    gen = torch.Generator().manual_seed(seed)
    inside, y = task.select(feats.labels)
    shots = _balanced(split["train"][inside[split["train"]]], y, k_shot, gen)
    val = _balanced(split["val"][inside[split["val"]]], y, VAL_PER_CLASS, gen)
    test = split["test"][inside[split["test"]]]
    torch.manual_seed(seed)
    head = nn.Linear(feats.base.out_features, 2)
    gate = None
    if kind != "head_only":
        A = torch.stack([pool_A for pool_A, _ in pool])
        B = torch.stack([pool_B for _, pool_B in pool])
        gate = Gate(kind, A, B, gen)
    params = trainable(head) + (trainable(gate) if gate is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        b = shots
        if batch is not None and batch < len(shots):
            b = shots[torch.randperm(len(shots), generator=gen)[:batch]]
        loss = F.cross_entropy(pooled_logits(feats, b, gate, head), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            losses.append(evaluate(feats, shots, y, gate, head)[1])
    return gate, head, losses or [loss.item()], (y, val, test)


def evaluate(feats, idx, labels, delta_fn, head):
    """-> (accuracy %, mean cross-entropy) on the articles ``idx``."""
    with torch.no_grad():
        logits = pooled_logits(feats, idx, delta_fn, head)
        acc = 100.0 * (logits.argmax(-1) == labels[idx]).float().mean().item()
        return acc, F.cross_entropy(logits, labels[idx]).item()


def run_gate(feats, split, task, pool, kind, seed, lr, steps, k_shot=K_SHOT, batch=None,
             log_every=0):
    """One gate run -> dict(val=, test= accuracy %, val_loss=, test_loss=, gate_params=,
    final_loss=, and with ``log_every`` loss_curve: the loss on all shots every that many
    steps)."""
    gate, head, losses, (y, val, test) = fit_gate(feats, split, task, pool, kind, seed, lr,
                                                  steps, k_shot, batch, log_every)
    n_gate = sum(p.numel() for p in trainable(gate)) if gate is not None else 0
    (va, vl), (ta, tl) = (evaluate(feats, i, y, gate, head) for i in (val, test))
    out = dict(val=va, test=ta, val_loss=vl, test_loss=tl, gate_params=n_gate,
               final_loss=losses[-1])
    if log_every:
        out["loss_curve"] = losses
    return out


def contrast(feats, split, target, pool_tasks, pool, seed, lr, steps, controls):
    """(e) contrastive analysis of one trained RadarGate: over the expert pairs, the Pearson r
    between task overlap and the change in angular separation the rotation makes (mean over
    CONTRAST_TOKENS test tokens), and the permutation control of experiment (d): the same angles
    handed to the wrong experts (``controls`` draws); p = fraction of draws with r at most the
    learned one."""
    from .contrastive import pair_statistics, pearson
    from radargate_kernels.reference import relation_map, rotation_angles
    gate, _, _, (_, _, test) = fit_gate(feats, split, target, pool, "radargate", seed, lr,
                                        steps)
    u = feats.u[test][feats.mask[test]][:CONTRAST_TOKENS].double()
    with torch.no_grad():
        V = torch.einsum("ti,eir,ero->teo", u, gate.A.double(), gate.B.double()) * (ALPHA / RANK)
        _, _, rho = relation_map(V, 1.0, 1e-6)
        alpha = rotation_angles(V, rho, gate.rot_down.double(), gate.rot_up.double(),
                                gate.angle_bias.double())
        cos_sim, delta = pair_statistics(V, alpha, 1e-6)
        E = V.shape[1]
        iu = torch.triu_indices(E, E, 1)
        overlap = torch.tensor([data.task_overlap(pool_tasks[i], pool_tasks[j])
                                for i, j in zip(iu[0].tolist(), iu[1].tolist())],
                               dtype=torch.float64)
        r = pearson(overlap, delta)
        gen = torch.Generator().manual_seed(70_000 + seed)
        ctrl = torch.tensor([pearson(overlap, pair_statistics(
            V, alpha[:, torch.randperm(E, generator=gen)], 1e-6)[1]) for _ in range(controls)],
            dtype=torch.float64)
    return dict(pearson=r, p_value=float((ctrl <= r).double().mean()),
                control_mean=float(ctrl.mean()), pearson_cosine=pearson(cos_sim, delta),
                mean_abs_change=float(delta.abs().mean()), pairs=int(delta.numel()),
                tokens=int(V.shape[0]))


class RunCache:
    """Results per run in a JSON-lines file: an interrupted suite resumes where it stopped."""

    def __init__(self, path):
        self.path, self.done = path, {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        r = json.loads(line)
                        self.done[r["key"]] = r

    def get(self, key, fn):
        if key not in self.done:
            r = dict(fn(), key=key)
            with open(self.path, "a") as f:
                f.write(json.dumps(r) + "\n")
            self.done[key] = r
        return self.done[key]


def select_lr(cache, key_base, lrs, fn, by="val"):
    """Runs every lr, keeps the best on validation: by="val" the highest accuracy (first on
    ties), by="val_loss" the lowest loss."""
    runs = [dict(cache.get(f"{key_base}|lr={lr}", lambda lr=lr: fn(lr)), lr=lr) for lr in lrs]
    if by == "val_loss":
        return min(runs, key=lambda r: r["val_loss"])
    best = max(runs, key=lambda r: r[by])
    return dict(best, tied=sum(r[by] == best[by] for r in runs) > 1)


# ---- statistics and verdicts --------------------------------------------------------------------

MIN_UNITS = 5


def verdict(mean, lo, hi, min_effect=MIN_EFFECT, units=MIN_UNITS):
    if units < MIN_UNITS:
        return "too few units"
    if mean >= min_effect and lo > 0:
        return "supported"
    if mean <= -min_effect and hi < 0:
        return "contradicted"
    if lo > -min_effect and hi < min_effect:
        return f"no effect of {min_effect:g} point or more"
    return "inconclusive"


def compare(results, a, b):
    """results[(target, seed)][gate] = test accuracy -> (mean, lo, hi, n units): the interval
    from the cluster bootstrap, targets as clusters with their seeds nested."""
    by = {}
    for (target, _), r in sorted(results.items()):
        if a in r and b in r:
            by.setdefault(target, []).append(r[a] - r[b])
    n = sum(len(v) for v in by.values())
    return (*cluster_bootstrap(by), n) if n else (float("nan"),) * 3 + (0,)


# ---- the whole experiment -----------------------------------------------------------------------

def setup(settings: RealSettings, cache_dir: str, label="e_realdata"):
    """Features, split, tasks and the trained experts (each cached under ``cache_dir``) ->
    (feats, split, tasks, {(task name, seed): (A, B)}, expert rows). Quick settings keep the
    first ``settings.targets`` topic-vs-topic tasks plus the first others, up to
    ``settings.expert_tasks``."""
    bar = {}

    def features_progress(done, total):
        bar.setdefault("p", Progress(total, f"{label} features")).update(done)
    feats = data.features(cache_dir, settings.per_topic, progress=features_progress)
    split = data.split_ids(feats.labels)
    tasks = data.make_tasks(feats.topics)
    if settings.expert_tasks is not None:  # quick: the targets plus a few others
        first = tasks[5:5 + settings.targets]
        tasks = first + [t for t in tasks if t not in first][:settings.expert_tasks - len(first)]
    tag = "quick" if settings.quick else "full"
    experts, rows = {}, []
    prog = Progress(len(tasks) * len(EXPERT_SEEDS), f"{label} experts")
    for i, task in enumerate(tasks):
        for s in EXPERT_SEEDS:
            path = os.path.join(cache_dir,
                                f"expert_{tag}_{task.name}_{s}_{settings.expert_steps}.pt")
            if os.path.exists(path):
                A, B, acc = torch.load(path)
            else:
                A, B, acc = train_expert(feats, split, task, s, settings.expert_steps)
                torch.save((A, B, acc), path)
            experts[(task.name, s)] = (A, B)
            rows.append(dict(experiment="realdata_expert", task=task.name, seed=s, test_acc=acc))
            prog.update(i * len(EXPERT_SEEDS) + s + 1, task.name)
    return feats, split, tasks, experts, rows


def run(settings: RealSettings, out_dir: str, cache_dir: str):
    """-> (rows, markdown section, {claim: verdict})."""
    os.makedirs(out_dir, exist_ok=True)
    feats, split, tasks, experts, rows = setup(settings, cache_dir)
    by_pair = {(t.pos[0], t.neg[0]): t for t in tasks if len(t.pos) == 1 and len(t.neg) == 1}
    targets = [by_pair[p] for p in TARGET_PAIRS if p in by_pair][:settings.targets]
    cache = RunCache(os.path.join(out_dir, "realdata_runs.jsonl"))
    tag = "quick" if settings.quick else "full"

    def pool_for(target):
        return [(k, v) for k, v in experts.items() if k[0] != target.name]

    # generalization: every gate on every (target, seed)
    results, chosen_lr = {}, {}
    units = [(t, s) for t in targets for s in settings.seeds]
    prog = Progress(len(units) * len(GATES), "e_realdata gates")
    n = 0
    for target, seed in units:
        pool = [v for _, v in pool_for(target)]
        results[(target.name, seed)] = {}
        for kind in GATES:
            key = f"{tag}|gen|{target.name}|{seed}|{kind}|{settings.gate_steps}|{len(pool)}"
            best = select_lr(cache, key, settings.lrs, lambda lr: run_gate(
                feats, split, target, pool, kind, seed, lr, settings.gate_steps))
            results[(target.name, seed)][kind] = best["test"]
            if kind == "radargate":
                chosen_lr[(target.name, seed)] = best["lr"]
            rows.append(dict(experiment="realdata_gate", target=target.name, seed=seed, gate=kind,
                             pool=len(pool), lr=best["lr"], lr_tied=best["tied"],
                             val_acc=best["val"], test_acc=best["test"],
                             gate_params=best["gate_params"], steps=settings.gate_steps))
            n += 1
            prog.update(n, f"{target.name} {kind}")

    found = {}
    for claim, a, b in COMPARISONS:
        m, lo, hi, nu = compare(results, a, b)
        v = verdict(m, lo, hi, units=nu)
        check = None
        if v == "supported":  # the 2x-budget check
            res2 = {}
            for target, seed in units:
                pool = [v_ for _, v_ in pool_for(target)]
                res2[(target.name, seed)] = {}
                for kind in (a, b):
                    key = (f"{tag}|gen|{target.name}|{seed}|{kind}|{2 * settings.gate_steps}|"
                           f"{len(pool)}")
                    res2[(target.name, seed)][kind] = select_lr(
                        cache, key, settings.lrs, lambda lr, kind=kind: run_gate(
                            feats, split, target, pool, kind, seed, lr,
                            2 * settings.gate_steps))["test"]
            m2, lo2, hi2, nu2 = compare(res2, a, b)
            check = (m2, lo2, hi2, verdict(m2, lo2, hi2, units=nu2))
        found[claim] = (v, (m, lo, hi, nu), check)

    # contrastive analysis of each unit's RadarGate (trained again at its chosen lr)
    contrast_rows = []
    prog = Progress(len(units), "e_realdata contrastive")
    for n, (target, seed) in enumerate(units, 1):
        keys_pool = pool_for(target)
        by_name = {t.name: t for t in tasks}
        key = f"{tag}|contrast|{target.name}|{seed}|{settings.gate_steps}|{settings.controls}"
        r = cache.get(key, lambda: contrast(
            feats, split, target, [by_name[k[0]] for k, _ in keys_pool],
            [v for _, v in keys_pool], seed, chosen_lr[(target.name, seed)],
            settings.gate_steps, settings.controls))
        contrast_rows.append(dict(experiment="realdata_contrastive", target=target.name,
                                  seed=seed, **{k: v for k, v in r.items() if k != "key"}))
        prog.update(n, target.name)
    rows += contrast_rows
    n_con = sum(1 for r in contrast_rows if r["pearson"] < 0 and r["p_value"] < 0.05)
    frac = n_con / max(1, len(contrast_rows))
    found_contrast = ("supported" if frac > 0.5 else "partly supported" if frac >= 0.25
                      else "not supported", n_con, len(contrast_rows))

    # scaling: softmax vs RadarGate over pool sizes
    scal = {}
    s_units = [(t, s) for t in targets[:settings.scaling_targets] for s in settings.seeds]
    prog = Progress(len(s_units) * len(settings.pool_sizes) * 2, "e_realdata scaling")
    n = 0
    for target, seed in s_units:
        full_pool = [v for _, v in pool_for(target)]
        rng = random.Random(seed)
        for P in settings.pool_sizes:
            pool = [full_pool[i] for i in sorted(rng.sample(range(len(full_pool)),
                                                            min(P, len(full_pool))))]
            for kind in ("softmax", "radargate"):
                key = f"{tag}|scale|{target.name}|{seed}|{kind}|{settings.gate_steps}|{P}"
                best = select_lr(cache, key, settings.lrs, lambda lr: run_gate(
                    feats, split, target, pool, kind, seed, lr, settings.gate_steps))
                scal.setdefault((target.name, seed, P), {})[kind] = best["test"]
                rows.append(dict(experiment="realdata_scaling", target=target.name, seed=seed,
                                 gate=kind, pool=P, lr=best["lr"], val_acc=best["val"],
                                 test_acc=best["test"], steps=settings.gate_steps))
                n += 1
                prog.update(n, f"{target.name} P={P} {kind}")
    from .realdata_report import section
    md = section(settings, rows, found, scal, tasks, targets, found_contrast)
    found[CONTRASTIVE_CLAIM] = (found_contrast[0], (frac, found_contrast[1], found_contrast[2],
                                                    len(contrast_rows)), None)
    return rows, md, found


def main(argv=None):
    import argparse
    import time
    from .common import cpu_pytorch_path
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (not evidence)")
    ap.add_argument("--out", default=None, help="output directory (default experiments/results)")
    ap.add_argument("--cache", default=None, help="feature and expert cache (default OUT/cache)")
    args = ap.parse_args(argv)
    cpu_pytorch_path()
    torch.use_deterministic_algorithms(True)
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or (os.path.join(here, "..", "results", "experiments-quick") if args.quick
                       else os.path.join(here, "results"))
    t0 = time.time()
    rows, md, found = run(QUICK if args.quick else FULL, out,
                          args.cache or os.path.join(out, "cache"))
    from .realdata_report import write
    write(rows, md, out)
    print(f"wrote {os.path.relpath(os.path.join(out, 'REALDATA.md'))} ({time.time() - t0:.0f} s)")
    for claim, (v, _, _) in found.items():
        print(f"  {claim}: {v}")
    return found


if __name__ == "__main__":
    main()
