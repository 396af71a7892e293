"""The CUDA focal-loss fast path (csrc/cuda/focal_loss_sparse_kernels.cu), the general focal-loss
kernels (csrc/cuda/focal_loss_kernels.cuh) and the calibration rows kernel
(csrc/cuda/calibration_kernels.cu) compile to the code ../shared/design/GPU.md asks for,
checked on this GPU-less machine from ptxas's register report and the sm_90 SASS: every layout's
logits are loaded (and the gradient stored) 16 bytes at a time, one MUFU.EX2 per element per
pass, within the instruction budget, no spills in the element passes.
Needs nvcc (the .cu files have no torch headers: each compiles on its own) and the cuobjdump
that Triton bundles."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "focal_loss_sparse_kernels.cu")
NVCC = shutil.which("nvcc")
KERNEL = re.compile(r"focal_loss_sparse_forward_kernelI(13__nv_bfloat16|6__half|f)"
                    r"Li(\d+)ELi(\d+)ELi(\d+)ELb([01])E")
VEC = {"13__nv_bfloat16": 8, "6__half": 8, "f": 4}
# GPU.md: instructions per element the H100 can issue at 3 TB/s
BUDGET = {"13__nv_bfloat16": 39, "6__half": 39, "f": 79}
# (threads a row, chunks a thread, CTAs a row) of rows that start 16-byte aligned, and of rows
# that share their first and last chunks with their neighbours (at most 4 chunks a thread)
LAYOUTS = {(4, 1, 1), (8, 1, 1), (16, 1, 1), (32, 1, 1), (32, 2, 1), (32, 4, 1), (64, 4, 1),
           (128, 4, 1), (256, 4, 1), (256, 8, 1), (512, 8, 1), (512, 8, 2), (512, 8, 4),
           (512, 8, 8)}
SHARED_LAYOUTS = {(4, 1, 1), (8, 1, 1), (16, 1, 1), (32, 1, 1), (32, 2, 1), (32, 4, 1),
                  (64, 4, 1), (128, 4, 1), (256, 4, 1), (512, 4, 1), (512, 4, 2), (512, 4, 4),
                  (512, 4, 8)}

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def cuobjdump():
    triton = pytest.importorskip("triton")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        pytest.skip("Triton's bundled cuobjdump not found")
    return path


def ptxas(arch, out, source=SOURCE, flags=()):
    """ptxas -v's report of the build of source for sm_{arch}; the cubin written to out."""
    r = subprocess.run([NVCC, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                        "-Xptxas", "-v", "-cubin", *flags, "-o", out, source],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stderr


def key(m):
    """(dtype, *template ints) of a kernel name's match."""
    return (m.group(1), *map(int, m.groups()[1:]))


def spills_of(report, kernel):
    """{key: spill bytes} of the kernels that match `kernel` in a ptxas report."""
    spills, current = {}, None
    for line in report.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            m = kernel.search(entry.group(1))
            current = key(m) if m else None
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill and current is not None:
            spills[current] = max(int(spill.group(1)), int(spill.group(2)))
    return spills


def compile_cubin(arch, out, source=SOURCE, kernel=KERNEL, flags=()):
    """{key: spill bytes} from ptxas -v; the cubin written to out."""
    return spills_of(ptxas(arch, out, source, flags), kernel)


_SM90 = {}  # (source, flags): (ptxas report, SASS), one build for every fixture that reads it


def compile_sass(tmp_path_factory, source, kernel, flags=()):
    """(spills, {key: SASS instructions}) of the sm_90 build of source."""
    if (source, flags) not in _SM90:
        out = str(tmp_path_factory.mktemp("cubin") / "k90.cubin")
        report = ptxas(90, out, source, flags)
        _SM90[(source, flags)] = report, subprocess.run(
            [cuobjdump(), "-sass", out], capture_output=True, text=True, check=True).stdout
    report, sass = _SM90[(source, flags)]
    kernels = {}
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        m = kernel.search(body.split("\n", 1)[0])
        if m:
            kernels[key(m)] = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]+);", body)
    return spills_of(report, kernel), kernels


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    return compile_sass(tmp_path_factory, SOURCE, KERNEL)


def test_every_layout_is_compiled(sm90):
    spills, kernels = sm90
    expected = {(t, *layout, 1) for t in VEC for layout in LAYOUTS}
    expected |= {(t, *layout, 0) for t in VEC for layout in SHARED_LAYOUTS}
    assert set(spills) == expected and set(kernels) == expected


