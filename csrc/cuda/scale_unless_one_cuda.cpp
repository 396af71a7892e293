// CUDA implementation of calibkernels::scale_unless_one_ (scale_unless_one_kernels.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_ops.h"
#include "scale_launch.h"

namespace calibkernels {
namespace {

void scale_unless_one_cuda(const at::Tensor& t, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(scale.numel() == 1 && at::isFloatingType(scale.scalar_type()),
                    "scale_unless_one_: scale must hold one floating value, got shape ",
                    scale.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous() && at::isFloatingType(t.scalar_type()),
                    "scale_unless_one_: t must be a contiguous floating tensor");
  c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor s = scale.to(t.device(), at::kDouble).contiguous();
  const cudaError_t err = launch_scale_unless_one(to_dtype(t.scalar_type()), t.data_ptr(),
                                                  t.numel(), s.const_data_ptr<double>(),
                                                  c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "scale_unless_one_: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CUDA, m) { m.impl("scale_unless_one_", &scale_unless_one_cuda); }

}  // namespace calibkernels
