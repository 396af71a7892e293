"""The Triton kernels compile to GPU code (sm_80 and sm_90 cubins) on this GPU-less machine: the
interpreter runs them on the CPU but skips what only the compiler checks (types, lowering).

Run in a fresh interpreter without TRITON_INTERPRET, which conftest.py sets for the other tests.
"""

import os
import re
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")


def compile_all():
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import calibkernels.triton_kernels as tk

    cases = []
    for dt, math_t in [("fp32", tl.float32), ("bf16", tl.float32), ("fp16", tl.float32),
                       ("fp64", tl.float64)]:
        acc = "fp64" if dt == "fp64" else "fp32"
        for prob in (False, True):
            target = f"*{dt}" if prob else "*i64"
            cases.append((tk.focal_loss_forward_kernel,
                          {"X": f"*{dt}", "TARGET": target, "WEIGHT": f"*{acc}", "TABLE": "*fp64",
                           "DIVISOR_PARTS": "*fp64", "LOSS": "*fp64" if prob else f"*{dt}",
                           "GRAD": f"*{dt}", "STATS": f"*{acc}", "n_rows": "i64",
                           "n_classes": "i64", "ignore_index": "i64", "eps": "fp64"},
                          # a traced forward (prob) writes the statistics alone
                          {"N_PIECES": 2, "PROB": prob, "HAS_WEIGHT": True, "HAS_GRAD": not prob,
                           "HAS_STATS": True, "DENSE": True, "MEAN": True, "REDUCE": prob,
                           "MATH_T": math_t, "ROWS": 2, "BLOCK_C": 1024, "SINGLE": False,
                           "ROW_ALIGN": 1}))
            cases.append((tk.focal_loss_backward_kernel,
                          {"X": f"*{dt}", "TARGET": target, "WEIGHT": f"*{acc}",
                           "STATS": f"*{acc}", "GRAD_OUTPUT": f"*{dt}", "GRAD": f"*{dt}",
                           "n_rows": "i64", "n_classes": "i64", "ignore_index": "i64",
                           "go_stride": "i64", "eps": "fp64"},
                          {"GO_PER_ROW": prob, "SKIP_ONE": True, "PROB": prob,
                           "HAS_WEIGHT": True, "DENSE": prob, "MATH_T": math_t, "ROWS": 4,
                           "BLOCK_C": 1024, "ROW_ALIGN": 1}))
        cases.append((tk.calibration_rows_kernel,
                      {"X": f"*{dt}", "TARGET": "*i64", "SAMPLES": f"*{acc}", "CORRECT": "*i1",
                       "INSIDE": "*i1", "TICKET": "*i32", "n_rows": "i64", "n_classes": "i64",
                       "ignore_index": "i64"},
                      {"MATH_T": math_t, "ROWS": 2, "BLOCK_C": 1024, "ROW_ALIGN": 1}))
        cases.append((tk.calibration_classwise_partials_kernel,
                      {"X": f"*{dt}", "TARGET": "*i64", "SAMPLES": f"*{acc}", "BETA": "*fp32",
                       "PART_COUNTS": "*i64", "PART_SUMS": "*fp64", "PART_HITS": "*i64",
                       "n_rows": "i64", "n_classes": "i64", "ignore_index": "i64",
                       "rows_per_chunk": "i64"},
                      {"FROM_LOGITS": True, "MATH_T": math_t, "N_BINS": 15, "NB": 16,
                       "BLOCK_R": 16, "BLOCK_K": 32}))
        cases.append((tk.calibration_sweep_rows_kernel,
                      {"X": f"*{dt}", "TARGET": "*i64", "TEMPS": "*fp64", "CONF": f"*{acc}",
                       "NLL": f"*{acc}", "CORRECT": "*i1", "n_classes": "i64",
                       "ignore_index": "i64", "n_temps": "i32"},
                      {"MATH_T": math_t, "BLOCK_T": 128, "BLOCK_C": 64}))
        cases.append((tk.focal_loss_finish_kernel,
                      {"LOSS_PARTS": "*fp64", "n_parts": "i64", "DIVISOR_PARTS": "*fp64",
                       "OUT": f"*{dt}", "n_rows": "i64"},
                      {"MEAN": True, "PROB": False, "BLOCK": 4096}))
    cases.append((tk.focal_loss_divisor_kernel,
                  {"TARGET": "*i64", "WEIGHT": "*fp32", "DIVISOR_PARTS": "*fp64", "n_rows": "i64",
                   "n_classes": "i64", "ignore_index": "i64"},
                  {"HAS_WEIGHT": True, "BLOCK": 1024}))
    for readings in (1, 2):
        cases.append((tk.calibration_top_kernel,
                      {"SAMPLES": "*fp32", "CORRECT": "*i1", "TARGET": "*i64", "INSIDE": "*i1",
                       "BETA": "*fp32", "PART_COUNTS": "*i64", "PART_SUMS": "*fp64",
                       "PART_HITS": "*i64", "PART_TOTALS": "*fp64", "PART_INSIDE": "*i32",
                       "TICKET": "*i32", "COUNTS": "*i64", "CONF_SUMS": "*fp64", "HITS": "*i64",
                       "TOTALS": "*fp64", "n_rows": "i64", "ignore_index": "i64"},
                      {"FIRST": 0, "READINGS": readings, "N_BINS": 15, "NB": 16, "BLOCK_R": 512,
                       "BLOCK_CH": 64}))
    cases.append((tk.calibration_sweep_partials_kernel,
                  {"CONF": "*fp32", "NLL": "*fp32", "CORRECT": "*i1", "TARGET": "*i64",
                   "BETA": "*fp32", "PART_COUNTS": "*i64", "PART_SUMS": "*fp64",
                   "PART_HITS": "*i64", "PART_NLL": "*fp64", "n_rows": "i64", "n_temps": "i32",
                   "ignore_index": "i64"},
                  {"N_BINS": 15, "NB": 16, "BLOCK_R": 512}))
    for arch in (80, 90):
        for fn, signature, constexprs in cases:
            signature = {**signature, **{name: "constexpr" for name in constexprs}}
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                    target=GPUTarget("cuda", arch, 32))
            assert len(kernel.asm["cubin"]) > 0
    # The runtime passes an integer below 2**31 as i32 and one equal to 1 as the constant 1 (N = 1,
    # one temperature, grad_output's stride 1, ...): each kernel both ways too, for sm_90.
    for fn, signature, constexprs in cases:
        narrow = {k: "i32" if v == "i64" else v for k, v in signature.items()}
        ones = {k: 1 for k, v in signature.items() if v in ("i32", "i64")}
        for extra in ({}, ones):
            values = {**constexprs, **extra}
            kernel = triton.compile(
                ASTSource(fn=fn, signature={**narrow, **{k: "constexpr" for k in values}},
                          constexprs=values), target=GPUTarget("cuda", 90, 32))
            assert len(kernel.asm["cubin"]) > 0, (fn.__name__, extra)
    print(f"compiled {len(cases)} kernels for sm_80 and sm_90 (and their i32 and 1 variants)")


