"""radargate_kernels: fused Triton kernels for RadarGate gating of LoRA experts.

- ``radar_gate_lora``: the fused RadarGate-LoRA layer as one op (x and LoRA weights in, the
  gated sum out; expert outputs never formed). What ``nn.RadarGateLoRALinear`` calls.
- ``radar_gate``: the op on expert outputs you already have ([..., K, D]).
- ``radar_gate_reference`` / ``radar_gate_lora_reference``: the pure-PyTorch definitions
  (contract: docs/SPEC.md; the math lives in reference.py).
- ``RadarGateFunction``: the autograd Function behind radar_gate's Triton path
"""
from .lora import radar_gate_lora
from .ops import RadarGateFunction, radar_gate
from .reference import radar_gate_lora_reference, radar_gate_reference

__all__ = ["radar_gate", "radar_gate_lora", "radar_gate_reference", "radar_gate_lora_reference",
           "RadarGateFunction"]
__version__ = "0.1.0"
