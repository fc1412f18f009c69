"""PEFT-style management (radargate_kernels.adapters): config, freezing, save/load round trips,
validated loading, injection edge cases, adapter dtype, constructor validation."""
import copy
import json

import pytest
import torch
from torch import nn

from radargate_kernels.adapters import (RadarGateConfig, RadarGateModel, get_radargate_model,
                                        inject_radargate, load_radargate_state_dict,
                                        radargate_state_dict)
from radargate_kernels.memory import saved_bytes
from radargate_kernels.nn import RadarGate, RadarGateLoRALinear

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency "
                                   "(requirements-dev.txt); this file needs it")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


TOKENS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def _train(model, steps=3, lr=2e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(input_ids=TOKENS, labels=TOKENS)
        (out.loss + 1e-2 * model.aux_loss()).backward()
        opt.step()
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def test_get_radargate_model_freezes_everything_but_adapters_and_modules_to_save():
    base = tiny_llama()
    cfg = RadarGateConfig(target_modules=["q_proj", "v_proj"], num_experts=3, rank=4, top_k=2,
                          modules_to_save=["lm_head"])
    model = get_radargate_model(base, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lm_head." in f".{n}" for n in trainable)
    for n in trainable:
        assert "lm_head" in n or any(k in n for k in ("lora_A", "lora_B", "router", "gate.")), n
    assert not any("embed_tokens" in n or "norm" in n or ".base." in n for n in trainable)
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.get_nb_trainable_parameters() == (n_train, total)


def test_print_trainable_parameters(capsys):
    model = get_radargate_model(tiny_llama(), RadarGateConfig(target_modules=["q_proj"],
                                                              num_experts=2, rank=2))
    model.print_trainable_parameters()
    n_train, total = model.get_nb_trainable_parameters()
    assert capsys.readouterr().out.strip() == (f"trainable params: {n_train:,d} || all params: "
                                               f"{total:,d} || trainable%: "
                                               f"{100 * n_train / total:.4f}")


def test_save_pretrained_from_pretrained_round_trip_is_exact(tmp_path):
    cfg = RadarGateConfig(target_modules=r".*\.(q_proj|v_proj)", num_experts=3, rank=4, top_k=2,
                          modules_to_save=["lm_head"])
    model = _train(get_radargate_model(tiny_llama(), cfg))
    expected = _logits(model)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "radargate_config.json").read_text())["top_k"] == 2
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "radargate_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert any(k.startswith("lm_head.") for k in saved) and not any(".base." in k for k in saved)
    torch.manual_seed(123)  # fresh adapters would differ from the trained ones
    loaded = RadarGateModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.equal(_logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = RadarGateModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_low_level_state_dict_keeps_every_trained_parameter():
    """The data-loss class: whatever requires grad is saved, not only the injected layers."""
    model = tiny_llama()
    model.requires_grad_(True)  # the user trains embeddings, norms, head too
    inject_radargate(model, ["q_proj"], num_experts=2, rank=2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        opt.step()
    model.eval()
    sd = radargate_state_dict(model)
    assert "model.embed_tokens.weight" in sd and "model.norm.weight" in sd
    fresh = tiny_llama()
    inject_radargate(fresh, ["q_proj"], num_experts=2, rank=2)
    assert load_radargate_state_dict(fresh, sd) == ([], [])
    assert torch.equal(_logits(fresh), _logits(model))


def _injected(seed=0):
    """Same base weights for every seed; the adapters depend on the seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))
    torch.manual_seed(seed)
    inject_radargate(model, ["0", "2"], num_experts=3, rank=2, top_k=2)
    with torch.no_grad():  # leave the identity start so the adapters change the output
        for m in model.modules():
            if isinstance(m, RadarGateLoRALinear):
                m.lora_B.normal_()
                m.gate.rot_up.normal_()
    return model


def test_load_validates_everything_before_writing():
    model, other = _injected(0), _injected(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = radargate_state_dict(other)
    bad = dict(sd)
    last = sorted(bad)[-1]
    bad[last] = bad[last][..., :1]  # wrong shape on the last key
    with pytest.raises(ValueError, match=rf"state_dict\[{last!r}\]: expected shape"):
        load_radargate_state_dict(model, bad)
    wrong_dtype = dict(sd, **{last: sd[last].double()})
    with pytest.raises(TypeError, match="expected dtype torch.float32"):
        load_radargate_state_dict(model, wrong_dtype)
    with pytest.raises(ValueError, match="missing keys"):
        load_radargate_state_dict(model, {k: v for k, v in sd.items() if k != last})
    with pytest.raises(ValueError, match="unexpected keys"):
        load_radargate_state_dict(model, dict(sd, nope=torch.zeros(1)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing written by any failed load
    res = load_radargate_state_dict(model, dict({k: v for k, v in sd.items() if k != last},
                                                nope=torch.zeros(1)), strict=False)
    assert res.missing_keys == [last] and res.unexpected_keys == ["nope"]


def test_load_accepts_compiled_model_keys_both_ways():
    src, dst = _injected(0), _injected(1)
    compiled_src = torch.compile(src)
    sd = compiled_src.state_dict()
    assert any(k.startswith("_orig_mod.") for k in sd)
    compiled_dst = torch.compile(dst)
    load_radargate_state_dict(compiled_dst, radargate_state_dict(compiled_src))
    assert not any(k.startswith("_orig_mod.") for k in radargate_state_dict(compiled_src))
    prefixed = {"_orig_mod." + k: v for k, v in radargate_state_dict(src).items()}
    fresh = _injected(2)
    x = torch.randn(4, 6)
    assert not torch.equal(fresh.eval()(x), src.eval()(x))
    load_radargate_state_dict(fresh, prefixed)
    assert torch.equal(fresh.eval()(x), src.eval()(x))


def test_inject_errors_and_shared_linears():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        inject_radargate(model, ["nothing"], num_experts=2, rank=2)
    inject_radargate(model, ["0"], num_experts=2, rank=2)
    with pytest.raises(ValueError, match="already RadarGateLoRALinear"):
        inject_radargate(model, ["0"], num_experts=2, rank=2)
    with pytest.raises(ValueError, match="already RadarGateLoRALinear"):
        inject_radargate(model, r".*", num_experts=2, rank=2)  # would also match 0.base
    with pytest.raises(ValueError, match="already a RadarGateModel"):
        get_radargate_model(get_radargate_model(nn.Sequential(nn.Linear(4, 4)),
                                                RadarGateConfig(["0"], num_experts=2, rank=2)),
                            RadarGateConfig(["0"], num_experts=2, rank=2))

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a  # one Linear under two names

        def forward(self, x):
            return self.b(self.a(x))

    tied = Tied()
    assert inject_radargate(tied, ["a", "b"], num_experts=2, rank=2) == ["a", "b"]
    assert isinstance(tied.a, RadarGateLoRALinear) and tied.a is tied.b


@pytest.mark.parametrize("name, kwargs", [
    ("rank", dict(rank=0)), ("num_experts", dict(num_experts=0)),
    ("gate_rank", dict(gate_rank=0)), ("router_temperature", dict(router_temperature=0.0)),
    ("dropout", dict(dropout=1.0)), ("top_k", dict(top_k=0)), ("tau", dict(tau=-1.0)),
    ("alpha", dict(alpha=float("nan"))), ("adapter_dtype", dict(adapter_dtype=torch.int8)),
    ("recompute", dict(recompute="auto")), ("rotation", dict(rotation="no")),
    ("stretch", dict(stretch="false")), ("fused", dict(fused=1)),
    ("freeze_experts", dict(freeze_experts="yes")),
])
def test_constructor_errors_name_the_argument(name, kwargs):
    args = {"num_experts": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        RadarGateLoRALinear(nn.Linear(4, 4), **args)
    if name in ("rank", "num_experts", "tau"):
        with pytest.raises(ValueError, match=name):
            RadarGate(4, **{"num_experts": 2, "rank": 2, name: kwargs[name]})
    cfg_name = "target_modules"
    if name == "adapter_dtype":
        args["adapter_dtype"] = "int8"  # the config names dtypes by string (JSON)
    with pytest.raises((ValueError, TypeError), match=name):
        RadarGateConfig(target_modules=["x"], **args)
    with pytest.raises(ValueError, match=cfg_name):
        RadarGateConfig(target_modules=[])


def test_config_json_round_trip_and_version(tmp_path):
    cfg = RadarGateConfig(target_modules=["q"], num_experts=4, top_k=2, modules_to_save=["h"],
                          recompute=True)
    cfg.save(str(tmp_path))
    assert RadarGateConfig.load(str(tmp_path)) == cfg
    d = cfg.to_dict()
    # a config written before the recompute field existed still loads (default: auto)
    old = {k: v for k, v in d.items() if k != "recompute"}
    assert RadarGateConfig.from_dict(old).recompute is None
    with pytest.raises(ValueError, match="format_version"):
        RadarGateConfig.from_dict(dict(d, format_version=99))
    with pytest.raises(ValueError, match="unknown fields"):
        RadarGateConfig.from_dict(dict(d, surprise=1))


def test_adapters_are_fp32_on_a_bf16_base_and_compute_in_the_input_dtype():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = RadarGateLoRALinear(base, num_experts=3, rank=2, top_k=2)
    added = [p for n, p in layer.named_parameters() if not n.startswith("base.")]
    assert added and all(p.dtype == torch.float32 for p in added)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.router.weight.grad.dtype == torch.float32


def test_quantized_base_weight_does_not_break_construction():
    base = nn.Linear(8, 8)
    base.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    layer = RadarGateLoRALinear(base, num_experts=2, rank=2)
    assert layer.lora_A.dtype == torch.float32


@pytest.mark.parametrize("fused", [True, False])
def test_top_k_compiles_fullgraph_and_matches_eager(fused):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = RadarGateLoRALinear(nn.Linear(8, 8), num_experts=4, rank=2, top_k=2, fused=fused)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.rot_up.normal_()
    x = torch.randn(6, 8)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_materialized_top2_saves_no_more_than_dense():
    def run(top_k):
        torch.manual_seed(0)
        layer = RadarGateLoRALinear(nn.Linear(64, 64), num_experts=8, rank=4, top_k=top_k,
                                    fused=False)
        x = torch.randn(128, 64)
        return saved_bytes(lambda: layer(x), list(layer.parameters()))["activations"]
    assert run(2) <= run(None)


def test_deepcopy_after_a_training_forward_and_backward():
    layer = RadarGateLoRALinear(nn.Linear(8, 8), num_experts=3, rank=2, top_k=2)
    y = layer(torch.randn(4, 8))
    clone = copy.deepcopy(layer)  # aux_loss (with its graph) is not copied
    assert clone.aux_loss is None
    (y.sum() + layer.aux_loss).backward()
    clone2 = copy.deepcopy(layer)
    x = torch.randn(3, 8)
    assert torch.equal(clone2(x), layer(x))


def test_hugging_face_trainer_trains_only_the_adapters_and_generate_works(tmp_path):
    model = get_radargate_model(tiny_llama(), RadarGateConfig(target_modules=["q_proj", "v_proj"],
                                                              num_experts=3, rank=4, top_k=2))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (8, 12), generator=g)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    # default remove_unused_columns: Trainer reads the wrapped model's forward signature
    out = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    model.eval()
    prompt = torch.randint(0, 64, (2, 5), generator=g)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **kw)
    assert cached.shape == (2, 9)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))


class _Net(nn.Module):
    def __init__(self, d=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj, self.v_proj, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.v_proj(self.q_proj(x)))


def _snapshot(model):
    """Everything a failed load must leave as it was: the module tree (objects, not copies),
    every parameter's value and requires_grad."""
    return ([(n, id(m)) for n, m in model.named_modules()],
            [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()])


def _assert_unchanged(model, snap):
    mods, params = _snapshot(model)
    assert mods == snap[0]
    assert [(n, g) for n, _, g in params] == [(n, g) for n, _, g in snap[1]]
    for (n, v, _), (_, w, _) in zip(params, snap[1]):
        assert torch.equal(v, w), n


def _saved(tmp_path, **cfg):
    cfg = RadarGateConfig(**{"target_modules": ["q_proj", "v_proj"], "num_experts": 3, "rank": 2,
                             "modules_to_save": ["head"], **cfg})
    get_radargate_model(_Net(seed=1), cfg).save_pretrained(str(tmp_path))
    return tmp_path


def _rewrite(path, change):
    from safetensors.torch import load_file, save_file
    f = path / "radargate_model.safetensors"
    save_file(change(load_file(str(f))), str(f))


def _edit_config(path, **kv):
    f = path / "radargate_config.json"
    f.write_text(json.dumps(dict(json.loads(f.read_text()), **kv)))


def _truncate(path):
    f = path / "radargate_model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])


@pytest.mark.parametrize("case", ["truncated file", "num_experts", "rank", "missing key",
                                  "missing modules_to_save key", "extra key", "fp16 weights",
                                  "other base dimensions", "missing modules_to_save target"])
def test_failed_from_pretrained_leaves_the_model_unchanged_and_a_retry_works(tmp_path, case):
    path = _saved(tmp_path)
    model = _Net(d=16 if case == "other base dimensions" else 8)
    model.head.requires_grad_(False)  # a caller's own flags are restored too
    if case == "truncated file":
        _truncate(path)
    elif case in ("num_experts", "rank"):
        _edit_config(path, **{case: 4})
    elif case == "missing key":
        _rewrite(path, lambda sd: {k: v for k, v in sd.items() if k != sorted(sd)[-1]})
    elif case == "missing modules_to_save key":  # the saved head's weight: not the base's
        _rewrite(path, lambda sd: {k: v for k, v in sd.items() if k != "head.weight"})
    elif case == "extra key":
        _rewrite(path, lambda sd: dict(sd, nope=torch.zeros(1)))
    elif case == "fp16 weights":
        _rewrite(path, lambda sd: {k: v.half() for k, v in sd.items()})
    elif case == "missing modules_to_save target":
        _edit_config(path, modules_to_save=["nope"])
    snap = _snapshot(model)
    with pytest.raises((ValueError, TypeError)):
        RadarGateModel.from_pretrained(model, str(path))
    _assert_unchanged(model, snap)
    if case != "other base dimensions":  # the same model object loads a good file afterwards
        good = _saved(tmp_path / "good")
        loaded = RadarGateModel.from_pretrained(model, str(good))
        assert isinstance(loaded.base_model.q_proj, RadarGateLoRALinear)


def test_failed_injection_leaves_the_model_unchanged():
    model = _Net()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        get_radargate_model(model, RadarGateConfig(["q_proj"], num_experts=2, rank=2,
                                                   modules_to_save=["nope"]))
    _assert_unchanged(model, snap)
    inject_radargate(model, ["v_proj"], num_experts=2, rank=2)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already RadarGateLoRALinear"):
        inject_radargate(model, ["q_proj", "v_proj"], num_experts=2, rank=2)  # q_proj first
    _assert_unchanged(model, snap)


def test_modules_to_save_load_onto_a_bf16_base_cast_as_peft_does(tmp_path):
    path = _saved(tmp_path)
    model = _Net(seed=2).to(torch.bfloat16)
    loaded = RadarGateModel.from_pretrained(model, str(path))
    from safetensors.torch import load_file
    sd = load_file(str(path / "radargate_model.safetensors"))
    assert loaded.base_model.head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.base_model.head.weight, sd["head.weight"].to(torch.bfloat16))
    assert loaded.base_model.q_proj.lora_A.dtype == torch.float32  # adapters stay fp32


def test_top_level_imports_peft_names_and_bias_pass_through():
    import radargate_kernels as rk
    for name in ("RadarGate", "RadarGateLoRALinear", "RadarGateConfig", "RadarGateModel",
                 "get_radargate_model", "inject_radargate", "from_peft_adapters"):
        assert name in rk.__all__ and getattr(rk, name) is not None
    cfg = rk.RadarGateConfig(["q_proj"], r=4, lora_alpha=8.0, lora_dropout=0.1)
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (4, 8.0, 0.1)
    assert rk.RadarGateConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="r: 8 conflicts with rank=4"):
        rk.RadarGateConfig(["q_proj"], rank=4, r=8)
    with pytest.raises(ValueError, match="r: 4 conflicts with rank=8"):  # explicit, = default
        rk.RadarGateConfig(["q_proj"], rank=8, r=4)
    cfg.rank = 6  # one setting under two names: no stale copy in what is saved or injected
    assert cfg.r == 6 and rk.RadarGateConfig.from_dict(cfg.to_dict()).rank == 6
    cfg.r = 3
    assert cfg.layer_kwargs()["rank"] == 3 and "r" not in cfg.to_dict()
    import dataclasses
    assert dataclasses.replace(cfg, rank=16).r == 16
    base = nn.Linear(4, 6)
    layer = RadarGateLoRALinear(base, num_experts=2, rank=2)
    assert layer.bias is base.bias and layer.weight is base.weight


