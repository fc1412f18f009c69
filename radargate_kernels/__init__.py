"""radargate_kernels: fused Triton kernels for RadarGate gating of LoRA experts.

- ``radar_gate``: the op (Triton on CUDA / under TRITON_INTERPRET=1, PyTorch reference otherwise)
- ``radar_gate_reference``: the pure-PyTorch definition of the math (SPEC.md)
- ``RadarGateFunction``: the autograd Function behind the Triton path
"""
from .ops import RadarGateFunction, radar_gate
from .reference import radar_gate_reference

__all__ = ["radar_gate", "radar_gate_reference", "RadarGateFunction"]
__version__ = "0.1.0"
