"""Drop-in use with real libraries: a transformers model built from a tiny local config (no
downloads) and adapters made with the real peft package."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency "
                                   "(requirements-dev.txt); this file needs it")
peft = pytest.importorskip("peft", reason="peft is a test dependency (requirements-dev.txt)")

from radargate_kernels.nn import (RadarGateLoRALinear, from_peft_adapters,  # noqa: E402
                                  inject_radargate, load_radargate_state_dict,
                                  radargate_state_dict)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_transformers_model_injected_trains_and_round_trips():
    model = tiny_llama().requires_grad_(False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    names = inject_radargate(model, r".*\.(q_proj|v_proj)", num_experts=3, rank=4, top_k=2)
    assert names == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # non-target modules untouched, base weights of targets frozen
    for n, p in model.named_parameters():
        key = n.replace(".base.", ".")
        if key in before:
            assert torch.equal(p, before[key]), n
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    fresh = tiny_llama()
    torch.manual_seed(99)
    inject_radargate(fresh, r".*\.(q_proj|v_proj)", num_experts=3, rank=4, top_k=2)
    load_radargate_state_dict(fresh, radargate_state_dict(model))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, out)


def _make_adapter(tmp_path, seed, name, **extra):
    base = tiny_llama()
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=2 + seed % 3, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False, **extra)
    pm = peft.get_peft_model(base, cfg)
    path = tmp_path / name
    pm.save_pretrained(str(path))
    return pm.eval(), str(path)


# seed 1: per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern), seed 2: rsLoRA
PATTERNS = [{}, dict(rank_pattern={"q_proj": 5}, alpha_pattern={"layers.1.self_attn.v_proj": 3}),
            dict(use_rslora=True)]


def test_peft_adapters_as_frozen_experts_reproduce_each_adapter(tmp_path):
    adapters = [_make_adapter(tmp_path, s, f"a{s}", **PATTERNS[s]) for s in range(3)]
    model = tiny_llama()  # trainable, as loaded: from_peft_adapters freezes it (get_peft_model)
    wrapped = from_peft_adapters(model, [p for _, p in adapters], tau=0.5)
    assert len(wrapped.radargate_config.target_modules) == 4 and wrapped.base_model is model
    layers = [m for m in model.modules() if isinstance(m, RadarGateLoRALinear)]
    assert len(layers) == 4
    assert all(not l.lora_A.requires_grad and l.router.weight.requires_grad for l in layers)
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} <= {
        "weight", "rot_down", "rot_up", "angle_bias"}  # router weight and the gate only
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if "router" not in n and ".gate." not in n)
    for key, value in dict(rank=4, r=4, alpha=8.0, lora_alpha=8.0, num_experts=2,
                           freeze_experts=False).items():  # what the adapters fix, both names
        with pytest.raises(ValueError, match=f"{key}: set by the adapters"):
            from_peft_adapters(tiny_llama(), [p for _, p in adapters], **{key: value})
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    for e, (pm, _) in enumerate(adapters):
        for l in layers:  # one-hot stretch gate on adapter e; the rotation starts at zero
            l.route = (lambda x2, e=e, E=len(adapters):
                       (torch.nn.functional.one_hot(torch.full((x2.shape[0],), e), E).float(),
                        None, torch.full((x2.shape[0], E), 1.0 / E)))
        with torch.no_grad():
            ours = model(input_ids=ids).logits
            theirs = pm(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _edit_config(path, **changes):
    import json
    import os
    f = os.path.join(path, "adapter_config.json")
    cfg = json.load(open(f))
    cfg.update(changes)
    json.dump(cfg, open(f, "w"))


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True), "DoRA"), (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"), (dict(peft_type="IA3"), "IA3"),
    (dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens"),
    (dict(use_qalora=True), "QA-LoRA"), (dict(arrow_config={"top_k": 2}), "Arrow"),
])
def test_peft_adapter_features_we_cannot_honour_raise(tmp_path, change, message):
    _, path = _make_adapter(tmp_path, 0, "a")
    _edit_config(path, **change)
    with pytest.raises(ValueError, match=message):
        from_peft_adapters(tiny_llama(), [path])


def test_peft_adapter_for_another_model_raises(tmp_path):
    _, path = _make_adapter(tmp_path, 0, "a")
    other = tiny_llama()
    other.model.layers = other.model.layers[:1]  # the adapter also adapts layer 1
    with pytest.raises(ValueError, match="which the model does not have"):
        from_peft_adapters(other, [path])


def test_peft_lora_weights_of_a_multi_adapter_layer_reproduce_each_adapter():
    """A PEFT lora.Linear with three adapters of different ranks (one rsLoRA) -> A [E, in, r],
    B [E, r, out] with the scalings folded in: x A_e B_e is adapter e's delta as PEFT computes it,
    and radar_gate_lora at zero angles gives their weighted sum."""
    from radargate_kernels import peft_lora_weights, radar_gate_lora
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10))
    cfgs = [dict(r=2, lora_alpha=8), dict(r=5, lora_alpha=3), dict(r=3, lora_alpha=6,
                                                                     use_rslora=True)]
    pm = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0"], init_lora_weights=False,
                                                   **cfgs[0]), adapter_name="a0")
    for i, c in enumerate(cfgs[1:], 1):
        pm.add_adapter(f"a{i}", peft.LoraConfig(target_modules=["0"], init_lora_weights=False,
                                                **c))
    layer = pm.base_model.model[0]
    A, B = peft_lora_weights(layer)
    assert A.shape == (3, 12, 5) and B.shape == (3, 5, 10)
    x = torch.randn(7, 12)
    with torch.no_grad():
        plain = layer.base_layer(x)
        for e in range(3):
            pm.base_model.set_adapter(f"a{e}")
            torch.testing.assert_close(x @ A[e] @ B[e], layer(x) - plain)
        w = torch.softmax(torch.randn(7, 3), -1)
        y = radar_gate_lora(x, A, B, w, backend="torch")
        torch.testing.assert_close(y, torch.einsum("tk,tko->to", w,
                                                   torch.einsum("ti,kir,kro->tko", x, A, B)))
    assert peft_lora_weights(layer, ["a2", "a0"])[0].shape == (2, 12, 3)
    with pytest.raises(ValueError, match="not LoRA adapters"):
        peft_lora_weights(layer, ["nope"])
    with pytest.raises(TypeError, match="expected a PEFT LoRA layer"):
        peft_lora_weights(nn.Linear(2, 2))
    layer.use_dora["a1"] = True  # as PEFT records it per adapter
    with pytest.raises(ValueError, match="'a1' uses DoRA"):
        peft_lora_weights(layer)
    layer.use_dora["a1"] = False
    from peft.tuners.lora.variants import ALoraLinearVariant
    layer.lora_variant["a2"] = ALoraLinearVariant()  # as PEFT records an aLoRA adapter
    with pytest.raises(ValueError, match="'a2' uses the LoRA variant ALoraLinearVariant"):
        peft_lora_weights(layer)


def _xlora_model(adapter_paths, **cfg):
    base = tiny_llama()
    base.config.use_cache = False
    return peft.get_peft_model(base, peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32,
                                                      adapters=adapter_paths, xlora_depth=1,
                                                      **cfg))


@pytest.mark.parametrize("top_k, softmax", [(None, True), (2, True), (2, False)],
                         ids=["dense", "top2", "top2-raw-logits"])
def test_xlora_with_radargate_trains_and_round_trips(tmp_path, top_k, softmax):
    """PEFT's X-LoRA on a tiny Llama with 4 PEFT adapters: use_radargate keeps the step-0 loss
    (the gates start as the weighted sum; with top_k_lora only the kept slots enter), gradients
    reach X-LoRA's router and every gate in 20 training steps, and the gates plus the router
    saved and loaded into a fresh X-LoRA model give the same logits exactly. (Without X-LoRA's
    softmax its scalings are raw logits, possibly negative: the kept slots must still be its.)"""
    from radargate_kernels.integrations.xlora import (load_xlora_gate_state_dict, use_radargate,
                                                      xlora_gate_state_dict)
    paths = {str(i): _make_adapter(tmp_path, i, f"a{i}")[1] for i in range(4)}  # X-LoRA: "0".."3"
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    model = _xlora_model(paths, top_k_lora=top_k, enable_softmax=softmax)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss
    swapped = use_radargate(model, rank=4)
    assert len(swapped) == 4  # q_proj and v_proj of 2 layers
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, before)
    with pytest.raises(ValueError, match="already use RadarGate"):
        use_radargate(model)
    gates = [m.radargate for m in model.modules() if hasattr(m, "radargate")]
    params = [p for p in model.parameters() if p.requires_grad]
    gate_params = {id(p) for g in gates for p in g.parameters()}
    assert gate_params <= {id(p) for p in params}  # registered: the optimizer sees them
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    losses = []
    for step in range(20):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(float(loss))
        loss.backward()
        if step == 0:
            router = [p for n, p in model.named_parameters() if "xlora_classifier" in n]
            assert router and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)
            assert all(g.rot_up.grad is not None and g.rot_up.grad.abs().sum() > 0 for g in gates)
        opt.step()
        assert torch.isfinite(loss)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    sd = dict(xlora_gate_state_dict(model), **{k: v for k, v in model.state_dict().items()
                                                if "xlora_classifier" in k})
    assert any(".radargate.rot_up" in k for k in sd)
    from safetensors.torch import load_file, save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "gates.safetensors"))
    fresh = _xlora_model(paths, top_k_lora=top_k, enable_softmax=softmax)
    use_radargate(fresh, rank=4)
    loaded = load_file(str(tmp_path / "gates.safetensors"))
    with pytest.raises(ValueError, match="missing gate keys"):
        load_xlora_gate_state_dict(fresh, {k: v for k, v in loaded.items() if "layers.1" not in k})
    load_xlora_gate_state_dict(fresh, loaded)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, trained)


def test_expert_major_dispatch_to_slots_matches_mixlora_index_add():
    """MixLoRA-style sparse top-2: experts run on their routed tokens (one expert gets none),
    the rows are put at their slots, and radar_gate at zero angles equals MixLoRA's index_add_
    combination; a wrong row count is named."""
    from radargate_kernels import radar_gate
    from radargate_kernels.integrations.sparse import slots_from_expert_major
    gen = torch.Generator().manual_seed(0)
    T, D, E, K = 9, 6, 4, 2
    x = torch.randn(T, D, generator=gen)
    experts = [nn.Linear(D, D) for _ in range(E)]
    logits = torch.randn(T, E, generator=gen)
    logits[:, 3] = -1e9  # expert 3 gets no token
    weights, selected = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    mask = torch.nn.functional.one_hot(selected, E).permute(2, 1, 0)
    out = torch.zeros(T, D)
    rows = []
    with torch.no_grad():
        for e in range(E):
            idx, top_x = torch.where(mask[e])
            r = experts[e](x[top_x])
            rows.append(r)
            out.index_add_(0, top_x, r * weights[top_x, idx, None])
        V = slots_from_expert_major(rows, selected)
        A, B = torch.randn(D, 2, generator=gen), torch.zeros(2, D // 2)
        y = radar_gate(V, weights, A, B, torch.zeros(E, D // 2), selected, backend="torch")
    torch.testing.assert_close(y, out)
    for t in range(T):
        for k in range(K):
            torch.testing.assert_close(V[t, k], experts[selected[t, k]](x[t]).detach())
    with pytest.raises(ValueError, match="rows_per_expert"):
        slots_from_expert_major(rows[:1] + [rows[1][:1]] + rows[2:], selected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixlora_top_p_empty_slots_are_masked(backend):
    """MixLoRA's top-p variant: K slots, those past the top-p mass left empty with id -1 and
    weight 0. slots_from_expert_major leaves them zero, radar_gate masks them: each token's
    result is RadarGate over its kept slots alone (issue #26)."""
    from radargate_kernels import radar_gate, radar_gate_reference
    from radargate_kernels.integrations.sparse import slots_from_expert_major
    gen = torch.Generator().manual_seed(3)
    T, D, E, K, top_p = 10, 6, 4, 3, 0.6
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    experts = [nn.Linear(D, D, dtype=torch.float64) for _ in range(E)]
    probs, order = torch.sort(torch.softmax(torch.randn(T, E, generator=gen,
                                                        dtype=torch.float64), -1), -1, True)
    probs, order = probs[:, :K], order[:, :K]
    keep = (probs.cumsum(-1) - probs) < top_p  # the slots needed to reach top_p (at least one)
    assert (~keep).any() and keep.sum(1).min() >= 1
    selected = torch.where(keep, order, -1)
    weights = torch.where(keep, probs, 0.0)
    weights = weights / weights.sum(-1, keepdim=True)
    with torch.no_grad():
        rows = [experts[e](x[torch.where(selected.t() == e)[1]]) for e in range(E)]
        V = slots_from_expert_major(rows, selected)
        A = torch.randn(D, 2, generator=gen, dtype=torch.float64)
        B = torch.randn(2, D // 2, generator=gen, dtype=torch.float64)
        beta = torch.randn(E, D // 2, generator=gen, dtype=torch.float64)
        y = radar_gate(V, weights, A, B, beta, selected, backend=backend)
        for t in range(T):
            k = keep[t]
            y_t = radar_gate_reference(V[t:t + 1, k], weights[t:t + 1, k], A, B, beta,
                                       selected[t:t + 1, k])
            torch.testing.assert_close(y[t], y_t[0], rtol=1e-12, atol=1e-12)
    assert (V[~keep] == 0).all()
