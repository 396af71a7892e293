"""Builds calibkernels._C against the torch that is installed: the op schemas, the CPU kernels for
every x86-64 instruction set (DEFAULT, AVX2, AVX-512, chosen at run time), and the CUDA kernels
when the toolchain can build them (torch a CUDA build and nvcc found; no GPU needed).

    pip install --no-build-isolation .        (pip's isolated build would not see your torch)
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
except ImportError:
    raise SystemExit(
        "calibkernels compiles against the torch you have installed, and this build cannot see "
        "one (pip's build isolation hides it, or torch is not installed). Install torch first, "
        "then build without isolation:\n"
        "    pip install torch\n"
        "    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)"
    ) from None

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

X86 = platform.machine() in ("x86_64", "AMD64")
# Each csrc/cpu/*.cpp is compiled once per instruction set, as ATen's own kernels are; at::vec
# picks its width from CPU_CAPABILITY_*, and the namespace CPU_CAPABILITY keeps the copies apart.
CPU_CAPABILITIES = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
if not X86:
    CPU_CAPABILITIES = {"DEFAULT": CPU_CAPABILITIES["DEFAULT"]}


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
# -ffp-contract=off: the same scalar expression rounds the same wherever it is inlined, so a
# gradient written in the forward is bit for bit the one the backward would recompute.
CXX = ["-O3", "-fopenmp", "-ffp-contract=off"] + (["-DCALIBKERNELS_X86_CAPABILITIES"] if X86 else [])


class BuildWithCpuCapabilities(BuildExtension):
    """torch's BuildExtension, plus the CPU kernels compiled once per instruction set (with its
    compiler wrapper, so torch's flags and ninja apply) and linked into the same library."""

    def build_extension(self, ext):
        sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
        cxx = [f for f in ext.extra_compile_args["cxx"] if not f.startswith("-DCALIBKERNELS_X86")]
        objects = []
        for name, flags in CPU_CAPABILITIES.items():
            objects += self.compiler.compile(
                sources, output_dir=os.path.join(self.build_temp, "cpu_" + name.lower()),
                include_dirs=ext.include_dirs, debug=self.debug, depends=ext.depends,
                extra_postargs={"cxx": cxx + flags, "nvcc": []} if BUILD_CUDA else cxx + flags)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def write_build_info():
    """calibkernels/_build_info.py: what the extension was built against, checked at import."""
    with open(os.path.join(ROOT, "calibkernels", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py: what calibkernels._C was built against (checked at '
                'import)."""\n\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA = {torch.version.cuda!r}\n")
        f.write(f"CUDA_KERNELS = {BUILD_CUDA!r}\n")
        f.write(f"CUDA_ARCHS = {CUDA_ARCHS if BUILD_CUDA else []!r}\n")
        f.write(f"CPU_CAPABILITIES = {list(CPU_CAPABILITIES)!r}\n")


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp"))
    depends = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/cpu/*.h"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if not (BUILD_CUDA and cuda_sources):
        return [CppExtension("calibkernels._C", sources, include_dirs=include_dirs,
                             depends=depends, extra_compile_args={"cxx": CXX},
                             extra_link_args=LINK)]
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
                          depends=depends, extra_compile_args={"cxx": CXX, "nvcc": nvcc},
                          extra_link_args=LINK)]


def version():
    with open(os.path.join(ROOT, "calibkernels", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


write_build_info()
EXTRAS = {
    "plot": ["matplotlib"],
    "torchmetrics": ["torchmetrics"],
    "demo": ["matplotlib", "scikit-learn", "tqdm"],
    "bench": ["pytest", "pytest-benchmark", "torchmetrics"],
    "test": ["pytest", "hypothesis", "expecttest", "matplotlib", "scikit-learn", "tqdm",
             "torchmetrics"],
}
EXTRAS["all"] = sorted({p for ps in EXTRAS.values() for p in ps})
setup(
    name="calibkernels",
    version=version(),
    description="Fused focal-loss and calibration-metric kernels for PyTorch",
    packages=find_packages(include=["calibkernels", "calibkernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildWithCpuCapabilities},
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["calibkernels = calibkernels.__main__:main"]},
)
