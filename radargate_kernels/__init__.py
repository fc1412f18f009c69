"""radargate_kernels: fused Triton kernels for RadarGate gating of LoRA experts.

- ``radar_gate_lora``: the fused RadarGate-LoRA layer as one op (x and LoRA weights in, the
  gated sum out; expert outputs never formed). What ``nn.RadarGateLoRALinear`` calls.
- ``radar_gate``: the op on expert outputs you already have ([..., K, D]).
- ``radar_gate_reference`` / ``radar_gate_lora_reference``: the pure-PyTorch definitions
  (contract: docs/SPEC.md; the math lives in reference.py).
- ``RadarGateFunction``: the autograd Function behind radar_gate's Triton path
- modules (``nn.py``): ``RadarGate``, ``RadarGateLoRALinear``; PEFT-style API (``adapters.py``):
  ``RadarGateConfig``, ``get_radargate_model``, ``RadarGateModel``, ``inject_radargate``,
  ``from_peft_adapters``, ``peft_lora_weights``, ``radargate_state_dict``,
  ``load_radargate_state_dict``
"""
from .adapters import (RadarGateConfig, RadarGateModel, from_peft_adapters, get_radargate_model,
                       inject_radargate, load_radargate_state_dict, peft_lora_weights,
                       radargate_state_dict)
from .lora import radar_gate_lora
from .nn import RadarGate, RadarGateLoRALinear
from .ops import RadarGateFunction, radar_gate
from .reference import radar_gate_lora_reference, radar_gate_reference

__all__ = ["radar_gate", "radar_gate_lora", "radar_gate_reference", "radar_gate_lora_reference",
           "RadarGateFunction", "RadarGate", "RadarGateLoRALinear", "RadarGateConfig",
           "RadarGateModel", "get_radargate_model", "inject_radargate", "from_peft_adapters",
           "radargate_state_dict", "load_radargate_state_dict", "peft_lora_weights"]
__version__ = "0.1.0"
