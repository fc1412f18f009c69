"""The Triton kernels of both ops: tile.py (shared helpers), stream.py (the three passes over
the output features: forward, row gradients, parameter gradients), relation.py (the K x K
relation part of radar_gate and of the fused layer, forward and backward), launch.py (the one
table of launch settings, and every launch)."""
