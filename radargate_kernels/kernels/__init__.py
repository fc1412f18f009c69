"""Triton kernels of the RadarGate op: forward.py, backward.py, shared helpers in common.py,
host launchers and block-size rule in launch.py."""
