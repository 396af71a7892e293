// The general focal-loss row kernels (focal_loss_kernels.cuh) for float16 inputs: one file a
// dtype, so that nvcc compiles them in parallel.
#include "focal_loss_kernels.cuh"

namespace calibkernels {
CK_FOCAL_LOSS_ROWS(, __half)
}  // namespace calibkernels
