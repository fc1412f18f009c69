"""PEFT-style adapter management for RadarGate-LoRA: config, injection, saving and loading.

    config = RadarGateConfig(target_modules=["q_proj", "v_proj"], num_experts=8, rank=8, top_k=2)
    model = get_radargate_model(base_model, config)   # everything but the adapters frozen
    model.print_trainable_parameters()
    ...train...
    model.save_pretrained("out/")                     # radargate_config.json + .safetensors
    model = RadarGateModel.from_pretrained(fresh_base_model, "out/")

Lower level: ``inject_radargate`` (wrap matching ``nn.Linear``s, nothing else),
``radargate_state_dict`` / ``load_radargate_state_dict`` (validated, like
``nn.Module.load_state_dict``) and ``from_peft_adapters`` (trained PEFT LoRAs as frozen experts).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import warnings
from typing import Iterable, NamedTuple, Optional, Union

import torch
from torch import nn

from .nn import RadarGateLoRALinear

CONFIG_NAME = "radargate_config.json"
WEIGHTS_NAME = "radargate_model.safetensors"
_FORMAT_VERSION = 1
_COMPILED_PREFIX = "_orig_mod."  # what torch.compile'd modules put in front of every key


# ---------------------------------------------------------------------------------------- config

@dataclasses.dataclass
class RadarGateConfig:
    """What ``get_radargate_model`` injects. ``target_modules``: a regex matched against the full
    module name, or a list of names / name suffixes. ``modules_to_save``: other modules (names or
    suffixes) to train and save with the adapters, e.g. a new classification head. The other
    fields are ``RadarGateLoRALinear``'s arguments; ``adapter_dtype`` is the dtype of the added
    parameters (fp32 by default, as PEFT: the layer computes in the input's dtype)."""

    target_modules: Union[str, list]
    num_experts: int = 8
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    top_k: Optional[int] = None
    router_temperature: float = 1.0
    gate_rank: int = 8
    tau: float = 1.0
    freeze_experts: bool = False
    rotation: bool = True
    stretch: bool = True
    fused: bool = True
    adapter_dtype: str = "float32"
    modules_to_save: Optional[list] = None
    recompute: Optional[bool] = None
    # PEFT's names r, lora_alpha, lora_dropout are accepted too: aliases of rank, alpha, dropout
    # (properties reading and writing them; not stored twice), see _init_with_peft_names below

    def __post_init__(self):
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = [str(t) for t in self.target_modules]
        elif not isinstance(self.target_modules, str):
            raise TypeError(f"target_modules: expected a regex string or a list of names, got "
                            f"{type(self.target_modules).__name__}")
        if not self.target_modules:
            raise ValueError("target_modules: expected at least one module name or a regex")
        if self.modules_to_save is not None:  # a string is one name, not a list of letters
            self.modules_to_save = _names(self.modules_to_save)
        _dtype_from_name(self.adapter_dtype)
        # the layer's constructor validates the rest; run it once on a tiny layer so a bad
        # config fails here, naming the field, rather than at injection time
        RadarGateLoRALinear(nn.Linear(2, 2, device="meta"), **self.layer_kwargs())

    def layer_kwargs(self) -> dict:
        """The keyword arguments of ``RadarGateLoRALinear`` this config stands for."""
        skip = {"target_modules", "modules_to_save", "adapter_dtype"}
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        kw["adapter_dtype"] = _dtype_from_name(self.adapter_dtype)
        return kw

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), format_version=_FORMAT_VERSION)

    @classmethod
    def from_dict(cls, d: dict) -> "RadarGateConfig":
        d = dict(d)
        version = d.pop("format_version", None)
        if version != _FORMAT_VERSION:
            raise ValueError(f"{CONFIG_NAME}: format_version {version!r} is not supported "
                             f"(this version reads {_FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)} | set(_PEFT_NAMES)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{CONFIG_NAME}: unknown fields {unknown}")
        return cls(**d)

    def save(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str) -> "RadarGateConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"directory: {directory} has no {CONFIG_NAME}")
        with open(path) as f:
            return cls.from_dict(json.load(f))


_PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}
_dataclass_init = RadarGateConfig.__init__


