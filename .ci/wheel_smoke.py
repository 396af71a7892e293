"""Smoke test of an installed calibkernels wheel (make wheel-check runs it in a fresh venv, from
outside the repository): it imports, its ops run and give the reference's numbers."""

import os
import subprocess
import sys

import torch

import calibkernels as ck
from calibkernels import _build_info, reference

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
assert not ck.__file__.startswith(repo), f"imported the source tree, not the wheel: {ck.__file__}"
x = torch.randn(64, 10, dtype=torch.float64, requires_grad=True)
t = torch.randint(0, 10, (64,))
for capability in _build_info.CPU_CAPABILITIES:
    os.environ["CALIBKERNELS_CPU_CAPABILITY"] = capability
    loss = ck.focal_loss(x, t, gamma="flsd-53", label_smoothing=0.1)
    expected = reference.focal_loss(x, t, gamma="flsd-53", label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss, x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-15)
    report = ck.calibration_report(x.detach(), t)
    torch.testing.assert_close(report["ece"], reference.calibration_error(x.detach(), t))
    print(f"{capability}: focal loss and calibration report match the reference")
version = subprocess.run([sys.executable, "-m", "calibkernels", "--version"], check=True,
                         capture_output=True, text=True).stdout.strip()
print(f"wheel OK: {version}, from {os.path.dirname(ck.__file__)}, built for "
      f"{_build_info.CPU_CAPABILITIES} (CUDA kernels: {_build_info.CUDA_KERNELS})")