def test_mixed_dtype_error_says_what_to_do():
    from radargate_kernels import radar_gate
    V = torch.randn(3, 2, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"weights: expected dtype torch.bfloat16 .*cast it, e.g. "
                                        r"weights.to\(expert_out.dtype\)"):
        radar_gate(V, torch.randn(3, 2), torch.randn(4, 2, dtype=torch.bfloat16),
                   torch.randn(2, 2, dtype=torch.bfloat16))
    gate = RadarGate(4, 2, rank=2)  # a module casts fp32 routing weights to a bf16 input's dtype
    assert gate(V, torch.softmax(torch.randn(3, 2), -1)).dtype == torch.bfloat16


def test_switches_and_strings_are_not_guessed(tmp_path):
    """Issue #26: a string switch is truthy ("false" would turn rotation on) and a string
    modules_to_save is a sequence of letters: the first raises naming the field (also from a
    JSON config), the second is one module name."""
    d = RadarGateConfig(target_modules=["q_proj"], num_experts=2, rank=2).to_dict()
    with pytest.raises(TypeError, match="rotation: expected True or False"):
        RadarGateConfig.from_dict(dict(d, rotation="false"))
    with pytest.raises(TypeError, match="angle_bias: expected True or False"):
        RadarGate(4, 2, angle_bias="no")
    with pytest.raises(TypeError, match="modules_to_save"):
        RadarGateConfig(target_modules=["q_proj"], modules_to_save=3)
    cfg = RadarGateConfig(target_modules=["q_proj", "v_proj"], num_experts=2, rank=2,
                          modules_to_save="head")
    assert cfg.modules_to_save == ["head"]
    model = get_radargate_model(_Net(), cfg)
    assert all(p.requires_grad for p in model.base_model.head.parameters())
    assert any(k.startswith("head.") for k in radargate_state_dict(model.base_model, "head"))


