// calibkernels::scale_unless_one_ on CUDA: t *= scale, where every block reads the scalar on the
// device and exits at once when it is 1 (no host synchronisation, no pass for loss.backward()).
#include <cuda_runtime.h>

#include "cuda_utils.cuh"
#include "scale_launch.h"

namespace calibkernels {
namespace {

// The scale in float64, applied in t's math type (a float64 t keeps every bit of it).
template <typename T>
__global__ void scale_unless_one_kernel(T* __restrict__ t, int64_t n,
                                        const double* __restrict__ scale) {
  using A = typename MathType<T>::type;
  if (*scale == 1.0) return;
  const A s = static_cast<A>(*scale);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    t[i] = from_math<T>(to_math(t[i]) * s);
  }
}

}  // namespace

cudaError_t launch_scale_unless_one(DType dtype, void* t, int64_t n, const double* scale,
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
