"""The Triton kernels of both ops: tile.py (shared helpers), stream.py (the three passes over
the output features), relation.py (radar_gate's relation part), launch.py (the one table of
launch settings, and every launch)."""