def _ptxas_report(ptx, arch):
    """(registers, spill-store bytes) from ptxas -v on the kernel's PTX (Triton's own ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", path, "-o",
                               os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    return (int(re.search(r"Used (\d+) registers", done.stderr).group(1)),
            int(re.search(r"(\d+) bytes spill stores", done.stderr).group(1)))


def focal_layout_gate():
    """Every layout calibkernels.triton_ops.focal_layout picks, compiled for sm_90 with the
    runtime's divisibility-16 hints on pointers (and on C where C % 16 == 0, as the runtime
    specialises): no spills, and 16-byte loads (v4.b32 / v2.b64) where the row alignment allows."""
    import torch
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import calibkernels.triton_kernels as tk
    from calibkernels.triton_ops import (_row_align, calibration_layout, classwise_layout,
                                         focal_layout)

    names = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    seen, failures = set(), []

    def check(fn, signature, constexprs, c, dtype, dt, kind, rows, block, single, warps, align):
        hinted = [k for k, v in signature.items() if v.startswith("*")] + \
            ["n_rows"] + (["n_classes"] if c % 16 == 0 and "n_classes" in signature else [])
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in hinted}
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        kernel = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        ptx = kernel.asm["ptx"]
        regs, spills = _ptxas_report(ptx, 90)
        wide = len(re.findall(r"ld\.global[.\w]*\.(v4\.[bfsu]32|v2\.[bfsu]64) ", ptx))
        line = (f"{fn.__name__.replace('_kernel', ''):<24} {dt} {kind:<6} C={c:<6} "
                f"rows={rows:<3} block={block:<5} single={single:d} warps={warps:<2} "
                f"align={align:<2} regs={regs:<3} spill={spills} wide_loads={wide}")
        print(line)
        if spills or (min(align, 16 // dtype.itemsize) * dtype.itemsize >= 16
                      and block >= 64 and wide == 0):
            failures.append(line)
    for dtype, dt in names.items():
        acc, math_t = ("fp64", tl.float64) if dtype == torch.float64 else ("fp32", tl.float32)
        for kind in ("sparse", "dense", "prob"):
            prob, dense = kind == "prob", kind != "sparse"
            for c in (2, 10, 100, 1000, 4096, 8192, 16384, 32000, 128256):
                rows, block, single, warps = focal_layout(65536, c, dtype, dense)
                align = _row_align(c)
                key = (dt, kind, rows, block, single, warps, align, c % 16 == 0)
                if key in seen:
                    continue
                seen.add(key)
                common = {"X": f"*{dt}", "TARGET": f"*{dt}" if prob else "*i64",
                          "WEIGHT": f"*{acc}", "GRAD": f"*{dt}", "STATS": f"*{acc}",
                          "n_rows": "i64", "n_classes": "i64", "ignore_index": "i64",
                          "eps": "fp64"}
                flags = {"PROB": prob, "HAS_WEIGHT": dense, "DENSE": dense, "MATH_T": math_t,
                         "ROWS": rows, "BLOCK_C": block, "ROW_ALIGN": align}
                kernels = [
                    (tk.focal_loss_forward_kernel,
                     {**common, "TABLE": "*fp64", "DIVISOR_PARTS": "*fp64", "LOSS": "*fp64"},
                     {**flags, "N_PIECES": 2, "HAS_GRAD": True, "HAS_STATS": True, "MEAN": True,
                      "REDUCE": True, "SINGLE": single}),
                    (tk.focal_loss_backward_kernel,
                     {**common, "GRAD_OUTPUT": f"*{dt}", "go_stride": "i64"},
                     {**flags, "GO_PER_ROW": False, "SKIP_ONE": True})]
                for fn, signature, constexprs in kernels:
                    check(fn, signature, constexprs, c, dtype, dt, kind, rows, block, single,
                          warps, align)
        for c in (10, 100, 1000, 32000):
            rows, block, warps = calibration_layout(65536, c, dtype)
            align = _row_align(c)
            key = (dt, "calibration", rows, block, warps, align, c % 16 == 0)
            if key in seen:
                continue
            seen.add(key)
            fn = tk.calibration_rows_kernel
            signature = {"X": f"*{dt}", "TARGET": "*i64", "SAMPLES": f"*{acc}", "CORRECT": "*i1",
                         "INSIDE": "*i1", "TICKET": "*i32", "n_rows": "i64", "n_classes": "i64",
                         "ignore_index": "i64"}
            constexprs = {"MATH_T": math_t, "ROWS": rows, "BLOCK_C": block, "ROW_ALIGN": align}
            check(fn, signature, constexprs, c, dtype, dt, "calib", rows, block, True, warps,
                  align)
    # the top-label state: 16- to 1024-bin tiles (TRITON_MAX_BINS), one reading and both
    for n_bins in (15, 300, 1024):
        nb = triton.next_power_of_2(n_bins)
        for readings in (1, 2):
            check(tk.calibration_top_kernel,
                  {"SAMPLES": "*fp32", "CORRECT": "*i1", "TARGET": "*i64", "INSIDE": "*i1",
                   "BETA": "*fp32", "PART_COUNTS": "*i64", "PART_SUMS": "*fp64",
                   "PART_HITS": "*i64", "PART_TOTALS": "*fp64", "PART_INSIDE": "*i32",
                   "TICKET": "*i32", "COUNTS": "*i64", "CONF_SUMS": "*fp64", "HITS": "*i64",
                   "TOTALS": "*fp64", "n_rows": "i64", "ignore_index": "i64"},
                  {"FIRST": 0, "READINGS": readings, "N_BINS": n_bins, "NB": nb,
                   "BLOCK_R": max(16, min(1024, 8192 // nb)), "BLOCK_CH": max(1, 1024 // nb)},
                  n_bins, torch.float32, "fp32", f"top{readings}", 1, nb, True, 4, 1)
    # the classwise bins at the layouts classwise_layout picks (4 warps, as launched)
    for n_bins in (1, 15, 30, 60, 100, 255, 1000):
        block_k, block_r = classwise_layout(1000, n_bins)
        check(tk.calibration_classwise_partials_kernel,
              {"X": "*fp32", "TARGET": "*i64", "SAMPLES": "*fp32", "BETA": "*fp32",
               "PART_COUNTS": "*i64", "PART_SUMS": "*fp64", "PART_HITS": "*i64",
               "n_rows": "i64", "n_classes": "i64", "ignore_index": "i64",
               "rows_per_chunk": "i64"},
              {"FROM_LOGITS": True, "MATH_T": tl.float32, "N_BINS": n_bins,
               "NB": triton.next_power_of_2(n_bins), "BLOCK_R": block_r, "BLOCK_K": block_k},
              1000, torch.float32, "fp32", f"cw{n_bins}", block_r, block_k, True, 4, 1)
    # the temperature sweep's bins, as calibration_sweep_triton launches them
    for n_bins in (15, 1024):
        nb = triton.next_power_of_2(n_bins)
        check(tk.calibration_sweep_partials_kernel,
              {"CONF": "*fp32", "NLL": "*fp32", "CORRECT": "*i1", "TARGET": "*i64",
               "BETA": "*fp32", "PART_COUNTS": "*i64", "PART_SUMS": "*fp64",
               "PART_HITS": "*i64", "PART_NLL": "*fp64", "n_rows": "i64", "n_temps": "i32",
               "ignore_index": "i64"},
              {"N_BINS": n_bins, "NB": nb, "BLOCK_R": max(16, min(1024, 8192 // nb))},
              n_bins, torch.float32, "fp32", "sweep", 1, nb, True, 4, 1)
    # the mean's divisor (4 warps) and the final sum (8 warps), as triton_ops launches them
    check(tk.focal_loss_divisor_kernel,
          {"TARGET": "*i64", "WEIGHT": "*fp32", "DIVISOR_PARTS": "*fp64", "n_rows": "i64",
           "n_classes": "i64", "ignore_index": "i64"}, {"HAS_WEIGHT": True, "BLOCK": 1024},
          1, torch.int64, "i64", "divisor", 1, 1024, True, 4, 1)
    check(tk.focal_loss_finish_kernel,
          {"LOSS_PARTS": "*fp64", "n_parts": "i64", "DIVISOR_PARTS": "*fp64", "OUT": "*bf16",
           "n_rows": "i64"}, {"MEAN": True, "PROB": False, "BLOCK": 4096},
          1, torch.float64, "fp64", "finish", 1, 4096, True, 8, 1)
    assert not failures, "\n".join(["layouts that spill or load narrow:"] + failures)
    print(f"layout gate: {len(seen)} layouts")


@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="with a GPU the other Triton tests compile and run the kernels")
def test_triton_focal_layouts_do_not_spill():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, "layouts"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "layout gate" in done.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="with a GPU the other Triton tests compile and run the kernels")
def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled" in done.stdout


if __name__ == "__main__":
    focal_layout_gate() if sys.argv[1:] == ["layouts"] else compile_all()
