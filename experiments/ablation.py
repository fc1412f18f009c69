"""(c) Ablation: which of the two gates matters.

Variants: stretch only (rotation disabled), rotation only (uniform weights 1/K), both, and
neither (uniform average, a floor), on both problems:

- the multi-task problem of (b) at E = 10 (5 with --quick): "both" and "stretch only"
  are the ``radargate`` and ``softmax`` runs of the scaling sweep (same seeds, same runs);
  "rotation only" (``stretch=False``) and "neither" (``stretch=False, rotation=False``) are new;
- the cone problem of (a) at rotation strength 1: "both" = ``radargate``, "stretch only" =
  ``weighted_sum``; "rotation only" = uniform weights + RadarGate (new); "neither" = the uniform
  average of the experts (no parameters: evaluated, not trained).

Controls (c'), on the multi-task problem: ``stretch_only_matched``, softmax gating with the LoRA
rank raised (alpha / rank kept at 4) until the model has at least RadarGate's trainable
parameters; and every variant of (c') again with twice the steps.
"""
from __future__ import annotations

import torch

from . import cone, scaling
from .common import count_params, relative_mse

VARIANTS = ("stretch_only", "rotation_only", "both", "neither")
CONE_STRENGTH = 1.0


def run(settings, scaling_rows, cone_rows, problems):
    rows = []
    E = settings.ablation_experts
    same = {"both": "radargate", "stretch_only": "softmax"}
    for seed in settings.seeds:
        for variant, gate in same.items():
            src = next(r for r in scaling_rows
                       if r["gate"] == gate and r["experts"] == E and r["seed"] == seed)
            rows.append(dict(src, experiment="ablation_multitask", variant=variant))
        for variant, options in (("rotation_only", scaling.ABLATION["rotation_only"]),
                                 ("neither", scaling.ABLATION["neither"])):
            row, _ = scaling.fit(problems[seed], variant, E, seed, settings.scaling_steps,
                                 options=options)
            rows.append(dict(row, experiment="ablation_multitask", variant=variant))

    same = {"both": "radargate", "stretch_only": "weighted_sum"}
    for seed in settings.seeds:
        for variant, gate in same.items():
            src = next(r for r in cone_rows if r["gate"] == gate
                       and r["strength"] == CONE_STRENGTH and r["seed"] == seed)
            rows.append(dict(src, experiment="ablation_cone", variant=variant))
        row = cone.fit("rotation_only", CONE_STRENGTH, seed, settings.cone_steps)
        rows.append(dict(row, experiment="ablation_cone", variant="rotation_only"))
        prob = cone.Problem(CONE_STRENGTH, seed)
        x, V, y = prob.sample(cone.EVAL_TOKENS, torch.Generator().manual_seed(20_000 + seed))
        rows.append(dict(experiment="ablation_cone", variant="neither", gate="uniform_average",
                         strength=CONE_STRENGTH, seed=seed, steps=0, params=0,
                         final_loss=float(relative_mse(V.mean(1), y))))
    return rows


def matched_rank(problem, E, seed):
    """Smallest LoRA rank at which the softmax model has at least RadarGate's parameters."""
    target = count_params(problem.model(E, seed, **scaling.GATES["radargate"]))
    return next(r for r in range(4, 64)
                if count_params(problem.model(E, seed, rank=r, rotation=False)) >= target)


def run_controls(settings, scaling_rows, problems):
    """(c') 'both', 'stretch_only' and the parameter-matched 'stretch_only_matched' on the
    multi-task problem at E = ablation_experts, at 1x and 2x the steps."""
    rows = []
    E = settings.ablation_experts
    for seed in settings.seeds:
        prob = problems[seed]
        rank = matched_rank(prob, E, seed)
        for budget in (1, 2):
            steps = budget * settings.scaling_steps
            for variant, options in (("both", scaling.GATES["radargate"]),
                                     ("stretch_only", scaling.GATES["softmax"]),
                                     ("stretch_only_matched", dict(rotation=False, rank=rank))):
                src = [r for r in scaling_rows if budget == 1 and r["experts"] == E
                       and r["seed"] == seed and r["gate"] == dict(
                           both="radargate", stretch_only="softmax").get(variant)]
                row = src[0] if src else scaling.fit(prob, variant, E, seed, steps,
                                                     options=options)[0]
                rows.append(dict(row, experiment="ablation_controls", variant=variant,
                                 budget=budget, lora_rank=options.get("rank", 4)))
    return rows