def test_no_spills_in_the_element_passes(sm90):
    # The aligned cluster kernels (64 registers for two 512-thread CTAs an SM, 8 chunks a thread)
    # keep a few loop invariants in local memory, reloaded once a row outside the element passes:
    # at most 16 bytes.
    spills, kernels = sm90
    for key, spilled in spills.items():
        limit = 16 if key[3] > 1 and key[4] else 0
        assert spilled <= limit, f"{key}: {spilled} bytes spilled"
        local = [i for i in kernels[key] if re.match(r"(@!?U?P\d )?(LDL|STL)\b", i)]
        assert len(local) <= limit // 2, f"{key}: {local}"


def test_16_byte_accesses_and_one_exp2_per_element_per_pass(sm90):
    _, kernels = sm90
    for (t, tpr, items, cluster, aligned), ins in kernels.items():
        count = lambda pat: sum(1 for i in ins if re.search(pat, i))  # noqa: E731
        what = f"{t} {tpr}x{items} cluster {cluster} aligned {aligned}"
        loads = [k for k, i in enumerate(ins) if re.search(r"\bLDG\.E\.128\b", i)]
        first_max = next(k for k, i in enumerate(ins) if re.search(r"\b(HMNMX2|FMNMX)\b", i))
        assert len(loads) == items and loads[-1] < first_max, what  # all issued before a use
        # the gradient, or a fill (a shared chunk element by element beside each)
        assert count(r"\bSTG\.E\.128\b") == 2 * items, what
        elements = VEC[t] * items
        # two passes (the sum, the gradient) and exp(log p_y) for the row
        assert count(r"\bMUFU\.EX2\b") == 2 * elements + 2, what
        assert count(r"\bCALL\b") <= 4, what  # powf and division slow paths, once a row


