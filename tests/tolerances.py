"""Per-dtype tolerance table and the comparison helper every numerical test uses.

How the table is derived. The kernels and the reference both compute in fp32 (fp64 for fp64
inputs) and round once, at the end, to the dtype of the result. Against the exact value
(``truth``: the reference in float64 on the same, already rounded, inputs) a correct kernel
therefore differs by
  (a) fp32 rounding noise of the size of the reference's own: NOISE_FACTOR = 3 times the
      reference's measured error. flash-attention's tests use 2 (neither order of summation is
      better than the other); we measured why 2 is not enough here: over 6 seeds x 28 cases x
      all outputs in fp32 the largest ratio kernel error / ensemble noise (below) was 2.09 (a
      rank-1 dA of one token, kernel 1.3e-5 vs 8 perturbed-input samples 1.9e-6 .. 6.8e-6), the
      next largest 0.32: the kernels evaluate SPEC's backward formulas, a different algorithm
      whose error constant can be a small multiple of the reference's. The reference's error is measured as the largest
      over four equivalent evaluations (original layout, tokens permuted, expert slots permuted,
      Givens pairs permuted; helpers.reference_runs): the same exact values summed in other
      orders, so a case with cancelling sums shows its real noise instead of one lucky sample.
      The kernels also use algebraically different (SPEC-given) formulas -- cosines from the Gram
      matrix, <v^_i, dv^_i> = sum_j S_ij C_ij -- so the ensemble also holds four float64
      evaluations on inputs perturbed by one fp32 unit roundoff: what any backward-stable fp32
      algorithm may return. That term matters in ill-conditioned cases: hypothesis found two
      equal experts at |v| ~ 30 in fp32 where dV's error was 2.25x the worst reordering while
      the kernel in float64 agreed to 5e-15 (the problem amplifies 6e-8 input noise to 2.8e-6);
      plus
  (b) a floor in ulps of the result dtype at the tensor's largest magnitude (FLOOR_ULPS):
      - float16/bfloat16: one ulp, for the final rounding. The Triton interpreter truncates
        fp32 -> bf16 where the reference rounds to nearest (seen in triton 3.9 on this machine),
        so a kernel's value may be a full ulp away where the reference's is half an ulp.
      - float32: four ulps. The kernel's rounding sequence differs from the reference's (cosines
        from the Gram matrix, angle gradient from the rotated u), and on tiny problems the
        reference is sometimes nearly exact by luck, so 2x its error is no bound there. Measured
        over the 29 cases x 3 seeds of test_kernel_vs_reference (fp32, all outputs and
        gradients): the kernel error exceeded 2x the reference's by at most 2.4 fp32 ulps of
        max|truth|; worst kernel error 9.7 ulps where the reference's was 3.4.

| dtype    | allowed max |kernel - truth|                                  |
|----------|------------------------------------------------------------------|
| float64  | 1e-10 * max|truth| + 3 * ensemble noise (fp64 perturbations) ²     |
| float32  | 3 * max|ref32 - truth| + 4 * 2**-23 * max|truth|                 |
| float16  | 3 * max|ref16 - truth| + 2**-10 * max|truth|                     |
| bfloat16 | 3 * max|refbf16 - truth| + 2**-7 * max|truth|                   |

² The relative bound of issue #2; the noise term only matters where the exact value is 0 by
cancellation (hypothesis: two equal experts make dA exactly 0 in exact arithmetic, the fp64
reference returned 1e-32 noise, the kernel 0 -- "relative error" is undefined there).

The reference's own error (max|ref_dtype - truth|) is measured per test on the same inputs, so
the bound follows the conditioning of each case instead of a guessed constant.

The fused RadarGate-LoRA op (``radar_gate_lora``) uses the same table; its ensemble adds float64
runs of its own algorithm with the parameter products P = B B^T and Q = B rot_down rounded by one
unit roundoff (tests/lora_helpers.py, ``_factor_rounding_run``): that op is backward stable with
respect to (s, P, Q), and a hypothesis case (|B| ~ 30, r = 1, repeated experts) showed errors
5.7x the input-perturbation noise that vanished when P and Q were accumulated in float64.

Parameter gradients (dA, dB, dangle_bias) are sums over tokens and can cancel: their rounding error
scales with the summands, not with the sum, and on a tensor of one element (r = 1, D = 2) the
reference's error is a single sample that can be small by luck (seen: a dB of 296 cancelling terms,
kernel 24 ulps vs reference 6 ulps of |dB|). For them max|truth| above is replaced by
max(sum_t |contribution of token t|) (helpers.param_grad_abs_scale), the scale that rounding-error
analysis of a sum gives.
"""
import torch

NOISE_FACTOR = 3.0
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
FLOOR_ULPS = {torch.float32: 4.0, torch.float16: 1.0, torch.bfloat16: 1.0}
FP64_RTOL = 1e-10


def assert_matches(name, kernel, ref, truth, dtype, scale=None):
    """kernel: result in ``dtype``; ref: the reference's result in ``dtype`` or a list of them
    (equivalent reorderings); truth: float64 reference. ``scale`` replaces max|truth| in the
    floor term (sums over tokens). Raises with a clear report."""
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    ref = refs[0]
    assert kernel.shape == truth.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    assert kernel.dtype == ref.dtype, f"{name}: dtype {kernel.dtype} != {ref.dtype}"
    if truth.numel() == 0:
        return
    k, t = kernel.double(), truth.double()
    ref_err = max((r.double() - t).abs().max().item() for r in refs)
    scale = t.abs().max().item() if scale is None else max(scale, t.abs().max().item())
    err = (k - t).abs().max().item()
    if dtype == torch.float64:
        bound = FP64_RTOL * scale + NOISE_FACTOR * ref_err
    else:
        bound = NOISE_FACTOR * ref_err + FLOOR_ULPS[dtype] * ULP[dtype] * scale
    assert err <= bound, (f"{name} [{dtype}]: max|kernel - truth| = {err:.3e} > bound {bound:.3e} "
                          f"(max|ref - truth| = {ref_err:.3e} over {len(refs)} orderings, "
                          f"max|truth| = {scale:.3e})")