def test_ranks_above_the_kernels_limit_run():
    """Issue #26: what the constructor accepts runs; ranks 128 and 96 (beyond the Triton
    kernels' 64) take the PyTorch path, trained and saved as any other."""
    torch.manual_seed(0)
    layer = RadarGateLoRALinear(nn.Linear(16, 8), num_experts=3, rank=128, gate_rank=96,
                                top_k=2)
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.gate.rot_up.grad is not None
    model = get_radargate_model(_Net(), RadarGateConfig(target_modules=["q_proj"], rank=65,
                                                        num_experts=2))
    model(torch.randn(3, 8)).sum().backward()


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_checkpointing_counts_once_and_keeps_the_aux_loss_gradient(fused):
    """Issue #26: checkpointing re-runs forward in backward. routing_counts must count a batch
    once and aux_loss keep its gradient (use_reentrant=False); with use_reentrant=True forward
    runs without autograd: aux_loss still has one (the router's probabilities recomputed)."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    layer = RadarGateLoRALinear(nn.Linear(8, 8), num_experts=4, rank=2, top_k=2, fused=fused)
    x = torch.randn(6, 8, requires_grad=True)
    layer(x)
    once = layer.routing_counts.clone()
    layer.reset_stats()
    y = checkpoint(layer, x, use_reentrant=False)
    aux = layer.aux_loss
    (y.sum() + aux).backward()
    assert torch.equal(layer.routing_counts, once)
    assert aux.grad_fn is not None and layer.router.weight.grad.abs().sum() > 0
    layer.reset_stats()
    layer.zero_grad()
    y = checkpoint(layer, x, use_reentrant=True)  # forward without autograd, then recomputed
    aux = layer.aux_loss
    assert aux.grad_fn is not None  # the router's probabilities again, with autograd
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0  # aux alone trains the router
    y.sum().backward()
    assert torch.equal(layer.routing_counts, once)
