"""The CPU kernels are built for every x86-64 instruction set (DEFAULT, AVX2, AVX-512) and chosen at
run time (csrc/cpu_dispatch.cpp): each variant this machine runs gives the reference's numbers,
CALIBKERNELS_CPU_CAPABILITY forces a lower one, and no code that a lesser CPU may run uses a wider
instruction set than it has (a wheel built on an AVX-512 machine runs on an AVX2-only one)."""

import re
import shutil
import subprocess

import pytest
import torch

import calibkernels as ck
from calibkernels import reference
from calibkernels._build_info import CPU_CAPABILITIES
from helpers import assert_within_twice_eager, loss_and_grad, make_logits, make_probs

ORDER = ["DEFAULT", "AVX2", "AVX512"]
MACHINE = torch.backends.cpu.get_cpu_capability()
RUNNABLE = [c for c in CPU_CAPABILITIES
            if ORDER.index(c) <= ORDER.index(MACHINE if MACHINE in ORDER else "DEFAULT")]


@pytest.fixture(params=RUNNABLE)
def capability(request, monkeypatch):
    monkeypatch.setenv("CALIBKERNELS_CPU_CAPABILITY", request.param)
    assert ck.cpu_capability() == request.param
    return request.param


def test_every_x86_capability_is_built_and_the_widest_runs_by_default(monkeypatch):
    monkeypatch.delenv("CALIBKERNELS_CPU_CAPABILITY", raising=False)
    if torch.backends.cpu.get_cpu_capability() in ORDER:
        assert CPU_CAPABILITIES == ORDER
    assert ck.cpu_capability() == RUNNABLE[-1]
    monkeypatch.setenv("CALIBKERNELS_CPU_CAPABILITY", "AVX512")  # never above the machine's
    assert ck.cpu_capability() == RUNNABLE[-1]
    monkeypatch.setenv("CALIBKERNELS_CPU_CAPABILITY", "SSE9")
    with pytest.raises(ValueError, match="must be DEFAULT, AVX2 or AVX512"):
        ck.cpu_capability()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("gamma,smoothing,prob", [(3.0, 0.0, False), ("flsd-53", 0.1, False),
                                                  (2.0, 0.0, True)], ids=str)
def test_focal_loss_of_every_capability_is_within_twice_eager(capability, dtype, gamma,
                                                               smoothing, prob):
    # the same formulas at another vector width: sums in another order, so within the
    # CONTRACT §4 rule (2x eager's error against float64), not the same bits
    for seed, (n, c) in enumerate([(64, 10), (16, 1000), (8, 4097)]):
        x, t = make_logits(n, c, dtype, seed=seed, ignore_index=None if prob else -100)
        if prob:
            t = make_probs(x, seed)
        kw = dict(label_smoothing=smoothing, weight=torch.rand(c, dtype=dtype) + 0.5)
        truth = loss_and_grad(reference.focal_loss, x.double(), t.double() if prob else t, gamma,
                              "mean", **dict(kw, weight=kw["weight"].double()))
        ours = loss_and_grad(ck.focal_loss, x, t, gamma, "mean", **kw)
        eager = loss_and_grad(reference.focal_loss, x, t, gamma, "mean", **kw)
        if dtype == torch.float64:
            torch.testing.assert_close(ours[0], truth[0], rtol=1e-10, atol=0)
            torch.testing.assert_close(ours[1], truth[1], rtol=1e-10, atol=1e-15)
        else:
            assert_within_twice_eager(ours[0], eager[0], truth[0], dtype, f"{capability} loss")
            assert_within_twice_eager(ours[1], eager[1], truth[1], dtype, f"{capability} grad")


def test_calibration_of_every_capability(capability):
    from test_calibration import _data

    x, t = _data(3000, 37, dtype=torch.float32, seed=31, ignore=True)
    p = x.softmax(1)
    # probabilities: the same float32 values bin identically at every width
    expected = {"ece": reference.calibration_error(p, t), "brier": reference.brier_score(p, t),
                "classwise_ece": reference.classwise_ece(p, t),
                "adaptive_ece": reference.adaptive_ece(p, t)}
    report = ck.calibration_report(p, t)
    for k, v in expected.items():
        torch.testing.assert_close(report[k], v, rtol=1e-6, atol=1e-7)
    sweep = ck.calibration_sweep(x, t, [0.5, 2.0])
    nll = torch.nn.functional.cross_entropy(x.double() / 2.0, t, ignore_index=-100)
    torch.testing.assert_close(sweep["nll"][1], nll, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_confidence_is_never_correct_at_every_capability(capability, dtype):
    # the AVX-512 row max may drop a NaN that the others keep: the rule must not see it
    from calibkernels.calibration import per_sample
    from test_calibration import poisoned_logits

    for c in [2, 5, 17, 40, 100]:
        x, t, expected = poisoned_logits(c, dtype)
        assert torch.equal(per_sample(x, t)[1], expected), (capability, c)
        assert ck.calibration_bins(x, t).hits.sum() == expected.sum(), (capability, c)


def _global_symbols(library):
    """The library's global and weak (COMDAT) functions: the ones a linker may share between
    translation units. Local symbols (GCC's .isra / .constprop clones) stay in their own."""
    out = subprocess.run(["nm", "--defined-only", library], capture_output=True, text=True,
                         check=True).stdout
    return {parts[2] for parts in (line.split() for line in out.splitlines())
            if len(parts) == 3 and parts[1] in "TWV"}


def _functions(library):
    """{function name: set of mnemonics} from objdump's disassembly of the library."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True,
                         text=True, check=True).stdout
    functions, current = {}, None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            current = functions.setdefault(head.group(1), set())
        elif current is not None:
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1].strip():
                current.add(parts[1].split()[0] + (" zmm" if "zmm" in line else ""))
    return functions


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None or
                    "AVX512" not in CPU_CAPABILITIES, reason="needs binutils and an x86-64 build")
def test_no_code_outside_a_capability_uses_a_wider_instruction_set():
    # Inline functions of torch's headers compiled in an AVX-512 translation unit share their
    # name with the baseline's copies, and the linker keeps one: it must hold no VEX or EVEX
    # instruction, or a lesser CPU would fault (SIGILL) in it.
    import calibkernels._C

    library = calibkernels._C.__file__
    wide, avx512_in_avx2 = [], []
    shared = _global_symbols(library)
    for name, mnemonics in _functions(library).items():
        if name not in shared:
            continue
        in_avx512 = "6AVX512" in name or "AVX512::" in name
        in_avx2 = "4AVX2" in name or "AVX2::" in name
        vex = {m for m in mnemonics if m.startswith("v") or m.startswith("k")}
        if vex and not (in_avx2 or in_avx512):
            wide.append((name, sorted(vex)[:5]))
        if in_avx2 and any(m.endswith("zmm") or m.startswith("k") for m in mnemonics):
            avx512_in_avx2.append(name)
    assert not wide, f"{len(wide)} functions outside the AVX2/AVX512 kernels use AVX: {wide[:5]}"
    assert not avx512_in_avx2, avx512_in_avx2[:5]
