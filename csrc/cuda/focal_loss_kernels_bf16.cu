// The general focal-loss row kernels (focal_loss_kernels.cuh) for bfloat16 inputs: one file a
// dtype, so that nvcc compiles them in parallel.
#include "focal_loss_kernels.cuh"

namespace calibkernels {
CK_FOCAL_LOSS_ROWS(, __nv_bfloat16)
}  // namespace calibkernels
