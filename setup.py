from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="radargate_kernels",
    version="0.1.0",
    description="Fused Triton kernels for RadarGate (rotation + stretch) gating of LoRA experts",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["radargate_kernels", "radargate_kernels.*"]),
    python_requires=">=3.11",  # the pinned triton 3.9 needs it (requirements-dev.txt)
    # Permissive on purpose: users bring their own (CUDA) torch. Dev/CI pins live in
    # requirements-dev.txt (CPU torch 2.13.0).
    install_requires=["torch>=2.4", "triton>=3.0", "numpy",
                      "safetensors"],  # save_pretrained / from_pretrained (adapters.py)
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"],
                    "bench": ["pytest-benchmark", "matplotlib"]},
    license="Apache-2.0",
)
