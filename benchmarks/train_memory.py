"""Peak memory and time of a few training steps of a small transformers model (CPU), per adapter:

    python benchmarks/train_memory.py [--steps 3] [--batch 4 --seq 512] [--json out.json]

Variants: plain PEFT LoRA (rank 8) and RadarGate-LoRA layers (rank 8 experts, gate rank 8) with the
materialized path (fused=False) and the fused one (fused=True), at E = 8 dense, E = 8 top-2 and
E = 40 dense, on q_proj and v_proj of every layer of a Llama model built from a local config
(hidden 512, 4 layers, random weights, nothing downloaded). Each variant runs in its own process;
the figure is the peak resident set size during the training steps minus the resident set size
just before the first step (model, optimizer state excluded: AdamW's state is created before), as
reported by the OS (``resource.getrusage``, max RSS), so it is what the steps themselves add:
activations saved for backward, gradients and temporaries. RADARGATE_CPU_PATH=eager in every
process: the materialized layers' op then runs the eager chunked CPU path instead of compiling
the reference with inductor on the first step (whose compiler memory would count as a peak).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ["peft_lora", "mat_E8", "fused_E8", "mat_E8_top2", "fused_E8_top2", "mat_E40",
            "fused_E40"]


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(name, steps, batch, seq):
    import torch
    import transformers
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from radargate_kernels.nn import inject_radargate
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376,
                                   num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=8, max_position_embeddings=seq)
    model = transformers.LlamaForCausalLM(cfg)
    if name == "peft_lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                           target_modules=["q_proj", "v_proj"]))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        E = 40 if "E40" in name else 8
        top_k = 2 if "top2" in name else None
        inject_radargate(model, r".*\.(q_proj|v_proj)", num_experts=E, rank=8, top_k=top_k,
                         gate_rank=8, fused=name.startswith("fused"))
        for m in model.modules():  # non-zero experts and rotation, as after some training
            if hasattr(m, "lora_B"):
                with torch.no_grad():
                    m.lora_B.normal_(std=0.01)
                    m.gate.rot_up.normal_(std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:  # create AdamW's state before measuring
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 1000, (steps, batch, seq), generator=gen)
    base = _rss_mib()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=data[i], labels=data[i])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return dict(variant=name, peak_over_base_mib=_rss_mib() - base, base_mib=base,
                step_s=sorted(times)[len(times) // 2], trainable=sum(p.numel() for p in params),
                loss=float(out.loss))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_variant(a.one, a.steps, a.batch, a.seq)))
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RADARGATE_CPU_PATH"] = "eager"
    rows = []
    print(f"| adapter | peak over start of steps (MiB) | median step (s) | trainable params |")
    print("| --- | --- | --- | --- |")
    for v in a.variants:
        res = subprocess.run([sys.executable, __file__, "--one", v, "--steps", str(a.steps),
                              "--batch", str(a.batch), "--seq", str(a.seq)], env=env,
                             capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"| {v} | {row['peak_over_base_mib']:.0f} | {row['step_s']:.2f} | "
              f"{row['trainable']:,} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
