from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="radargate_kernels",
    version="0.1.0",
    description="Fused Triton kernels for RadarGate (rotation + stretch) gating of LoRA experts",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["radargate_kernels", "radargate_kernels.*"]),
    python_requires=">=3.11",  # the tested Python; triton 3.9 needs it
    # Permissive on purpose: users bring their own (CUDA) torch. Floors are the tested ones: triton
    # 3.7.1 passed the compatibility lane (benchmarks/compat_lane.py, BENCHMARKS.md) and is what
    # torch 2.13's CUDA build pins; dev/CI versions live in requirements-dev.txt.
    install_requires=["torch>=2.13", "triton>=3.7.1", "numpy",
                      "safetensors"],  # save_pretrained / from_pretrained (adapters.py)
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"],
                    "bench": ["pytest-benchmark", "matplotlib"]},
    license="Apache-2.0",
)
