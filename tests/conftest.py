"""Test setup: the kernel tests run the Triton kernels in the interpreter on CPU.

TRITON_INTERPRET must be set before triton decorates the kernels, so it is set here, before
any test module imports radargate_kernels. (A GPU run: TRITON_INTERPRET=0 pytest, with CUDA.)

The interpreter computes every fp32 ``tl.dot`` in full fp32, while a GPU's tensor cores read
tf32 operands: the fp32 registers' low 13 mantissa bits are ignored (truncation). So that the
tests check the arithmetic a GPU does, ``tf32`` dots here truncate their fp32 operands the same
way, and tf32x3 dots sum the three tf32 products of the operands' hi and lo parts
(``emulate_tf32``; the kernels' "tf32x2" is two tf32 dots of a computed operand's tf32 parts,
tile.mm); their other precision, "ieee", stays exact fp32.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# radar_gate's CPU path is eager by default (RADARGATE_CPU_PATH=compile opts in to the compiled
# reference, tested in test_cpu_path.py and test_op_reliability.py); set explicitly here so an
# environment that opts in does not slow the suite down.
os.environ.setdefault("RADARGATE_CPU_PATH", "eager")


def emulate_tf32():
    """Make the interpreter's tf32 dots truncate fp32 operands to tf32 (10 mantissa bits)."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter as interp
    B = interp.InterpreterBuilder
    if getattr(B, "_tf32_emulated", False):
        return
    orig = B.create_dot

    def truncated(h):
        if h.data.dtype != np.float32:
            return h
        bits = np.ascontiguousarray(h.data).view(np.uint32) & np.uint32(0xFFFFE000)
        return interp.TensorHandle(bits.view(np.float32), h.dtype)

    def rest(h, hi):
        return interp.TensorHandle((h.data - hi.data).astype(np.float32), h.dtype)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = truncated(a), truncated(b)
        elif input_precision == ir.INPUT_PRECISION.TF32x3 and a.data.dtype == np.float32:
            # three tf32 products of the operands' hi and lo parts (lo x lo left out)
            a_hi, b_hi = truncated(a), truncated(b)
            a_lo, b_lo = truncated(rest(a, a_hi)), truncated(rest(b, b_hi))
            acc = orig(self, a_hi, b_hi, d, input_precision, max_num_imprecise_acc)
            acc = orig(self, a_hi, b_lo, acc, input_precision, max_num_imprecise_acc)
            return orig(self, a_lo, b_hi, acc, input_precision, max_num_imprecise_acc)
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)
    B.create_dot = create_dot
    B._tf32_emulated = True


if os.environ["TRITON_INTERPRET"] == "1":
    emulate_tf32()

if os.environ.get("PYTEST_XDIST_WORKER"):  # one pytest-xdist worker per core: no thread contention
    import torch
    torch.set_num_threads(1)
