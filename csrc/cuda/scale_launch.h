// The launcher of scale_unless_one_kernels.cu (torch-free).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace calibkernels {

// t[0 .. n) *= *scale, unless *scale == 1 (read on the device).
cudaError_t launch_scale_unless_one(DType dtype, void* t, int64_t n, const double* scale,
                                    cudaStream_t stream);

}  // namespace calibkernels