def _init_with_peft_names(self, *args, r=None, lora_alpha=None, lora_dropout=None, **kwargs):
    for peft, value in (("r", r), ("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout)):
        own = _PEFT_NAMES[peft]
        if value is not None:
            if own in kwargs and kwargs[own] != value:
                raise ValueError(f"{peft}: {value!r} conflicts with {own}={kwargs[own]!r} (the "
                                 f"same setting; give one)")
            kwargs[own] = value
    _dataclass_init(self, *args, **kwargs)


def _alias(own):
    return property(lambda self: getattr(self, own), lambda self, v: setattr(self, own, v),
                    doc=f"PEFT's name of ``{own}``")


RadarGateConfig.__init__ = _init_with_peft_names
for _peft, _own in _PEFT_NAMES.items():
    setattr(RadarGateConfig, _peft, _alias(_own))


def _dtype_from_name(name: str) -> torch.dtype:
    allowed = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
               "float16": torch.float16}
    if name not in allowed:
        raise ValueError(f"adapter_dtype: expected one of {sorted(allowed)}, got {name!r}")
    return allowed[name]


# ------------------------------------------------------------------------------------- injection

def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _strip_compiled(name: str) -> str:
    return name.replace(_COMPILED_PREFIX, "")


@contextlib.contextmanager
def all_or_nothing(model: nn.Module):
    """Undo, if the block raises, every change it made to ``model``'s module tree (submodules
    swapped) and to its parameters' ``requires_grad``: a failed injection or load leaves the
    caller's model as it was, so a retry starts from the same model."""
    children = [(m, name, c) for m in model.modules() for name, c in m._modules.items()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for m, name, c in children:
            m._modules[name] = c
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def inject_radargate(model: nn.Module, target_modules: Union[str, Iterable[str]],
                     **layer_kwargs) -> list:
    """Replace every ``nn.Linear`` whose qualified name matches ``target_modules`` (a regex
    matched against the full name, or names / name suffixes) by a ``RadarGateLoRALinear``
    wrapping it. Returns the replaced names.

    Only the wrapped layers' base weights are frozen; ``get_radargate_model`` also freezes the
    rest of the model (PEFT's convention). Raises if nothing matches or a match is already
    injected. A Linear registered under several names (shared / tied) gets one wrapper, set at
    every name, so the sharing is kept."""
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    with all_or_nothing(model):
        return _inject(model, target_modules, layer_kwargs)


def _inject(model, target_modules, layer_kwargs):
    wrappers, replaced, already = {}, [], []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not _matches(_strip_compiled(name), target_modules):
            continue
        if isinstance(module, RadarGateLoRALinear):
            already.append(name)
            continue
        if not isinstance(module, nn.Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, RadarGateLoRALinear):  # the base of an earlier wrapper
            already.append(parent_name)
            continue
        if id(module) not in wrappers:
            wrappers[id(module)] = RadarGateLoRALinear(module, **layer_kwargs)
        setattr(parent, child, wrappers[id(module)])
        replaced.append(name)
    if already:
        raise ValueError(f"target_modules: {sorted(set(already))[:5]} are already "
                         f"RadarGateLoRALinear layers (injecting twice would wrap the wrappers)")
    if not replaced:
        raise ValueError(f"target_modules: {target_modules!r} matches no nn.Linear of the model")
    return replaced


def _added_param_names(model: nn.Module) -> dict:
    """Names of the parameters injection added -> tensor (state_dict names, with prefixes)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, RadarGateLoRALinear):
            prefix = f"{name}." if name else ""
            for k, v in module.state_dict(keep_vars=True).items():
                if not k.startswith("base."):
                    out[prefix + k] = v
    return out


def _names(modules_to_save) -> list:
    """None, one module name or a list of names -> a list (a string is one name, not letters)."""
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str):
        return [modules_to_save]
    if not isinstance(modules_to_save, (list, tuple)):
        raise TypeError(f"modules_to_save: expected None, a module name or a list of names, got "
                        f"{type(modules_to_save).__name__}")
    return [str(m) for m in modules_to_save]


def _modules_to_save_params(model: nn.Module, modules_to_save) -> dict:
    out = {}
    modules_to_save = _names(modules_to_save)
    if not modules_to_save:
        return out
    found = set()
    for name, module in model.named_modules():
        stripped = _strip_compiled(name)
        hit = [m for m in modules_to_save if stripped == m or stripped.endswith("." + m)]
        if name and hit:
            found.update(hit)
            for k, v in module.state_dict(prefix=f"{name}.", keep_vars=True).items():
                out[k] = v
    missing = sorted(set(modules_to_save) - found)
    if missing:
        raise ValueError(f"modules_to_save: {missing} match no module of the model")
    return out


# ---------------------------------------------------------------------------------- state dicts

def radargate_state_dict(model: nn.Module, modules_to_save=None) -> dict:
    """The parameters injection added (experts, routers, gates), plus every other parameter
    that requires grad (a trained head, embeddings you unfroze) and the modules named in
    ``modules_to_save``: what was trained is saved. Base weights that stay frozen are not.
    Keys are those of ``model.state_dict()``, without ``torch.compile``'s ``_orig_mod.``."""
    out = {k: v.detach() for k, v in _added_param_names(model).items()}
    for name, p in model.named_parameters():
        if p.requires_grad and name not in out:
            out[name] = p.detach()
    for k, v in _modules_to_save_params(model, modules_to_save).items():
        out[k] = v.detach()
    return {_strip_compiled(k): v for k, v in out.items()}


class LoadResult(NamedTuple):
    missing_keys: list
    unexpected_keys: list


def load_radargate_state_dict(model: nn.Module, state_dict: dict, strict: bool = True,
                              modules_to_save=None):
    """Load what ``radargate_state_dict`` saved into an injected model.

    Every key, shape and dtype is checked before anything is written: on an error the model is
    unchanged. Keys may carry ``torch.compile``'s ``_orig_mod.`` prefix or not, on either side.
    Required keys: the injected parameters and the state of ``modules_to_save`` (what
    ``radargate_state_dict`` saved for them); other keys must name a parameter or buffer of the
    model (e.g. a trained head). Returns ``(missing_keys, unexpected_keys)`` like
    ``nn.Module.load_state_dict``; with ``strict=True`` (default) either being non-empty raises.
    """
    targets = {_strip_compiled(k): v for k, v in model.state_dict(keep_vars=True).items()}
    added = set(_strip_compiled(k) for k in _added_param_names(model))
    required = added | set(_strip_compiled(k)
                           for k in _modules_to_save_params(model, modules_to_save))
    given = {}
    for k, v in state_dict.items():
        key = _strip_compiled(k)
        if key in given:
            raise ValueError(f"state_dict: key {key!r} appears twice (with and without "
                             f"{_COMPILED_PREFIX!r})")
        given[key] = v
    missing = sorted(required - set(given))
    unexpected = sorted(set(given) - set(targets))
    if strict and (missing or unexpected):
        raise ValueError(f"state_dict: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                         f", unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected; nothing was loaded)")
    plan = []
    for key, value in given.items():
        if key not in targets:
            continue
        dest = targets[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}]: expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(dest.shape):
            raise ValueError(f"state_dict[{key!r}]: expected shape {tuple(dest.shape)}, got "
                             f"{tuple(value.shape)} (nothing was loaded)")
        if value.dtype != dest.dtype:
            if key not in added and value.is_floating_point() and dest.is_floating_point():
                value = value.to(dest.dtype)  # a base module (modules_to_save): as PEFT casts
            else:
                raise TypeError(f"state_dict[{key!r}]: expected dtype {dest.dtype}, got "
                                f"{value.dtype} (adapter weights keep their dtype; cast the file "
                                f"first; nothing was loaded)")
        plan.append((dest, value))
    with torch.no_grad():
        for dest, value in plan:
            dest.copy_(value)
    return LoadResult(missing, unexpected)


# -------------------------------------------------------------------------------------- model

def _freeze_all_but_adapters(model: nn.Module, modules_to_save):
    """requires_grad only for the added parameters (those the layers left trainable: see
    ``freeze_experts``) and those of ``modules_to_save``."""
    keep = {id(p) for p in _added_param_names(model).values()
            if isinstance(p, nn.Parameter) and p.requires_grad}
    keep |= {id(p) for p in _modules_to_save_params(model, modules_to_save).values()
             if isinstance(p, nn.Parameter)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def trainable_parameters(model: nn.Module) -> tuple:
    """(trainable, total) parameter counts; shared parameters counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


class RadarGateModel(nn.Module):
    """A model with RadarGate-LoRA layers injected, as ``get_radargate_model`` returns it.

    Calls (``forward``, ``generate``, attribute access) go to the wrapped ``base_model``.
    """

    def __init__(self, base_model: nn.Module, config: RadarGateConfig):
        super().__init__()
        self.base_model = base_model
        self.radargate_config = config
        # forward shows the wrapped model's signature, so tools that inspect it (Trainer drops
        # dataset columns forward does not name) see input_ids, labels, ...
        self.forward = _ForwardTo(self)

    def __getattr__(self, name):
        if name == "base_model":  # not set yet (during __init__): no recursion
            return super().__getattr__(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def aux_loss(self):
        """Sum of the layers' load-balancing losses from the last forward (0 if none)."""
        losses = [m.aux_loss for m in self.base_model.modules()
                  if isinstance(m, RadarGateLoRALinear) and m.aux_loss is not None]
        return sum(losses) if losses else torch.zeros(())

    def get_nb_trainable_parameters(self) -> tuple:
        return trainable_parameters(self)

    def print_trainable_parameters(self):
        trainable, total = trainable_parameters(self)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def state_dict_to_save(self) -> dict:
        return radargate_state_dict(self.base_model, self.radargate_config.modules_to_save)

    def save_pretrained(self, directory: str):
        """Write ``radargate_config.json`` and ``radargate_model.safetensors`` (the adapters and
        ``modules_to_save``; not the base model)."""
        from safetensors.torch import save_file
        sd = self.state_dict_to_save()
        added = set(_added_param_names(self.base_model))
        extra = sorted(k for k in sd if k not in added and not _in_modules_to_save(
            k, self.radargate_config.modules_to_save))
        if extra:
            warnings.warn(f"save_pretrained: also saving trainable parameters outside the adapters "
                          f"and modules_to_save: {extra[:5]}; from_pretrained loads them",
                          stacklevel=2)
        self.radargate_config.save(directory)
        # safetensors wants contiguous tensors that share no storage
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()},
                  os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, is_trainable: bool = False):
        """Inject into ``model`` as the saved config says and load the saved weights. The adapters
        are frozen unless ``is_trainable`` (as PEFT's ``from_pretrained``)."""
        from safetensors.torch import load_file
        config = RadarGateConfig.load(directory)
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"directory: {directory} has no {WEIGHTS_NAME}")
        try:  # read (and so check) the whole file before touching the model
            state = load_file(path)
        except Exception as err:
            raise ValueError(f"directory: {path} is not a readable safetensors file ({err}); "
                             f"the model is unchanged") from err
        with all_or_nothing(model):
            wrapped = get_radargate_model(model, config)
            load_radargate_state_dict(wrapped.base_model, state,
                                      modules_to_save=config.modules_to_save)
            if not is_trainable:
                wrapped.requires_grad_(False)
            return wrapped