def common_path(ins):
    """The instructions outside basic blocks that access global memory element by element (SASS
    instructions are 16 bytes each: a branch target's index is its offset / 16)."""
    targets = {int(t, 16) // 16 for i in ins for t in re.findall(r"\bBRA\b.*\b0x([0-9a-f]+)", i)}
    blocks, block = [], []
    for k, i in enumerate(ins):
        if k in targets and block:
            blocks.append(block)
            block = []
        block.append(i)
        if re.search(r"\b(BRA|EXIT|RET)\b", i):
            blocks.append(block)
            block = []
    element = re.compile(r"\b(LDG|STG)\.E(\.U16|\.64)?\s")
    return [i for b in blocks + [block] if not any(element.search(j) for j in b) for i in b]


def test_instructions_per_element_within_the_bandwidth_budget(sm90):
    # the same kernel with more and fewer chunks a thread: the difference is the element passes
    _, kernels = sm90
    for t in VEC:
        grown = len(kernels[(t, 256, 8, 1, 1)]) - len(kernels[(t, 256, 4, 1, 1)])
        assert grown / (4 * VEC[t]) <= BUDGET[t], f"{t}: {grown / (4 * VEC[t]):.1f} an element"
        # Rows that share chunks: their element loads and stores run for at most two chunks of a
        # row (or the tensor's last row); the rest, the -inf masks included, fits the budget.
        grown = (len(common_path(kernels[(t, 32, 4, 1, 0)]))
                 - len(common_path(kernels[(t, 32, 2, 1, 0)])))
        assert grown / (2 * VEC[t]) <= BUDGET[t], f"{t}: {grown / (2 * VEC[t]):.1f} an element"


def test_sm80_build_has_no_spills(tmp_path):
    # sm_80 has no clusters: those kernels compile to a trap the host never launches
    spills = compile_cubin(80, str(tmp_path / "sparse80.cubin"))
    assert spills and all(v == 0 for v in spills.values()), spills


# ---- the general focal-loss kernels: a row's first chunks in registers, the rest streamed ----
GENERAL_KERNEL = re.compile(r"focal_loss_((?:forward|backward)_kernelI(?:f|13__nv_bfloat16))f"
                            r"Lb([01])ELi(\d+)E")
GENERAL_TPR = (4, 8, 16, 32, 256, 512)
GENERAL_ITEMS = 4  # kItems: cached 16-byte chunks a thread


@pytest.fixture(scope="module")
def general90(tmp_path_factory):
    # Only the kernels gated here (the whole 16-bit build takes minutes): fp32 with and without a
    # dense target, bf16 without one (class indices: unaligned rows, sm_80's long rows).
    variants = [(t, d) for t in ("float", "__nv_bfloat16") for d in ("true", "false")
                if not (t == "__nv_bfloat16" and d == "true")]
    lines = ['#include "focal_loss_kernels.cuh"', "namespace calibkernels::general {"]
    lines += [f"template __global__ void focal_loss_{phase}_kernel<{t}, float, {d}, {tpr}>"
              "(const FocalLossLaunch);"
              for t, d in variants for tpr in GENERAL_TPR for phase in ("forward", "backward")]
    source = tmp_path_factory.mktemp("general") / "general.cu"
    source.write_text("\n".join(lines + ["}"]) + "\n")
    return compile_sass(tmp_path_factory, str(source), GENERAL_KERNEL,
                        flags=("-I", os.path.join(ROOT, "csrc", "cuda")))


def test_general_kernels_spills_and_16_byte_accesses(general90):
    spills, kernels = general90
    assert len(kernels) == 3 * 2 * len(GENERAL_TPR) == len(spills)
    for (name, dense, tpr), ins in kernels.items():
        what = f"{name} dense={dense} tpr={tpr}"
        count = lambda pat: sum(1 for i in ins if re.search(pat, i))  # noqa: E731
        local = count(r"^(@!?U?P\d )?(LDL|STL)\b")
        if name.startswith("forward") and "bfloat16" in name and tpr <= 32:
            # ptxas holds these at 80 registers: a few row scalars go to local memory, once a
            # row (10 accesses when written); the cached logits alone would be 32 or more
            assert spills[(name, dense, tpr)] <= 40 and local <= 12, (what, local)
        else:
            assert spills[(name, dense, tpr)] == 0 and local == 0, (what, local)
        # 16-byte loads and stores (rows not 16-byte aligned take element accesses beside them):
        # the forward's cached chunks, then one a pass over the rest of a long row (statistics
        # and gradient; with a dense target also p_sel's and the sums'); the backward's one.
        if name.startswith("forward"):
            loads, stores = GENERAL_ITEMS + (4 if dense else 2), GENERAL_ITEMS + 1
        else:
            loads, stores = 1, 1
        assert count(r"\bLDG\.E\.128\b") == loads and count(r"\bSTG\.E\.128\b") == stores, what


# ---- the calibration rows kernel: a row in registers, read once ----

CALIB_SOURCE = os.path.join(ROOT, "csrc", "cuda", "calibration_kernels.cu")
CALIB_KERNEL = re.compile(r"calibration_rows_kernelI(13__nv_bfloat16|6__half|f)"
                          r"Li(\d+)ELi(\d+)ELb([01])E")
CALIB_LAYOUTS = {(4, 1), (4, 2), (4, 4), (4, 8), (8, 8), (16, 8), (32, 8), (64, 8), (128, 8),
                 (256, 8), (512, 8)}


@pytest.fixture(scope="module")
def calib90(tmp_path_factory):
    return compile_sass(tmp_path_factory, CALIB_SOURCE, CALIB_KERNEL)


def test_calibration_rows_layouts_loads_and_exp2(calib90):
    spills, kernels = calib90
    expected = {(t, *layout, aligned) for t in VEC for layout in CALIB_LAYOUTS
                for aligned in (0, 1)}
    assert set(kernels) == expected
    for (t, tpr, items, aligned), ins in kernels.items():
        what = f"{t} {tpr}x{items} aligned {aligned}"
        # rows not a multiple of 16 bytes load element by element (a few spilled bytes at most)
        assert spills[(t, tpr, items, aligned)] <= (0 if aligned else 48), what
        elements = VEC[t] * items
        # an exp2 an element for the sums, and exp(x_y - max) for the row
        assert sum(1 for i in ins if re.search(r"\bMUFU\.EX2\b", i)) == elements + 1, what
        if aligned:
            loads = [k for k, i in enumerate(ins) if re.search(r"\bLDG\.E\.128\b", i)]
            first = next(k for k, i in enumerate(ins) if re.search(r"\b(HMNMX2|FMNMX)\b", i))
            assert len(loads) == items and loads[-1] < first, what  # all issued before a use


def test_calibration_rows_instructions_per_element(calib90):
    # 4 threads a row with 8 and with 4 chunks a thread: the difference is the element passes
    # (measured 19.3 bf16, 18.5 fp32 when written; the read-only budget is twice GPU.md's)
    _, kernels = calib90
    for t in VEC:
        per_element = ((len(kernels[(t, 4, 8, 1)]) - len(kernels[(t, 4, 4, 1)]))
                       / (4 * VEC[t]))
        assert per_element <= 24, f"{t}: {per_element:.1f} instructions an element"


# ---- the temperature sweep: a warp a row, the row read once for all K temperatures ----

SWEEP_KERNEL = re.compile(r"calibration_sweep_rows_kernelI(13__nv_bfloat16|6__half|f|d)Li(\d+)E")


@pytest.fixture(scope="module")
def sweep90(tmp_path_factory):
    return compile_sass(tmp_path_factory, CALIB_SOURCE, SWEEP_KERNEL)


def test_sweep_reads_each_row_once(sweep90):
    spills, kernels = sweep90
    assert set(kernels) == {(t, j) for t in (*VEC, "d") for j in (1, 2, 4, 8)}
    for (t, j), ins in kernels.items():
        what = f"{t} J={j}"
        count = lambda pat: sum(1 for i in ins if re.search(pat, i))  # noqa: E731
        # global loads: the target, a chunk of 8 logits a lane, then x[y] once a row; the K
        # temperatures come from the parameter bank
        assert count(r"\bLDG\b") == 1 + 8 + 1, what
        shared = [k for k, i in enumerate(ins) if re.search(r"\bLDS\b", i)]
        local = [i for i in ins[shared[0]:shared[-1] + 1] if re.search(r"\b(LDL|STL)\b", i)]
        assert not local, f"{what}: local memory in the element loop: {local}"
        if t == "d":
            continue  # float64 (tests, not speed): its division and log calls spill once a row
        assert spills[(t, j)] == 0, what
        # J sums a lane: an exp2 per staged element and temperature, J to rescale, J for p_y
        assert count(r"\bMUFU\.EX2\b") == j * (len(shared) + 2), what


PARTIALS_KERNEL = re.compile(r"calibration_sweep_partials_kernelI(f|d)E")


def test_sweep_partials_load_a_batch_of_rows_before_using_it(tmp_path_factory):
    # a row's 32 temperatures are one coalesced read; a warp's 8 rows of confidences and NLLs
    # (read-only: LDG.CONSTANT) issued before the first bin is updated in shared memory; the
    # compiler may sink the first row's under its "kept" test
    spills, kernels = compile_sass(tmp_path_factory, CALIB_SOURCE, PARTIALS_KERNEL)
    assert set(kernels) == {("f",), ("d",)}
    for (t,), ins in kernels.items():
        assert spills[(t,)] == 0, t
        assert not [i for i in ins if re.search(r"\b(LDL|STL)\b", i)], t
        values = [k for k, i in enumerate(ins) if re.search(r"\bLDG\.E\S*\.CONSTANT\b", i)]
        first_update = next(k for k, i in enumerate(ins) if re.search(r"\bLDS\b", i))
        assert len(values) == 2 * 8, t
        assert sum(k < first_update for k in values) >= 2 * 7, t


CLASSWISE_KERNEL = re.compile(
    r"calibration_classwise_partials_kernelI(13__nv_bfloat16|6__half|f|d)Lb([01])E")


def test_classwise_partials_load_a_batch_of_rows_before_using_it(tmp_path_factory):
    # a thread a class: 8 rows' targets, the class's values and the rows' sample columns issued
    # before the first bin is updated (in shared memory: the SHARED kernels)
    spills, kernels = compile_sass(tmp_path_factory, CALIB_SOURCE, CLASSWISE_KERNEL)
    assert set(kernels) == {(t, shared) for t in (*VEC, "d") for shared in (0, 1)}
    for (t, shared), ins in kernels.items():
        assert spills[(t, shared)] == 0, t
        assert not [i for i in ins if re.search(r"\b(LDL|STL)\b", i)], t
        if shared:
            first_update = next(k for k, i in enumerate(ins) if re.search(r"\bLDS\b", i))
            loads = sum(1 for i in ins[:first_update] if re.search(r"\bLDG\b", i))
            assert loads >= 3 * 8, f"{t}: {loads} loads before the first bin update"
