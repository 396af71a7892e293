// calibkernels::scale_unless_one_ on CUDA: t *= scale, where every block reads the scalar on the
// device and exits at once when it is 1 (no host synchronisation, no pass for loss.backward()).
#include <cuda_runtime.h>

#include "cuda_utils.cuh"
#include "scale_launch.h"

namespace calibkernels {
namespace {

template <typename T>
__global__ void scale_unless_one_kernel(T* __restrict__ t, int64_t n,
                                        const float* __restrict__ scale) {
  const float s = *scale;
  if (s == 1.0f) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    t[i] = from_math<T>(static_cast<typename MathType<T>::type>(to_math(t[i]) * s));
  }
}

}  // namespace

cudaError_t launch_scale_unless_one(DType dtype, void* t, int64_t n, const float* scale,
                                    cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    scale_unless_one_kernel<T><<<grid, 256, 0, stream>>>(static_cast<T*>(t), n, scale);
    return cudaGetLastError();
  });
}

}  // namespace calibkernels
