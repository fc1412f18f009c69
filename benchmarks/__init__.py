"""Benchmarks and evidence tools (not installed with the package): timing harness, sweep, byte
counting (cost_report), AOT compile check (compile_report), fused-layer measurements, GPU lane
(gpu_check). Run from the repository root, e.g. ``python -m benchmarks.compile_report``."""
