"""Compatibility lane: the kernels with another triton version, in a throwaway venv.

    python -m benchmarks.compat_lane [--triton 3.4.0] [--torch 2.13.0] [--keep]

Creates a venv, installs the given torch (pip's choice for the pin: on this machine the CPU
build on disk) and triton next to it, plus this package and the test dependencies, then runs
(1) the interpreter grid: tests/test_kernel_vs_reference.py and the Triton half of
tests/test_lora.py, and (2) the ahead-of-time compile report, ``--quick`` (sm_80 and sm_90).
Prints one summary line per step and exits non-zero if any step fails. setup.py's floor is the
oldest triton this lane passed with (BENCHMARKS.md lists the runs).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, env=None, cwd=ROOT):
    t0 = time.time()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--triton", default="3.4.0")
    ap.add_argument("--torch", default="2.13.0")
    ap.add_argument("--keep", action="store_true", help="keep the venv (its path is printed)")
    args = ap.parse_args(argv)
    venv = tempfile.mkdtemp(prefix=f"radargate-compat-triton{args.triton}-")
    py = os.path.join(venv, "bin", "python")
    steps = []
    try:
        code, out, sec = run([sys.executable, "-m", "venv", venv])
        assert code == 0, out
        pins = [f"torch=={args.torch}", f"triton=={args.triton}", "numpy", "pytest",
                "hypothesis", "safetensors"]
        code, out, sec = run([py, "-m", "pip", "install", "-q", *pins])
        steps.append(("install", code, sec, out.strip().splitlines()[-1:] if code else []))
        if code:
            raise SystemExit(out[-2000:])
        code, out, sec = run([py, "-m", "pip", "install", "-q", "--no-deps", "-e", "."])
        assert code == 0, out
        _, ver, _ = run([py, "-c", "import torch, triton; print(torch.__version__, "
                                   "triton.__version__)"])
        env = dict(os.environ, TRITON_INTERPRET="1")
        code, out, sec = run([py, "-m", "pytest", "-q", "-p", "no:randomly",
                              "tests/test_kernel_vs_reference.py", "tests/test_lora.py",
                              "-k", "not torch]"], env=env)
        steps.append(("interpreter grid", code, sec, out.strip().splitlines()[-1:]))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code, out, sec = run([py, "-m", "benchmarks.compile_report", "--quick"], env=env)
        summary = [line for line in out.splitlines() if line.startswith("summary")]
        steps.append(("compile report --quick", code, sec, summary or out.strip().splitlines()[-3:]))
        print(f"compat lane: {ver.strip()}")
        for name, code, sec, tail in steps:
            print(f"  {name:24s} {'ok' if code == 0 else 'FAILED'} in {sec:.0f} s: "
                  + " | ".join(tail))
        return 1 if any(code for _, code, _, _ in steps) else 0
    finally:
        if args.keep:
            print(f"venv kept: {venv}")
        else:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