class _ForwardTo:
    """Callable that forwards to ``owner.base_model`` and carries its forward's signature
    (an instance attribute, so deepcopy / pickling follow the owner)."""

    def __init__(self, owner):
        self.owner = owner

    def __call__(self, *args, **kwargs):
        return self.owner.base_model(*args, **kwargs)

    @property
    def __signature__(self):
        return inspect.signature(self.owner.base_model.forward)


def _in_modules_to_save(key: str, modules_to_save) -> bool:
    return any(key.startswith(m + ".") or f".{m}." in key for m in _names(modules_to_save))


def get_radargate_model(model: nn.Module, config: RadarGateConfig) -> RadarGateModel:
    """Inject RadarGate-LoRA layers into ``model`` (in place) as ``config`` says, freeze every
    parameter but the added ones and ``config.modules_to_save``, and wrap it in a
    ``RadarGateModel`` (``save_pretrained``, ``print_trainable_parameters``)."""
    if not isinstance(config, RadarGateConfig):
        raise TypeError(f"config: expected a RadarGateConfig, got {type(config).__name__}")
    if isinstance(model, RadarGateModel):
        raise ValueError("model: already a RadarGateModel (injecting twice would wrap the "
                         "wrappers)")
    with all_or_nothing(model):
        _modules_to_save_params(model, config.modules_to_save)  # raises for a missing target
        inject_radargate(model, config.target_modules, **config.layer_kwargs())
        _freeze_all_but_adapters(model, config.modules_to_save)
        return RadarGateModel(model, config)


