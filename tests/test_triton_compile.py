"""The Triton kernels compile to GPU code (sm_80 and sm_90 cubins) on this GPU-less machine: the
interpreter runs them on the CPU but skips what only the compiler checks (types, lowering).

Run in a fresh interpreter without TRITON_INTERPRET, which conftest.py sets for the other tests.
"""

import os
import subprocess
import sys

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
                           "DIVISOR": "*fp64", "LOSS_ROWS": f"*{acc}", "GRAD": f"*{dt}",
                           "STATS": f"*{acc}", "n_classes": "i64", "ignore_index": "i64",
                           "eps": "fp64"},
                          {"N_PIECES": 2, "PROB": prob, "HAS_WEIGHT": True, "HAS_GRAD": True,
                           "DENSE": True, "MEAN": True, "MATH_T": math_t, "BLOCK_C": 1024}))
            cases.append((tk.focal_loss_backward_kernel,
                          {"X": f"*{dt}", "TARGET": target, "WEIGHT": f"*{acc}",
                           "STATS": f"*{acc}", "GRAD_OUTPUT": f"*{acc}", "GRAD": f"*{dt}",
                           "n_classes": "i64", "ignore_index": "i64", "eps": "fp64"},
                          {"GO_PER_ROW": False, "SKIP_ONE": True, "PROB": prob,
                           "HAS_WEIGHT": True, "DENSE": prob, "MATH_T": math_t,
                           "BLOCK_C": 1024}))
        cases.append((tk.calibration_rows_kernel,
                      {"X": f"*{dt}", "TARGET": "*i64", "SAMPLES": f"*{acc}", "CORRECT": "*i1",
                       "INSIDE": "*i1", "n_classes": "i64", "ignore_index": "i64"},
                      {"MATH_T": math_t, "BLOCK_C": 1024}))
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
    cases.append((tk.calibration_top_partials_kernel,
                  {"SAMPLES": "*fp32", "CORRECT": "*i1", "TARGET": "*i64", "BETA": "*fp32",
                   "PART_COUNTS": "*i64", "PART_SUMS": "*fp64", "PART_HITS": "*i64",
                   "PART_TOTALS": "*fp64", "n_rows": "i64", "ignore_index": "i64"},
                  {"READING": 3, "N_BINS": 15, "NB": 16, "BLOCK_R": 512}))
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
    print(f"compiled {len(cases)} kernels for sm_80 and sm_90")


@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="with a GPU the other Triton tests compile and run the kernels")
def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled" in done.stdout


if __name__ == "__main__":
    compile_all()
