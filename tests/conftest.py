"""Test setup: the kernel tests run the Triton kernels in the interpreter on CPU.

TRITON_INTERPRET must be set before triton decorates the kernels, so it is set here, before
any test module imports radargate_kernels. (A GPU run: TRITON_INTERPRET=0 pytest, with CUDA.)
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# radar_gate's CPU path compiles the reference with inductor on first use; the tests use the
# eager path by default (no compile per dtype) and test the compiled one in test_cpu_path.py.
os.environ.setdefault("RADARGATE_CPU_PATH", "eager")