# -------------------------------------------------------------------------- PEFT adapters in

_UNSUPPORTED_PEFT = {
    "use_dora": "DoRA (use_dora=True)",
    "fan_in_fan_out": "fan_in_fan_out=True (Conv1D-style weights)",
    "lora_bias": "lora_bias=True",
    # options that change the adapter's forward (a plain x A B would silently differ): aLoRA is
    # active only after its invocation tokens; the others reshape, gate or replace the product
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora=True)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora=True)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (adapters on nn.Parameters, not Linear layers)",
}


def lora_variant(layer, name):
    """The PEFT LoRA variant (DoRA, aLoRA, ...) adapter ``name`` of a PEFT layer uses, or None:
    a variant changes the forward, so a plain x A B would silently differ."""
    return getattr(layer, "lora_variant", {}).get(name)


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that it ends."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_peft_adapter(adapter_dir):
    """-> (config dict, {module name: (A [in, r], B [r, out] scaled by alpha / r)})."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"adapter_dirs: {adapter_dir} has no adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter_dirs: {adapter_dir} is a {cfg.get('peft_type')} adapter; only "
                         f"LoRA adapters are supported")
    for key, what in _UNSUPPORTED_PEFT.items():
        if cfg.get(key):
            raise ValueError(f"adapter_dirs: {adapter_dir} uses {what}, which from_peft_adapters "
                             f"does not support")
    if cfg.get("modules_to_save"):
        raise ValueError(f"adapter_dirs: {adapter_dir} has modules_to_save "
                         f"{cfg['modules_to_save']}; from_peft_adapters loads LoRA experts only "
                         f"(the saved copies of those modules would be dropped)")
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter_dirs: {adapter_dir} has no adapter_model.safetensors")
    sd = load_file(path)
    base_alpha = float(cfg.get("lora_alpha", cfg["r"]))
    mods = {}
    for key, W in sd.items():
        if ".lora_A." in key:
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            A = W
            B = sd[key.replace(".lora_A.", ".lora_B.")]
            r = A.shape[0]  # the rank actually used here (rank_pattern included)
            alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, base_alpha))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            mods[name] = (A.t().contiguous(), (B.t() * scale).contiguous())  # [in, r], [r, out]
        elif ".lora_B." not in key:
            raise ValueError(f"adapter_dirs: {adapter_dir} holds {key!r}, which is not a LoRA A/B "
                             f"weight of a Linear (embeddings, biases, magnitudes are not "
                             f"supported)")
    return cfg, mods


def peft_lora_weights(layer: nn.Module, adapter_names=None):
    """A PEFT ``lora.Linear`` holding several adapters -> ``(lora_A [E, in, r], lora_B [E, r,
    out])`` for ``radar_gate_lora``, one expert per adapter (``adapter_names``: which, in order;
    default all of the layer's LoRA adapters), each adapter's scaling (lora_alpha / r, or rsLoRA's
    / sqrt(r)) folded into its B. Ranks may differ: they are zero-padded to the largest (the
    padding adds nothing). DoRA, fan_in_fan_out and LoRA biases raise."""
    lora_A, lora_B = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if not isinstance(lora_A, nn.ModuleDict) or not isinstance(lora_B, nn.ModuleDict):
        raise TypeError(f"layer: expected a PEFT LoRA layer (lora_A / lora_B ModuleDicts), got "
                        f"{type(layer).__name__}")
    names = list(lora_A.keys()) if adapter_names is None else list(adapter_names)
    missing = [n for n in names if n not in lora_A]
    if not names or missing:
        raise ValueError(f"adapter_names: {missing or names} are not LoRA adapters of this layer "
                         f"(it has {list(lora_A.keys())})")
    for n in names:
        if getattr(layer, "use_dora", {}).get(n):
            raise ValueError(f"adapter_names: {n!r} uses DoRA, which is not supported")
        if lora_variant(layer, n) is not None:
            raise ValueError(f"adapter_names: {n!r} uses the LoRA variant "
                             f"{type(lora_variant(layer, n)).__name__}, which is not supported")
        if getattr(layer, "fan_in_fan_out", False):
            raise ValueError("layer: fan_in_fan_out=True (Conv1D-style weights) is not supported")
        if lora_B[n].bias is not None:
            raise ValueError(f"adapter_names: {n!r} has a LoRA bias, which is not supported")
    rank = max(lora_A[n].weight.shape[0] for n in names)
    w = lora_A[names[0]].weight
    A = w.new_zeros((len(names), w.shape[1], rank))
    B = w.new_zeros((len(names), rank, lora_B[names[0]].weight.shape[0]))
    with torch.no_grad():
        for e, n in enumerate(names):
            r = lora_A[n].weight.shape[0]
            A[e, :, :r] = lora_A[n].weight.t()
            B[e, :r, :] = lora_B[n].weight.t() * float(layer.scaling[n])
    return A, B


def from_peft_adapters(model: nn.Module, adapter_dirs, target_modules=None, **layer_kwargs):
    """Load N PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors`` in each
    of ``adapter_dirs``) into ``model`` as N frozen experts per adapted ``nn.Linear``, gated by a
    trainable router and RadarGate (the paper's setting: compose pretrained LoRAs, train only the
    gate). ``target_modules`` defaults to the modules the adapters adapt. Each adapter's
    ``lora_alpha / r`` (per module with ``alpha_pattern`` / ``rank_pattern``; ``sqrt(r)`` with
    rsLoRA) is folded into its B; ranks may differ (zero-padded to the largest). Unsupported
    adapter features (DoRA, fan_in_fan_out, lora bias, modules_to_save, non-Linear targets)
    and adapted modules that do not exist in ``model`` raise, as does a layer argument the adapters
    fix (num_experts, rank, alpha and their PEFT names, freeze_experts). As ``get_peft_model``:
    every other parameter of ``model`` is frozen, and the result is a ``RadarGateModel``
    (``save_pretrained``; the replaced names are ``.radargate_config.target_modules``)."""
    fixed = sorted({"num_experts", "rank", "alpha", "r", "lora_alpha", "freeze_experts"}
                   & set(layer_kwargs))
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: set by the adapters (one expert per adapter, their "
                         f"largest rank, their own scalings folded in, experts frozen); "
                         f"remove {'it' if len(fixed) == 1 else 'them'}")
    adapters = [_read_peft_adapter(d) for d in adapter_dirs]
    if not adapters:
        raise ValueError("adapter_dirs: expected at least one adapter directory")
    linears = {_strip_compiled(n): m for n, m in model.named_modules()}
    for d, (_, mods) in zip(adapter_dirs, adapters):
        absent = sorted(n for n in mods if n not in linears)
        if absent:
            raise ValueError(f"adapter_dirs: {d} adapts {absent[:3]}, which the model does not "
                             f"have")
        wrong = sorted(n for n in mods if not isinstance(linears[n], nn.Linear))
        if wrong:
            raise ValueError(f"adapter_dirs: {d} adapts {wrong[:3]}, which are not nn.Linear")
    names = sorted(set().union(*(set(m) for _, m in adapters)))
    if target_modules is not None:
        names = [n for n in names if _matches(n, target_modules if isinstance(target_modules, str)
                                                 else list(target_modules))]
    rank = max(A.shape[1] for _, m in adapters for A, _ in m.values())
    if isinstance(layer_kwargs.get("adapter_dtype"), torch.dtype):
        layer_kwargs["adapter_dtype"] = str(layer_kwargs["adapter_dtype"]).removeprefix("torch.")
    config = RadarGateConfig(target_modules=names, num_experts=len(adapters), rank=rank,
                             alpha=rank, freeze_experts=True, **layer_kwargs)
    with all_or_nothing(model):
        replaced = inject_radargate(model, names, **config.layer_kwargs())
        _copy_adapters(model, replaced, adapters)
        _freeze_all_but_adapters(model, None)
        return RadarGateModel(model, config)


def _copy_adapters(model, replaced, adapters):
    for name in replaced:
        layer = model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            for e, (_, mods) in enumerate(adapters):
                if name in mods:  # an adapter that does not adapt this module adds nothing
                    A, B = mods[name]
                    layer.lora_A[e, :, :A.shape[1]] = A.to(layer.lora_A.dtype)
                    layer.lora_B[e, :B.shape[0], :] = B.to(layer.lora_B.dtype)
