"""Builds calibkernels._C: the op schemas and CPU kernels always, the CUDA kernels when they exist
and the toolchain can build them (torch a CUDA build and nvcc found; no GPU needed)."""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Real GPUs to build for (SASS), plus PTX of the newest so that later GPUs JIT it. Explicit, because
# torch's own arch detection needs a GPU and this must build without one.
# CALIBKERNELS_CUDA_ARCHS="90" builds one target (faster, e.g. on the GPU machine itself).
CUDA_ARCHS = os.environ.get("CALIBKERNELS_CUDA_ARCHS", "80 90").split()


def find_cuda_home():
    """The CUDA toolkit folder. The nvcc on PATH may be a wrapper script elsewhere, so ask nvcc
    itself (its dry run prints _HERE_=<toolkit>/bin) rather than guess from its path."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    here = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.dirname(here.group(1).strip()) if here else os.path.dirname(os.path.dirname(nvcc))


def want_cuda():
    """CALIBKERNELS_CUDA=0 skips CUDA, =1 requires it; by default CUDA is built whenever torch is a
    CUDA build and nvcc is found (no GPU needed)."""
    import torch

    setting = os.environ.get("CALIBKERNELS_CUDA", "auto")
    if setting == "0":
        return False
    possible = torch.version.cuda is not None and find_cuda_home() is not None
    if setting == "1" and not possible:
        raise SystemExit("CALIBKERNELS_CUDA=1 but torch is not a CUDA build or nvcc was not found")
    return possible


BUILD_CUDA = want_cuda()
if BUILD_CUDA:
    os.environ["CUDA_HOME"] = find_cuda_home()  # read by torch.utils.cpp_extension at import

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

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


def shared_libstdcxx():
    """The shared libstdc++ (the one torch uses), named by its full path. On the GPU image the
    extension came out with a private static copy (ldd listed no libstdc++, and std:: internals
    sat inside _C.so), which mixed with the process's copy and crashed as soon as an error message
    formatted a number; g++ links libstdc++.a when it finds no libstdc++.so. Named first, the
    shared library resolves every std:: symbol."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        path = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libstdc++.so.6"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    return [path] if os.path.isabs(path) and os.path.exists(path) else []


# -fopenmp: at::parallel_for is a header template that is serial without it.
LINK = ["-fopenmp"] + shared_libstdcxx()


def extensions():
    # No -std: torch.utils.cpp_extension passes the standard its own headers need (C++17 up to
    # torch 2.12, C++20 after).
    # -ffp-contract=off: the same scalar expression rounds the same wherever it is inlined, so a
    # gradient written in the forward is bit for bit the one the backward would recompute.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"] + CPU_CAPABILITY_FLAGS[cpu_capability()]
    sources = sorted(glob.glob("csrc/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if not (BUILD_CUDA and cuda_sources):
        return [CppExtension("calibkernels._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=LINK)]
    # pip's CUDA wheels carry headers (cusparse.h, cublas_v2.h) that some toolkits lack.
    for site in sys.path:
        wheel_include = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(wheel_include):
            include_dirs.append(wheel_include)
            break
    nvcc = ["-O3", "-lineinfo"]
    nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    nvcc += [f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]
    return [CUDAExtension("calibkernels._C", sources + cuda_sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                          extra_link_args=LINK)]


setup(
    name="calibkernels",
    version="0.1.0",
    description="Fused focal-loss and calibration-metric kernels for PyTorch",
    packages=find_packages(include=["calibkernels", "calibkernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
)
