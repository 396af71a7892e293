"""Installing and importing (issue 14): every install path works or stops early with what to run,
an extension built against another torch says so, optional dependencies name their extra, the
import is light, and the command line has a version and a log-friendly demo."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **kw):
    """Runs code in a fresh interpreter from outside the repository (as a user would)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd="/", env=env, timeout=300, **kw)


@pytest.mark.parametrize("editable", [False, True])
def test_an_isolated_build_stops_before_compiling_and_says_what_to_run(editable):
    # pip's default build isolation would hide the installed torch (and an unpinned torch build
    # requirement once fetched 5 GB of another one): the build stops at once instead
    args = [sys.executable, "-m", "pip", "install", "--no-deps", "--dry-run"]
    args += ["-e", ROOT] if editable else [ROOT]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "compiles against the torch you have installed" in output
    assert "pip install --no-build-isolation" in output


def test_an_extension_built_against_another_torch_names_both_and_the_fix():
    done = _python(
        "import sys, types\n"
        "sys.modules['calibkernels._build_info'] = types.SimpleNamespace(\n"
        "    TORCH_VERSION='2.3.0+cpu', TORCH_CUDA=None)\n"
        "import calibkernels\n")
    assert done.returncode != 0
    assert "ImportError: calibkernels was built against torch 2.3.0+cpu (CPU only)" in done.stderr
    import torch

    assert f"but torch {torch.__version__}" in done.stderr
    assert "pip install --no-build-isolation --force-reinstall" in done.stderr


@pytest.mark.parametrize("module,extra,code", [
    ("matplotlib", "plot", "ck.reliability_diagram(torch.randn(8, 3), torch.zeros(8).long())"),
    ("torchmetrics", "torchmetrics", "import calibkernels.torchmetrics_adapter"),
    ("sklearn", "demo", "from calibkernels.demo import load_digits_split; load_digits_split()"),
    ("tqdm", "demo", "from calibkernels.__main__ import main; main(['demo', '--epochs', '1'])"),
])
def test_a_missing_optional_dependency_names_its_extra(module, extra, code):
    done = _python(f"import sys; sys.modules[{module!r}] = None\n"
                   f"import torch, calibkernels as ck\n{code}\n")
    assert done.returncode != 0
    assert f"pip install 'calibkernels[{extra}]'" in done.stderr, done.stderr[-2000:]


def test_import_is_light():
    # neither triton nor torch._inductor until a Triton kernel or torch.compile is used
    done = _python(
        "import sys, torch\n"
        "import calibkernels as ck\n"
        "x, t = torch.randn(16, 10, requires_grad=True), torch.randint(0, 10, (16,))\n"
        "ck.focal_loss(x, t).backward(); ck.calibration_report(x.detach(), t)\n"
        "print(sorted(m for m in ('triton', 'torch._inductor') if m in sys.modules))\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("[]")


def test_version_and_help():
    from calibkernels import __version__

    done = subprocess.run([sys.executable, "-m", "calibkernels", "--version"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"calibkernels {__version__} (torch ")
    for command, words in [("demo", ["digits", "scikit-learn", "minute"]),
                           ("bench", ["8192 x 1000", "torchmetrics", "minutes"])]:
        done = subprocess.run([sys.executable, "-m", "calibkernels", command, "--help"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        for word in words:
            assert word in " ".join(done.stdout.split()), (command, word)


def test_demo_log_in_a_pipe_is_whole_lines(tmp_path):
    # no progress bar (carriage returns) when the output is not a terminal
    done = subprocess.run([sys.executable, "-m", "calibkernels", "demo", "--epochs", "3",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr
    assert "FLSD-53  epoch    3" in done.stdout
